"""The event stream of `POST /v1/images/generations` with `stream: true`, in the shape of the
OpenAI Images API, so its SDKs parse it: `image_generation.partial_image` events (previews of
the first image: OpenAI's `partial_images` of them, or one per evaluation with our `preview`)
and an `image_generation.completed` event per image, each with the image as `b64_json` at the
top level. The SSE event name equals the `type` field.

The fields OpenAI's events carry are all there (`usage` counts no tokens: there are none);
our own ride along as extra fields, which the SDKs keep: `id`, `step` and `total` on partial
images, the resolved generation parameters (`seed`, `sampler`, `nfe`, ...) and the image's
`index` on completed ones. The native endpoint keeps its `progress`/`completed` events.
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, Field

from denoised.server.http.schemas import GenerationInfo

PARTIAL_IMAGE: Final = "image_generation.partial_image"
COMPLETED: Final = "image_generation.completed"


class _ImageEventFields(BaseModel):
    """What OpenAI's partial and completed events share."""

    b64_json: str = Field(description="The encoded image, base64.")
    created_at: int = Field(description="Unix seconds when the event was made.")
    size: str = Field(description="The requested size, `WxH`.")
    background: Literal["opaque"] = "opaque"
    quality: Literal["auto"] = "auto"


class PartialImageEvent(_ImageEventFields):
    """A low-resolution PNG of the current prediction of the first image."""

    type: Literal["image_generation.partial_image"] = PARTIAL_IMAGE
    partial_image_index: int = Field(
        description="0-based: with `partial_images` k, 0..k-1; with `preview`, `step` - 1."
    )
    output_format: Literal["png"] = "png"
    id: str = Field(description="Request id.")
    step: int = Field(description="Evaluations done, 1..total.")
    total: int = Field(description="Evaluations planned (nfe).")


def partial_image_steps(nfe: int, partial_images: int) -> dict[int, int]:
    """The evaluations (1-based) after which OpenAI's `partial_images` are sent, each mapped to
    its `partial_image_index`. The nfe evaluations are split into k + 1 equal parts, k =
    min(partial_images, nfe), and partial image i follows the evaluation that ends part i + 1:
    evenly spaced, with the final image ending the last part (nfe = 10, k = 2: 4 and 7). With
    k = nfe every evaluation sends one."""
    k = min(partial_images, nfe)
    return {-(-(i + 1) * nfe // (k + 1)): i for i in range(k)}


class InputTokensDetails(BaseModel):
    image_tokens: int = 0
    text_tokens: int = 0


class Usage(BaseModel):
    """OpenAI's token usage; a class label is not tokenised, so every count is 0."""

    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    total_tokens: int = 0


class CompletedEvent(GenerationInfo, _ImageEventFields):
    """One finished image, with the request's resolved parameters."""

    type: Literal["image_generation.completed"] = COMPLETED
    index: int = Field(description="Position in the request's images.")
    usage: Usage = Field(default_factory=Usage)

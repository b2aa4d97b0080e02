"""Request and response bodies of the HTTP API (pydantic; they generate the OpenAPI schema).

Two generation endpoints share the sampling fields:
- `POST /v1/images/generations`: the OpenAI Images API shape (`prompt`, `n`, `size`,
  `response_format`, `model`) plus the extension fields below; `prompt` is a class name.
- `POST /v1/generate`: the native shape; `label` is a class name or a class id.

Limits that depend on the server's settings (largest n, steps, timeout, work per request) and
on the model (its classes, sizes, samplers) are checked after parsing and answered with a 422
naming the field and the allowed values, in the same error shape as schema violations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from denoised.models.checkpoints.model_dir import MAX_GUIDANCE_SCALE
from denoised.models.sampling.samplers import SAMPLER_NAMES
from denoised.server.imaging import OutputFormat
from denoised.server.registry import ConditioningKind

if TYPE_CHECKING:  # the sampler names are known only at run time
    SamplerName = str
else:
    SamplerName = Literal[SAMPLER_NAMES]  # an enumeration in the OpenAPI schema
ResponseFormat = Literal["b64_json", "bytes"]
SamplerOptionValue = bool | int | float | str

# OpenAI Images API values this server cannot honour, and why (a plain "Input should be
# 'png', 'webp' or 'npy'" would not tell an OpenAI client that the value is understood).
# Characters in a prompt or negative prompt: far more than any encoder reads (CLIP's 77 tokens,
# T5's 512), small enough to keep a body's cost bounded.
PROMPT_CHARS = 4000

_UNSUPPORTED_VALUES = {
    "output_format": {"jpeg": "images are encoded losslessly; use 'png', 'webp' or 'npy'"},
    "response_format": {"url": "this server keeps no images to link to; use 'b64_json' or 'bytes'"},
}

# OpenAI Images API fields without a counterpart here: the values accepted (each one means
# what the server does anyway) and why others are refused.
_OPENAI_DEFAULTS_ONLY: dict[str, tuple[tuple, str]] = {
    "quality": (("auto", "standard"), "the model has one quality level"),
    "style": ((), "the models have no styles"),
    "background": (("auto", "opaque"), "images have no alpha channel"),
    "moderation": (("auto",), "this server does not moderate prompts"),
    "output_compression": ((100,), "images are encoded losslessly"),
}


def _unsupported(value: Any, reason: str) -> PydanticCustomError:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    # The text goes in the context: a value's braces must not be read as placeholders.
    return PydanticCustomError(
        "unsupported", "{text}", {"text": f"{shown} is not supported: {reason}"}
    )


class SamplingFields(BaseModel):
    """Fields common to both generation endpoints. Strict: JSON types are not coerced (a
    `"20"` for steps or `true` for n is a 422, not 20 or 1); integers are accepted as floats."""

    model_config = ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False, protected_namespaces=()
    )

    model: str | None = Field(
        None, description="Model id (see GET /v1/models); default: the first served model."
    )
    negative_prompt: str | None = Field(
        None,
        max_length=PROMPT_CHARS,
        description="Text models: what guidance steers away from (the unconditional rows' "
        "prompt; default the empty prompt). Needs guidance (`guidance_scale` other than 1).",
    )
    n: int = Field(1, ge=1, description="Number of images (at most the server's max_n).")
    size: str | None = Field(
        None,
        max_length=32,
        description="`WIDTHxHEIGHT` in pixels, one of the model's sizes, or `auto` (what "
        "OpenAI clients send): the model's native size, also the default.",
        examples=["8x8"],
    )
    sampler: SamplerName | None = Field(None, description="Default: the model's default sampler.")
    steps: int | None = Field(
        None, ge=1, description="Sampler steps (at most the server's max_steps)."
    )
    guidance_scale: float | None = Field(
        None,
        ge=0.0,
        le=MAX_GUIDANCE_SCALE,
        description="Classifier-free guidance scale w in u + w·(c − u); 1 disables guidance.",
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=2**63 - 1,
        description="Random seed; the same request and seed give the same images. Image k "
        "of a request is seeded with seed + k (modulo 2^63): it equals the one image of the "
        "same request with that seed and n = 1. Default: drawn by the server and echoed back.",
    )
    sampler_options: dict[str, SamplerOptionValue] | None = Field(
        None,
        max_length=16,
        description="Sampler-specific options, e.g. `eta` for ddim; unknown names are a 422 "
        "listing the allowed ones.",
        examples=[{"spacing": "linspace"}],
    )
    output_format: OutputFormat = Field(
        "png",
        description="`png`/`webp`: 8-bit RGB or grayscale images; `npy`: float32 arrays "
        "[H, W, C] in [0, 1] (unquantised).",
    )
    response_format: ResponseFormat = Field(
        "b64_json",
        description="`b64_json`: JSON with base64 images; `bytes`: the raw file as the body "
        "(one image, or with `npy` one [n, H, W, C] array).",
    )
    timeout: float | None = Field(
        None, gt=0, description="Seconds until the request fails with 504 if not finished."
    )
    stream: bool = Field(
        False, description="Send Server-Sent Events: `progress` per step, then `completed`."
    )
    preview: bool = Field(
        False,
        description="With `stream`: attach a low-resolution PNG of the current prediction "
        "of the final image to each `progress` event.",
    )

    @field_validator("output_format", "response_format", mode="before")
    @classmethod
    def _known_but_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        assert info.field_name is not None  # set for a field validator
        reason = _UNSUPPORTED_VALUES[info.field_name].get(value) if isinstance(value, str) else None
        if reason:
            raise _unsupported(value, reason)
        return value


class ImagesRequest(SamplingFields):
    """`POST /v1/images/generations` — the OpenAI Images API shape plus extensions."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "digits-dit", "prompt": "3", "n": 2, "size": "8x8"},
                {
                    "prompt": "7",
                    "sampler": "dpmpp-2m",
                    "steps": 20,
                    "guidance_scale": 3.0,
                    "seed": 42,
                    "output_format": "webp",
                },
            ]
        }
    )

    prompt: str | None = Field(
        None,
        max_length=PROMPT_CHARS,
        description="Text models: the prompt (truncated to the model's `max_prompt_tokens`, "
        'as the response\'s `truncated` says). Class models: a class name (e.g. `"3"` for '
        "the digits models). Omitted: the empty prompt, or unconditional generation.",
    )
    user: str | None = Field(None, max_length=256, description="Accepted and ignored (OpenAI).")
    quality: Literal["auto", "standard"] | None = Field(
        None, description="OpenAI: only its defaults are accepted (one quality level)."
    )
    style: None = Field(None, description="OpenAI: not supported (no styles); omit it.")
    background: Literal["auto", "opaque"] | None = Field(
        None, description="OpenAI: images are always opaque."
    )
    moderation: Literal["auto"] | None = Field(
        None, description="OpenAI: only `auto` (this server does not moderate prompts)."
    )
    output_compression: Literal[100] | None = Field(
        None, description="OpenAI: only 100 (images are encoded losslessly)."
    )
    partial_images: int | None = Field(
        None,
        ge=0,
        le=3,
        description="With `stream`: how many partial images (previews of the first image) to "
        "send before the final images, at evenly spaced evaluations; at most one per "
        "evaluation. 0: none. Not together with `preview`, which sends one per evaluation.",
    )

    @field_validator(*_OPENAI_DEFAULTS_ONLY, mode="before")
    @classmethod
    def _openai_defaults_only(cls, value: Any, info: ValidationInfo) -> Any:
        assert info.field_name is not None  # set for a field validator
        accepted, reason = _OPENAI_DEFAULTS_ONLY[info.field_name]
        if value is None or (value in accepted and type(value) is type(accepted[0])):
            return value
        alternatives = " or ".join(repr(v) for v in accepted)
        raise _unsupported(
            value, f"{reason}; omit it" + (f" or use {alternatives}" if accepted else "")
        )

    @field_validator("partial_images")
    @classmethod
    def _partial_images_in_a_stream(cls, value: int | None, info: ValidationInfo) -> int | None:
        # `stream` and `preview` come first, so they are in `info.data` if they were valid.
        if value is not None and info.data.get("preview"):
            raise PydanticCustomError(
                "conflict",
                "set partial_images or preview, not both: preview sends a partial image per "
                "evaluation, partial_images that many in all",
            )
        if value and not info.data.get("stream"):
            raise PydanticCustomError(
                "needs_stream", "partial images are sent as stream events; set stream: true"
            )
        return value


class GenerateRequest(SamplingFields):
    """`POST /v1/generate` — the native endpoint."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "digits-dit",
                    "label": "3",
                    "n": 4,
                    "sampler": "dpmpp-2m",
                    "steps": 20,
                    "guidance_scale": 3.0,
                    "seed": 0,
                },
                {"label": 5, "sampler": "ddim", "sampler_options": {"eta": 1.0}, "stream": True},
            ]
        }
    )

    label: str | int | None = Field(
        None,
        description="Class models: a class name (string) or class id (integer); omitted: "
        "unconditional.",
    )
    prompt: str | None = Field(
        None,
        max_length=PROMPT_CHARS,
        description="Text models: the prompt (class models take it as a class name too).",
    )


class ImageData(BaseModel):
    b64_json: str = Field(description="The encoded image (png/webp file or npy array), base64.")
    index: int = Field(description="Position in the request's images.")


class GenerationInfo(BaseModel):
    """What was generated: the resolved parameters (defaults filled in) and the seed."""

    model_config = ConfigDict(protected_namespaces=())

    id: str = Field(description="Request id (also in the X-Request-ID header).")
    model: str
    label: str | None = Field(description="Class name, or null for unconditional.")
    seed: int
    sampler: str
    steps: int
    nfe: int = Field(description="Backbone evaluations per sample (e.g. Heun: about 2×steps).")
    guidance_scale: float
    sampler_options: dict[str, SamplerOptionValue]
    size: str
    output_format: OutputFormat
    prompt_tokens: int | None = Field(
        None, description="Text models: the prompt's tokens, counted before truncation."
    )
    truncated: bool | None = Field(
        None, description="Text models: whether the prompt was cut to `max_prompt_tokens`."
    )


class ImagesResponse(GenerationInfo):
    """OpenAI shape (`created`, `data`) plus the resolved parameters."""

    created: int = Field(description="Unix seconds.")
    data: list[ImageData]


class Timings(BaseModel):
    queue_seconds: float = Field(description="Admission to first backbone forward.")
    total_seconds: float = Field(description="Admission to encoded images.")


class GenerateResponse(GenerationInfo):
    object: Literal["generation"] = "generation"
    created: int
    images: list[ImageData]
    timings: Timings


class ProgressEvent(BaseModel):
    """Data of a `progress` Server-Sent Event, sent after every backbone evaluation."""

    id: str
    step: int = Field(description="Evaluations done, 1..total.")
    total: int = Field(description="Evaluations planned (nfe).")
    preview: str | None = Field(None, description="Base64 PNG of the current prediction.")


class ModelDefaults(BaseModel):
    sampler: str
    steps: int
    guidance_scale: float
    size: str


class ModelCard(BaseModel):
    """One entry of `GET /v1/models` (OpenAI shape plus what the model can do)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "denoised"
    architecture: str = Field(description="Backbone family: dit, sit, unet, unet-text, mmdit")
    process: str = Field(description="Noise process: vp (diffusion) or flow")
    prediction: str = Field(description="What the backbone predicts: epsilon, v, sample, velocity")
    classes: list[str] | None = Field(
        description="Class names, or null if unconditional or the model has none"
    )
    num_classes: int | None = Field(
        None, description="Classes (ids 0..num_classes−1), or null if unconditional"
    )
    conditioning: ConditioningKind = Field(
        description="What requests condition on: a text prompt, a class label, or nothing"
    )
    max_prompt_tokens: int | None = Field(
        None, description="Text models: the prompt tokens read; longer prompts are truncated"
    )
    sizes: list[str]
    samplers: list[str]
    defaults: ModelDefaults
    latent: bool = Field(description="Whether a VAE decodes latents to pixels")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, not_found, rate_limited, ...")
    param: str | None = Field(None, description="The offending field, where there is one.")
    code: int = Field(description="The HTTP status.")
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"] = "ok"


ReadinessStatus = Literal["loading", "ready", "degraded", "draining", "failed"]


class Readiness(BaseModel):
    ready: bool
    status: ReadinessStatus
    models: list[str]
    detail: dict[str, Any] = Field(default_factory=dict)

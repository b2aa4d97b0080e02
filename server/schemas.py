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

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from denoised.models.samplers import SAMPLER_NAMES

SamplerName = Literal[SAMPLER_NAMES]  # an enumeration in the OpenAPI schema
OutputFormat = Literal["png", "webp", "npy"]
ResponseFormat = Literal["b64_json", "bytes"]
SamplerOptionValue = bool | int | float | str

_SIZE_PATTERN = r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$"


class SamplingFields(BaseModel):
    """Fields common to both generation endpoints."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())

    model: str | None = Field(
        None, description="Model id (see GET /v1/models); default: the first served model."
    )
    n: int = Field(1, ge=1, description="Number of images (at most the server's max_n).")
    size: str | None = Field(
        None,
        pattern=_SIZE_PATTERN,
        description="`WIDTHxHEIGHT` in pixels; one of the model's sizes. Default: its native size.",
        examples=["32x32"],
    )
    sampler: SamplerName | None = Field(None, description="Default: the model's default sampler.")
    steps: int | None = Field(
        None, ge=1, description="Sampler steps (at most the server's max_steps)."
    )
    guidance_scale: float | None = Field(
        None,
        ge=0.0,
        le=100.0,
        description="Classifier-free guidance scale w in u + w·(c − u); 1 disables guidance.",
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=2**63 - 1,
        description="Random seed; the same request and seed give the same images. "
        "Default: drawn by the server and echoed back.",
    )
    sampler_options: dict[str, SamplerOptionValue] | None = Field(
        None,
        max_length=16,
        description="Sampler-specific options, e.g. `eta` for ddim; unknown names are a 422 "
        "listing the allowed ones.",
        examples=[{"eta": 0.5}],
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


class ImagesRequest(SamplingFields):
    """`POST /v1/images/generations` — the OpenAI Images API shape plus extensions."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "digits-dit", "prompt": "3", "n": 2, "size": "32x32"},
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
        max_length=1000,
        description='A class name of the model (e.g. `"3"` for the digits models). '
        "Omitted: unconditional generation.",
    )
    user: str | None = Field(None, max_length=256, description="Accepted and ignored (OpenAI).")


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
        description="A class name (string) or class id (integer); omitted: unconditional.",
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
    architecture: str = Field(description="Backbone family: dit, sit or unet")
    process: str = Field(description="Noise process: vp (diffusion) or flow")
    prediction: str = Field(description="What the backbone predicts: epsilon, v, sample, velocity")
    classes: list[str] | None = Field(description="Class names, or null if unconditional")
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


class Readiness(BaseModel):
    ready: bool
    status: Literal["loading", "ready", "degraded", "draining", "failed"]
    models: list[str]
    detail: dict[str, Any] = Field(default_factory=dict)

"""What the client sends and gets back, as plain dataclasses (no validation library: the
server validates and answers 422 naming the field)."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

Endpoint = Literal["generate", "images"]
# `b64_json`: JSON with base64 images; `bytes`: the file itself is the body.
ResponseFormat = Literal["b64_json", "bytes"]

# Where each endpoint lives and what it calls the class name.
ENDPOINT_PATHS: dict[str, str] = {"generate": "/v1/generate", "images": "/v1/images/generations"}
LABEL_FIELDS: dict[str, str] = {"generate": "label", "images": "prompt"}

_T = TypeVar("_T")


def from_dict(cls: type[_T], data: dict[str, Any]) -> _T:
    """Build a dataclass from JSON, ignoring fields a newer server may add."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class GenerationRequest:
    """The sampling fields both generation endpoints take; None leaves the server's default.

    `label` is a class name (or, on the native endpoint, a class id); None generates
    unconditionally. `timeout` is the server-side deadline in seconds (504 when it passes).
    """

    label: str | int | None = None
    model: str | None = None
    n: int = 1
    size: str | None = None
    sampler: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    sampler_options: dict[str, bool | int | float | str] | None = None
    output_format: Literal["png", "webp", "npy"] = "png"
    timeout: float | None = None

    def body(
        self,
        endpoint: Endpoint,
        stream: bool = False,
        preview: bool = False,
        response_format: ResponseFormat = "b64_json",
    ) -> dict:
        """The JSON body for `endpoint` (fields left at None are omitted)."""
        if endpoint not in ENDPOINT_PATHS:
            allowed = ", ".join(ENDPOINT_PATHS)
            raise ValueError(f"endpoint must be one of {allowed}; got {endpoint!r}")
        if response_format not in ("b64_json", "bytes"):
            raise ValueError(f"response_format must be b64_json or bytes; got {response_format!r}")
        body = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if "label" in body:
            body[LABEL_FIELDS[endpoint]] = body.pop("label")
        if stream:
            body["stream"] = True
            if preview:
                body["preview"] = True
        elif preview:
            raise ValueError("preview needs a stream: use stream() or on_progress")
        if response_format == "bytes":
            if stream:
                raise ValueError("a stream carries b64_json; response_format bytes cannot stream")
            body["response_format"] = "bytes"
        return body


@dataclass(frozen=True)
class EncodedFile:
    """A file as the server encoded it; `save` writes it unchanged."""

    data: bytes

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.data)
        return path


@dataclass(frozen=True)
class GeneratedImage(EncodedFile):
    """One image as the server encoded it (`format` png/webp, or npy: a float32 [H, W, C]
    array file)."""

    index: int
    format: str


@dataclass(frozen=True)
class Timings:
    queue_seconds: float  # admission to the first backbone forward
    total_seconds: float  # admission to the encoded images


@dataclass(frozen=True)
class Generation:
    """A finished request: its images and every parameter the server resolved (the seed too)."""

    id: str
    model: str
    label: str | None
    seed: int
    sampler: str
    steps: int
    nfe: int  # backbone evaluations per sample
    guidance_scale: float
    sampler_options: dict[str, Any]
    size: str
    output_format: str
    created: int
    images: list[GeneratedImage]
    timings: Timings | None = None  # the native endpoint reports them

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Generation:
        fmt = body["output_format"]
        encoded = body["images"] if "images" in body else body["data"]
        images = [
            GeneratedImage(base64.b64decode(item["b64_json"]), item["index"], fmt)
            for item in encoded
        ]
        timings = from_dict(Timings, body["timings"]) if body.get("timings") else None
        fields = {k: v for k, v in body.items() if k not in ("images", "data", "timings")}
        return from_dict(cls, {**fields, "images": images, "timings": timings})

    def save(self, path: str | Path) -> list[Path]:
        """Write the images: to `path` itself for one image, else `stem-<index>.suffix`."""
        paths = image_paths(path, [image.index for image in self.images])
        return [image.save(p) for image, p in zip(self.images, paths, strict=True)]


def image_paths(path: str | Path, indices: Sequence[int]) -> list[Path]:
    """Where `Generation.save(path)` writes the images of these indices."""
    path = Path(path)
    if len(indices) == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in indices]


@dataclass(frozen=True)
class GenerationFile(EncodedFile):
    """A generation answered with the file itself (`response_format="bytes"`): one png/webp
    image, or with npy one float32 [n, H, W, C] array file. The answer's headers name the
    request id, the model and the seed the server resolved."""

    content_type: str  # image/png, image/webp or application/x-npy
    format: str  # the requested output format
    id: str
    model: str
    seed: int


@dataclass(frozen=True)
class Progress:
    """One `progress` event: `step` of `total` model evaluations are done."""

    id: str
    step: int
    total: int
    preview: bytes | None = None  # a small PNG of the current prediction (with preview=True)

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 1.0

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Progress:
        preview = body.get("preview")
        return cls(
            body["id"], body["step"], body["total"], base64.b64decode(preview) if preview else None
        )


@dataclass(frozen=True)
class ModelDefaults:
    sampler: str
    steps: int
    guidance_scale: float
    size: str


@dataclass(frozen=True)
class Model:
    """An entry of `GET /v1/models`."""

    id: str
    architecture: str
    process: str
    prediction: str
    classes: list[str] | None  # class names; None when unconditional or unnamed
    sizes: list[str]
    samplers: list[str]
    defaults: ModelDefaults
    latent: bool
    created: int = 0
    owned_by: str = "denoised"
    num_classes: int | None = None  # classes the model is conditioned on (with or without names)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Model:
        return from_dict(cls, {**body, "defaults": from_dict(ModelDefaults, body["defaults"])})


@dataclass(frozen=True)
class Readiness:
    """`GET /ready`: `ready` once models are loaded and warmed, false while loading/draining."""

    ready: bool
    status: str
    models: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)

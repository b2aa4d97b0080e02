"""Admission: a client's request, checked against its model and the server's limits, becomes
validated `GenerationParams` (every default filled in, its conditioning decided — for a text
model, whether it is guided and the prompts the engine will encode) and the request's
sampler state. Errors are `FieldError`s naming the request field at fault; the HTTP
layer answers them with 422.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from denoised.models.conditioning import UNCONDITIONAL, Conditioning, guides
from denoised.models.sampling.samplers import SamplerOptionError, SamplerState, create_sampler
from denoised.server.engine.jobs import GenerationParams
from denoised.server.imaging import OutputFormat
from denoised.server.registry import ServedModel
from denoised.server.settings import Settings


class FieldError(ValueError):
    """A request field that is well-formed but not acceptable."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


@dataclass(frozen=True)
class GenerationRequest:
    """What a client asked for, before defaults and limits (None: the model's default)."""

    prompt: str | None = None  # a text model's prompt, or a class model's class name
    label: str | int | None = None  # a class model's class name or id (the native endpoint)
    negative_prompt: str | None = None  # text models: the unconditional rows' prompt
    class_param: str = "label"  # the field this endpoint names a class by, for errors
    n: int = 1
    size: str | None = None
    sampler: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    sampler_options: Mapping[str, Any] | None = None
    output_format: OutputFormat = "png"
    response_format: str = "b64_json"
    timeout: float | None = None
    stream: bool = False
    preview: bool = False


def allowed_values(values: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(v) for v in values[:limit])
    return shown + (
        f", … ({len(values)} in all; see GET /v1/models)" if len(values) > limit else ""
    )


def _label(
    model: ServedModel, value: str | int | None, param: str
) -> tuple[int | None, str | None]:
    """(class id, class name) of a request's label. A model without class names takes ids,
    as integers or decimal strings (the OpenAI endpoint's prompt), and names the class by its
    id."""
    if value is None:
        if model.num_classes and model.loaded.null_label is None:
            raise FieldError(param, f"model {model.name!r} needs a {param}: it has no null class")
        return None, None
    count, names = model.num_classes, model.classes
    if not count:
        raise FieldError(param, f"model {model.name!r} is unconditional; omit {param}")
    if isinstance(value, str):
        key = value.strip().lower()
        if names:
            for index, name in enumerate(names):
                if name.lower() == key:
                    return index, name
            raise FieldError(param, f"unknown class {value!r}; allowed: {allowed_values(names)}")
        if not (key.isascii() and key.isdecimal()):
            raise FieldError(
                param,
                f"model {model.name!r} has no class names: give a class id 0..{count - 1}, "
                f"got {value!r}",
            )
    # Longer digit strings are out of range anyway (and int() caps their length).
    index = value if isinstance(value, int) else int(key) if len(key) < 19 else count
    if not 0 <= index < count:
        raise FieldError(param, f"class id must be in 0..{count - 1}, got {value!r}")
    return index, names[index] if names else str(index)


def _guidance(model: ServedModel, given: float | None, label_id: int | None, param: str) -> float:
    """The scale applied. Guidance pulls toward a class, so without a label there is none: a
    scale other than 1 is refused rather than echoed but ignored."""
    if label_id is not None:
        if given is not None and given != 1.0 and not model.can_guide:
            raise FieldError(
                "guidance_scale",
                f"model {model.name!r} cannot be guided (no null class or no guided "
                f"channels); omit guidance_scale or use 1, got {given:g}",
            )
        return model.defaults.guidance_scale if given is None else given
    if given is not None and given != 1.0:
        missing = (
            f"model {model.name!r} is unconditional"
            if not model.num_classes
            else f"this request has no {param}"
        )
        raise FieldError(
            "guidance_scale",
            f"guidance needs a label and {missing}; omit guidance_scale or use 1 "
            f"(no guidance), got {given:g}",
        )
    return 1.0


def _class_request(model: ServedModel, request: GenerationRequest) -> tuple[str | int | None, str]:
    """The class a request names and the field that names it: `label`, or `prompt` (the
    images endpoint's class name). A negative prompt is for text models only."""
    if request.negative_prompt is not None:
        raise FieldError(
            "negative_prompt",
            f"model {model.name!r} is conditioned on {model.conditioning} labels, not text; "
            "omit negative_prompt",
        )
    if request.label is not None and request.prompt is not None:
        raise FieldError("prompt", "give the class as label or as prompt, not both")
    if request.prompt is not None:
        return request.prompt, "prompt"
    return request.label, "label" if request.label is not None else request.class_param


def _text_guidance(model: ServedModel, request: GenerationRequest) -> float:
    """A text model's guidance scale; its unconditional rows run the negative prompt, or the
    empty one."""
    if request.label is not None:
        raise FieldError(
            "label", f"model {model.name!r} is conditioned on text: send a prompt, not a label"
        )
    given = request.guidance_scale
    scale = model.defaults.guidance_scale if given is None else given
    if guides(scale) and not model.can_guide:
        raise FieldError(
            "guidance_scale",
            f"model {model.name!r} cannot be guided; omit guidance_scale or use 1, got {scale:g}",
        )
    if request.negative_prompt is not None and not guides(scale):
        raise FieldError(
            "negative_prompt",
            "a negative prompt needs guidance (the unconditional rows it steers away from run "
            "only with a guidance_scale other than 1); set guidance_scale or omit it",
        )
    return scale


def _conditioning(
    model: ServedModel, label_id: int | None, scale: float, n: int, device: torch.device
) -> Conditioning:
    """The request's rows: its class (or the null class when unlabelled), guided when the
    scale applied is not 1; nothing for an unconditional model."""
    if not model.num_classes:
        return UNCONDITIONAL
    if label_id is None:
        null_label = model.loaded.null_label
        assert null_label is not None  # _label asks a model without one for a label
        return Conditioning.null_class(n, null_label, device)
    labels = torch.full((n,), label_id, dtype=torch.int64, device=device)
    return Conditioning.classes(labels, model.loaded.null_label, scale)


def _sampler_param(error: ValueError, options: Mapping[str, Any]) -> str:
    """`sampler_options.<name>` for the option at fault; `sampler_options` or `sampler` when
    the error names none the request gave (e.g. more steps than the process has)."""
    if isinstance(error, SamplerOptionError) and error.option in options:
        return f"sampler_options.{error.option}"
    return "sampler_options" if options else "sampler"


def admit(
    model: ServedModel,
    request: GenerationRequest,
    settings: Settings,
    request_id: str,
    device: torch.device,
) -> tuple[GenerationParams, SamplerState]:
    """Validate `request` against `model` and the server's limits; create its sampler state
    (initial noise from the request's own seeded generators). FieldError names the field."""
    defaults = model.defaults
    n = request.n
    if n > settings.max_n:
        raise FieldError("n", f"must be at most {settings.max_n}, got {n}")
    size = defaults.size if request.size in (None, "auto") else request.size
    if size not in model.sizes:
        raise FieldError(
            "size",
            f"{size!r} is not one of this model's sizes; allowed: "
            f"{allowed_values(list(model.sizes))} or 'auto' (the native size)",
        )
    steps = request.steps if request.steps is not None else defaults.steps
    if steps > settings.max_steps:
        raise FieldError("steps", f"must be at most {settings.max_steps}, got {steps}")
    timeout = request.timeout if request.timeout is not None else settings.default_timeout
    if timeout > settings.max_timeout:
        raise FieldError("timeout", f"must be at most {settings.max_timeout}, got {timeout}")
    if model.conditioning == "text":
        label_id, label_name, label_param = None, None, "prompt"
        scale = _text_guidance(model, request)
    else:
        value, label_param = _class_request(model, request)
        label_id, label_name = _label(model, value, label_param)
        scale = _guidance(model, request.guidance_scale, label_id, label_param)
    if request.preview and not request.stream:
        raise FieldError("preview", "previews are sent as stream events; set stream: true")
    if request.stream and request.response_format == "bytes":
        raise FieldError(
            "response_format", "a stream carries b64_json; 'bytes' needs stream: false"
        )
    if request.response_format == "bytes" and n > 1 and request.output_format != "npy":
        raise FieldError(
            "response_format",
            "'bytes' returns one file: use n=1, output_format 'npy' (one [n,H,W,C] array) "
            "or response_format 'b64_json'",
        )
    sampler = request.sampler or defaults.sampler
    options = dict(request.sampler_options or {})
    seed = request.seed if request.seed is not None else secrets.randbits(63)
    latent_shape = model.sizes[size]
    # Image k has its own generator, seeded seed + k: it equals image 0 of the same request
    # with that seed and n = 1, whatever the sampler (per-step noise included).
    generators = [torch.Generator(device="cpu").manual_seed((seed + k) % 2**63) for k in range(n)]
    try:
        state = create_sampler(
            sampler,
            model.loaded.process,
            steps,
            (n, *latent_shape),
            generators,
            options=options,
            device=device,
        )
    except ValueError as exc:
        raise FieldError(_sampler_param(exc, options), str(exc)) from None
    conditioning = None  # a text model's prompts are encoded by the engine, batched
    if model.conditioning != "text":
        conditioning = _conditioning(model, label_id, scale, n, device)
    height, width = (int(v) for v in size.split("x"))
    guided = guides(scale) if conditioning is None else conditioning.guided
    work = n * state.nfe * height * width * (2 if guided else 1)
    if work > settings.max_work:
        raise FieldError(
            "n",
            f"n × evaluations × pixels{' × 2 (guidance)' if guided else ''} = {work:.3g} "
            f"exceeds this server's per-request work limit of {settings.max_work:.3g}; ask "
            "for fewer images, steps or pixels",
        )
    params = GenerationParams(
        request_id=request_id,
        model=model.name,
        label=label_id,
        label_name=label_name,
        n=n,
        size=size,
        latent_shape=latent_shape,
        sampler=sampler,
        steps=steps,
        nfe=state.nfe,
        guidance_scale=scale,
        sampler_options=options,
        seed=seed,
        output_format=request.output_format,
        response_format=request.response_format,
        timeout=timeout,
        stream=request.stream,
        preview=request.preview,
        guided=guided,
        conditioning=conditioning,
        prompt=None if conditioning is not None else request.prompt or "",
        negative_prompt=request.negative_prompt if conditioning is None and guided else None,
    )
    return params, state

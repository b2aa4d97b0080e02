"""The served models: loading them, describing them (`GET /v1/models`), and turning an API
request into validated `GenerationParams` plus its sampler state."""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from denoised.models.checkpoints.model_dir import (
    CONFIG_FILE,
    VAE_WEIGHTS_FILE,
    WEIGHTS_FILE,
    load_model_dir,
)
from denoised.models.sampling.samplers import SAMPLER_NAMES, create_sampler
from denoised.models.zoo import ZOO_DIR, ZOO_MODELS
from denoised.server.engine.jobs import GenerationParams
from denoised.server.http.schemas import ModelCard, ModelDefaults, SamplingFields
from denoised.server.settings import Settings

log = logging.getLogger("denoised.server")


def default_model_dirs() -> list[Path]:
    """The shipped zoo models (`models/zoo/<name>/`), in `ZOO_MODELS` order: what `denoised
    serve` serves when no model is named."""
    root = ZOO_DIR
    shipped = [root / n for n in ZOO_MODELS if (root / n / CONFIG_FILE).is_file()]
    if not shipped:
        raise ValueError(
            f"no shipped models under {root}; name model directories with --model DIR "
            "or DENOISED_MODELS"
        )
    return shipped


class FieldError(ValueError):
    """A request field that is well-formed but not acceptable (answered with 422)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


class UnknownModel(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"model {name!r} is not served; available: {', '.join(known)}")


class ModelUnavailable(LookupError):
    """A configured model that failed to load (answered with 503)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"model {name!r} is unavailable: it failed to load ({reason})")


def _allowed(values: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(v) for v in values[:limit])
    return shown + (
        f", … ({len(values)} in all; see GET /v1/models)" if len(values) > limit else ""
    )


def _option_param(message: str, options: dict) -> str:
    """`sampler_options.<name>` for the option a sampler's error message names first (its
    messages name the offending option); `sampler_options` or `sampler` when none."""
    named = []
    for name in options:
        found = name and re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", message)
        if found:
            named.append((found.start(), name))
    if named:
        return f"sampler_options.{min(named)[1]}"
    return "sampler_options" if options else "sampler"


@dataclass
class ServedModel:
    loaded: object  # models.checkpoint.LoadedModel
    created: int

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def classes(self) -> list[str] | None:
        return self.loaded.class_names

    @property
    def num_classes(self) -> int:
        """Classes the backbone was trained on (0: unconditional). Names are optional: a
        model without them takes class ids."""
        return self.loaded.num_classes or 0

    @property
    def sizes(self) -> dict[str, tuple[int, int, int]]:
        side = self.loaded.image_size
        return {f"{side}x{side}": tuple(self.loaded.latent_shape)}

    @property
    def defaults(self) -> ModelDefaults:
        config = self.loaded.config
        given = config.get("defaults", {})
        flow = self.loaded.process.to_config()["type"] == "flow"
        return ModelDefaults(
            sampler=given.get("sampler", "euler" if flow else "dpmpp-2m"),
            steps=int(given.get("steps", 20)),
            guidance_scale=float(given.get("guidance_scale", 1.0)),
            size=next(iter(self.sizes)),
        )

    def card(self) -> ModelCard:
        config = self.loaded.config
        return ModelCard(
            id=self.name,
            created=self.created,
            architecture=config["family"],
            process=self.loaded.process.to_config()["type"],
            prediction=self.loaded.process.prediction,
            classes=self.classes,
            num_classes=self.num_classes or None,
            sizes=list(self.sizes),
            samplers=list(SAMPLER_NAMES),
            defaults=self.defaults,
            latent=self.loaded.vae is not None,
        )

    def _label(self, value: str | int | None, param: str) -> tuple[int | None, str | None]:
        """(class id, class name) of a request's label. A model without class names takes
        ids, as integers or decimal strings (the OpenAI endpoint's prompt), and names the
        class by its id."""
        if value is None:
            if self.num_classes and not self.loaded.has_null_label:
                raise FieldError(
                    param, f"model {self.name!r} needs a {param}: it has no null class"
                )
            return None, None
        count, names = self.num_classes, self.classes
        if not count:
            raise FieldError(param, f"model {self.name!r} is unconditional; omit {param}")
        if isinstance(value, str):
            key = value.strip().lower()
            if names:
                for index, name in enumerate(names):
                    if name.lower() == key:
                        return index, name
                raise FieldError(param, f"unknown class {value!r}; allowed: {_allowed(names)}")
            if not (key.isascii() and key.isdecimal()):
                raise FieldError(
                    param,
                    f"model {self.name!r} has no class names: give a class id 0..{count - 1}, "
                    f"got {value!r}",
                )
        # Longer digit strings are out of range anyway (and int() caps their length).
        index = value if isinstance(value, int) else int(key) if len(key) < 19 else count
        if not 0 <= index < count:
            raise FieldError(param, f"class id must be in 0..{count - 1}, got {value!r}")
        return index, names[index] if names else str(index)

    def _guidance(self, given: float | None, label_id: int | None, label_param: str) -> float:
        """The scale applied. Guidance pulls toward a class, so without a label there is
        none: a scale other than 1 is refused rather than echoed but ignored."""
        if label_id is not None:
            if given is not None and given != 1.0 and not self.loaded.guided_channels:
                raise FieldError(
                    "guidance_scale",
                    f"model {self.name!r} cannot be guided (no null class or no guided "
                    f"channels); omit guidance_scale or use 1, got {given:g}",
                )
            return self.defaults.guidance_scale if given is None else given
        if given is not None and given != 1.0:
            missing = (
                f"model {self.name!r} is unconditional"
                if not self.num_classes
                else f"this request has no {label_param}"
            )
            raise FieldError(
                "guidance_scale",
                f"guidance needs a label and {missing}; omit guidance_scale or use 1 "
                f"(no guidance), got {given:g}",
            )
        return 1.0

    def prepare(
        self,
        fields: SamplingFields,
        label: str | int | None,
        label_param: str,
        settings: Settings,
        request_id: str,
        device: torch.device,
    ) -> tuple[GenerationParams, object]:
        """Validate a request against this model and the server's limits; create its sampler
        state (initial noise from the request's own seeded generator)."""
        defaults = self.defaults
        if fields.n > settings.max_n:
            raise FieldError("n", f"must be at most {settings.max_n}, got {fields.n}")
        size = defaults.size if fields.size in (None, "auto") else fields.size
        if size not in self.sizes:
            raise FieldError(
                "size",
                f"{size!r} is not one of this model's sizes; allowed: "
                f"{_allowed(list(self.sizes))} or 'auto' (the native size)",
            )
        steps = fields.steps if fields.steps is not None else defaults.steps
        if steps > settings.max_steps:
            raise FieldError("steps", f"must be at most {settings.max_steps}, got {steps}")
        timeout = fields.timeout if fields.timeout is not None else settings.default_timeout
        if timeout > settings.max_timeout:
            raise FieldError("timeout", f"must be at most {settings.max_timeout}, got {timeout}")
        label_id, label_name = self._label(label, label_param)
        scale = self._guidance(fields.guidance_scale, label_id, label_param)
        if fields.preview and not fields.stream:
            raise FieldError("preview", "previews are sent as stream events; set stream: true")
        if fields.stream and fields.response_format == "bytes":
            raise FieldError(
                "response_format", "a stream carries b64_json; 'bytes' needs stream: false"
            )
        if fields.response_format == "bytes" and fields.n > 1 and fields.output_format != "npy":
            raise FieldError(
                "response_format",
                "'bytes' returns one file: use n=1, output_format 'npy' (one [n,H,W,C] array) "
                "or response_format 'b64_json'",
            )
        sampler = fields.sampler or defaults.sampler
        options = dict(fields.sampler_options or {})
        seed = fields.seed if fields.seed is not None else secrets.randbits(63)
        latent_shape = self.sizes[size]
        # Image k has its own generator, seeded seed + k: it equals image 0 of the same request
        # with that seed and n = 1, whatever the sampler (per-step noise included).
        generators = [
            torch.Generator(device="cpu").manual_seed((seed + k) % 2**63) for k in range(fields.n)
        ]
        try:
            state = create_sampler(
                sampler,
                self.loaded.process,
                steps,
                (fields.n, *latent_shape),
                generators,
                options=options,
                device=device,
            )
        except ValueError as exc:
            raise FieldError(_option_param(str(exc), options), str(exc)) from None
        height, width = (int(v) for v in size.split("x"))
        guided = scale != 1.0  # _guidance returns 1 without a label
        # A guided sample runs two backbone rows per evaluation (conditional, unconditional).
        work = fields.n * state.nfe * height * width * (2 if guided else 1)
        if work > settings.max_work:
            raise FieldError(
                "n",
                f"n × evaluations × pixels{' × 2 (guidance)' if guided else ''} = {work:.3g} "
                f"exceeds this server's per-request work limit of {settings.max_work:.3g}; ask "
                "for fewer images, steps or pixels",
            )
        params = GenerationParams(
            request_id=request_id,
            model=self.name,
            label=label_id,
            label_name=label_name,
            n=fields.n,
            size=size,
            latent_shape=latent_shape,
            sampler=sampler,
            steps=steps,
            nfe=state.nfe,
            guidance_scale=scale,
            sampler_options=options,
            seed=seed,
            output_format=fields.output_format,
            response_format=fields.response_format,
            timeout=timeout,
            stream=fields.stream,
            preview=fields.preview,
            guided=guided,
        )
        return params, state


class ModelRegistry:
    def __init__(
        self, models: list[ServedModel], unavailable: dict[str, str] | None = None
    ) -> None:
        if not models:
            raise ValueError("no models to serve")
        self.unavailable = dict(unavailable or {})  # directory name → why it did not load
        self.models: dict[str, ServedModel] = {}
        for model in models:
            if model.name in self.models:
                raise ValueError(f"two model directories are both named {model.name!r}")
            self.models[model.name] = model
        self.default = models[0].name

    def drop(self, name: str, why: str) -> None:
        """Stop serving a loaded model that then failed (its warm-up): it joins `unavailable`
        and the next model becomes the default if it was. RuntimeError when none is left."""
        del self.models[name]
        self.unavailable[name] = why
        if not self.models:
            raise RuntimeError(f"no model left to serve; {name}: {why}")
        if self.default == name:
            self.default = next(iter(self.models))

    def get(self, name: str | None) -> ServedModel:
        key = self.default if name is None else name
        if key in self.unavailable and key not in self.models:
            raise ModelUnavailable(key, self.unavailable[key])
        if key not in self.models:
            raise UnknownModel(key, list(self.models))
        return self.models[key]


def confined_model_dir(path: Path | str, roots: Sequence[str] = ()) -> Path:
    """`path` with symlinks and `..` resolved. ValueError when it lies outside every one of
    `roots` (if any are configured), or when a file it serves links outside it and them."""
    resolved = Path(path).resolve()
    allowed = [Path(root).resolve() for root in roots]
    if allowed and not any(resolved.is_relative_to(root) for root in allowed):
        raise ValueError(
            f"{path} resolves to {resolved}, outside the model roots "
            f"({', '.join(map(str, allowed))})"
        )
    for name in (CONFIG_FILE, WEIGHTS_FILE, VAE_WEIGHTS_FILE):
        target = (resolved / name).resolve()
        if not any(target.is_relative_to(root) for root in [resolved, *allowed]):
            raise ValueError(f"{resolved / name} links to {target}, outside its model directory")
    return resolved


def load_registry(
    dirs: list[Path | str],
    device: torch.device,
    dtype: torch.dtype,
    roots: Sequence[str] = (),
) -> ModelRegistry:
    """Every model directory that loads (confined to `roots`, see `confined_model_dir`). One
    that does not is logged and listed in `unavailable` with the reason, so the others still
    serve; ValueError when none loads."""
    created = int(time.time())
    served, unavailable = [], {}
    for directory in dirs:
        try:
            path = confined_model_dir(directory, roots)
            served.append(ServedModel(load_model_dir(path, device=device, dtype=dtype), created))
        except Exception as exc:
            log.exception("model directory %s failed to load", directory)
            unavailable[Path(directory).name] = f"{type(exc).__name__}: {exc}"
    if not served:
        reasons = "; ".join(f"{name}: {why}" for name, why in unavailable.items())
        raise ValueError(f"no model could be loaded ({reasons})")
    return ModelRegistry(served, unavailable)

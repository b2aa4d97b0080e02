"""The served models: loading them from their directories, and what the rest of the server
asks of one (its classes, sizes, defaults)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from denoised.models.checkpoints.model_dir import (
    CONFIG_FILE,
    TEXT_DIR,
    VAE_WEIGHTS_FILE,
    WEIGHTS_FILE,
    LoadedModel,
    load_model_dir,
)
from denoised.models.zoo import ZOO_DIR, ZOO_MODELS

log = logging.getLogger("denoised.server")

# What a model's requests condition on: a text prompt, a class label, or nothing.
ConditioningKind = Literal["text", "class", "none"]


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


class UnknownModel(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"model {name!r} is not served; available: {', '.join(known)}")


class ModelUnavailable(LookupError):
    """A configured model that failed to load (answered with 503)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"model {name!r} is unavailable: it failed to load ({reason})")


@dataclass(frozen=True)
class Defaults:
    """What a request that omits these fields gets."""

    sampler: str
    steps: int
    guidance_scale: float
    size: str


@dataclass
class ServedModel:
    loaded: LoadedModel
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
        channels, height, width = self.loaded.latent_shape
        return {f"{side}x{side}": (channels, height, width)}

    @property
    def conditioning(self) -> ConditioningKind:
        """What requests condition on: `text` (a prompt), `class` (a label) or `none`."""
        if self.loaded.text is not None:
            return "text"
        return "class" if self.num_classes else "none"

    @property
    def max_prompt_tokens(self) -> int | None:
        """Tokens of a prompt the text encoders read (longer ones are truncated)."""
        return None if self.loaded.text is None else self.loaded.text.max_tokens

    @property
    def can_guide(self) -> bool:
        """Whether guidance applies: an unconditional input to guide from (the null class, or
        the negative or empty prompt) and channels to guide."""
        has_unconditional = self.loaded.text is not None or self.loaded.null_label is not None
        return has_unconditional and bool(self.loaded.guided_channels)

    @property
    def defaults(self) -> Defaults:
        config = self.loaded.config
        given = config.get("defaults", {})
        return Defaults(
            sampler=given.get("sampler", "euler" if self.process == "flow" else "dpmpp-2m"),
            steps=int(given.get("steps", 20)),
            guidance_scale=float(given.get("guidance_scale", 1.0)),
            size=next(iter(self.sizes)),
        )

    @property
    def process(self) -> str:
        """The noise process: vp (diffusion) or flow."""
        return self.loaded.process.to_config()["type"]


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
    text_files = sorted((resolved / TEXT_DIR).rglob("*")) if (resolved / TEXT_DIR).is_dir() else []
    for file in [resolved / n for n in (CONFIG_FILE, WEIGHTS_FILE, VAE_WEIGHTS_FILE)] + text_files:
        target = file.resolve()
        if not any(target.is_relative_to(root) for root in [resolved, *allowed]):
            raise ValueError(f"{file} links to {target}, outside its model directory")
    return resolved


def load_registry(
    dirs: Sequence[Path | str],
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
            loaded = load_model_dir(path, device=device, dtype=dtype)
            if loaded.text_dims is not None and loaded.text is None:
                raise ValueError(
                    f"{path} holds a text-conditioned backbone without its text encoders "
                    f"({path / TEXT_DIR} is missing; `denoised convert` writes it)"
                )
            served.append(ServedModel(loaded, created))
        except Exception as exc:
            log.exception("model directory %s failed to load", directory)
            unavailable[Path(directory).name] = f"{type(exc).__name__}: {exc}"
    if not served:
        reasons = "; ".join(f"{name}: {why}" for name, why in unavailable.items())
        raise ValueError(f"no model could be loaded ({reasons})")
    return ModelRegistry(served, unavailable)

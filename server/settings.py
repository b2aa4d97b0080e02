"""Server settings: defaults, overridden by `DENOISED_*` environment variables, overridden by
command-line flags (the CLI passes only the flags that were given)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from denoised.kernels.backends import ATTENTION_BACKENDS, FUSED_BACKENDS

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
BATCHING_MODES = ("step", "request")


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    models: tuple[str, ...] = ()  # model directories; empty: the shipped default models
    model_roots: tuple[str, ...] = ()  # if set, model directories must resolve inside these
    device: str = "auto"  # auto: cuda when available, else cpu
    # Backbone dtype. auto: bfloat16 on cuda; on cpu bfloat16 where the CPU multiplies it
    # natively (AMX, AVX512-BF16) and the model's outputs stay close (server/device.py),
    # else float32.
    dtype: str = "auto"
    # Backbones through torch.compile (inductor; CUDA graphs per batch bucket on CUDA),
    # compiled during warm-up (at the first forward without warm-up).
    compile: bool = True
    threads: int = 0  # CPU threads for torch ops; 0: torch's default (one per core)
    attention: str = "auto"  # attention backend (kernels.backends): auto | triton | sdpa
    fused: str = "auto"  # fused elementwise kernels: auto | triton | reference
    max_batch: int = 64  # samples per backbone forward (a guided sample counts twice)
    max_queue: int = 256  # admitted requests waiting for their first step; more get 429
    batching: str = "step"  # "step" (step-level) or "request" (equal parameters, to completion)
    drain_seconds: float = 30.0  # on SIGTERM: how long in-flight work may take to finish
    # Per-request limits (violations are 422 naming the field).
    max_n: int = 16
    max_steps: int = 1000
    max_timeout: float = 600.0
    default_timeout: float = 300.0
    max_work: float = 2.0e9  # n × evaluations × pixels (× 2 guided) one request may ask for
    max_body_bytes: int = 64 * 1024
    preview_size: int = 32  # longest side of the streamed x0 previews, pixels
    prompt_cache_mb: float = 256.0  # per text model: encoded prompts kept for reuse (LRU)
    # Per forward: MiB of text inputs (encoded prompts, cross-attention caches) stacked.
    max_batch_text_mb: float = 1024.0
    warmup: bool = True  # one small generation per model before /ready turns true
    # /ready is 503 while any configured model failed to load (the others still serve);
    # False: ready as soon as one model serves, the failed ones listed in /ready's detail.
    strict_readiness: bool = True
    # Access control (optional).
    api_keys: tuple[str, ...] = ()
    api_keys_file: str | None = None
    metrics_auth: bool = False  # whether /metrics needs an API key too
    cors_origins: tuple[str, ...] = ()  # browser origins allowed cross-origin; () = CORS off
    encode_threads: int = 2  # image encoding off the engine thread (the VAE decodes on it)
    fault_injection: str = ""  # tests only: faults to inject (see server/faults.py); "" = none

    def __post_init__(self) -> None:
        _check_choice("device", self.device, DEVICES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("batching", self.batching, BATCHING_MODES)
        _check_choice("attention", self.attention, ATTENTION_BACKENDS)
        _check_choice("fused", self.fused, FUSED_BACKENDS)
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        for name in ("port", "max_batch", "max_queue", "max_n", "max_steps", "max_body_bytes"):
            if getattr(self, name) < (0 if name == "port" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("prompt_cache_mb", "max_batch_text_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("drain_seconds", "max_timeout", "default_timeout", "max_work"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def all_api_keys(self) -> tuple[str, ...]:
        """Keys from `api_keys` plus one per non-empty line of `api_keys_file`."""
        keys = list(self.api_keys)
        if self.api_keys_file:
            with open(self.api_keys_file, encoding="utf-8") as fh:
                keys += [line.strip() for line in fh if line.strip()]
        return tuple(keys)


ENV_PREFIX = "DENOISED_"


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _parse(name: str, raw: str, default: Any) -> Any:
    """Parse one environment value to the type of the setting's default."""
    try:
        if isinstance(default, bool):
            lowered = raw.strip().lower()
            if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
                raise ValueError(raw)
            return lowered in ("1", "true", "yes", "on")
        if isinstance(default, tuple):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}: cannot parse {raw!r}") from None
    return raw


def settings_from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from `DENOISED_<NAME>` variables (e.g. `DENOISED_MAX_BATCH=32`,
    `DENOISED_MODELS=dir1,dir2`), then `overrides` (values that are None are ignored)."""
    environ = os.environ if environ is None else environ
    defaults = Settings()
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is not None:
            values[f.name] = _parse(f.name, raw, getattr(defaults, f.name))
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("models"), list):
        values["models"] = tuple(values["models"])
    return replace(defaults, **values)

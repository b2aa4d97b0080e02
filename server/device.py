"""The device and backbone dtype a server runs in.

`--dtype auto` means bfloat16 on CUDA, and on a CPU with native bf16 matmul (AMX or
AVX512-BF16) bfloat16 for each model whose bf16 outputs stay within `BF16_TOLERANCE` of its
float32 ones (checked at load time on the model's own sampler inputs); float32 otherwise.
Sampler state (x, the D history, the update) stays float32 whatever the backbone runs in.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from pathlib import Path

import torch

from denoised.models.conditioning import TextContext
from denoised.models.sampling.samplers import create_sampler
from denoised.server.settings import Settings

log = logging.getLogger("denoised.server")

# /proc/cpuinfo flags of x86 units that multiply bf16 natively (AMX tiles, AVX512 dot products).
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
# Most relative RMS error of a bf16 backbone output against float32 that `auto` accepts. bf16
# keeps 8 significant bits (relative rounding 2⁻⁹ ≈ 2e-3 per value); a few dozen layers of
# float32-accumulated matmuls measure 0.5–1.5 % on the DiT presets, so 3 % leaves room for
# deeper models and still refuses one whose outputs bf16 really changes.
BF16_TOLERANCE = 3e-2
# The check's inputs: this many rows at each of this many noise levels of the model's process.
_CHECK_ROWS, _CHECK_TIMES = 1, 4
_CHECK_TOKENS = 8  # text models: prompt tokens per row of the check


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is missing: macOS, Windows)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def native_bf16(flags: Iterable[str] | None = None) -> bool:
    """Whether the CPU multiplies bf16 natively (`flags`: this machine's when None)."""
    return not NATIVE_BF16_FLAGS.isdisjoint(cpu_flags() if flags is None else flags)


def resolve_device(
    settings: Settings, flags: Iterable[str] | None = None
) -> tuple[torch.device, torch.dtype]:
    """The device the `device` setting asks for and the dtype models load in. With `dtype`
    auto on a CPU that has native bf16, models load in float32 and `settle_dtype` then moves
    each one that passes the tolerance check to bfloat16."""
    name = settings.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    dtype_name = settings.dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if name == "cuda" else "float32"
    if settings.dtype == "auto" and name == "cpu" and native_bf16(flags):
        log.info("CPU has native bf16 matmul: models move to bfloat16 where it stays accurate")
    return torch.device(name), getattr(torch, dtype_name)


def check_inputs(
    loaded, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | TextContext | None]:
    """Backbone inputs `(x, t, y)` the model meets in serving: noise at `_CHECK_TIMES` model
    times spread over its process (from a DDIM grid), labels drawn over its classes and null,
    or for a text model random embeddings of its encoders' widths."""
    generator = torch.Generator().manual_seed(seed)
    rows = _CHECK_ROWS * _CHECK_TIMES
    state = create_sampler(
        "ddim", loaded.process, _CHECK_TIMES, (1, *loaded.latent_shape), generator
    )
    times = torch.tensor([e.model_time for e in state.plan], dtype=torch.float32)
    t = times.repeat_interleave(_CHECK_ROWS)
    x = torch.randn((rows, *loaded.latent_shape), generator=generator)
    y: torch.Tensor | TextContext | None = None
    if loaded.text_dims is not None:  # prompt-like embeddings of the backbone's widths
        width, pooled = loaded.text_dims
        tokens = torch.randn((rows, _CHECK_TOKENS, width), generator=generator)
        vector = None if pooled is None else torch.randn((rows, pooled), generator=generator)
        y = TextContext(tokens, None, vector)
    elif loaded.num_classes:
        y = torch.randint(
            0, loaded.num_classes + int(loaded.has_null_label), (rows,), generator=generator
        )
    return x, t, y


def _cast(y: torch.Tensor | TextContext | None, dtype: torch.dtype):
    """Text inputs in the backbone's dtype (class ids stay integers)."""
    return y.to(dtype=dtype) if isinstance(y, TextContext) else y


@torch.inference_mode()
def bf16_error(module: torch.nn.Module, bf16: torch.nn.Module, call) -> float:
    """Relative RMS difference of `call(bf16, torch.bfloat16)` from `call(module,
    torch.float32)`; `call(m, dtype)` runs one module on fixed inputs cast to `dtype`."""
    want = call(module, torch.float32).float()
    got = call(bf16, torch.bfloat16).float()
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def _bf16_if_close(what: str, module: torch.nn.Module, call) -> torch.nn.Module | None:
    """A bfloat16 copy of `module` when it passes `BF16_TOLERANCE`, else None (logged)."""
    candidate = copy.deepcopy(module).to(torch.bfloat16)
    error = bf16_error(module, candidate, call)
    if error > BF16_TOLERANCE:
        log.warning("%s stays float32: its bf16 outputs differ by %.2g (relative RMS), over %.2g",
                    what, error, BF16_TOLERANCE)  # fmt: skip
        return None
    log.info("%s runs in bfloat16 (relative RMS difference from float32: %.2g)", what, error)
    return candidate


def settle_dtype(
    loaded, device: torch.device, settings: Settings, flags: Iterable[str] | None = None
) -> torch.dtype:
    """With `dtype` auto on a CPU with native bf16, move `loaded`'s backbone, and its VAE,
    each to bfloat16 if it passes `BF16_TOLERANCE`. Returns the backbone's dtype."""
    dtype = next(loaded.backbone.parameters()).dtype
    if settings.dtype != "auto" or device.type != "cpu" or not native_bf16(flags):
        return dtype
    x, t, y = check_inputs(loaded)
    x, t, y = x.to(device), t.to(device), None if y is None else y.to(device)
    used = loaded.out_channels_used
    backbone = _bf16_if_close(
        f"{loaded.name} backbone",
        loaded.backbone,
        lambda m, dt: m(x.to(dt), t, _cast(y, dt))[:, :used],
    )
    if backbone is None:
        return dtype
    loaded.backbone = backbone
    if loaded.vae is not None:
        latents = x[:1]  # one row: a decode costs far more than a forward
        vae = _bf16_if_close(
            f"{loaded.name} VAE", loaded.vae, lambda m, dt: m.decode(latents.to(dt))
        )
        loaded.vae = vae or loaded.vae
    return torch.bfloat16

"""Fixed sinusoidal embeddings shared by the backbones: timesteps and 2-D patch positions."""

from __future__ import annotations

import math

import torch


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of per-sample (possibly fractional) times `t: [B]` -> `[B, dim]`.

    Frequencies are `max_period ** (-i / (dim/2 - freq_shift))`, i = 0 .. dim/2-1. The original
    DiT/SiT code uses `freq_shift=0` with cos first; diffusers' DiT uses `freq_shift=1`. The
    result is float32 whatever the dtype of `t`.
    """
    if t.ndim != 1:
        raise ValueError(
            f"timesteps must be a 1-D tensor with one value per sample, got {tuple(t.shape)}"
        )
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """`[M] -> [M, dim]`: sin of `positions * 10000**(-i/(dim/2))` then cos, in float64."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    out = positions.double()[:, None] / (10000.0**omega)[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """The fixed 2-D position table of DiT/MAE for a row-major `grid_h x grid_w` token grid.

    Returns float32 `[grid_h * grid_w, dim]`: the first half encodes the column index, the
    second half the row index (the reference implementations put width first). Built on the
    CPU even under a `torch.device("meta")` context, so a module built there keeps the table.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows = torch.arange(grid_h, device="cpu").repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device="cpu").repeat(grid_h)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()

"""Embeddings shared by the backbones: sinusoidal timesteps and 2-D patch positions, and the
MLP that embeds a conditioning vector."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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
        emb = F.pad(emb, (0, 1))
    return emb


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """`[M] -> [M, dim]`: sin of `positions * 10000**(-i/(dim/2))` then cos, in float64."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    out = positions.double()[:, None] / (10000.0**omega)[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, spacing: float = 1.0) -> torch.Tensor:
    """The fixed 2-D position table of DiT/MAE for a row-major `grid_h x grid_w` token grid.

    Returns float32 `[grid_h * grid_w, dim]`: the first half encodes the column position, the
    second half the row position (the reference implementations put width first). Positions
    are `index / spacing`, in float32 as diffusers computes them (SD3 spaces its table's
    `pos_embed_max_size` positions over the training grid's side). Built on the CPU even under
    a `torch.device("meta")` context, so a module built there keeps the table.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")

    def table(n: int) -> torch.Tensor:  # one row per position, expanded to the grid below
        positions = torch.arange(n, dtype=torch.float32, device="cpu") / spacing
        return sincos_1d(dim // 2, positions).float()

    cols = table(grid_w).repeat(grid_h, 1)
    rows = table(grid_h).repeat_interleave(grid_w, dim=0)
    return torch.cat([cols, rows], dim=1)


class TimestepMLP(nn.Module):
    """Linear-SiLU-Linear on a conditioning vector: diffusers' `TimestepEmbedding` (on the
    sinusoidal timestep features) and its SiLU `PixArtAlphaTextProjection` (on a pooled text
    embedding), parameter names included."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))

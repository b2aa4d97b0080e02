"""Batched classifier-free guidance + solver update: the sampler hot path.

Per sample i (one row of the batch), with per-sample scalars:

    guided = u + w·(c − u)      on channels [0, guided_channels) of guided samples, else c
    d      = p·x + q·guided     (the prediction type converted to the data prediction)
    x_next = a·x + b₀·d + Σ_{k≥1} b_k·history[k−1] + c_noise·noise

``u`` is the unconditional output row ``uncond[uncond_index[i]]`` (Ho & Salimans, 2022);
unguided samples (``uncond_index == −1``) have no unconditional row. Every supported sampler
step has this form, so one pass updates a batch that mixes samplers, step counts and
guidance scales. ``guided_update_reference`` is the float32 PyTorch definition;
``guided_update`` dispatches (a fused kernel for CUDA tensors plugs in here).
"""

from __future__ import annotations

import torch
from torch import Tensor


def guided_update_reference(
    x: Tensor,
    cond: Tensor,
    uncond: Tensor,
    uncond_index: Tensor,
    w: Tensor,
    p: Tensor,
    q: Tensor,
    a: Tensor,
    b: Tensor,
    history: Tensor | None,
    c: Tensor,
    noise: Tensor | None,
    guided_channels: int,
) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch float32 guidance + update; returns ``(x_next, d)``."""
    batch = x.shape[0]
    if b.dim() != 2 or b.shape[0] != batch or b.shape[1] < 1:
        raise ValueError(
            f"b must have shape [B, K] with K >= 1 and B = {batch}; got {tuple(b.shape)}"
        )
    if b.shape[1] > 1 and (history is None or history.shape[0] < b.shape[1] - 1):
        raise ValueError(f"history must hold K - 1 = {b.shape[1] - 1} tensors for b of width K")

    def col(v: Tensor) -> Tensor:  # [B] -> [B, 1, 1, ...] for broadcasting over a sample
        return v.float().reshape((batch,) + (1,) * (x.dim() - 1))

    x = x.float()
    guided = cond.float().clone()
    rows = torch.nonzero(uncond_index >= 0).flatten()
    if rows.numel() > 0:
        g = guided_channels
        u = uncond.float()[uncond_index[rows], :g]
        guided[rows, :g] = u + w.float()[rows].reshape((-1,) + (1,) * (x.dim() - 1)) * (
            guided[rows, :g] - u
        )
    d = col(p) * x + col(q) * guided
    x_next = col(a) * x + col(b[:, 0]) * d
    for k in range(1, b.shape[1]):
        x_next = x_next + col(b[:, k]) * history[k - 1].float()
    if noise is not None:
        x_next = x_next + col(c) * noise.float()
    return x_next, d


def guided_update(
    x: Tensor,
    cond: Tensor,
    uncond: Tensor,
    uncond_index: Tensor,
    w: Tensor,
    p: Tensor,
    q: Tensor,
    a: Tensor,
    b: Tensor,
    history: Tensor | None,
    c: Tensor,
    noise: Tensor | None,
    guided_channels: int,
) -> tuple[Tensor, Tensor]:
    """Guidance + solver update for a mixed batch (see the module docstring)."""
    return guided_update_reference(
        x, cond, uncond, uncond_index, w, p, q, a, b, history, c, noise, guided_channels
    )

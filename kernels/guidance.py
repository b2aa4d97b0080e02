"""Batched classifier-free guidance + solver update: the sampler hot path.

Per sample i (one row of the batch), with per-sample scalars:

    guided = u + w·(c − u)      on channels [0, guided_channels) of guided samples, else c
    d      = p·x + q·guided     (the prediction type converted to the data prediction)
    x_next = a·x + b₀·d + Σ_{k≥1} b_k·history[k−1] + c_noise·noise

``u`` is the unconditional output row ``uncond[uncond_index[i]]`` (Ho & Salimans, 2022);
unguided samples (``uncond_index == −1``) have no unconditional row. Every supported sampler
step has this form, so one pass updates a batch that mixes samplers, step counts and
guidance scales. ``guided_update_reference`` is the float32 PyTorch definition;
``guided_update`` dispatches: the fused Triton kernel (``denoised::guided_update`` custom op)
where ``use_fused`` says so (CUDA tensors by default), the reference otherwise.

The kernel reads cond, x, the history, the noise and (for guided rows) the unconditional row
once and writes x_next and d once — the least traffic the step allows. One program handles
one block of one sample's elements, so that sample's coefficients are scalars loaded once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import triton
import triton.language as tl
from torch import Tensor

from denoised.kernels._triton import check_triton_device, use_fused

MAX_ORDER = 4  # widest b (current D plus three history terms) the kernel unrolls
# BatchUpdate.values(): (uncond_index, w, p, q, a, b, history, c, noise).
_UpdateValues = tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor, Tensor | None
]


@dataclass(frozen=True)
class BatchUpdate:
    """Per-row guidance and update values of one step over B rows (see the module docstring)."""

    uncond_index: Tensor  # [B] int64: the row of ``uncond`` guiding each row, −1 for none
    w: Tensor  # [B] guidance scales
    p: Tensor  # [B]
    q: Tensor  # [B]
    a: Tensor  # [B]
    b: Tensor  # [B, K]
    history: Tensor | None  # [K−1, B, C, H, W], zeros where a row keeps fewer D's
    c: Tensor  # [B]
    noise: Tensor | None  # [B, C, H, W], zeros for rows with c = 0; None when all c = 0

    def values(self) -> _UpdateValues:
        """The fields in order (``dataclasses.astuple`` would deep-copy the tensors)."""
        return tuple(getattr(self, f.name) for f in fields(self))


def guided_update_reference(
    x: Tensor, cond: Tensor, uncond: Tensor, update: BatchUpdate, guided_channels: int
) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch float32 guidance + update; returns ``(x_next, d)``."""
    uncond_index, w, p, q, a, b, history, c, noise = update.values()
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
        assert history is not None  # K > 1 without a history raised above
        x_next = x_next + col(b[:, k]) * history[k - 1].float()
    if noise is not None:
        x_next = x_next + col(c) * noise.float()
    return x_next, d


@triton.jit
def _guided_update_fwd(
    X, COND, UNCOND, UNCOND_INDEX, W, P, Q, A, B, HISTORY, C, NOISE, X_NEXT, D,
    row_elems, guided_elems,
    stride_x, stride_cond, stride_uncond, stride_b,  # per-sample (row) strides
    stride_history_k, stride_history, stride_noise, stride_out,
    ORDER: tl.constexpr,  # K: b's width; history terms 1..K-1
    HAS_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < row_elems
    row64 = row.to(tl.int64)

    x = tl.load(X + row64 * stride_x + offs, mask=mask, other=0.0)
    cond = tl.load(COND + row64 * stride_cond + offs, mask=mask, other=0.0).to(tl.float32)
    u_row = tl.load(UNCOND_INDEX + row)
    # Guided elements end at guided_elems, or at 0 for an unguided row (a scalar bound keeps
    # the mask a plain block comparison).
    guide = offs < tl.where(u_row >= 0, guided_elems, 0)
    u_base = UNCOND + tl.maximum(u_row, 0) * stride_uncond
    u = tl.load(u_base + offs, mask=guide, other=0.0).to(tl.float32)
    w = tl.load(W + row)
    guided = tl.where(guide, u + w * (cond - u), cond)
    d = tl.load(P + row) * x + tl.load(Q + row) * guided
    x_next = tl.load(A + row) * x + tl.load(B + row64 * stride_b) * d
    for k in tl.static_range(1, ORDER):
        h_base = HISTORY + (k - 1) * stride_history_k + row64 * stride_history
        x_next += tl.load(B + row64 * stride_b + k) * tl.load(h_base + offs, mask=mask, other=0.0)
    if HAS_NOISE:
        z = tl.load(NOISE + row64 * stride_noise + offs, mask=mask, other=0.0)
        x_next += tl.load(C + row) * z
    tl.store(X_NEXT + row64 * stride_out + offs, x_next, mask=mask)
    tl.store(D + row64 * stride_out + offs, d, mask=mask)


def guided_update_config(row_elems: int) -> tuple[int, int]:
    """(elements per program, warps): 8 float32 per thread (two 16-byte accesses per tensor),
    up to 2048-element blocks; small latents get one right-sized block per sample."""
    block = min(2048, max(256, triton.next_power_of_2(row_elems)))
    return block, block // 256


def _per_sample(t: Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    return t.to(dtype).contiguous()


def _sample_rows(t: Tensor, name: str, shape: tuple[int, ...]) -> Tensor:
    """`t` with each sample's elements contiguous (a channel slice of a wider output is)."""
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.shape[0] and not t[0].is_contiguous():
        t = t.contiguous()
    return t


def guided_update_launch(
    x: Tensor,
    cond: Tensor,
    uncond: Tensor,
    update: BatchUpdate,
    guided_channels: int,
    x_next: Tensor,
    d: Tensor,
) -> tuple[tuple[int, int], tuple, dict]:
    """Validated grid and arguments of one fused launch (shared with the compile checks)."""
    uncond_index, w, p, q, a, b, history, c, noise = update.values()
    if x.dim() != 4 or x.dtype != torch.float32:
        raise ValueError(f"x must be a float32 [B, C, H, W] tensor, got {x.dtype} {tuple(x.shape)}")
    batch, channels = x.shape[:2]
    row_elems = math.prod(x.shape[1:])
    order = b.shape[1] if b.dim() == 2 else 0
    if b.dim() != 2 or b.shape[0] != batch or not 1 <= order <= MAX_ORDER:
        raise ValueError(
            f"b must be [B={batch}, K] with 1 <= K <= {MAX_ORDER}, got {tuple(b.shape)}"
        )
    if not 0 <= guided_channels <= channels:
        raise ValueError(f"guided_channels must be in [0, {channels}], got {guided_channels}")
    x = x.contiguous()
    cond = _sample_rows(cond, "cond", tuple(x.shape))
    if uncond.dim() != 4 or tuple(uncond.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"uncond must be [G, {channels}, ...] like x, got {tuple(uncond.shape)}")
    uncond = _sample_rows(uncond, "uncond", tuple(uncond.shape)) if uncond.numel() else x
    uncond_index = _per_sample(uncond_index, "uncond_index", (batch,), torch.int64)
    w, p, q, a, c = (
        _per_sample(t, name, (batch,), torch.float32)
        for t, name in ((w, "w"), (p, "p"), (q, "q"), (a, "a"), (c, "c"))
    )
    b = b.to(torch.float32).contiguous()
    if order > 1:
        if history is None or history.dim() != 5 or history.shape[0] < order - 1:
            raise ValueError(f"history must hold K - 1 = {order - 1} tensors for b of width K")
        if tuple(history.shape[1:]) != tuple(x.shape):
            raise ValueError(f"history[k] must have x's shape {tuple(x.shape)}")
        history = history[: order - 1].to(torch.float32).contiguous()
    else:
        history = x
    has_noise = noise is not None
    noise = (
        _sample_rows(noise.to(torch.float32), "noise", tuple(x.shape)) if noise is not None else x
    )
    for name, t in (("x_next", x_next), ("d", d)):
        if tuple(t.shape) != tuple(x.shape) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 {tuple(x.shape)} tensor")
    block, warps = guided_update_config(row_elems)
    grid = (triton.cdiv(row_elems, block), batch)
    args = (
        x, cond, uncond, uncond_index, w, p, q, a, b, history, c, noise, x_next, d,
        row_elems, guided_channels * (row_elems // max(channels, 1)),
        x.stride(0), cond.stride(0), uncond.stride(0), b.stride(0),
        history.stride(0) if order > 1 else 0, history.stride(1) if order > 1 else 0,
        noise.stride(0), x_next.stride(0),
    )  # fmt: skip
    kwargs = dict(ORDER=order, HAS_NOISE=has_noise, BLOCK=block, num_warps=warps)
    return grid, args, kwargs


def guided_update_triton(
    x: Tensor,
    cond: Tensor,
    uncond: Tensor,
    update: BatchUpdate,
    guided_channels: int,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Launch the fused kernel (no dispatch). ``uncond_index`` must hold -1 or a row of
    ``uncond`` (not checked: that would cost a device sync per step). ``out`` optionally
    supplies the (x_next, d) buffers, e.g. static ones for a CUDA graph."""
    if out is None:
        x_next, d = (torch.empty(x.shape, dtype=torch.float32, device=x.device) for _ in "xd")
    else:
        x_next, d = out
    grid, args, kwargs = guided_update_launch(x, cond, uncond, update, guided_channels, x_next, d)
    check_triton_device(*(t for t in args if isinstance(t, Tensor)))
    if x.numel():
        _guided_update_fwd[grid](*args, **kwargs)
    return x_next, d


# A custom op takes tensors, not a dataclass: the one place the fields are spelled out.
@torch.library.custom_op("denoised::guided_update", mutates_args=())
def _guided_update_op(
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
    update = BatchUpdate(uncond_index, w, p, q, a, b, history, c, noise)
    return guided_update_triton(x, cond, uncond, update, guided_channels)


@_guided_update_op.register_fake
def _(x, cond, uncond, *update_and_channels):
    return torch.empty_like(x), torch.empty_like(x)


def guided_update(
    x: Tensor, cond: Tensor, uncond: Tensor, update: BatchUpdate, guided_channels: int
) -> tuple[Tensor, Tensor]:
    """Guidance + solver update for a mixed batch (see the module docstring)."""
    b = update.b
    tensors = [t for t in (x, cond, update.history, update.noise) if t is not None]
    if b.dim() == 2 and b.shape[1] <= MAX_ORDER and use_fused(*tensors):
        return _guided_update_op(x, cond, uncond, *update.values(), guided_channels)
    return guided_update_reference(x, cond, uncond, update, guided_channels)

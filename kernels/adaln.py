"""Fused adaLN pieces of a DiT block: LayerNorm + modulate, and gate + residual (+ LayerNorm +
modulate).

A DiT block (Peebles & Xie, 2023) wraps each branch in the same elementwise steps:

    h = LayerNorm(x) * (1 + scale) + shift      (affine-free LayerNorm, per-sample shift/scale)
    x = x + gate * branch(h)                    (per-sample gate)

Eager PyTorch spends several full passes over the activations on each; at 256 px they cost
more than attention. One Triton kernel does any of the three combinations in one pass over
rows of `[B, N, C]` activations: `layer_norm_modulate`, `gate_residual`, and
`gate_residual_layer_norm_modulate` (a residual update followed by the next branch's
normalisation, reading x and the branch once). Statistics and arithmetic are float32 whatever
the storage dtype. Each function dispatches: the Triton kernel (through a `denoised::` custom
op, visible to `torch.compile`) where `use_fused` says so, the PyTorch reference otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from denoised.kernels._triton import check_triton_device, use_fused


def layer_norm_modulate_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    """Affine-free LayerNorm of `x: [B, N, C]`, then the per-sample `(1 + scale) * . + shift`."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]


def gate_residual_reference(
    x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor
) -> torch.Tensor:
    """`x + gate * branch` with a per-sample gate `[B, C]`."""
    return x + gate[:, None] * branch


@triton.jit
def _adaln_fwd(
    X, GATE, BRANCH, SHIFT, SCALE, X_OUT, Y,
    n_rows, tokens, channels, eps,
    stride_x, stride_branch, stride_x_out, stride_y,  # row strides (columns are contiguous)
    stride_gate, stride_shift, stride_scale,  # per-sample row strides of the [B, C] vectors
    RESIDUAL: tl.constexpr,  # x = x + gate * branch, stored to X_OUT
    NORM: tl.constexpr,  # y = LayerNorm(x) * (1 + scale) + shift, stored to Y
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    row_mask = rows < n_rows
    col_mask = cols < channels
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)  # element offsets may pass 2^31; row counts do not
    sample = (rows // tokens).to(tl.int64)  # per-sample vectors are indexed by the row's sample

    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    out_dtype = x.dtype
    x = x.to(tl.float32)  # all arithmetic in float32 (also the interpreter's bf16 upcast)
    if RESIDUAL:
        gate = tl.load(GATE + sample[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0)
        branch = tl.load(BRANCH + rows64[:, None] * stride_branch + cols[None, :], mask=mask,
                         other=0.0)  # fmt: skip
        x = (x + gate.to(tl.float32) * branch.to(tl.float32)).to(out_dtype)
        tl.store(X_OUT + rows64[:, None] * stride_x_out + cols[None, :], x, mask=mask)
        # Normalise the stored (rounded) residual, as the unfused pair of calls would.
        x = x.to(tl.float32)
    if NORM:
        mean = tl.sum(x, axis=1) / channels
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / channels + eps)
        shift = tl.load(SHIFT + sample[:, None] * stride_shift + cols[None, :], mask=mask,
                        other=0.0)  # fmt: skip
        scale = tl.load(SCALE + sample[:, None] * stride_scale + cols[None, :], mask=mask,
                        other=0.0)  # fmt: skip
        y = centred * rstd[:, None] * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(out_dtype), mask=mask)


def adaln_config(channels: int) -> tuple[int, int, int]:
    """(rows per program, column block, warps): one row per column block, ~4096 elements per
    program so every thread holds 16 values of each operand (no spills, enough bytes in
    flight per SM)."""
    block_c = triton.next_power_of_2(channels)
    rows = max(1, 4096 // block_c)
    return rows, block_c, 8 if block_c >= 2048 else 4


def _check(x: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as a [rows, C] view with contiguous columns (copying only when it must)."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1]).contiguous()


def _vector(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def adaln_launch(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    branch: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    eps: float,
    x_out: torch.Tensor | None,
    y: torch.Tensor | None,
) -> tuple[tuple[int], tuple, dict]:
    """Grid and arguments of one fused launch; `x_out`/`y` are [rows, C] outputs or None.

    Shared by the launcher and the CI compile checks.
    """
    b, n, c = x.shape
    residual, norm = gate is not None, shift is not None
    x2 = _rows(x)
    # Callers pass branch and x_out with gate, scale and y with shift (adaln_triton checks).
    if gate is not None:
        assert branch is not None and x_out is not None
        branch2, gate = _rows(branch), _vector(gate)
    else:
        branch2 = gate = x_out = x2
    if shift is not None:
        assert scale is not None and y is not None
        shift, scale = _vector(shift), _vector(scale)
    else:
        shift = scale = y = x2
    rows, block_c, warps = adaln_config(c)
    grid = (triton.cdiv(b * n, rows),)
    args = (
        x2, gate, branch2, shift, scale, x_out, y,
        b * n, n, c, eps,
        x2.stride(0), branch2.stride(0), x_out.stride(0), y.stride(0),
        gate.stride(0), shift.stride(0), scale.stride(0),
    )  # fmt: skip
    kwargs = dict(RESIDUAL=residual, NORM=norm, ROWS=rows, BLOCK_C=block_c, num_warps=warps)
    return grid, args, kwargs


def adaln_triton(
    x: torch.Tensor,
    gate: torch.Tensor | None = None,
    branch: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    eps: float = 1e-6,
    out: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch the fused kernel; returns `(x + gate * branch or None, modulated LN or None)`.

    Pass gate and branch for the residual, shift and scale for the normalisation, or both.
    `out` optionally supplies contiguous `[B, N, C]` output buffers.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be [batch, tokens, channels], got shape {tuple(x.shape)}")
    b, n, c = x.shape
    _check(x, "x", (b, n, c))
    residual, norm = gate is not None, shift is not None
    if (gate is None) != (branch is None) or (shift is None) != (scale is None):
        raise ValueError("pass gate with branch, and shift with scale")
    if not (residual or norm):
        raise ValueError("nothing to compute: pass gate and branch, or shift and scale")
    for name, t, shape in (("gate", gate, (b, c)), ("branch", branch, (b, n, c)),
                           ("shift", shift, (b, c)), ("scale", scale, (b, c))):  # fmt: skip
        if t is not None:
            _check(t, name, shape)
    check_triton_device(*(t for t in (x, gate, branch, shift, scale) if t is not None))
    x_out, y = out
    if residual and x_out is None:
        x_out = torch.empty(b, n, c, dtype=x.dtype, device=x.device)
    if norm and y is None:
        y = torch.empty(b, n, c, dtype=x.dtype, device=x.device)
    for name, t in (("x_out", x_out), ("y", y)):
        if t is not None and (tuple(t.shape) != (b, n, c) or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous {(b, n, c)} tensor")
    if b * n == 0:
        return x_out, y
    # Both are set above when residual / norm.
    x_rows = x_out.view(-1, c) if residual and x_out is not None else None
    y_rows = y.view(-1, c) if norm and y is not None else None
    grid, args, kwargs = adaln_launch(x, gate, branch, shift, scale, eps, x_rows, y_rows)
    _adaln_fwd[grid](*args, **kwargs)
    return x_out, y


@torch.library.custom_op("denoised::layer_norm_modulate", mutates_args=())
def _layer_norm_modulate_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    y = adaln_triton(x, shift=shift, scale=scale, eps=eps)[1]
    assert y is not None  # made when shift and scale are given
    return y


@_layer_norm_modulate_op.register_fake
def _(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("denoised::gate_residual", mutates_args=())
def _gate_residual_op(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    x_out = adaln_triton(x, gate=gate, branch=branch)[0]
    assert x_out is not None  # made when gate and branch are given
    return x_out


@_gate_residual_op.register_fake
def _(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("denoised::gate_residual_layer_norm_modulate", mutates_args=())
def _gate_residual_layer_norm_modulate_op(
    x: torch.Tensor,
    gate: torch.Tensor,
    branch: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    x_out, y = adaln_triton(x, gate, branch, shift, scale, eps)
    assert x_out is not None and y is not None  # both made when all four are given
    return x_out, y


@_gate_residual_layer_norm_modulate_op.register_fake
def _(x, gate, branch, shift, scale, eps):
    empty = torch.empty_like(x, memory_format=torch.contiguous_format)
    return empty, torch.empty_like(empty)


def layer_norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    """`LayerNorm(x) * (1 + scale) + shift` for `x: [B, N, C]`, per-sample `[B, C]` vectors."""
    if use_fused(x, shift, scale):
        return _layer_norm_modulate_op(x, shift, scale, eps)
    return layer_norm_modulate_reference(x, shift, scale, eps)


def gate_residual(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """`x + gate * branch` with a per-sample gate `[B, C]`."""
    if use_fused(x, gate, branch):
        return _gate_residual_op(x, gate, branch)
    return gate_residual_reference(x, gate, branch)


def gate_residual_layer_norm_modulate(
    x: torch.Tensor,
    gate: torch.Tensor,
    branch: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x', LayerNorm(x') * (1 + scale) + shift)` with `x' = x + gate * branch`, in one pass."""
    if use_fused(x, gate, branch, shift, scale):
        return _gate_residual_layer_norm_modulate_op(x, gate, branch, shift, scale, eps)
    x = gate_residual_reference(x, gate, branch)
    return x, layer_norm_modulate_reference(x, shift, scale, eps)

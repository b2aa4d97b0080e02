"""The one attention entry point used by every attention layer (DiT, MMDiT, UNet, VAE).

`attention(q, k, v)` takes `[batch, heads, tokens, head_dim]` tensors and returns the
non-causal softmax attention with scale `1/sqrt(head_dim)`. The backend is chosen per call
by the `attention` backend (`kernels.backends`):

- `auto` (default): the Triton flash-attention kernel for CUDA tensors it supports; on
  other devices softmax(QKᵀ/√d)V written out (`explicit_attention`) up to
  `EXPLICIT_MAX_KEYS` keys, where SDPA's CPU kernel costs more than the work, and PyTorch's
  `scaled_dot_product_attention` (SDPA) everywhere else;
- `triton`: always the Triton kernel (ValueError where it cannot run);
- `sdpa`: always SDPA.

The Triton kernel is a flash-attention forward (Dao et al., 2022): one program per block of
query rows of one (batch, head), streaming key/value blocks through an online softmax in base
2 with float32 statistics and accumulators. Head dims that are not a power of two are split
into two power-of-two parts (72 = 64 + 16 with 8 masked lanes, 96 = 64 + 32) instead of being
padded to 128, so DiT-XL's 72 does 80/72 of the matmul work rather than 128/72. Inputs may be
strided views (e.g. q, k, v sliced out of one fused qkv projection); any query and key
length works (tails are masked). It is exposed as the `denoised::flash_attention` custom op
so `torch.compile` sees one opaque node.

`attention(q, k, v, mask)` with a `[batch, key tokens]` bool key-padding mask (False: a padded
key no query may attend to) always runs SDPA with that mask, whatever the backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from denoised.kernels._triton import check_triton_device, interpreting, upcast
from denoised.kernels.backends import backends

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128


@triton.jit
def _flash_attention_fwd(
    Q, K, V, O,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    heads, n_q, n_kv, qk_scale,
    HEAD_DIM: tl.constexpr,  # true head dim
    D0: tl.constexpr,  # power-of-two first part of the head dim
    D1: tl.constexpr,  # power-of-two second part (0: none), lanes past HEAD_DIM masked
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr,  # n_kv % BLOCK_N == 0: no key masking inside the loop
    ALIGN: tl.constexpr,  # batch/head/token strides arrive divided by ALIGN (see stride_align)
    IEEE: tl.constexpr,  # float32 inputs: full-precision dots instead of tf32
    UPCAST: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // heads).to(tl.int64)
    off_h = (off_bh % heads).to(tl.int64)
    # Multiplying back by the constexpr lets the compiler prove row alignment (vector loads,
    # cp.async) for strides like 72 that Triton's own specialisation (multiples of 16) misses.
    stride_qb, stride_qh, stride_qn = stride_qb * ALIGN, stride_qh * ALIGN, stride_qn * ALIGN
    stride_kb, stride_kh, stride_kn = stride_kb * ALIGN, stride_kh * ALIGN, stride_kn * ALIGN
    stride_vb, stride_vh, stride_vn = stride_vb * ALIGN, stride_vh * ALIGN, stride_vn * ALIGN
    stride_ob, stride_oh, stride_on = stride_ob * ALIGN, stride_oh * ALIGN, stride_on * ALIGN
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    O += off_b * stride_ob + off_h * stride_oh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    m_mask = offs_m < n_q
    precision: tl.constexpr = "ieee" if IEEE else "tf32"

    q0 = tl.load(Q + offs_m[:, None] * stride_qn + offs_d0[None, :] * stride_qd,
                 mask=m_mask[:, None], other=0.0)  # fmt: skip
    if UPCAST:
        q0 = q0.to(tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        d1_mask = offs_d1 < HEAD_DIM
        q1 = tl.load(Q + offs_m[:, None] * stride_qn + offs_d1[None, :] * stride_qd,
                     mask=m_mask[:, None] & d1_mask[None, :], other=0.0)  # fmt: skip
        if UPCAST:
            q1 = q1.to(tl.float32)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    for start_n in range(0, n_kv, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < n_kv
        k_rows = K + cols[:, None] * stride_kn
        v_rows = V + cols[:, None] * stride_vn
        if EVEN_N:
            k0 = tl.load(k_rows + offs_d0[None, :] * stride_kd)
            v0 = tl.load(v_rows + offs_d0[None, :] * stride_vd)
        else:
            k0 = tl.load(k_rows + offs_d0[None, :] * stride_kd, mask=n_mask[:, None], other=0.0)
            v0 = tl.load(v_rows + offs_d0[None, :] * stride_vd, mask=n_mask[:, None], other=0.0)
        if UPCAST:
            k0 = k0.to(tl.float32)
            v0 = v0.to(tl.float32)
        qk = tl.dot(q0, tl.trans(k0), input_precision=precision)
        if D1 > 0:
            kv1_mask = d1_mask[None, :] if EVEN_N else n_mask[:, None] & d1_mask[None, :]
            k1 = tl.load(k_rows + offs_d1[None, :] * stride_kd, mask=kv1_mask, other=0.0)
            v1 = tl.load(v_rows + offs_d1[None, :] * stride_vd, mask=kv1_mask, other=0.0)
            if UPCAST:
                k1 = k1.to(tl.float32)
                v1 = v1.to(tl.float32)
            qk = tl.dot(q1, tl.trans(k1), qk, input_precision=precision)
        if not EVEN_N:
            qk = tl.where(n_mask[None, :], qk, float("-inf"))
        # Base-2 online softmax: qk_scale carries log2(e) / sqrt(head_dim).
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=precision)
        if D1 > 0:
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=precision)
        m_i = m_new

    inv_l = 1.0 / l_i
    o_rows = O + offs_m[:, None] * stride_on
    out0 = (acc0 * inv_l[:, None]).to(O.dtype.element_ty)
    tl.store(o_rows + offs_d0[None, :] * stride_od, out0, mask=m_mask[:, None])
    if D1 > 0:
        out1 = (acc1 * inv_l[:, None]).to(O.dtype.element_ty)
        tl.store(o_rows + offs_d1[None, :] * stride_od, out1,
                 mask=m_mask[:, None] & d1_mask[None, :])  # fmt: skip


@dataclass(frozen=True)
class AttentionConfig:
    """One launch configuration of the flash-attention kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """Power-of-two parts (d0, d1) covering `head_dim`; d1 == 0 when it is a power of two.

    Dots need power-of-two tiles of at least 16; two parts waste at most the masked tail of
    d1 (72 -> 64 + 16, 8 lanes idle) where one part would pad to the next power of two.
    """
    d0 = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d0
    d1 = 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))
    return d0, d1


def attention_config(
    head_dim: int, dtype: torch.dtype, capability: tuple[int, int]
) -> AttentionConfig:
    """The shipped block configuration for a head dim, input dtype and GPU capability.

    Fixed, not autotuned: deterministic launches, nothing to tune at warm-up, and every entry
    is compiled for sm_90 and sm_80 in CI (no spills, shared memory within the limit).
    """
    d0, d1 = split_head_dim(head_dim)
    width = d0 + d1
    if dtype == torch.float32:
        # Full-precision float32 dots run on CUDA cores (no tensor-core path): narrow key
        # blocks keep the operands in registers (64 x 32 tiles spill at head dims 64-128).
        return AttentionConfig(64, 16, 4, 2)
    if capability[0] == 9:
        # Hopper: 128-row tiles for two warpgroups of wgmma; wider key blocks while the
        # qk tile plus accumulators still fit in registers.
        return AttentionConfig(128, 128 if width <= 64 else 64, 8, 3)
    # Ampere and others: mma.sync tiles, 3-stage cp.async pipeline within 100 KB of smem.
    return AttentionConfig(128, 64, 4 if width <= 64 else 8, 3)


def _device_capability(t: torch.Tensor) -> tuple[int, int]:
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else (9, 0)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects [batch, heads, tokens, head_dim] tensors, got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, _, d = q.shape
    if k.shape[:2] != (b, h) or v.shape[:2] != (b, h) or k.shape[2] != v.shape[2]:
        raise ValueError(
            f"attention: k and v must match q's batch and heads and each other's tokens, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[3] != d or v.shape[3] != d:
        raise ValueError(f"attention: head dims differ (q {d}, k {k.shape[3]}, v {v.shape[3]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: dtypes differ (q {q.dtype}, k {k.dtype}, v {v.dtype})")


def triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when the Triton kernel can run these inputs, else the reason it cannot."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not one of float16, bfloat16, float32"
    if not MIN_HEAD_DIM <= q.shape[-1] <= MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} is outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    if not interpreting() and not (q.is_cuda and k.is_cuda and v.is_cuda):
        return f"tensors are on {q.device}, not CUDA"
    return None


def stride_align(*tensors: torch.Tensor) -> int:
    """Largest power of two <= 16 dividing every batch, head and token stride of `tensors`."""
    align = 16
    for t in tensors:
        for stride in t.stride()[:-1]:
            while stride % align:
                align //= 2
    return align


def flash_attention_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    capability: tuple[int, int],
    config: AttentionConfig | None = None,
) -> tuple[tuple[int, int], tuple, dict]:
    """Grid, positional and keyword arguments of the kernel launch for these tensors.

    Shared by the launcher and the CI compile checks, so the checked specialisation is the
    launched one. `config` overrides the shipped table (for tuning sweeps).
    """
    b, h, n_q, d = q.shape
    n_kv = k.shape[2]
    d0, d1 = split_head_dim(d)
    cfg = config or attention_config(d, q.dtype, capability)
    grid = (triton.cdiv(n_q, cfg.block_m), b * h)
    align = stride_align(q, k, v, out)
    strides = [(*(s // align for s in t.stride()[:-1]), t.stride(-1)) for t in (q, k, v, out)]
    args = (
        q, k, v, out,
        *strides[0], *strides[1], *strides[2], *strides[3],
        h, n_q, n_kv, math.log2(math.e) / math.sqrt(d),
    )  # fmt: skip
    kwargs = dict(
        HEAD_DIM=d, D0=d0, D1=d1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        EVEN_N=n_kv % cfg.block_n == 0, ALIGN=align, IEEE=q.dtype == torch.float32, UPCAST=upcast(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return grid, args, kwargs


def new_output(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised `[B, H, N, D]` output laid out as `[B, N, H, D]` in memory, so the
    caller's usual `out.transpose(1, 2).reshape(B, N, H * D)` is a view, not a copy."""
    b, h, n, d = q.shape
    return torch.empty(b, n, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)


def flash_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None = None,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """Launch the Triton flash-attention forward (no dispatch; ValueError on bad input).

    `out` may be any strided `[B, H, N, D]` tensor of q's dtype; by default it is laid out as
    `[B, N, H, D]` (see `new_output`).
    """
    _check_inputs(q, k, v)
    reason = triton_supports(q, k, v)
    if reason is not None:
        raise ValueError(f"the Triton attention kernel cannot run: {reason}")
    if k.shape[2] == 0:
        raise ValueError("attention: key/value sequence is empty")
    if out is None:
        out = new_output(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"attention: out must be {tuple(q.shape)} {q.dtype} on {q.device}, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )
    check_triton_device(q, k, v, out)
    if out.numel() == 0:
        return out
    grid, args, kwargs = flash_attention_launch(q, k, v, out, _device_capability(q), config)
    _flash_attention_fwd[grid](*args, **kwargs)
    return out


@torch.library.custom_op("denoised::flash_attention", mutates_args=())
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Triton flash-attention forward as a custom op (opaque to `torch.compile`)."""
    return flash_attention_triton(q, k, v)


@flash_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return new_output(q)


def _key_padding_mask(mask: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A `[B, L_k]` bool key-padding mask as SDPA's `[B, 1, 1, L_k]` attn_mask (ValueError
    naming a bad shape or dtype)."""
    if mask.dtype != torch.bool or tuple(mask.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"attention: mask must be a bool [batch, key tokens] = {(k.shape[0], k.shape[2])} "
            f"tensor, got {mask.dtype} {tuple(mask.shape)}"
        )
    return mask[:, None, None, :]


# Off CUDA, up to this many keys the written-out attention beat SDPA's CPU flash kernel
# 1.6-2.4x at 64 tokens (DiT-S/2 on 16x16 latents; bfloat16, eager and compiled) and 3x at
# 16; at 256 it lost 2.7x in eager float32 (`docs/benchmarks.md`).
EXPLICIT_MAX_KEYS = 64


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d)V as two matmuls, the scores and softmax in float32 (bf16 scores
    lose ~0.1 in the output at unit-scale inputs): what `attention` runs on short sequences
    off CUDA (the scores, `[B, H, N, L]`, are held whole)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.softmax(-1).to(q.dtype) @ v


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention of `[B, H, N, D]` tensors on the configured backend. `mask`: an
    optional `[B, L_k]` bool key-padding mask, True for the keys each row may attend to (e.g.
    the real tokens of prompts padded to one length); with one, every backend runs SDPA with
    it (the Triton kernel takes no mask). A query whose keys are all masked gets NaN."""
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_key_padding_mask(mask, k))
    backend = backends().attention
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "triton":
        return flash_attention(q, k, v)
    if q.is_cuda and triton_supports(q, k, v) is None:
        return flash_attention(q, k, v)
    if not q.is_cuda and k.shape[-2] <= EXPLICIT_MAX_KEYS:
        return explicit_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)

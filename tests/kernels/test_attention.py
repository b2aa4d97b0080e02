"""Triton flash attention against SDPA (float64) on random inputs, and the dispatcher."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from guards import DEVICE, assert_close, check_guarded, guarded_empty

from denoised.kernels.attention import (
    EXPLICIT_MAX_KEYS,
    attention,
    explicit_attention,
    flash_attention,
    flash_attention_triton,
    split_head_dim,
)
from denoised.kernels.backends import set_backends, using_backends

# The interpreter trips a NumPy deprecation inside Triton itself.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SEQ_LENS = (1, 17, 77, 256, 257)
HEAD_DIMS = (32, 64, 72, 96, 128)
# Every (length, head dim) pair once; the dtype rotates so each dtype meets every length and
# every head dim while the interpreter runs 25 cases instead of 75.
CASES = [
    (n, d, DTYPES[(i + j) % len(DTYPES)])
    for (i, n), (j, d) in itertools.product(enumerate(SEQ_LENS), enumerate(HEAD_DIMS))
]


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double())


def _randn(*shape: int, dtype: torch.dtype, scale: float = 1.0, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=DEVICE)


@pytest.mark.parametrize(("n", "d", "dtype"), CASES, ids=[f"n{n}-d{d}-{t}" for n, d, t in CASES])
def test_matches_sdpa(n: int, d: int, dtype: torch.dtype) -> None:
    batch, heads = (2, 2) if n < 256 else (1, 2)
    q, k, v = (_randn(batch, heads, n, d, dtype=dtype, seed=n * 1000 + d + s) for s in range(3))
    buffer, out = guarded_empty((batch, heads, n, d), dtype)
    flash_attention_triton(q, k, v, out=out)
    check_guarded(buffer, out)
    assert_close(out, _reference(q, k, v), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_qkv_views_and_strided_output(dtype: torch.dtype) -> None:
    # q, k, v sliced out of one [B, N, 3, H, D] projection; output written as [B, N, H, D].
    batch, n, heads, d = 2, 77, 2, 72
    qkv = _randn(batch, n, 3, heads, d, dtype=dtype, seed=7)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    buffer, out_bnhd = guarded_empty((batch, n, heads, d), dtype)
    out = flash_attention_triton(q, k, v, out=out_bnhd.transpose(1, 2))
    check_guarded(buffer, out_bnhd)
    assert_close(out, _reference(q, k, v), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits(dtype: torch.dtype) -> None:
    # Logits of several hundred: exp overflows unless the running max is subtracted. Float32
    # logits that large carry ~600 * 2^-24 of rounding, so float32 gets 1e-4 here.
    q = _randn(1, 2, 77, 64, dtype=dtype, scale=25.0, seed=11)
    k = _randn(1, 2, 77, 64, dtype=dtype, scale=25.0, seed=12)
    v = _randn(1, 2, 77, 64, dtype=dtype, seed=13)
    buffer, out = guarded_empty(tuple(q.shape), dtype)
    flash_attention_triton(q, k, v, out=out)
    check_guarded(buffer, out)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), _reference(q, k, v), atol=1e-4, rtol=1e-4)
    else:
        assert_close(out, _reference(q, k, v), dtype)


@pytest.mark.parametrize(("n_q", "n_kv"), [(17, 77), (77, 1)])
def test_query_and_key_lengths_differ(n_q: int, n_kv: int) -> None:
    q = _randn(1, 2, n_q, 32, dtype=torch.float16, seed=21)
    k = _randn(1, 2, n_kv, 32, dtype=torch.float16, seed=22)
    v = _randn(1, 2, n_kv, 32, dtype=torch.float16, seed=23)
    assert_close(flash_attention_triton(q, k, v), _reference(q, k, v), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "keys"), [(1, 1), (16, 16), (64, 64), (17, 77)])
def test_explicit_attention_matches_sdpa(n: int, keys: int, dtype: torch.dtype) -> None:
    q = _randn(3, 4, n, 64, dtype=dtype, seed=71, scale=2.0)
    k, v = (_randn(3, 4, keys, 64, dtype=dtype, seed=s, scale=2.0) for s in (72, 73))
    assert_close(explicit_attention(q, k, v), _reference(q, k, v), dtype)


@pytest.mark.parametrize(
    ("head_dim", "parts"), [(32, (32, 0)), (72, (64, 16)), (96, (64, 32)), (100, (64, 64))]
)
def test_head_dim_split(head_dim: int, parts: tuple[int, int]) -> None:
    assert split_head_dim(head_dim) == parts


def test_dispatch_setting() -> None:
    q, k, v = (_randn(1, 2, 17, 32, dtype=torch.float32, seed=s) for s in (31, 32, 33))
    sdpa = F.scaled_dot_product_attention(q, k, v)
    with using_backends(attention="sdpa"):
        assert torch.equal(attention(q, k, v), sdpa)
    with using_backends(attention="triton"):
        assert torch.equal(attention(q, k, v), flash_attention_triton(q, k, v))
    with using_backends(attention="auto"):
        expected = flash_attention_triton(q, k, v) if q.is_cuda else explicit_attention(q, k, v)
        assert torch.equal(attention(q, k, v), expected)
        if not q.is_cuda:  # above EXPLICIT_MAX_KEYS keys: SDPA
            k, v = (
                _randn(1, 2, EXPLICIT_MAX_KEYS + 1, 32, dtype=q.dtype, seed=s) for s in (34, 35)
            )
            assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    with pytest.raises(ValueError, match="DENOISED_ATTENTION"):
        set_backends(attention="fast")


def test_bad_inputs_name_the_problem() -> None:
    q = _randn(1, 2, 17, 32, dtype=torch.float32, seed=41)
    with pytest.raises(ValueError, match="head dims differ"):
        flash_attention_triton(q, q, q[..., :16])
    with pytest.raises(ValueError, match="head dim 8"):
        flash_attention_triton(q[..., :8], q[..., :8], q[..., :8])
    with pytest.raises(ValueError, match=r"\[batch, heads, tokens, head_dim\]"):
        flash_attention_triton(q[0], q[0], q[0])


def test_custom_op_is_traceable() -> None:
    q, k, v = (_randn(1, 2, 17, 32, dtype=torch.float16, seed=s) for s in (51, 52, 53))
    torch.library.opcheck(flash_attention, (q, k, v))
    compiled = torch.compile(flash_attention, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(q, k, v), flash_attention_triton(q, k, v))


def test_default_output_is_token_major() -> None:
    # [B, N, H, D] in memory: merging the heads back into channels needs no copy.
    q, k, v = (_randn(2, 3, 17, 32, dtype=torch.float16, seed=s) for s in (61, 62, 63))
    out = flash_attention_triton(q, k, v)
    assert out.transpose(1, 2).is_contiguous()
    assert_close(out, _reference(q, k, v), torch.float16)


@pytest.mark.parametrize("backend", ["auto", "triton", "sdpa"])
def test_key_padding_mask_equals_dropping_the_padded_keys(backend: str) -> None:
    # Row 0 keeps 5 of 9 keys, row 1 all of them: each row as if its padding were not there.
    q = _randn(2, 2, 7, 32, dtype=torch.float32, seed=71)
    k, v = (_randn(2, 2, 9, 32, dtype=torch.float32, seed=s) for s in (72, 73))
    mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    mask[0, 5:] = False
    with using_backends(attention=backend):
        out = attention(q, k, v, mask=mask)
    assert_close(out[:1], _reference(q[:1], k[:1, :, :5], v[:1, :, :5]), torch.float32)
    assert_close(out[1:], _reference(q[1:], k[1:], v[1:]), torch.float32)
    with pytest.raises(ValueError, match=r"mask must be a bool \[batch, key tokens\] = \(2, 9\)"):
        attention(q, k, v, mask=mask[:, :8])
    with pytest.raises(ValueError, match=r"got torch\.float32"):
        attention(q, k, v, mask=mask.float())

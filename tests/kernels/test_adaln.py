"""Fused adaLN kernel against the float64 PyTorch reference, and its dispatchers."""

from __future__ import annotations

import itertools

import pytest
import torch
from guards import DEVICE, assert_close, check_guarded, guarded_empty

from denoised.kernels import adaln
from denoised.kernels.adaln import (
    adaln_triton,
    gate_residual,
    gate_residual_layer_norm_modulate,
    gate_residual_reference,
    layer_norm_modulate,
    layer_norm_modulate_reference,
)
from denoised.kernels.backends import set_backends, using_backends

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (tokens, channels): one token; a ragged token count with a non-power-of-two width; DiT-XL's
# width (1152 of a 2048-lane block).
SHAPES = ((1, 32), (17, 72), (5, 1152))
CASES = list(itertools.product(SHAPES, DTYPES))


def _inputs(tokens: int, channels: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    batch = 3
    x = (torch.randn(batch, tokens, channels, generator=g) * 2 + 0.5).to(dtype).to(DEVICE)
    branch = torch.randn(batch, tokens, channels, generator=g).to(dtype).to(DEVICE)
    # Per-sample vectors are chunks of one adaLN projection, as in the model: strided views.
    shift, scale, gate = (
        torch.randn(batch, 3 * channels, generator=g).to(dtype).to(DEVICE).chunk(3, dim=1)
    )
    return x, branch, shift, scale, gate


def _d(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.double() for t in tensors]


@pytest.mark.parametrize(("shape", "dtype"), CASES, ids=[f"{s}-{d}" for s, d in CASES])
def test_layer_norm_modulate(shape: tuple[int, int], dtype: torch.dtype) -> None:
    x, _, shift, scale, _ = _inputs(*shape, dtype, seed=1)
    buffer, y = guarded_empty(tuple(x.shape), dtype)
    adaln_triton(x, shift=shift, scale=scale, eps=1e-6, out=(None, y))
    check_guarded(buffer, y)
    assert_close(y, layer_norm_modulate_reference(*_d(x, shift, scale), 1e-6), dtype)


@pytest.mark.parametrize(("shape", "dtype"), CASES, ids=[f"{s}-{d}" for s, d in CASES])
def test_gate_residual_then_layer_norm_modulate(shape: tuple[int, int], dtype: torch.dtype) -> None:
    x, branch, shift, scale, gate = _inputs(*shape, dtype, seed=2)
    x_buffer, x_out = guarded_empty(tuple(x.shape), dtype)
    y_buffer, y = guarded_empty(tuple(x.shape), dtype)
    adaln_triton(x, gate, branch, shift, scale, 1e-5, out=(x_out, y))
    check_guarded(x_buffer, x_out)
    check_guarded(y_buffer, y)
    expected_x = gate_residual_reference(*_d(x, gate, branch))
    assert_close(x_out, expected_x, dtype)
    # The normalisation reads the stored residual, as the unfused calls would.
    assert_close(y, layer_norm_modulate_reference(*_d(x_out, shift, scale), 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_residual(dtype: torch.dtype) -> None:
    x, branch, _, _, gate = _inputs(17, 72, dtype, seed=3)
    buffer, x_out = guarded_empty(tuple(x.shape), dtype)
    assert adaln_triton(x, gate, branch, out=(x_out, None))[1] is None
    check_guarded(buffer, x_out)
    assert_close(x_out, gate_residual_reference(*_d(x, gate, branch)), dtype)


def test_dispatch_setting() -> None:
    x, branch, shift, scale, gate = _inputs(17, 72, torch.float32, seed=4)
    with using_backends(fused="reference"):
        assert torch.equal(
            layer_norm_modulate(x, shift, scale, 1e-6),
            layer_norm_modulate_reference(x, shift, scale, 1e-6),
        )
    with using_backends(fused="triton"):
        assert torch.equal(
            layer_norm_modulate(x, shift, scale, 1e-6),
            adaln_triton(x, shift=shift, scale=scale)[1],
        )
        assert torch.equal(gate_residual(x, gate, branch), adaln_triton(x, gate, branch)[0])
        fused = gate_residual_layer_norm_modulate(x, gate, branch, shift, scale, 1e-6)
        for got, want in zip(fused, adaln_triton(x, gate, branch, shift, scale, 1e-6), strict=True):
            assert torch.equal(got, want)
    expect_kernel = x.is_cuda  # auto: the kernel on CUDA, the reference elsewhere
    with using_backends(fused="auto"):
        got = gate_residual(x, gate, branch)
    want = adaln_triton(x, gate, branch)[0] if expect_kernel else x + gate[:, None] * branch
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="DENOISED_FUSED"):
        set_backends(fused="always")


def test_bad_inputs_name_the_problem() -> None:
    x, _, shift, scale, gate = _inputs(17, 72, torch.float32, seed=5)
    with pytest.raises(ValueError, match="shift must have shape"):
        adaln_triton(x, shift=shift[:, :8], scale=scale)
    with pytest.raises(ValueError, match="pass gate with branch"):
        adaln_triton(x, gate=gate)
    with pytest.raises(ValueError, match=r"\[batch, tokens, channels\]"):
        adaln_triton(x[0], shift=shift, scale=scale)


def test_custom_ops_are_traceable() -> None:
    x, branch, shift, scale, gate = _inputs(5, 32, torch.bfloat16, seed=6)
    torch.library.opcheck(adaln._layer_norm_modulate_op, (x, shift, scale, 1e-6))
    torch.library.opcheck(adaln._gate_residual_op, (x, gate, branch))
    torch.library.opcheck(
        adaln._gate_residual_layer_norm_modulate_op, (x, gate, branch, shift, scale, 1e-6)
    )

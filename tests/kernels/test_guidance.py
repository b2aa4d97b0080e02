"""Fused guidance + solver step against `guided_update_reference` on random mixed batches."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from guards import DEVICE, check_guarded, guarded_empty

from denoised.kernels import guidance
from denoised.kernels.backends import using_backends
from denoised.kernels.guidance import (
    BatchUpdate,
    guided_update,
    guided_update_reference,
    guided_update_triton,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

COND_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Both sides compute in float32 from the same (rounded) inputs; only the order of operations
# differs.
ATOL = RTOL = 1e-5


def _step(shape, order: int, with_noise: bool, cond_dtype: torch.dtype, seed: int, guided_rows):
    """Random step inputs; `guided_rows[i]` is sample i's unconditional row or -1."""
    g = torch.Generator().manual_seed(seed)
    batch, channels = shape[:2]

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g).to(DEVICE)

    def coeff() -> torch.Tensor:
        return torch.rand(batch, generator=g).to(DEVICE) * 2 - 0.5

    num_uncond = max(guided_rows) + 1
    # Backbone outputs with learned-variance channels: cond/uncond are channel slices.
    out = (torch.randn(batch + num_uncond, 2 * channels, *shape[2:], generator=g) * 3).to(DEVICE)
    out = out.to(cond_dtype)
    x = randn(*shape)
    update = BatchUpdate(
        uncond_index=torch.tensor(guided_rows, dtype=torch.int64, device=DEVICE),
        w=coeff() * 4,
        p=coeff(),
        q=coeff(),
        a=coeff(),
        b=torch.rand(batch, order, generator=g).to(DEVICE),
        history=randn(order - 1, *shape) if order > 1 else None,
        c=coeff() if with_noise else torch.zeros(batch, device=DEVICE),
        noise=randn(*shape) if with_noise else None,
    )
    return dict(x=x, cond=out[:batch, :channels], uncond=out[batch:, :channels], update=update)


def _check(inputs: dict, guided_channels: int) -> None:
    shape = tuple(inputs["x"].shape)
    x_buffer, x_next = guarded_empty(shape, torch.float32)
    d_buffer, d = guarded_empty(shape, torch.float32)
    guided_update_triton(**inputs, guided_channels=guided_channels, out=(x_next, d))
    check_guarded(x_buffer, x_next)
    check_guarded(d_buffer, d)
    want_x, want_d = guided_update_reference(**inputs, guided_channels=guided_channels)
    torch.testing.assert_close(d, want_d, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(x_next, want_x, atol=ATOL, rtol=RTOL)


CASES = [
    (order, noise, COND_DTYPES[i % 3])
    for i, (order, noise) in enumerate(itertools.product((1, 2, 3, 4), (False, True)))
]


@pytest.mark.parametrize(("order", "with_noise", "cond_dtype"), CASES)
def test_mixed_batch(order: int, with_noise: bool, cond_dtype: torch.dtype) -> None:
    # Rows 0, 2, 4 guided (their unconditional rows out of order), rows 1, 3 not; three of
    # four channels guided; 9 x 9 latents leave a ragged block tail.
    inputs = _step((5, 4, 9, 9), order, with_noise, cond_dtype, seed=order * 2 + with_noise,
                   guided_rows=[2, -1, 0, -1, 1])  # fmt: skip
    _check(inputs, guided_channels=3)


@pytest.mark.parametrize("cond_dtype", COND_DTYPES)
def test_several_blocks_per_sample(cond_dtype: torch.dtype) -> None:
    # 4 x 24 x 24 = 2304 elements per sample: two 2048-element programs, the second ragged.
    inputs = _step((2, 4, 24, 24), 2, True, cond_dtype, seed=11, guided_rows=[-1, 0])
    _check(inputs, guided_channels=4)


@pytest.mark.parametrize("guided_channels", [0, 4])
def test_no_unconditional_rows(guided_channels: int) -> None:
    inputs = _step((3, 4, 8, 8), 3, False, torch.float32, seed=12, guided_rows=[-1, -1, -1])
    assert inputs["uncond"].shape[0] == 0
    _check(inputs, guided_channels)


def test_dispatch_setting() -> None:
    inputs = _step((3, 4, 8, 8), 2, True, torch.float32, seed=13, guided_rows=[0, -1, 1])
    for setting, implementation in (
        ("triton", guided_update_triton),
        ("reference", guided_update_reference),
    ):
        with using_backends(fused=setting):
            got = guided_update(**inputs, guided_channels=4)
        want = implementation(**inputs, guided_channels=4)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_bad_inputs_name_the_problem() -> None:
    inputs = _step((3, 4, 8, 8), 2, True, torch.float32, seed=14, guided_rows=[0, -1, 1])
    update = inputs["update"]

    def changed(**fields) -> dict:
        return {**inputs, "update": dataclasses.replace(update, **fields)}

    with pytest.raises(ValueError, match="history must hold"):
        guided_update_triton(**changed(history=None), guided_channels=4)
    with pytest.raises(ValueError, match="guided_channels"):
        guided_update_triton(**inputs, guided_channels=5)
    with pytest.raises(ValueError, match="w must have shape"):
        guided_update_triton(**changed(w=update.w[:2]), guided_channels=4)
    with pytest.raises(ValueError, match="K <= 4"):
        guided_update_triton(**changed(b=torch.ones(3, 5, device=DEVICE)), guided_channels=4)


def test_custom_op_is_traceable() -> None:
    inputs = _step((3, 4, 8, 8), 3, True, torch.bfloat16, seed=15, guided_rows=[0, -1, 1])
    flat = (inputs["x"], inputs["cond"], inputs["uncond"], *inputs["update"].values(), 4)
    torch.library.opcheck(guidance._guided_update_op, flat)

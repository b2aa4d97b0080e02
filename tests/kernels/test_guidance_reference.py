"""guided_update_reference against a per-sample float64 evaluation of its definition."""

from __future__ import annotations

import pytest
import torch

from denoised.kernels.guidance import BatchUpdate, guided_update, guided_update_reference


def per_sample(x, cond, uncond, uncond_index, w, p, q, a, b, history, c, noise, g):
    """The contract (CONTRACTS.md §2), one sample at a time in float64."""
    xs, ds = [], []
    for i in range(x.shape[0]):
        out = cond[i].double().clone()
        if uncond_index[i] >= 0:
            u = uncond[uncond_index[i]].double()
            out[:g] = u[:g] + w[i].double() * (out[:g] - u[:g])
        d = p[i].double() * x[i].double() + q[i].double() * out
        nxt = a[i].double() * x[i].double() + b[i, 0].double() * d
        for k in range(1, b.shape[1]):
            nxt = nxt + b[i, k].double() * history[k - 1, i].double()
        if noise is not None:
            nxt = nxt + c[i].double() * noise[i].double()
        xs.append(nxt)
        ds.append(d)
    return torch.stack(xs), torch.stack(ds)


def random_inputs(
    batch, channels, size, groups, width, guided_channels, cond_dtype, with_noise, seed
):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):  # never zero, never tiny
        return torch.randn(*shape, generator=gen) + 0.1

    x = rnd(batch, channels, size, size)
    cond = rnd(batch, channels, size, size).to(cond_dtype)
    uncond = rnd(groups, channels, size, size).to(cond_dtype)
    uncond_index = torch.full((batch,), -1, dtype=torch.int64)
    guided_rows = torch.randperm(batch, generator=gen)[:groups]
    uncond_index[guided_rows] = torch.randperm(groups, generator=gen)
    w = rnd(batch) * 3
    history = rnd(width - 1, batch, channels, size, size) if width > 1 else None
    noise = rnd(batch, channels, size, size) if with_noise else None
    return (x, cond, uncond, uncond_index, w, rnd(batch), rnd(batch), rnd(batch), rnd(batch, width),
            history, rnd(batch), noise, guided_channels)  # fmt: skip


def packed(fn, args):
    """`fn` on the flat arguments of `per_sample` (x, cond, uncond, the update's fields, g)."""
    return fn(*args[:3], BatchUpdate(*args[3:12]), args[12])


CASES = [
    # batch, channels, size, unconditional rows, K, guided channels, cond dtype, noise
    (1, 1, 1, 0, 1, 1, torch.float32, False),
    (5, 4, 7, 3, 3, 4, torch.float32, True),
    (6, 8, 5, 6, 2, 4, torch.bfloat16, True),  # DiT latents: 4 guided of 8 channels
    (7, 3, 9, 2, 4, 2, torch.float16, False),
    (3, 4, 4, 0, 2, 4, torch.float32, True),  # G = 0: nothing guided
]


@pytest.mark.parametrize(("seed", "case"), list(enumerate(CASES)), ids=str)
def test_reference_matches_definition(seed, case):
    args = random_inputs(*case, seed=seed)
    want_x, want_d = per_sample(*args)
    for fn in (guided_update_reference, guided_update):
        got_x, got_d = packed(fn, args)
        assert got_x.dtype == torch.float32 and got_d.dtype == torch.float32
        torch.testing.assert_close(got_d.double(), want_d, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_x.double(), want_x, rtol=1e-5, atol=1e-5)


def test_unguided_rows_ignore_w_and_uncond():
    args = list(random_inputs(4, 3, 5, 2, 1, 3, torch.float32, False, seed=3))
    x1, _ = packed(guided_update_reference, args)
    unguided = args[3] < 0
    args[4] = args[4].clone()
    args[4][unguided] = 123.0  # w of unguided rows is ignored
    x2, _ = packed(guided_update_reference, args)
    torch.testing.assert_close(x1, x2, rtol=0, atol=0)


def test_bad_shapes():
    args = list(random_inputs(4, 3, 5, 2, 3, 3, torch.float32, False, seed=4))
    args[9] = None  # K = 3 needs two history tensors
    with pytest.raises(ValueError, match="history"):
        packed(guided_update_reference, args)
    args = list(random_inputs(4, 3, 5, 2, 1, 3, torch.float32, False, seed=4))
    args[8] = args[8][:3]
    with pytest.raises(ValueError, match="b must have shape"):
        packed(guided_update_reference, args)

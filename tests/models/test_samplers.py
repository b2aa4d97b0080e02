"""Sampler states: options, identities, exactness invariants, determinism, mixed batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gaussian_mixture import GaussianMixture, mixture_model

from denoised.models.conditioning import Conditioning
from denoised.models.sampling.grids import make_grid
from denoised.models.sampling.process import FlowProcess, Process, VPProcess
from denoised.models.sampling.samplers import (
    SAMPLER_NAMES,
    build_plan,
    create_sampler,
    sample,
    step_batch,
)

DETERMINISTIC = ("ddim", "dpmpp-2m", "dpmpp-3m", "euler", "heun", "unipc")
PROCESSES = [
    VPProcess("scaled_linear", 0.00085, 0.012, prediction="epsilon"),
    VPProcess("squaredcos_cap_v2", prediction="v"),
    FlowProcess(shift=3.0, prediction="velocity"),
    FlowProcess(convention="sit", prediction="velocity"),
]
PROC_IDS = ["vp-eps", "vp-cos-v", "flow-shift3", "sit"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- options -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("plms", {}, "sampler must be one of"),
        ("ddim", {"order": 2}, "unknown option"),
        ("ddim", {"eta": -0.5}, "eta"),
        ("ddim", {"eta": "1"}, "eta"),
        ("ddim", {"eta": 1.5}, "eta"),
        ("dpmpp-2m", {"order": 4}, "order"),
        ("dpmpp-3m", {"order": True}, "order"),
        ("unipc", {"order": 2.0}, "order"),
        ("dpmpp-2m-sde", {"order": 3}, "order"),
        ("euler", {"spacing": "cosine"}, "spacing"),
        ("euler", {"final": "none"}, "final"),
        ("heun", {"denoise_to_zero": True}, "denoise_to_zero"),
        ("unipc", {"lower_order_final": "yes"}, "lower_order_final"),
        ("ddim", {"shift": 3.0}, "shift"),
        ("ddim", {"round_timesteps": 1}, "round_timesteps"),
        ("ddim", {"spacing": "leading", "final": "min"}, "leading"),
    ],
)
def test_bad_options_name_the_field(name, options, field):
    with pytest.raises(ValueError, match=field):
        create_sampler(name, VPProcess(), 10, (1, 1, 2, 2), gen(), options)


def test_bad_steps_shape_and_flow_spacing():
    with pytest.raises(ValueError, match="steps"):
        create_sampler("ddim", VPProcess(), 0, (1, 1, 2, 2), gen())
    with pytest.raises(ValueError, match="steps must be at most"):
        create_sampler("ddim", VPProcess(), 1001, (1, 1, 2, 2), gen())
    assert create_sampler("ddim", VPProcess(), 1000, (1, 1, 1, 1), gen()).nfe == 1000
    with pytest.raises(ValueError, match="shape"):
        create_sampler("ddim", VPProcess(), 4, (0, 1, 2, 2), gen())
    with pytest.raises(ValueError, match="spacing"):
        create_sampler("ddim", FlowProcess(), 10, (1, 1, 2, 2), gen(), {"spacing": "karras"})
    with pytest.raises(ValueError, match="shift"):
        create_sampler("euler", FlowProcess(), 10, (1, 1, 2, 2), gen(), {"shift": -1.0})


# --- structure -----------------------------------------------------------------------------


VARIANTS = [(n, {}) for n in DETERMINISTIC] + [
    ("unipc", {"order": 3}),
    ("dpmpp-3m", {"lower_order_final": False}),
    ("ddim", {"final": "min", "denoise_to_zero": True}),
]


def test_cached_plans_equal_fresh_ones_and_validate_alike():
    """Plans are cached per process, sampler, steps and options: a state gets what
    build_plan gives, states share nothing they change, and options that compare equal to
    valid ones (order 2.0, True) or cannot be a cache key are still refused."""
    proc = VPProcess()
    for name, options in VARIANTS:
        first = create_sampler(name, proc, 9, (1, 1, 2, 2), gen(), dict(options))
        again = create_sampler(name, proc, 9, (2, 1, 2, 2), gen(1), dict(options))
        assert list(first.plan) == build_plan(name, proc, 9, options)
        assert again.plan is first.plan  # built once
    again.advance(torch.zeros_like(again.x), torch.zeros_like(again.x))
    assert first.step_index == 0 and again.step_index == 1
    create_sampler("unipc", proc, 9, (1, 1, 2, 2), gen(), {"order": 2})
    create_sampler("dpmpp-2m", proc, 9, (1, 1, 2, 2), gen(), {"order": 1})
    for name, options in [("unipc", {"order": 2.0}), ("dpmpp-2m", {"order": True}),
                          ("ddim", {"eta": [0.5]})]:  # fmt: skip
        with pytest.raises(ValueError, match=r"order|eta"):
            create_sampler(name, proc, 9, (1, 1, 2, 2), gen(), options)


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=str)
@pytest.mark.parametrize("proc", PROCESSES, ids=PROC_IDS)
def test_dirac_data_is_followed_exactly(name, options, proc):
    """With all data at one point c, D ≡ c and the exact flow is x = α·c + σ·e: every step
    must land on it (a·σ = σ_next and a·α + Σb = α_next), and the end must be c."""
    state = create_sampler(name, proc, 7, (3, 2, 2, 2), gen(1), options)
    c = torch.randn(3, 2, 2, 2, generator=gen(2))

    def alpha_sigma(t: float) -> tuple[float, float]:
        alpha, sigma = proc.alpha_sigma(proc.native_time(np.array(t)))
        return float(alpha), float(sigma)

    alpha0, sigma0 = alpha_sigma(state.model_time())
    e = (state.x - alpha0 * c) / sigma0  # the noise that puts the start on the line

    def model_fn(x, t, y):
        p, q = proc.prediction_coefficients(*alpha_sigma(t[0].item()))
        return (c - float(p) * x) / float(q)

    while not state.done:
        step_batch(model_fn, [state])
        if not state.done:
            alpha, sigma = alpha_sigma(state.model_time())
            # Heun's correction multiplies D1 − D2 by up to α_n·σ/(2α·σ_n) (≈ 1e3 at the cosine
            # schedule's first step), so float32 rounding of D shows up at 1e-4 there.
            tol = 1e-4 if name == "heun" else 2e-5
            torch.testing.assert_close(state.x, alpha * c + sigma * e, atol=tol, rtol=1e-5)
    torch.testing.assert_close(state.x, c, atol=1e-5, rtol=1e-5)


ORDERS = {"dpmpp-2m": (1, 2, 3), "dpmpp-3m": (1, 2, 3), "dpmpp-2m-sde": (1, 2), "unipc": (1, 2, 3)}


@pytest.mark.parametrize("proc", PROCESSES, ids=PROC_IDS)
def test_every_plan_is_finite(proc):
    for name in SAMPLER_NAMES:
        for order in ORDERS.get(name, (None,)):
            options = {} if order is None else {"order": order}
            for steps in (1, 2, 3, 4, 16):
                plan = build_plan(name, proc, steps, options)
                for e in plan:
                    cf = e.coefficients
                    values = [e.model_time, cf.p, cf.q, cf.a, *cf.b, cf.c]
                    assert np.isfinite(values).all(), (name, order, steps)
                assert len(plan[-1].coefficients.b) == 1  # the step onto σ = 0 is first order


def test_nfe_and_history_depth():
    proc = VPProcess()
    assert create_sampler("heun", proc, 10, (1, 1, 1, 1), gen()).nfe == 19  # last step Euler
    assert create_sampler("heun", proc, 10, (1, 1, 1, 1), gen(), {"final": "min"}).nfe == 20
    assert create_sampler("dpmpp-3m", proc, 10, (1, 1, 1, 1), gen()).nfe == 10
    widths = {n: max(len(e.coefficients.b) for e in build_plan(n, proc, 20)) for n in SAMPLER_NAMES}
    assert widths == {
        "ddim": 1, "dpmpp-2m": 2, "dpmpp-3m": 3, "dpmpp-2m-sde": 2, "euler": 1, "heun": 2,
        "unipc": 3,
    }  # fmt: skip
    # multistep warm-up and lower-order final steps on a short grid
    plan = build_plan("dpmpp-3m", proc, 6)
    assert [len(e.coefficients.b) for e in plan] == [1, 2, 3, 3, 2, 1]
    # ... on long grids too (diffusers steps down only below 15 steps), and only when asked
    for p in (proc, FlowProcess()):
        widths = [len(e.coefficients.b) for e in build_plan("dpmpp-3m", p, 20)]
        assert widths[-3:] == [3, 2, 1], widths
        full = build_plan("dpmpp-3m", p, 20, {"lower_order_final": False})
        assert [len(e.coefficients.b) for e in full][-3:] == [3, 3, 1]


def test_denoise_to_zero_and_round_timesteps():
    proc = VPProcess()
    plan = build_plan("dpmpp-2m", proc, 8, {"final": "min", "denoise_to_zero": True})
    assert len(plan) == 9
    last = plan[-1].coefficients
    assert (last.a, last.b, last.c) == (0.0, (1.0,), 0.0)
    assert plan[-1].model_time == 0.0 < plan[-2].model_time  # one extra evaluation at σ_min
    plan = build_plan("dpmpp-2m", proc, 8, {"spacing": "karras", "round_timesteps": True})
    times = [e.model_time for e in plan]
    assert times == [round(t) for t in times] and times[0] == 999.0
    unrounded = build_plan("dpmpp-2m", proc, 8, {"spacing": "karras"})
    assert [e.coefficients for e in plan] == [e.coefficients for e in unrounded]


# --- identities ----------------------------------------------------------------------------


@pytest.mark.parametrize("proc", PROCESSES, ids=PROC_IDS)
def test_ddim_is_euler_in_sigma_coordinates(proc):
    """DDIM (η = 0) equals an Euler integration written directly in the ODE's own
    coordinates: x̃ = x/α, s = σ/α for VP; x, σ for flow."""
    gmm = GaussianMixture.random(4, 8, seed=3)
    model = mixture_model(gmm, proc)
    state = create_sampler("ddim", proc, 12, (64, 4, 1, 1), gen(5))
    grid = make_grid(proc, 12)
    flow = isinstance(proc, FlowProcess)
    x = state.x.double().reshape(64, 4).numpy()
    for i in range(12):
        scale = 1.0 if flow else grid.alpha[i]
        s, s_next = grid.sigma[i] / scale, grid.sigma[i + 1] / (1.0 if flow else grid.alpha[i + 1])
        d = gmm.denoise(x, grid.alpha[i], grid.sigma[i])
        y = x / scale
        y = y + (s_next - s) * (y - d) / s
        x = y * (1.0 if flow else grid.alpha[i + 1])
    out = sample(model, state).double().reshape(64, 4).numpy()
    np.testing.assert_allclose(out, x, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    ("proc", "options"),
    [(p, {"spacing": s}) for p in PROCESSES[:2] for s in ("trailing", "logsnr")]
    + [(p, {}) for p in PROCESSES[2:]],
)
def test_dpmpp_order_one_is_ddim(proc, options):
    model = mixture_model(GaussianMixture.random(4, 8, seed=4), proc)
    runs = []
    for name, extra in (("ddim", {}), ("dpmpp-2m", {"order": 1}), ("dpmpp-3m", {"order": 1})):
        state = create_sampler(name, proc, 9, (32, 4, 1, 1), gen(7), {**options, **extra})
        runs.append(sample(model, state))
    torch.testing.assert_close(runs[1], runs[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(runs[2], runs[0], atol=1e-5, rtol=0)
    plans = [
        build_plan(n, proc, 9, {**options, **e})
        for n, e in (("ddim", {}), ("dpmpp-2m", {"order": 1}))
    ]
    for e1, e2 in zip(*plans, strict=True):
        np.testing.assert_allclose(
            [e1.coefficients.a, *e1.coefficients.b],
            [e2.coefficients.a, *e2.coefficients.b],
            rtol=1e-12,
        )


# --- noise and determinism -----------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), [("dpmpp-2m-sde", {}), ("ddim", {"eta": 1.0})])
def test_stochastic_samplers_are_seeded(name, options):
    proc = VPProcess()
    model = mixture_model(GaussianMixture.random(2, 8, seed=0), proc)

    def run(seed):
        return sample(model, create_sampler(name, proc, 10, (16, 2, 1, 1), gen(seed), options))

    a, b, c = run(11), run(11), run(12)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1


@pytest.mark.parametrize(
    ("name", "options"), [("dpmpp-2m-sde", {}), ("ddim", {"eta": 1.0}), ("dpmpp-2m", {})]
)
def test_per_image_generators_make_images_independent_of_n(name, options):
    """With one generator per image, image k of a batch is image 0 of a batch of one with
    generator k alone — initial noise and (stochastic samplers) every step's noise."""
    proc = VPProcess()
    model = mixture_model(GaussianMixture.random(4, 8, seed=0), proc)
    shape = (3, 1, 2, 2)
    generators = [gen(5 + k) for k in range(3)]
    batch = sample(model, create_sampler(name, proc, 8, shape, generators, options))
    for k in range(3):
        alone = sample(model, create_sampler(name, proc, 8, (1, *shape[1:]), [gen(5 + k)], options))
        torch.testing.assert_close(batch[k : k + 1], alone, rtol=0, atol=1e-6)
    # one generator for the batch is one stream: a list of one is the same as the generator
    single = sample(model, create_sampler(name, proc, 8, (1, *shape[1:]), gen(5), options))
    torch.testing.assert_close(single, batch[:1], rtol=0, atol=1e-6)
    # ... and a shared stream does make image 1 depend on the batch (what the list avoids)
    if name != "dpmpp-2m":
        shared = sample(model, create_sampler(name, proc, 8, (2, *shape[1:]), gen(5), options))
        assert (shared[:1] - batch[:1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="one each"):
        create_sampler(name, proc, 8, shape, [gen(0), gen(1)], options)


def test_noise_is_drawn_once_per_step():
    state = create_sampler("dpmpp-2m-sde", VPProcess(), 5, (2, 1, 2, 2), gen(0))
    z1, z2 = state.noise(), state.noise()
    assert z1 is z2 and z1.shape == state.x.shape
    assert create_sampler("dpmpp-2m", VPProcess(), 5, (2, 1, 2, 2), gen(0)).noise() is None
    while not state.done:
        state.advance(state.x, state.x)
    with pytest.raises(ValueError, match="done"):
        state.advance(state.x, state.x)


def test_step_batch_returns_the_data_predictions():
    proc = VPProcess()
    first = create_sampler("dpmpp-2m-sde", proc, 5, (2, 1, 2, 2), gen(0))
    second = create_sampler("dpmpp-2m", proc, 5, (3, 1, 2, 2), gen(1))
    d = step_batch(mixture_model(GaussianMixture.random(4, 8), proc), [first, second])
    assert d.shape == (5, 1, 2, 2)  # in state order
    torch.testing.assert_close(d[:2], first.history()[0])  # step 1 of 2M reads D_0 back
    torch.testing.assert_close(d[2:], second.history()[0])


# --- mixed batches -----------------------------------------------------------------------


def class_model(proc: Process, classes: int = 3):
    """Class-conditional exact model on 16-D data [B, 4, 2, 2]: class y owns a subset of the
    modes; the null label (= classes) is the full mixture."""
    full = GaussianMixture.random(16, 9, seed=9)
    parts = []
    for k in range(classes):
        idx = np.arange(k, 9, classes)
        parts.append(
            GaussianMixture(
                full.weights[idx] / full.weights[idx].sum(), full.means[idx], full.stds[idx]
            )
        )
    models = [mixture_model(g, proc) for g in [*parts, full]]

    def model_fn(x, t, y):
        out = torch.empty_like(x)
        for k in range(classes + 1):
            rows = (y == k).nonzero().flatten()
            if rows.numel():
                out[rows] = models[k](x[rows], t[rows])
        # extra channels (a learned variance, say) must be ignored by the update
        return torch.cat([out, torch.full_like(out, 7.0)], dim=1)

    return model_fn


REQUESTS = [
    # sampler, steps, options, guidance scale, images, joins at iteration
    ("ddim", 50, {}, 1.0, 2, 0),
    ("dpmpp-2m", 10, {}, 4.0, 3, 4),
    ("euler", 20, {}, 1.0, 1, 9),
    ("dpmpp-2m-sde", 15, {}, 2.0, 2, 12),
    ("unipc", 8, {}, 3.0, 1, 30),
    ("heun", 6, {}, 1.5, 1, 31),
]


@pytest.mark.parametrize("guided_channels", [4, 2])
def test_mixed_batch_equals_runs_alone(guided_channels):
    proc = FlowProcess(shift=2.0)
    model = class_model(proc)
    null = 3

    def new_state(i):
        name, steps, options, _, n, _ = REQUESTS[i]
        return create_sampler(name, proc, steps, (n, 4, 2, 2), gen(100 + i), options)

    labels = [torch.tensor([i % 3] * REQUESTS[i][4]) for i in range(len(REQUESTS))]

    def conditioning(i: int, w: float) -> Conditioning:
        return Conditioning.classes(labels[i], null, w)

    alone = []
    for i, (_, _, _, w, _, _) in enumerate(REQUESTS):
        alone.append(sample(model, new_state(i), conditioning(i, w), guided_channels))

    states: dict[int, object] = {}
    finished: dict[int, torch.Tensor] = {}
    iteration = 0
    while len(finished) < len(REQUESTS):
        for i, req in enumerate(REQUESTS):
            if req[5] == iteration:
                states[i] = new_state(i)
        active = sorted(states)
        if active:
            step_batch(
                model,
                [states[i] for i in active],
                [conditioning(i, REQUESTS[i][3]) for i in active],
                guided_channels,
            )
        for i in active:
            if states[i].done:  # leaves at once
                finished[i] = states.pop(i).x
        iteration += 1
    for i in range(len(REQUESTS)):
        torch.testing.assert_close(finished[i], alone[i], atol=1e-5, rtol=0, msg=f"request {i}")
    # guidance changed the guided requests' images (the test can fail)
    unguided = sample(model, new_state(1), conditioning(1, 1.0), guided_channels)
    assert (unguided - alone[1]).abs().max() > 1e-2

"""Noise processes: schedules against diffusers, conversions, training helpers, configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from denoised.models.sampling.process import (
    FlowProcess,
    VPProcess,
    process_from_config,
    shift_sigma,
)

VP_CASES = [
    ("linear", 0.0001, 0.02),
    ("scaled_linear", 0.00085, 0.012),
    ("squaredcos_cap_v2", 0.0001, 0.02),
]


def all_processes():
    for schedule, start, end in VP_CASES:
        for prediction in ("epsilon", "v", "sample"):
            yield VPProcess(schedule, start, end, prediction=prediction)
    for convention in ("rf", "sit"):
        for prediction in ("velocity", "sample"):
            yield FlowProcess(shift=3.0, convention=convention, prediction=prediction)


@pytest.mark.parametrize(("schedule", "start", "end"), VP_CASES)
def test_vp_schedules_match_diffusers(schedule, start, end):
    ref = DDPMScheduler(beta_schedule=schedule, beta_start=start, beta_end=end)
    proc = VPProcess(schedule, start, end)
    np.testing.assert_array_equal(proc.alphas_cumprod, ref.alphas_cumprod.double().numpy())
    taus = np.arange(1000)
    alpha, sigma = proc.alpha_sigma(taus)
    np.testing.assert_allclose(alpha**2, proc.alphas_cumprod, rtol=1e-12)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-12)


def test_vp_continuous_time_is_monotone_and_invertible():
    proc = VPProcess("scaled_linear", 0.00085, 0.012)
    taus = np.random.default_rng(0).uniform(0, 999, 200)
    ratios = proc.sigma_ratio(taus)
    np.testing.assert_allclose(proc.time_at_sigma_ratio(ratios), taus, rtol=1e-9, atol=1e-9)
    alpha, sigma = proc.alpha_sigma(np.sort(taus))
    logsnr = np.log(alpha / sigma)
    assert np.all(np.diff(logsnr) < 0)


def test_flow_shift_matches_diffusers_training_sigmas():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    unshifted = np.linspace(1, 1000, 1000)[::-1] / 1000
    np.testing.assert_allclose(shift_sigma(unshifted, 3.0), ref.sigmas.numpy(), rtol=1e-6)
    assert shift_sigma(0.5, 1.0) == 0.5
    assert shift_sigma(1.0, 7.0) == 1.0 and shift_sigma(0.0, 7.0) == 0.0


def test_flow_conventions():
    rf = FlowProcess(convention="rf")
    sit = FlowProcess(convention="sit")
    sigma = np.array([1.0, 0.25, 0.0])
    np.testing.assert_allclose(rf.model_time(sigma), [1000.0, 250.0, 0.0])
    np.testing.assert_allclose(sit.model_time(sigma), [0.0, 0.75, 1.0])  # t = 0 is noise
    for proc in (rf, sit):
        np.testing.assert_allclose(proc.native_time(proc.model_time(sigma)), sigma)
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.9, 0.5, 0.1])
    torch.testing.assert_close(rf.training_target(x0, noise, t), noise - x0)
    torch.testing.assert_close(sit.training_target(x0, noise, t), x0 - noise)
    xt = rf.add_noise(x0, noise, t)
    torch.testing.assert_close(xt, (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * noise)


@pytest.mark.parametrize("proc", list(all_processes()), ids=lambda p: str(p.to_config()))
def test_prediction_round_trip(proc):
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 4, 4, generator=gen), torch.randn(6, 3, 4, 4, generator=gen)
    t = proc.sample_train_times(6, gen)
    if proc.kind == "flow":
        t = t.clamp(0.02, 0.98)  # D is a division by α·… only at the extremes
    xt = proc.add_noise(x0, noise, t)
    target = proc.training_target(x0, noise, t)
    # The target converts back to the data it was made from, and to_data/from_data invert.
    torch.testing.assert_close(proc.to_data(target, xt, t), x0, atol=2e-4, rtol=1e-4)
    d = torch.randn_like(x0)
    torch.testing.assert_close(
        proc.to_data(proc.from_data(d, xt, t), xt, t), d, atol=1e-4, rtol=1e-4
    )


def test_vp_targets_by_prediction():
    x0, noise = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    t = torch.tensor([0.0, 10.0, 500.0, 999.0])
    eps = VPProcess(prediction="epsilon")
    alpha, sigma = (
        torch.tensor(v, dtype=torch.float32).view(-1, 1, 1, 1) for v in eps.alpha_sigma(t.numpy())
    )
    torch.testing.assert_close(eps.training_target(x0, noise, t), noise)
    torch.testing.assert_close(
        VPProcess(prediction="v").training_target(x0, noise, t), alpha * noise - sigma * x0
    )
    torch.testing.assert_close(VPProcess(prediction="sample").training_target(x0, noise, t), x0)


def test_training_times():
    gen = torch.Generator().manual_seed(0)
    taus = VPProcess().sample_train_times(4096, gen)
    assert taus.min() >= 0 and taus.max() <= 999 and torch.equal(taus, taus.round())
    assert abs(taus.mean().item() - 499.5) < 15
    sig = FlowProcess().sample_train_times(4096, gen)
    assert sig.min() >= 0 and sig.max() < 1 and abs(sig.mean().item() - 0.5) < 0.03


@pytest.mark.parametrize("proc", list(all_processes()), ids=lambda p: str(p.to_config()))
def test_config_round_trip(proc):
    cfg = proc.to_config()
    again = process_from_config(cfg)
    assert again.to_config() == cfg
    a1, s1 = proc.alpha_sigma(np.array([0.3 if proc.kind == "flow" else 300.0]))
    a2, s2 = again.alpha_sigma(np.array([0.3 if proc.kind == "flow" else 300.0]))
    assert (a1, s1) == (a2, s2)


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"type": "ve"}, "process.type"),
        ({"type": "vp", "schedule": "cosine"}, "schedule"),
        ({"type": "vp", "prediction": "velocity"}, "prediction"),
        ({"type": "flow", "prediction": "epsilon"}, "prediction"),
        ({"type": "flow", "convention": "edm"}, "convention"),
        ({"type": "flow", "shift": 0}, "shift"),
        ({"type": "vp", "num_train_timesteps": 1.5}, "num_train_timesteps"),
        ({"type": "vp", "beta_end": -1}, "beta_end"),
        ({"type": "vp", "shift": 3.0}, "shift"),
    ],
)
def test_bad_configs_name_the_field(cfg, field):
    with pytest.raises(ValueError, match=field):
        process_from_config(cfg)

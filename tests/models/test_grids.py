"""Sampling grids against the timesteps and σ's diffusers lays out for the same spacing."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from denoised.models.sampling.grids import VP_SPACINGS, make_grid
from denoised.models.sampling.process import FlowProcess, VPProcess

# diffusers converts a tensor through NumPy with a deprecated copy keyword.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SCALED = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
STEPS = (1, 7, 10, 13, 25, 50, 999)


def sd_process() -> VPProcess:
    return VPProcess("scaled_linear", 0.00085, 0.012)


def sigma_ratio(grid) -> np.ndarray:
    return grid.sigma / grid.alpha


@pytest.mark.parametrize("steps", STEPS)
def test_trailing_and_leading_timesteps(steps):
    proc = sd_process()
    for spacing in ("trailing", "leading"):
        ref = DDIMScheduler(**SCALED, timestep_spacing=spacing)
        ref.set_timesteps(steps)
        grid = make_grid(proc, steps, spacing)
        np.testing.assert_array_equal(grid.model_time[:-1], ref.timesteps.numpy())
        # at integer timesteps α² is the schedule's ᾱ exactly; the end is σ = 0
        taus = ref.timesteps.numpy()
        np.testing.assert_allclose(grid.alpha[:-1] ** 2, proc.alphas_cumprod[taus], rtol=1e-12)
        assert (grid.alpha[-1], grid.sigma[-1]) == (1.0, 0.0)


@pytest.mark.parametrize("steps", STEPS[1:])
def test_linspace_matches_euler(steps):
    ref = EulerDiscreteScheduler(**SCALED, timestep_spacing="linspace")
    ref.set_timesteps(steps)
    grid = make_grid(sd_process(), steps, "linspace")
    np.testing.assert_allclose(grid.model_time[:-1], ref.timesteps.numpy(), rtol=1e-6)
    # fractional timesteps: log-linear vs diffusers' linear interpolation of σ/α
    np.testing.assert_allclose(sigma_ratio(grid), ref.sigmas.numpy(), rtol=2e-3)


@pytest.mark.parametrize("steps", STEPS[1:])
@pytest.mark.parametrize(
    ("spacing", "flag"), [("karras", "use_karras_sigmas"), ("logsnr", "use_lu_lambdas")]
)
def test_sigma_spaced_grids_match_dpm_solver(steps, spacing, flag):
    ref = DPMSolverMultistepScheduler(**SCALED, **{flag: True})
    ref.set_timesteps(steps)
    grid = make_grid(sd_process(), steps, spacing, round_timesteps=True)
    np.testing.assert_allclose(sigma_ratio(grid), ref.sigmas.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(grid.model_time[:-1], ref.timesteps.numpy())


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", STEPS[1:])
def test_flow_grid_matches_flow_match_euler(shift, steps):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    if shift == 1.0:
        ref.set_timesteps(steps)
    else:  # diffusers shifts its own σ_min twice; given the unshifted σ's it shifts once
        ref.set_timesteps(sigmas=list(np.linspace(1.0, 1 / 1000, steps)))
    grid = make_grid(FlowProcess(shift=shift), steps)
    np.testing.assert_allclose(grid.sigma, ref.sigmas.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grid.model_time[:-1], ref.timesteps.numpy(), rtol=1e-5)
    np.testing.assert_allclose(grid.alpha, 1 - grid.sigma)


@pytest.mark.parametrize("spacing", VP_SPACINGS)
def test_grids_decrease_and_final_min(spacing):
    proc = sd_process()
    for final in ("zero", "min"):
        if (spacing, final) == ("leading", "min"):
            continue  # refused: leading already ends at τ = 0 (tested in test_samplers)
        grid = make_grid(proc, 12, spacing, final=final)
        assert grid.steps == 12
        assert np.all(np.diff(grid.logsnr) > 0)
        if final == "min":
            assert grid.model_time[-1] == 0.0
            np.testing.assert_allclose(sigma_ratio(grid)[-1], proc.sigma_ratios[0], rtol=1e-12)

"""Sampling grids: where along a process the sampler evaluates the backbone.

A grid of N steps is N + 1 points from most to least noisy, each an (α, σ) pair plus the
value the backbone is fed there. The last point is where the sample ends: σ = 0 (the data
prediction itself, ``final="zero"``) or the smallest training noise level (``final="min"``).

Spacings (VP processes, T training timesteps):
  ``trailing``  τ_i = round(T − i·T/N) − 1: starts at the last training timestep
                (Lin et al., 2024) — the default, right for latent models.
  ``leading``   τ_i = (N − 1 − i)·(T // N): the original DDIM/Stable Diffusion layout.
  ``linspace``  N timesteps evenly spaced from T − 1 down to 0 (fractional timesteps).
  ``karras``    σ̃ = σ/α spaced as in Karras et al. (2022), ρ = 7, between the training extremes.
  ``logsnr``    uniform in λ = log(α/σ) between the training extremes (Lu et al., 2022).
Flow processes use ``linspace``: σ evenly from 1 down to 1/T, then the static shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from denoised.models.sampling.process import FlowProcess, Process, VPProcess, shift_sigma

VP_SPACINGS = ("trailing", "leading", "linspace", "karras", "logsnr")
FLOW_SPACINGS = ("linspace",)
FINALS = ("zero", "min")
KARRAS_RHO = 7.0


@dataclass(frozen=True)
class Grid:
    """N + 1 points (float64): signal scale α, noise scale σ, and the backbone's time input."""

    alpha: np.ndarray
    sigma: np.ndarray
    model_time: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.alpha) - 1

    @property
    def logsnr(self) -> np.ndarray:
        """λ = log(α/σ); +inf at σ = 0."""
        with np.errstate(divide="ignore"):
            return np.log(self.alpha) - np.log(self.sigma)


class SamplerOptionError(ValueError):
    """A sampler name or option (its grid's included) that cannot be used; ``option`` names
    the offending option (None: the sampler itself)."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


def default_spacing(process: Process) -> str:
    return "linspace" if isinstance(process, FlowProcess) else "trailing"


def make_grid(
    process: Process,
    steps: int,
    spacing: str | None = None,
    final: str = "zero",
    shift: float | None = None,
    round_timesteps: bool = False,
) -> Grid:
    """The sampling grid of ``steps`` steps for ``process``.

    ``shift`` (flow only) overrides the process's static shift. ``round_timesteps`` feeds the
    backbone the nearest integer training timestep while the solver keeps the exact σ (the
    convention of diffusers' multistep solvers on Karras/logSNR grids).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    if final not in FINALS:
        raise SamplerOptionError(f"final must be one of {FINALS}; got {final!r}", "final")
    spacing = spacing or default_spacing(process)
    if isinstance(process, FlowProcess):
        if spacing not in FLOW_SPACINGS:
            raise SamplerOptionError(
                f"spacing for a flow process must be one of {FLOW_SPACINGS}; got {spacing!r}",
                "spacing",
            )
        times = _flow_times(process, steps, final, process.shift if shift is None else shift)
    else:
        assert isinstance(process, VPProcess)  # the one other kind of process
        if spacing not in VP_SPACINGS:
            raise SamplerOptionError(
                f"spacing must be one of {VP_SPACINGS}; got {spacing!r}", "spacing"
            )
        if shift is not None:
            raise SamplerOptionError("shift applies to flow processes only", "shift")
        if steps > process.num_train_timesteps:
            raise ValueError(
                f"steps must be at most num_train_timesteps ({process.num_train_timesteps}) "
                f"for a VP process; got {steps}"
            )
        times = _vp_times(process, steps, spacing, final)
    alpha, sigma = process.alpha_sigma(times)
    model_time = process.model_time(times)
    if round_timesteps:
        model_time = np.round(model_time)
    if final == "zero":
        alpha = np.append(alpha, 1.0)
        sigma = np.append(sigma, 0.0)
        # σ = 0 is only ever an end point; its model time is that of native time 0.
        model_time = np.append(model_time, process.model_time(np.zeros(1)))
    return Grid(alpha=alpha, sigma=sigma, model_time=model_time)


def _vp_times(process: VPProcess, steps: int, spacing: str, final: str) -> np.ndarray:
    """Native timesteps τ of the grid (N points, or N + 1 ending at τ = 0 for final='min')."""
    T = process.num_train_timesteps
    n = steps if final == "zero" else steps + 1
    if spacing == "trailing":
        taus = np.round(T - np.arange(steps) * (T / steps)) - 1.0
        return taus if final == "zero" else np.append(taus, 0.0)
    if spacing == "leading":
        taus = (np.arange(steps)[::-1] * (T // steps)).astype(np.float64)
        if final == "min":
            raise SamplerOptionError(
                "final='min' needs a spacing other than 'leading' (it ends at τ = 0)", "final"
            )
        return taus
    if spacing == "linspace":
        return np.linspace(T - 1, 0, n)
    s_max, s_min = process.sigma_ratios[-1], process.sigma_ratios[0]
    if spacing == "karras":
        ramp = np.linspace(0, 1, n)
        hi, lo = s_max ** (1 / KARRAS_RHO), s_min ** (1 / KARRAS_RHO)
        ratios = (hi + ramp * (lo - hi)) ** KARRAS_RHO
    else:  # logsnr
        ratios = np.exp(np.linspace(np.log(s_max), np.log(s_min), n))
    return process.time_at_sigma_ratio(ratios)


def _flow_times(process: FlowProcess, steps: int, final: str, shift: float) -> np.ndarray:
    if isinstance(shift, bool) or not isinstance(shift, int | float) or not shift > 0:
        raise SamplerOptionError(f"shift must be a positive number; got {shift!r}", "shift")
    n = steps if final == "zero" else steps + 1
    return shift_sigma(np.linspace(1.0, 1.0 / process.num_train_timesteps, n), float(shift))

"""Gaussian-mixture data with a closed-form denoiser, and the exact probability-flow endpoint.

For data ``x0 ~ Σ_k π_k N(μ_k, s_k² I)`` and ``x = α·x0 + σ·ε`` the noisy marginal is
``Σ_k π_k N(α·μ_k, (α²s_k² + σ²) I)`` and the ideal denoiser is
``E[x0 | x] = Σ_k r_k(x)·(μ_k + α·s_k²/(α²s_k² + σ²)·(x − α·μ_k))`` with posterior mode
weights r_k — an exact "trained model" for any process and prediction type. Shared by the
sampler tests and ``benchmarks/sampler_accuracy.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp

from denoised.models.sampling.grids import make_grid
from denoised.models.sampling.process import FlowProcess, Process
from denoised.models.sampling.samplers import create_sampler, sample


@dataclass
class GaussianMixture:
    weights: np.ndarray  # [K]
    means: np.ndarray  # [K, d]
    stds: np.ndarray  # [K]

    @classmethod
    def random(cls, dim: int, modes: int = 8, seed: int = 0) -> GaussianMixture:
        rng = np.random.default_rng(seed)
        return cls(
            weights=rng.dirichlet(np.full(modes, 5.0)),
            means=rng.normal(0.0, 1.0, (modes, dim)),
            stds=rng.uniform(0.3, 0.5, modes),
        )

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def denoise(self, x: np.ndarray, alpha: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        """E[x0 | x] for rows x [n, d] at per-row (or scalar) α, σ (float64)."""
        alpha = np.broadcast_to(np.asarray(alpha, np.float64), x.shape[:1])[:, None, None]
        sigma = np.broadcast_to(np.asarray(sigma, np.float64), x.shape[:1])[:, None, None]
        var = alpha**2 * self.stds[None, :, None] ** 2 + sigma**2  # [n, K, 1]
        diff = x[:, None, :] - alpha * self.means[None]  # [n, K, d]
        logp = np.log(self.weights)[None] - 0.5 * (
            self.dim * np.log(var[..., 0]) + (diff**2).sum(-1) / var[..., 0]
        )
        r = np.exp(logp - logp.max(1, keepdims=True))
        r /= r.sum(1, keepdims=True)
        post = self.means[None] + alpha * self.stds[None, :, None] ** 2 / var * diff
        return (r[..., None] * post).sum(1)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        return self.means[k] + self.stds[k, None] * rng.normal(size=(n, self.dim))

    def mean(self) -> np.ndarray:
        return self.weights @ self.means

    def covariance(self) -> np.ndarray:
        m = self.mean()
        centered = self.means - m
        spread = (self.weights * self.stds**2).sum() * np.eye(self.dim)
        return spread + (self.weights[:, None] * centered).T @ centered


def mixture_model(gmm: GaussianMixture, process: Process):
    """A backbone stand-in: model_fn(x [B, d, 1, 1] or [B, ...], t, y) in the process's
    prediction type, computed from the exact denoiser at the fed model time."""

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        native = process.native_time(t.double().cpu().numpy())
        alpha, sigma = process.alpha_sigma(native)
        flat = x.double().cpu().numpy().reshape(x.shape[0], -1)
        d = gmm.denoise(flat, alpha, sigma)
        p, q = process.prediction_coefficients(alpha, sigma)
        out = (d - p[:, None] * flat) / q[:, None]
        return torch.from_numpy(out).to(x.dtype).reshape(x.shape)

    return model_fn


def exact_endpoint(
    gmm: GaussianMixture,
    process: Process,
    x_init: np.ndarray,
    start: tuple[float, float],
    end: tuple[float, float],
) -> np.ndarray:
    """Probability-flow ODE from x_init at (α, σ) = ``start`` to ``end``, then one denoise: the
    endpoint every grid from σ_start to σ_end with a final step to σ = 0 converges to.

    VP: dx̃/du = x̃ − D with x̃ = x/α, u = log(σ/α). Flow: dx/du = x − D with u = log σ.
    DOP853 at rtol 1e-11.
    """
    n = x_init.shape[0]

    def coords(u: float) -> tuple[float, float]:
        s = np.exp(u)
        if isinstance(process, FlowProcess):
            return 1.0 - s, s
        return 1.0 / np.sqrt(1.0 + s * s), s / np.sqrt(1.0 + s * s)

    def scale(u: float) -> float:
        return 1.0 if isinstance(process, FlowProcess) else coords(u)[0]

    def rhs(u: float, y: np.ndarray) -> np.ndarray:
        alpha, sigma = coords(u)
        xt = y.reshape(n, -1)
        return (xt - gmm.denoise(xt * scale(u), alpha, sigma)).ravel()

    def to_u(alpha: float, sigma: float) -> float:
        return float(np.log(sigma if isinstance(process, FlowProcess) else sigma / alpha))

    u0, u1 = to_u(*start), to_u(*end)
    y0 = (x_init / scale(u0)).ravel()
    sol = solve_ivp(rhs, (u0, u1), y0, method="DOP853", rtol=1e-11, atol=1e-11)
    if not sol.success:
        raise RuntimeError(sol.message)
    y1 = sol.y[:, -1].reshape(n, -1) * scale(u1)
    return gmm.denoise(y1, *coords(u1))


def sampler_rmse(
    gmm: GaussianMixture,
    process: Process,
    name: str,
    steps: int,
    n: int = 256,
    seed: int = 0,
    options: dict | None = None,
    reference: np.ndarray | None = None,
) -> tuple[float, int, np.ndarray]:
    """(RMSE to the exact endpoint, NFE, reference) for one sampler run on ``n`` points.

    Pass back ``reference`` for further runs from the same seed and grid end points.
    """
    state = create_sampler(
        name, process, steps, (n, gmm.dim, 1, 1), torch.Generator().manual_seed(seed), options
    )
    x_init = state.x.double().numpy().reshape(n, -1)
    out = sample(mixture_model(gmm, process), state).double().numpy().reshape(n, -1)
    if reference is None:
        grid = make_grid(process, steps, spacing=(options or {}).get("spacing"))
        start = (grid.alpha[0], grid.sigma[0])
        end = (grid.alpha[-2], grid.sigma[-2])
        reference = exact_endpoint(gmm, process, x_init, start, end)
    return float(np.sqrt(((out - reference) ** 2).mean())), state.nfe, reference

"""Noise processes: how data becomes noise, and what the backbone is asked to predict.

Every process here writes a noisy sample as ``x = α·x0 + σ·ε`` with per-time scalars α and σ,
and the samplers only ever see these (α, σ) pairs and their log signal-to-noise ratio
``λ = log(α/σ)``. Two families:

* ``VPProcess`` — discrete variance-preserving schedules (DDPM; Ho et al., 2020) with
  ``linear``, ``scaled_linear`` and ``squaredcos_cap_v2`` (Nichol & Dhariwal, 2021) betas.
  Its native time is the training-timestep index ``τ ∈ [0, T−1]`` made continuous by
  interpolating log σ̃ (σ̃ = σ/α, the noise-to-signal ratio) linearly between integer
  timesteps, so τ ↔ σ̃ is exactly invertible (grids laid out in σ̃ or λ map back to the same
  σ̃). At integer τ, α² is the schedule's ᾱ_τ exactly. The backbone is fed τ itself.
* ``FlowProcess`` — flow matching / rectified flow (Lipman et al., 2023; Liu et al., 2023):
  ``x = (1−σ)·x0 + σ·ε``, velocity ``ε − x0``. Native time is σ ∈ [0, 1]. The ``"rf"``
  convention feeds the backbone ``1000·σ`` (``num_train_timesteps·σ``); the ``"sit"``
  convention (Ma et al., 2024) uses t = 1 − σ (t = 0 noise, t = 1 data), feeds t unscaled,
  and its velocity is ``data − noise``. A static ``shift`` s (Esser et al., 2024) is the
  default sampling-grid warp ``σ' = s·σ / (1 + (s−1)·σ)``.

Prediction types convert to the data prediction ``D`` (the denoised estimate of x0) by a
per-time affine map ``D = p·x + q·out``; ``prediction_coefficients`` gives (p, q) and
``to_data`` / ``from_data`` apply the map and its inverse.

Training helpers (used by the zoo recipe) all take *native* times::

    t = process.sample_train_times(n, generator)          # [n] native times
    x_t = process.add_noise(x0, noise, t)
    loss = mse(backbone(x_t, process.model_time(t), y), process.training_target(x0, noise, t))
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from torch import Tensor

VP_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
VP_PREDICTIONS = ("epsilon", "v", "sample")
FLOW_PREDICTIONS = ("velocity", "sample")
FLOW_CONVENTIONS = ("rf", "sit")
PROCESS_TYPES = ("vp", "flow")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number; got {value!r}")
    return float(value)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"{name} must be an integer >= 2; got {value!r}")
    return value


def shift_sigma(sigma: np.ndarray | float, shift: float) -> np.ndarray:
    """The static time shift of a flow grid, ``s·σ / (1 + (s−1)·σ)`` (identity for s = 1)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


class Process(ABC):
    """A noise process ``x = α(t)·x0 + σ(t)·ε`` in the process's native time t."""

    kind: str
    prediction: str
    num_train_timesteps: int

    @abstractmethod
    def alpha_sigma(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(α, σ) at native times ``t`` (float64 arrays)."""

    @abstractmethod
    def model_time(self, t: np.ndarray) -> np.ndarray:
        """The value the backbone is fed at native times ``t``."""

    @abstractmethod
    def native_time(self, model_time: np.ndarray) -> np.ndarray:
        """Inverse of ``model_time``."""

    @abstractmethod
    def prediction_coefficients(
        self, alpha: np.ndarray, sigma: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(p, q) with ``D = p·x + q·out`` for this process's prediction type."""

    @abstractmethod
    def sample_train_times(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` native training times drawn from the training distribution."""

    config_fields: tuple[str, ...]  # constructor arguments, in order

    def to_config(self) -> dict:
        """JSON-able config; ``process_from_config(p.to_config())`` rebuilds ``p``."""
        return {"type": self.kind, **{name: getattr(self, name) for name in self.config_fields}}

    # -- tensor helpers (float32 math on the caller's device) -------------------------------

    def _per_row(self, t: Tensor | float, like: Tensor, terms) -> tuple[Tensor, ...]:
        """``terms(α, σ, p, q)`` at native times ``t`` (float64), as float32 columns that
        broadcast against ``like`` row by row (a scalar t broadcasts to every row)."""
        t_np = torch.as_tensor(t).detach().cpu().double().numpy()
        alpha, sigma = self.alpha_sigma(t_np)
        values = terms(alpha, sigma, *self.prediction_coefficients(alpha, sigma))
        shape = (-1,) + (1,) * (like.dim() - 1) if np.ndim(t_np) else (1,) * like.dim()
        return tuple(
            torch.as_tensor(v, dtype=torch.float32, device=like.device).reshape(shape)
            for v in values
        )

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """``α(t)·x0 + σ(t)·noise``; ``t`` is a scalar or one native time per row."""
        alpha, sigma = self._per_row(t, x0, lambda a, s, p, q: (a, s))
        return alpha * x0 + sigma * noise

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """What the backbone should output for ``add_noise(x0, noise, t)``."""
        # (x0 − p·x)/q with x = α·x0 + σ·ε, expanded in float64 so that nothing cancels in
        # float32 (e.g. the flow velocity at small σ).
        c_x0, c_noise = self._per_row(t, x0, lambda a, s, p, q: ((1 - p * a) / q, -p * s / q))
        return c_x0 * x0 + c_noise * noise

    def to_data(self, out: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
        """The data prediction ``D = p·x + q·out`` from a backbone output at native time t."""
        p, q = self._per_row(t, x, lambda a, s, p, q: (p, q))
        return p * x + q * out.float()

    def from_data(self, d: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
        """The backbone output that converts to the data prediction ``d`` (inverse of to_data)."""
        p, q = self._per_row(t, x, lambda a, s, p, q: (p, q))
        return (d - p * x) / q


class VPProcess(Process):
    """Discrete variance-preserving process with a beta schedule of T training timesteps."""

    kind = "vp"
    config_fields = ("schedule", "beta_start", "beta_end", "num_train_timesteps", "prediction")

    def __init__(
        self,
        schedule: str = "linear",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        num_train_timesteps: int = 1000,
        prediction: str = "epsilon",
    ):
        self.schedule = _choice("schedule", schedule, VP_SCHEDULES)
        self.beta_start = _positive("beta_start", beta_start)
        self.beta_end = _positive("beta_end", beta_end)
        self.num_train_timesteps = _positive_int("num_train_timesteps", num_train_timesteps)
        self.prediction = _choice("prediction", prediction, VP_PREDICTIONS)
        self.alphas_cumprod = _alphas_cumprod(
            self.schedule, self.beta_start, self.beta_end, self.num_train_timesteps
        )
        # σ̃ = σ/α at each training timestep, increasing in τ.
        self.sigma_ratios = np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)
        self._log_sigma_ratios = np.log(self.sigma_ratios)

    def sigma_ratio(self, t: np.ndarray) -> np.ndarray:
        """σ̃(τ), interpolating log σ̃ linearly between training timesteps."""
        grid = np.arange(self.num_train_timesteps, dtype=np.float64)
        return np.exp(np.interp(np.asarray(t, dtype=np.float64), grid, self._log_sigma_ratios))

    def time_at_sigma_ratio(self, sigma_ratio: np.ndarray) -> np.ndarray:
        """Native τ whose σ̃ is ``sigma_ratio``, interpolating log σ̃ (clamped to [0, T−1])."""
        log_s = np.log(np.maximum(np.asarray(sigma_ratio, dtype=np.float64), 1e-10))
        grid = np.arange(self.num_train_timesteps, dtype=np.float64)
        return np.interp(log_s, self._log_sigma_ratios, grid)

    def alpha_sigma(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = self.sigma_ratio(t)
        alpha = 1.0 / np.sqrt(1.0 + s * s)
        return alpha, s * alpha

    def model_time(self, t: np.ndarray) -> np.ndarray:
        return np.asarray(t, dtype=np.float64)

    def native_time(self, model_time: np.ndarray) -> np.ndarray:
        return np.asarray(model_time, dtype=np.float64)

    def prediction_coefficients(self, alpha, sigma):
        alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
        if self.prediction == "epsilon":  # x0 = (x − σ·ε)/α
            return 1.0 / alpha, -sigma / alpha
        if self.prediction == "v":  # v = α·ε − σ·x0 (Salimans & Ho, 2022), α² + σ² = 1
            return alpha, -sigma
        return np.zeros_like(alpha), np.ones_like(alpha)

    def sample_train_times(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Integer timesteps uniform on [0, T−1] (returned as float32)."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).float()


def _alphas_cumprod(schedule: str, beta_start: float, beta_end: float, steps: int) -> np.ndarray:
    # Built in float32 like the training code these schedules come from, so that α at
    # integer timesteps is bit-for-bit the one a model was trained with.
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float32) ** 2
    else:  # squaredcos_cap_v2: ᾱ(t) = cos²((t + 0.008)/1.008 · π/2), betas capped at 0.999

        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - abar((i + 1) / steps) / abar(i / steps), 0.999) for i in range(steps)],
            dtype=torch.float32,
        )
    return torch.cumprod(1.0 - betas, dim=0).double().numpy()


class FlowProcess(Process):
    """Flow matching / rectified flow ``x = (1−σ)·x0 + σ·ε``; native time σ ∈ [0, 1]."""

    kind = "flow"
    config_fields = ("shift", "convention", "num_train_timesteps", "prediction")

    def __init__(
        self,
        shift: float = 1.0,
        convention: str = "rf",
        num_train_timesteps: int = 1000,
        prediction: str = "velocity",
    ):
        self.shift = _positive("shift", shift)
        self.convention = _choice("convention", convention, FLOW_CONVENTIONS)
        self.num_train_timesteps = _positive_int("num_train_timesteps", num_train_timesteps)
        self.prediction = _choice("prediction", prediction, FLOW_PREDICTIONS)

    def alpha_sigma(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sigma = np.asarray(t, dtype=np.float64)
        return 1.0 - sigma, sigma

    def model_time(self, t: np.ndarray) -> np.ndarray:
        sigma = np.asarray(t, dtype=np.float64)
        return 1.0 - sigma if self.convention == "sit" else sigma * self.num_train_timesteps

    def native_time(self, model_time: np.ndarray) -> np.ndarray:
        t = np.asarray(model_time, dtype=np.float64)
        return 1.0 - t if self.convention == "sit" else t / self.num_train_timesteps

    def prediction_coefficients(self, alpha, sigma):
        alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
        if self.prediction == "velocity":  # x0 = x − σ·(ε − x0); SiT's velocity has the other sign
            return np.ones_like(sigma), (sigma if self.convention == "sit" else -sigma)
        return np.zeros_like(alpha), np.ones_like(alpha)

    def sample_train_times(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """σ uniform on [0, 1) (the shift only warps sampling grids)."""
        return torch.rand(n, generator=generator)


def process_from_config(cfg: dict) -> Process:
    """Build a process from its config dict (the ``"process"`` entry of a model's config.json)."""
    if not isinstance(cfg, dict):
        raise ValueError(f"process config must be a dict; got {type(cfg).__name__}")
    kind = _choice("process.type", cfg.get("type"), PROCESS_TYPES)
    params = {k: v for k, v in cfg.items() if k != "type"}
    cls = VPProcess if kind == "vp" else FlowProcess
    allowed = cls.config_fields
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown {kind} process field(s) {unknown}; allowed: {', '.join(allowed)}"
        )
    return cls(**params)

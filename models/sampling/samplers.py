"""Samplers as per-request states that hand the engine linear-update coefficients.

Every supported step is, per sample,

    D      = p·x + q·out                               (backbone output → data prediction)
    x_next = a·x + b₀·D + Σ_{k≥1} b_k·D_k + c·z        (D_k: earlier data predictions)

so a sampler is a precomputed *plan*: one ``StepCoefficients`` per backbone evaluation,
fixed by the grid alone. ``SamplerState`` walks its plan and keeps what the plan needs (x, the
D history, its own ``torch.Generator``); ``kernels.guidance.guided_update`` applies the
coefficients to a whole mixed batch. Two-stage and predictor–corrector methods fit the same
form because their extra stages are linear in the current x and the stored D's too.

Samplers (``x = α·x0 + σ·ε``, λ = log(α/σ), h = λ_next − λ):
  ddim          DDIM (Song et al., 2021a) with ``eta`` in [0, 1] (0: deterministic, 1: DDPM-like).
  dpmpp-2m      DPM-Solver++ multistep (Lu et al., 2022), order 2 (``order`` 1–3).
  dpmpp-3m      the same, order 3.
  dpmpp-2m-sde  SDE-DPM-Solver++(2M) (``order`` 1–2), noise from the request's generator.
  euler         Euler on the probability-flow ODE dx̃/ds = (x̃ − D)/s: x̃ = x/α, s = σ/α for
                VP (Karras et al., 2022); x̃ = x, s = σ on the flow ODE. Equal to DDIM(η=0).
  heun          Heun's 2nd-order method on the same ODE: 2 evaluations per step except a
                final step to σ = 0 (Euler), so 2N − 1 evaluations for N steps.
  unipc         UniPC-bh2 predictor–corrector on the data prediction (Zhao et al., 2023).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor

from denoised.kernels.guidance import BatchUpdate, guided_update
from denoised.models.conditioning import UNCONDITIONAL, Conditioning, ModelInput, stack_inputs
from denoised.models.sampling.grids import Grid, SamplerOptionError, make_grid
from denoised.models.sampling.process import FlowProcess, Process


@dataclass(frozen=True)
class StepCoefficients:
    """One evaluation's update: ``D = p·x + q·out``, ``x_next = a·x + Σ b_k·D_k + c·z``."""

    p: float
    q: float
    a: float
    b: tuple[float, ...]
    c: float


@dataclass(frozen=True)
class PlannedEval:
    """A backbone evaluation at ``model_time`` followed by the update ``coefficients``."""

    model_time: float
    coefficients: StepCoefficients


Update = tuple[int, float, tuple[float, ...], float]  # (grid point evaluated, a, b, c)


@dataclass(frozen=True)
class Choices:
    """A request's sampler-specific options, checked, with their defaults filled in."""

    order: int
    lower_order_final: bool
    eta: float


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: the options it takes beyond the grid's, and its plan as grid updates."""

    name: str
    updates: Callable[[Grid, Process, Choices], list[Update]]
    options: frozenset[str] = frozenset()
    orders: tuple[int, ...] = (1,)  # the `order` values it accepts; the first is the default


# --- options ---------------------------------------------------------------------------------

_GRID_OPTIONS = {"spacing", "final", "denoise_to_zero", "round_timesteps", "shift"}


def _bool_option(options: dict, name: str, default: bool) -> bool:
    value = options.get(name, default)
    if not isinstance(value, bool):
        raise SamplerOptionError(f"option {name!r} must be true or false; got {value!r}", name)
    return value


def _choices(spec: SamplerSpec, options: dict) -> Choices:
    """The options of sampler ``spec``, checked (SamplerOptionError names the bad one)."""
    allowed = _GRID_OPTIONS | spec.options
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise SamplerOptionError(
            f"unknown option(s) {unknown} for sampler {spec.name!r}; "
            f"allowed: {', '.join(sorted(allowed))}",
            unknown[0],
        )
    order = options.get("order", spec.orders[0])
    if type(order) is not int or order not in spec.orders:
        raise SamplerOptionError(
            f"option 'order' for sampler {spec.name!r} must be one of {tuple(sorted(spec.orders))}"
            f"; got {order!r}",
            "order",
        )
    eta = options.get("eta", 0.0)
    # η scales DDPM's posterior noise; above 1 the noise would exceed σ_next itself.
    if isinstance(eta, bool) or not isinstance(eta, int | float) or not 0.0 <= eta <= 1.0:
        raise SamplerOptionError(f"option 'eta' must be a number in [0, 1]; got {eta!r}", "eta")
    return Choices(order, _bool_option(options, "lower_order_final", True), float(eta))


# --- grid updates ----------------------------------------------------------------------------


def _ddim(grid: Grid, eta: float) -> list[Update]:
    al, si = grid.alpha, grid.sigma
    updates: list[Update] = []
    for i in range(grid.steps):
        # DDPM posterior std scaled by η: σ_n·sqrt(1 − e^{−2h}), with e^{−h} = α·σ_n / (α_n·σ).
        ratio = al[i] * si[i + 1] / (al[i + 1] * si[i])
        std = eta * si[i + 1] * math.sqrt(max(1.0 - ratio * ratio, 0.0))
        a = math.sqrt(max(si[i + 1] ** 2 - std * std, 0.0)) / si[i]
        updates.append((i, a, (al[i + 1] - a * al[i],), std))
    return updates


def _multistep_orders(grid: Grid, order: int, lower_order_final: bool) -> list[int]:
    """Per-step order: warm up from 1 and, with ``lower_order_final``, step down so that step i
    uses ≤ N − i points. Unlike diffusers (which steps down only on grids of fewer than 15
    steps) this holds on every grid: third-order steps into the wide last log-SNR intervals
    cost dpmpp-3m 2.6–4.2× accuracy on flow grids of 15–50 steps (docs/samplers.md)."""
    n = grid.steps
    # A point at λ = −∞ (a flow grid's σ = 1) sits infinitely far back in λ: its D gets no
    # weight in any finite difference, so steps do not reach back to it.
    first = 1 if np.isneginf(grid.logsnr[0]) else 0
    orders = []
    for i in range(n):
        k = min(order, max(i + 1 - first, 1))
        if lower_order_final:
            k = min(k, n - i)
        if grid.sigma[i + 1] == 0.0:  # λ = +inf: only the first-order step is defined
            k = 1
        orders.append(k)
    return orders


def _dpmpp(grid: Grid, orders: list[int], sde: bool) -> list[Update]:
    al, si, lam = grid.alpha, grid.sigma, grid.logsnr
    updates: list[Update] = []
    for i, k in enumerate(orders):
        if si[i + 1] == 0.0:
            updates.append((i, 0.0, (al[i + 1],), 0.0))
            continue
        h = lam[i + 1] - lam[i]
        if sde:  # x_n = (σ_n/σ)e^{−h}·x + α_n(1 − e^{−2h})·(D + ½·D1) + σ_n·sqrt(1 − e^{−2h})·z
            a = si[i + 1] / si[i] * math.exp(-h)
            phi = al[i + 1] * -math.expm1(-2.0 * h)
            c = si[i + 1] * math.sqrt(-math.expm1(-2.0 * h))
        else:  # x_n = (σ_n/σ)·x + α_n(1 − e^{−h})·(D + ½·D1) [+ higher terms]
            a = si[i + 1] / si[i]
            phi = al[i + 1] * -math.expm1(-h)
            c = 0.0
        b: tuple[float, ...]
        if k == 1:
            b = (phi,)
        elif k == 2:  # D1 = (D − D₋₁)/r0, r0 = h₋₁/h (the "midpoint" form)
            r0 = (lam[i] - lam[i - 1]) / h
            b = (phi * (1.0 + 0.5 / r0), -phi * 0.5 / r0)
        else:
            b = _dpmpp3_weights(
                al[i + 1], h, (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            )
        updates.append((i, a, b, c))
    return updates


def _dpmpp3_weights(
    alpha_next: float, h: float, r0: float, r1: float
) -> tuple[float, float, float]:
    """Weights on (D, D₋₁, D₋₂) of the third-order DPM-Solver++ multistep update."""
    e = math.expm1(-h)  # e^{−h} − 1
    c0 = -alpha_next * e
    c1 = alpha_next * (e / h + 1.0)
    c2 = -alpha_next * ((e + h) / h**2 - 0.5)
    # D1 = D1_0 + r0/(r0+r1)·(D1_0 − D1_1), D2 = (D1_0 − D1_1)/(r0+r1), with
    # D1_0 = (D − D₋₁)/r0 and D1_1 = (D₋₁ − D₋₂)/r1.
    d10 = (1.0 / r0, -1.0 / r0, 0.0)
    d11 = (0.0, 1.0 / r1, -1.0 / r1)
    diff = tuple(u - v for u, v in zip(d10, d11, strict=True))
    d1 = tuple(u + r0 / (r0 + r1) * v for u, v in zip(d10, diff, strict=True))
    d2 = tuple(v / (r0 + r1) for v in diff)
    w0, w1, w2 = (
        c0 * (j == 0) + c1 * u + c2 * v for j, (u, v) in enumerate(zip(d1, d2, strict=True))
    )
    return w0, w1, w2


def _ode_coordinates(process: Process, alpha: np.ndarray, sigma: np.ndarray):
    """(scale, s) with the probability-flow ODE dx̃/ds = (x̃ − D)/s in x̃ = x/scale."""
    if isinstance(process, FlowProcess):
        return np.ones_like(sigma), sigma
    return alpha, sigma / alpha


def _euler(grid: Grid, process: Process) -> list[Update]:
    scale, s = _ode_coordinates(process, grid.alpha, grid.sigma)
    return [
        (
            i,
            scale[i + 1] * s[i + 1] / (scale[i] * s[i]),
            (scale[i + 1] * (1.0 - s[i + 1] / s[i]),),
            0.0,
        )
        for i in range(grid.steps)
    ]


def _heun(grid: Grid, process: Process) -> list[Update]:
    scale, s = _ode_coordinates(process, grid.alpha, grid.sigma)
    updates = []
    for i, euler_step in enumerate(_euler(grid, process)):
        updates.append(euler_step)
        if grid.sigma[i + 1] == 0.0:
            continue
        # Second stage at the Euler point x' (on grid point i+1): with D1 the first stage's
        # and D2 this stage's data prediction, x_next = x' + scale·(s_n − s)/(2·s_n)·(D1 − D2).
        k = scale[i + 1] * (s[i + 1] - s[i]) / (2.0 * s[i + 1])
        updates.append((i + 1, 1.0, (-k, k), 0.0))
    return updates


def _unipc_rhos(h: float, rks: list[float], solve_all: bool) -> tuple[np.ndarray, float, float]:
    """UniPC-bh2 weights (Zhao et al., 2023) for the data prediction, and h·φ₁, B(h).

    ``rks`` are the λ-offsets r_j of the earlier D's relative to h (the last entry is 1).
    The predictor solves the system without its last row/column (``solve_all=False``),
    the corrector the full one; orders 2 (predictor) and 1 (corrector) use ρ = ½.
    """
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh)  # "bh2"
    order = len(rks)
    rows, rhs = [], []
    h_phi_k, factorial = h_phi_1 / hh - 1.0, 1
    for i in range(1, order + 1):
        rows.append([r ** (i - 1) for r in rks])
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    if solve_all:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(np.array(rows), np.array(rhs))
    elif order == 1:
        rhos = np.zeros(0)
    elif order == 2:
        rhos = np.array([0.5])
    else:
        rhos = np.linalg.solve(np.array(rows)[:-1, :-1], np.array(rhs)[:-1])
    return rhos, h_phi_1, b_h


def _unipc_terms(grid: Grid, i: int, order: int, corrector: bool) -> tuple[float, np.ndarray]:
    """The UniPC step from grid point i to i+1 as (x-coefficient, weights over D's).

    Predictor (into point i+1, from x at point i): weights over D_i, D_{i−1}, …, D_{i−order+1}.
    Corrector of point i+1, given its new D_{i+1}: only the change it makes to the predicted
    x, as weights over D_{i+1}, D_i, …, D_{i−order+1} (x-coefficient 0).
    """
    al, si, lam = grid.alpha, grid.sigma, grid.logsnr
    if si[i + 1] == 0.0:  # λ = +inf: the sample becomes its data prediction
        return 0.0, np.array([al[i + 1]])
    h = lam[i + 1] - lam[i]
    rks = [(lam[i - j] - lam[i]) / h for j in range(1, order)] + [1.0]
    rhos_p, h_phi_1, b_h = _unipc_rhos(h, rks, solve_all=False)
    scale = -al[i + 1] * b_h
    if not corrector:
        weights = np.zeros(order)  # over D_i, D_{i−1}, …
        weights[0] = -al[i + 1] * h_phi_1
        rhos, offset = rhos_p, 0
    else:
        rhos_c = _unipc_rhos(h, rks, solve_all=True)[0]
        weights = np.zeros(order + 1)  # over D_{i+1}, D_i, D_{i−1}, …
        weights[0] += scale * rhos_c[-1]  # ρ_last·(D_{i+1} − D_i)
        weights[1] -= scale * rhos_c[-1]
        rhos, offset = rhos_c[:-1] - np.append(rhos_p, np.zeros(len(rhos_c) - 1 - len(rhos_p))), 1
    for j in range(1, order):  # ρ_j·(D_{i−j} − D_i)/r_j
        w = scale * rhos[j - 1] / rks[j - 1]
        weights[offset + j] += w
        weights[offset] -= w
    return (si[i + 1] / si[i] if not corrector else 0.0), weights


def _unipc(grid: Grid, orders: list[int]) -> list[Update]:
    """UniPC: predictor into point i+1, then (after evaluating there) its corrector.

    The engine evaluates the backbone at the *predicted* x; folding the corrector of that
    point into the next predictor keeps each step linear in that x and the stored D's:
    x_next = A·(x + Σ γ_m·D_{i−m}) + Σ β_m·D_{i−m}.
    """
    updates = []
    for i, k in enumerate(orders):
        a, beta = _unipc_terms(grid, i, k, corrector=False)  # over D_i, D_{i−1}, …
        b = np.zeros(1 + max(len(beta), orders[i - 1] + 1 if i > 0 else 0))
        b[: len(beta)] += beta
        if i > 0:  # correct point i (predicted by step i−1 of order orders[i−1]) first
            _, gamma = _unipc_terms(grid, i - 1, orders[i - 1], corrector=True)
            b[: len(gamma)] += a * gamma
        updates.append((i, a, tuple(np.trim_zeros(b, "b")) or (0.0,), 0.0))
    return updates


# --- the samplers ----------------------------------------------------------------------------


def _multistep(
    method: Callable[[Grid, list[int]], list[Update]],
) -> Callable[[Grid, Process, Choices], list[Update]]:
    def updates(grid: Grid, process: Process, choices: Choices) -> list[Update]:
        return method(grid, _multistep_orders(grid, choices.order, choices.lower_order_final))

    return updates


_MULTISTEP_OPTIONS = frozenset({"order", "lower_order_final"})

SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec("ddim", lambda grid, _, o: _ddim(grid, o.eta), frozenset({"eta"})),
        SamplerSpec(
            "dpmpp-2m", _multistep(partial(_dpmpp, sde=False)), _MULTISTEP_OPTIONS, (2, 1, 3)
        ),
        SamplerSpec(
            "dpmpp-3m", _multistep(partial(_dpmpp, sde=False)), _MULTISTEP_OPTIONS, (3, 1, 2)
        ),
        SamplerSpec(
            "dpmpp-2m-sde", _multistep(partial(_dpmpp, sde=True)), _MULTISTEP_OPTIONS, (2, 1)
        ),
        SamplerSpec("euler", lambda grid, process, _: _euler(grid, process)),
        SamplerSpec("heun", lambda grid, process, _: _heun(grid, process)),
        SamplerSpec("unipc", _multistep(_unipc), _MULTISTEP_OPTIONS, (2, 1, 3)),
    )
}
SAMPLER_NAMES = tuple(SAMPLERS)


def build_plan(
    name: str, process: Process, steps: int, options: dict | None = None
) -> list[PlannedEval]:
    """Every evaluation of sampler ``name`` over ``steps`` steps, with its coefficients."""
    options = dict(options or {})
    if name not in SAMPLERS:
        raise SamplerOptionError(f"sampler must be one of {', '.join(SAMPLER_NAMES)}; got {name!r}")
    choices = _choices(SAMPLERS[name], options)
    final = options.get("final", "zero")
    denoise_to_zero = _bool_option(options, "denoise_to_zero", False)
    if denoise_to_zero and final != "min":
        raise SamplerOptionError(
            "option 'denoise_to_zero' needs final='min' (a grid that stops short of σ = 0)",
            "denoise_to_zero",
        )
    grid = make_grid(
        process,
        steps,
        spacing=options.get("spacing"),
        final=final,
        shift=options.get("shift"),
        round_timesteps=_bool_option(options, "round_timesteps", False),
    )
    updates = SAMPLERS[name].updates(grid, process, choices)
    plan = [
        PlannedEval(float(grid.model_time[i]), _with_prediction(process, grid, i, a, b, c))
        for i, a, b, c in updates
    ]
    if denoise_to_zero:  # one more evaluation at the last point; the sample becomes its D
        plan.append(
            PlannedEval(
                float(grid.model_time[-1]), _with_prediction(process, grid, -1, 0.0, (1.0,), 0.0)
            )
        )
    return plan


def _with_prediction(process: Process, grid: Grid, i: int, a, b, c) -> StepCoefficients:
    p, q = process.prediction_coefficients(grid.alpha[i], grid.sigma[i])
    return StepCoefficients(float(p), float(q), float(a), tuple(float(v) for v in b), float(c))


# --- per-request state -----------------------------------------------------------------------


Generators = torch.Generator | Sequence[torch.Generator]


def _randn(shape: tuple[int, ...], generator: Generators) -> Tensor:
    """N(0, I) draws from one generator, or from one generator per row (per image), so that
    image k's noise does not depend on how many images share its request."""
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device)
    return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator])


class SamplerState:
    """One request's sampler: current x, position in the plan, D history, own generator(s)."""

    def __init__(
        self,
        name: str,
        plan: Sequence[PlannedEval],
        x: Tensor,
        generator: Generators,
    ):
        self.name = name
        self.plan = plan
        self.x = x
        self.generator = generator
        self.step_index = 0
        self._history: list[Tensor] = []
        self._keep = max(len(e.coefficients.b) for e in plan) - 1
        self._noise: Tensor | None = None

    @property
    def nfe(self) -> int:
        return len(self.plan)

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.plan)

    def model_time(self) -> float:
        return self.plan[self.step_index].model_time

    def coefficients(self) -> StepCoefficients:
        return self.plan[self.step_index].coefficients

    def history(self) -> list[Tensor]:
        """The D's that ``coefficients().b[1:]`` multiply, newest first."""
        return self._history[: len(self.coefficients().b) - 1]

    def noise(self) -> Tensor | None:
        """This evaluation's z (drawn once from the request's generator(s)), or None when
        c = 0."""
        if self.coefficients().c == 0.0:
            return None
        if self._noise is None:
            self._noise = _randn(tuple(self.x.shape), self.generator).to(self.x.device)
        return self._noise

    def advance(self, x_next: Tensor, d: Tensor) -> None:
        """Accept the update for the pending evaluation."""
        if self.done:
            raise ValueError("sampler is already done")
        self.x = x_next
        if self._keep:
            self._history = [d, *self._history][: self._keep]
        self._noise = None
        self.step_index += 1


def create_sampler(
    name: str,
    process: Process,
    steps: int,
    shape: tuple[int, ...],
    generator: Generators,
    options: dict | None = None,
    device: torch.device | str = "cpu",
) -> SamplerState:
    """A fresh sampler state; draws the initial noise x ~ N(0, I) from ``generator``: one
    generator for the whole batch, or a sequence of one per image (``shape[0]`` of them), whose
    image k then equals image 0 of a one-image state with generator k alone.

    Options (ValueError names the bad one): ``spacing`` (grids.VP_SPACINGS / FLOW_SPACINGS),
    ``final`` ("zero" | "min"), ``denoise_to_zero`` (bool, with final="min"),
    ``round_timesteps`` (bool), ``shift`` (flow only), and per sampler ``eta`` (ddim),
    ``order`` and ``lower_order_final`` (multistep samplers).
    """
    shape = tuple(shape)
    if len(shape) < 2 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(f"shape must be positive integers (n, C, ...); got {shape!r}")
    if not isinstance(generator, torch.Generator) and len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for {shape[0]} images; need one each")
    return SamplerState(name, _plan(name, process, steps, options),
                        _randn(shape, generator).to(device), generator)  # fmt: skip


def _plan(name: str, process: Process, steps: int, options: dict | None) -> Sequence[PlannedEval]:
    """``build_plan``, cached per process object: a server's requests repeat a few samplers,
    step counts and options, and building a plan is most of admitting a request. The key
    keeps each option's type (``order`` 2 is valid, 2.0 and True are not, yet they compare
    equal); options that cannot be a key (only invalid ones) go to ``build_plan`` to be
    refused there."""
    key = tuple(sorted((k, type(v), v) for k, v in (options or {}).items()))
    try:
        hash(key)
    except TypeError:
        return build_plan(name, process, steps, options)
    return _cached_plan(name, process, steps, key)


@functools.lru_cache(maxsize=256)
def _cached_plan(
    name: str, process: Process, steps: int, options: tuple
) -> tuple[PlannedEval, ...]:
    return tuple(build_plan(name, process, steps, {k: v for k, _, v in options}))


# --- batched stepping ------------------------------------------------------------------------

ModelFn = Callable[[Tensor, Tensor, ModelInput | None], Tensor]


def stack_updates(
    states: Sequence[SamplerState], uncond_index: Tensor, scales: Sequence[float]
) -> BatchUpdate:
    """The pending evaluation's guidance, coefficients, history and noise of ``states``,
    row-stacked; ``uncond_index`` ([B]) maps rows to their unconditional rows."""
    device = states[0].x.device
    coeffs = [s.coefficients() for s in states]
    width = max(len(cf.b) for cf in coeffs)
    # One small host table, expanded to rows and copied to the device once.
    table = _per_row(
        states,
        [
            [w, cf.p, cf.q, cf.a, cf.c, *cf.b, *[0.0] * (width - len(cf.b))]
            for w, cf in zip(scales, coeffs, strict=True)
        ],
        torch.float32,
    ).to(device, non_blocking=True)
    history = None
    if width > 1:
        history = torch.stack(
            [
                torch.cat([_nth(s.history(), k, s.x) for s in states]).float()
                for k in range(width - 1)
            ]
        )
    noises = [s.noise() for s in states]
    noise = None
    if any(z is not None for z in noises):
        noise = torch.cat(
            [
                z if z is not None else torch.zeros_like(s.x)
                for z, s in zip(noises, states, strict=True)
            ]
        )
    w, p, q, a, c = table[:, :5].unbind(1)
    return BatchUpdate(uncond_index, w, p, q, a, table[:, 5:], history, c, noise)


def _per_row(states: Sequence[SamplerState], values: list[list], dtype: torch.dtype) -> Tensor:
    """Per-state rows of ``values`` repeated for each of the state's samples (on the host)."""
    counts = torch.tensor([s.x.shape[0] for s in states])
    return torch.tensor(values, dtype=dtype).repeat_interleave(counts, dim=0)


def _nth(history: list[Tensor], k: int, like: Tensor) -> Tensor:
    return history[k] if k < len(history) else torch.zeros_like(like)


def step_batch(
    model_fn: ModelFn,
    states: Sequence[SamplerState],
    conditionings: Sequence[Conditioning] | None = None,
    guided_channels: int | None = None,
) -> Tensor:
    """Advance every state by one evaluation with a single ``model_fn`` call; returns the
    evaluation's data predictions D, [Σ rows, C, H, W] in the order of ``states``.

    Each state's rows are evaluated on its conditioning's inputs (None: unconditional, for
    all states or none); a guided state's rows run a second time on its null inputs, and the
    two are combined as u + w·(c − u) on channels [0, guided_channels). ``model_fn(x, t, y)``
    returns [B, C_out, H, W] with C_out ≥ C (extra channels, e.g. a learned variance, are
    ignored).
    """
    n = len(states)
    if n == 0:
        raise ValueError("step_batch needs at least one sampler state")
    conditionings = [UNCONDITIONAL] * n if conditionings is None else list(conditionings)
    if len(conditionings) != n:
        raise ValueError("conditionings need one entry per state")
    has_inputs = conditionings[0].inputs is not None
    if any((cond.inputs is not None) != has_inputs for cond in conditionings):
        raise ValueError("conditioning inputs must be given for all states or for none")
    device = states[0].x.device
    counts = [s.x.shape[0] for s in states]
    x = torch.cat([s.x for s in states]).float()
    extra = [i for i in range(n) if conditionings[i].guided]  # unconditional rows follow x
    # Per-row values built on the host and copied to the device once.
    uncond_rows, next_row = [], 0
    for cond, count in zip(conditionings, counts, strict=True):
        if cond.guided:
            uncond_rows.append(torch.arange(next_row, next_row + count))
            next_row += count
        else:
            uncond_rows.append(torch.full((count,), -1))
    uncond_index = torch.cat(uncond_rows).to(device, non_blocking=True)
    times = [[s.model_time()] for s in states]
    t = _per_row(states, times, torch.float32).to(device, non_blocking=True)[:, 0]
    t_per_state = t.split(counts)
    model_x = torch.cat([x] + [states[i].x.float() for i in extra])
    model_t = torch.cat([t] + [t_per_state[i] for i in extra])
    model_y = None
    if has_inputs:
        # None of these is None: every state has inputs (checked above), and the extra rows'
        # states are guided (they have null inputs).
        rows = [cond.inputs for cond in conditionings]
        rows += [conditionings[i].null_inputs for i in extra]
        model_y = stack_inputs([y for y in rows if y is not None])
        if isinstance(model_y, Tensor):
            model_y = model_y.to(device)
    out = model_fn(model_x, model_t, model_y)
    channels = x.shape[1]
    cond_out, uncond_out = out[: x.shape[0], :channels], out[x.shape[0] :, :channels]
    update = stack_updates(states, uncond_index, [cond.scale for cond in conditionings])
    x_next, d = guided_update(
        x, cond_out, uncond_out, update, channels if guided_channels is None else guided_channels
    )
    for state, x_i, d_i in zip(states, x_next.split(counts), d.split(counts), strict=True):
        state.advance(x_i, d_i)
    return d


def sample(
    model_fn: ModelFn,
    state: SamplerState,
    conditioning: Conditioning = UNCONDITIONAL,
    guided_channels: int | None = None,
) -> Tensor:
    """Run ``state`` to the end, one ``step_batch`` per evaluation; returns the final x."""
    while not state.done:
        step_batch(model_fn, [state], [conditioning], guided_channels)
    return state.x

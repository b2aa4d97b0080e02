"""Which requests share the next backbone forward (torch-free, so it is unit-tested alone).

The engine hands the batcher every admitted, unfinished request as a `Candidate`, oldest
first, once per iteration; the batcher returns the ones that run in the next forward.

- `StepBatcher` (step-level batching): any requests of one model and latent shape share a
  forward whatever their sampler, step count, guidance scale or progress. Oldest first under
  a budget counted in samples (a guided sample costs two rows: conditional and unconditional).
  New requests join at the next iteration; finished ones are simply no longer candidates.
- `RequestBatcher` (the comparison mode): only requests with equal sampling parameters share
  a batch, and a batch runs to completion before the next one forms — what servers that batch
  whole requests do.

Both are fair between models: the model served least recently goes next.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """One request as the batcher sees it."""

    id: int
    model: str
    shape: tuple[int, ...]  # latent (C, H, W): only equal shapes stack into one tensor
    samples: int  # images in the request
    guided: bool  # guided samples add an unconditional row each
    params: Hashable = None  # equal for requests the request-level mode may batch together

    @property
    def cost(self) -> int:
        return self.samples * (2 if self.guided else 1)


class _FairBatcher:
    """Round-robin between models: the model whose last forward is oldest goes next."""

    def __init__(self, max_samples: int) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.max_samples = max_samples
        self._tick = 0
        self._last_served: dict[str, int] = {}

    def _next_model(self, candidates: Sequence[Candidate]) -> str:
        # Ties (never served) go to the model with the oldest request.
        first_seen: dict[str, int] = {}
        for position, cand in enumerate(candidates):
            first_seen.setdefault(cand.model, position)
        return min(first_seen, key=lambda m: (self._last_served.get(m, -1), first_seen[m]))

    def _served(self, model: str) -> None:
        self._tick += 1
        self._last_served[model] = self._tick

    def _fill(self, pool: Sequence[Candidate]) -> list[Candidate]:
        """Oldest first while the budget lasts; the oldest always runs, even if over budget."""
        chosen: list[Candidate] = []
        used = 0
        for cand in pool:
            if chosen and used + cand.cost > self.max_samples:
                continue  # a smaller, younger request may still fit
            chosen.append(cand)
            used += cand.cost
            if used >= self.max_samples:
                break
        return chosen


class StepBatcher(_FairBatcher):
    """Step-level batching: mixed samplers, step counts and progress in one forward."""

    def select(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        """`candidates` oldest first; returns the requests for the next forward."""
        if not candidates:
            return []
        model = self._next_model(candidates)
        same_model = [c for c in candidates if c.model == model]
        shape = same_model[0].shape
        self._served(model)
        return self._fill([c for c in same_model if c.shape == shape])


class RequestBatcher(_FairBatcher):
    """Request-level batching: equal parameters only, each batch run to completion."""

    def __init__(self, max_samples: int) -> None:
        super().__init__(max_samples)
        self._running: set[int] = set()

    def select(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        running = [c for c in candidates if c.id in self._running]
        if running:
            return running  # late arrivals wait for the whole batch to finish
        if not candidates:
            self._running = set()
            return []
        model = self._next_model(candidates)
        same_model = [c for c in candidates if c.model == model]
        head = same_model[0]
        self._served(model)
        chosen = self._fill(
            [c for c in same_model if c.shape == head.shape and c.params == head.params]
        )
        self._running = {c.id for c in chosen}
        return chosen


def make_batcher(mode: str, max_samples: int) -> StepBatcher | RequestBatcher:
    """`mode` is "step" or "request" (the `--batching` setting)."""
    batchers = {"step": StepBatcher, "request": RequestBatcher}
    if mode not in batchers:
        raise ValueError(f"batching mode must be one of {sorted(batchers)}, got {mode!r}")
    return batchers[mode](max_samples)

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

Both are fair between models: the model served least recently goes next, and each forward
stays within its model's row limit (`BatchLimit`: `max_batch`, lowered after a forward runs
out of memory and probed back up after a run of successes) and, for text models, within a
byte budget for the text inputs it stacks (encoded prompts or cross-attention caches).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

# Iterations without running out of memory before a lowered limit is probed upward (doubled).
# Counted in iterations rather than seconds because a failed probe costs one failed forward:
# after 64 successes that is under 2 % extra forwards, and the wait doubles after each failed
# probe (up to 16 × 64 = 1024 iterations), so a lasting shortage costs ever less. After a
# transient one, the limit is back at `max_batch` within about 64 × log2(max_batch / limit)
# iterations: seconds on a GPU.
PROBE_AFTER = 64
MAX_PROBE_WAIT_FACTOR = 16


@dataclass(frozen=True)
class Candidate:
    """One request as the batcher sees it."""

    id: int
    model: str
    shape: tuple[int, ...]  # latent (C, H, W): only equal shapes stack into one tensor
    samples: int  # images in the request
    guided: bool  # guided samples add an unconditional row each
    params: Hashable = None  # equal for requests the request-level mode may batch together
    # Bytes of the request's text inputs (encoded prompts or cross-attention caches), which
    # every forward it joins stacks into one tensor per layer.
    text_bytes: int = 0

    @property
    def cost(self) -> int:
        return self.samples * (2 if self.guided else 1)


class BatchLimit:
    """The most backbone rows one model's forward may have (rows are what take the device's
    memory; a guided sample is two). `max_batch` at first; after a forward of R rows runs out
    of memory, the largest forward that ran in that iteration (below R); doubled towards
    `max_batch` after `probe_after` iterations without running out of memory. A probe that
    runs out of memory lowers the limit again and doubles the wait before the next probe."""

    def __init__(self, ceiling: int, probe_after: int = PROBE_AFTER) -> None:
        if ceiling < 1 or probe_after < 1:
            raise ValueError(
                f"ceiling and probe_after must be >= 1, got {ceiling} and {probe_after}"
            )
        self.ceiling = ceiling
        self.rows = ceiling
        self._probe_after = probe_after
        self._wait = probe_after  # successful iterations before the next probe
        self._streak = 0  # successful iterations since the limit last changed
        self._probing = False  # the limit was raised and has not yet held for a whole wait

    def record(self, ran: Sequence[int], out_of_memory: Sequence[int]) -> None:
        """One iteration of the model: the rows of its forwards that ran and of those that
        ran out of memory (the engine splits those and retries the halves)."""
        if out_of_memory:
            smallest = min(out_of_memory)
            if smallest > self.rows:
                return  # a lone request larger than the limit: its own failure, not the limit's
            fitted = [rows for rows in ran if rows < smallest]
            self.rows = max(1, min(self.rows, max(fitted, default=smallest - 1)))
            if self._probing:  # the raised limit did not hold: probe less often
                self._wait = min(2 * self._wait, MAX_PROBE_WAIT_FACTOR * self._probe_after)
            self._probing = False
            self._streak = 0
            return
        self._streak += 1
        if self._streak < self._wait:
            return
        self._streak = 0
        if self._probing:  # the raised limit held for a whole wait
            self._wait = self._probe_after
            self._probing = False
        if self.rows < self.ceiling:
            self.rows = min(self.ceiling, 2 * self.rows)
            self._probing = True


class _FairBatcher:
    """Round-robin between models: the model whose last forward is oldest goes next."""

    def __init__(self, max_samples: int, max_text_bytes: int | None = None) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.max_samples = max_samples
        self.max_text_bytes = max_text_bytes  # None: text inputs are not limited
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

    def _fill(self, pool: Sequence[Candidate], limits: Mapping[str, int] | None) -> list[Candidate]:
        """Oldest first while the budget (`max_samples`, or the model's lower limit in
        `limits`) and the text-input budget (`max_text_bytes`) last; the oldest always runs,
        even if over budget."""
        budget = self.max_samples
        if pool and limits and pool[0].model in limits:
            budget = min(budget, limits[pool[0].model])
        text_budget = self.max_text_bytes
        chosen: list[Candidate] = []
        used = text = 0
        for cand in pool:
            over_text = text_budget is not None and text + cand.text_bytes > text_budget
            if chosen and (used + cand.cost > budget or over_text):
                continue  # a smaller, younger request may still fit
            chosen.append(cand)
            used += cand.cost
            text += cand.text_bytes
            if used >= budget:
                break
        return chosen


class StepBatcher(_FairBatcher):
    """Step-level batching: mixed samplers, step counts and progress in one forward."""

    def select(
        self, candidates: Sequence[Candidate], limits: Mapping[str, int] | None = None
    ) -> list[Candidate]:
        """`candidates` oldest first; `limits`: rows per forward by model where lower than
        `max_samples`. Returns the requests for the next forward."""
        if not candidates:
            return []
        model = self._next_model(candidates)
        same_model = [c for c in candidates if c.model == model]
        shape = same_model[0].shape
        self._served(model)
        return self._fill([c for c in same_model if c.shape == shape], limits)


class RequestBatcher(_FairBatcher):
    """Request-level batching: equal parameters only, each batch run to completion."""

    def __init__(self, max_samples: int, max_text_bytes: int | None = None) -> None:
        super().__init__(max_samples, max_text_bytes)
        self._running: set[int] = set()

    def select(
        self, candidates: Sequence[Candidate], limits: Mapping[str, int] | None = None
    ) -> list[Candidate]:
        running = [c for c in candidates if c.id in self._running]
        if running:
            # Late arrivals wait for the whole batch to finish; a batch over its model's
            # (lowered) limit runs in parts, oldest first.
            return self._fill(running, limits)
        if not candidates:
            self._running = set()
            return []
        model = self._next_model(candidates)
        same_model = [c for c in candidates if c.model == model]
        head = same_model[0]
        self._served(model)
        chosen = self._fill(
            [c for c in same_model if c.shape == head.shape and c.params == head.params], limits
        )
        self._running = {c.id for c in chosen}
        return chosen


def make_batcher(
    mode: str, max_samples: int, max_text_bytes: int | None = None
) -> StepBatcher | RequestBatcher:
    """`mode` is "step" or "request" (the `--batching` setting)."""
    batchers: dict[str, type[StepBatcher | RequestBatcher]] = {
        "step": StepBatcher,
        "request": RequestBatcher,
    }
    if mode not in batchers:
        raise ValueError(f"batching mode must be one of {sorted(batchers)}, got {mode!r}")
    return batchers[mode](max_samples, max_text_bytes)

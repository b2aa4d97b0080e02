"""Which requests share the next backbone forward (torch-free, so it is unit-tested alone).

The engine keeps every admitted, unfinished request as a `Candidate` in its model's queue
(oldest first) and asks the batcher, once per iteration, for the ones that run in the next
forward. The batcher reads a queue only as far as that forward needs (see `LOOKAHEAD`), so an
iteration costs the same with ten requests waiting or ten thousand.

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

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

# Iterations without running out of memory before a lowered limit is probed upward (doubled).
# Counted in iterations rather than seconds because a failed probe costs one failed forward:
# after 64 successes that is under 2 % extra forwards, and the wait doubles after each failed
# probe (up to 16 × 64 = 1024 iterations), so a lasting shortage costs ever less. After a
# transient one, the limit is back at `max_batch` within about 64 × log2(max_batch / limit)
# iterations: seconds on a GPU.
PROBE_AFTER = 64
MAX_PROBE_WAIT_FACTOR = 16
# Candidates a forward's selection passes over (too large, another shape or other parameters)
# before it stops looking: younger requests may fill a gap the budget leaves, but the cost of
# an iteration must not grow with the queue.
LOOKAHEAD = 64


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


# Each model's waiting and running requests, by id (ids grow with arrival), oldest first.
Queues = Mapping[str, Mapping[int, Candidate]]


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


def _oldest(queue: Mapping[int, Candidate]) -> Candidate:
    return queue[next(iter(queue))]


class _FairBatcher:
    """Round-robin between models: the model whose last forward is oldest goes next."""

    def __init__(self, max_samples: int, max_text_bytes: int | None = None) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.max_samples = max_samples
        self.max_text_bytes = max_text_bytes  # None: text inputs are not limited
        self._tick = 0
        self._last_served: dict[str, int] = {}

    def _next_model(self, queues: Queues) -> str | None:
        """The model to serve next (None: no candidates). Ties (never served) go to the
        model with the oldest request: ids grow with arrival."""
        waiting = [(self._last_served.get(m, -1), next(iter(q)), m) for m, q in queues.items() if q]
        return min(waiting)[2] if waiting else None

    def _served(self, model: str) -> None:
        self._tick += 1
        self._last_served[model] = self._tick

    def _budget(self, model: str, limits: Mapping[str, int] | None) -> int:
        """Rows per forward of `model`: `max_samples`, or its lower limit in `limits`."""
        return min(self.max_samples, (limits or {}).get(model, self.max_samples))

    def _fill(
        self, pool: Iterable[Candidate], fits: Callable[[Candidate], bool], budget: int
    ) -> list[Candidate]:
        """Oldest first, those of `pool` that `fits`, while the row `budget` and the
        text-input budget (`max_text_bytes`) last; the first always runs, even if over budget.
        Past one that does not fit, younger ones are still looked at (a smaller one may fill
        the gap), but at most `LOOKAHEAD` are passed over: a long queue costs no more."""
        text_budget = self.max_text_bytes
        chosen: list[Candidate] = []
        used = text = passed = 0
        for cand in pool:
            over_text = text_budget is not None and text + cand.text_bytes > text_budget
            if chosen and (used + cand.cost > budget or over_text or not fits(cand)):
                passed += 1
                if passed > LOOKAHEAD:
                    break
                continue
            chosen.append(cand)
            used += cand.cost
            text += cand.text_bytes
            if used >= budget:
                break
        return chosen


class StepBatcher(_FairBatcher):
    """Step-level batching: mixed samplers, step counts and progress in one forward."""

    def select(self, queues: Queues, limits: Mapping[str, int] | None = None) -> list[Candidate]:
        """`queues`: each model's candidates by id, oldest first; `limits`: rows per forward
        by model where lower than `max_samples`. Returns the requests for the next forward."""
        model = self._next_model(queues)
        if model is None:
            return []
        self._served(model)
        queue = queues[model]
        shape = _oldest(queue).shape
        return self._fill(queue.values(), lambda c: c.shape == shape, self._budget(model, limits))


class RequestBatcher(_FairBatcher):
    """Request-level batching: equal parameters only, each batch run to completion."""

    def __init__(self, max_samples: int, max_text_bytes: int | None = None) -> None:
        super().__init__(max_samples, max_text_bytes)
        self._running: list[int] = []  # the ids of the batch in progress, oldest first
        self._running_model = ""

    def select(self, queues: Queues, limits: Mapping[str, int] | None = None) -> list[Candidate]:
        queue = queues.get(self._running_model, {})
        running = [queue[i] for i in self._running if i in queue]
        if running:
            # Late arrivals wait for the whole batch to finish; a batch over its model's
            # (lowered) limit runs in parts, oldest first.
            return self._fill(running, lambda c: True, self._budget(self._running_model, limits))
        model = self._next_model(queues)
        if model is None:
            self._running = []
            return []
        self._served(model)
        queue = queues[model]
        head = _oldest(queue)
        chosen = self._fill(
            queue.values(),
            lambda c: c.shape == head.shape and c.params == head.params,
            self._budget(model, limits),
        )
        self._running, self._running_model = [c.id for c in chosen], model
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

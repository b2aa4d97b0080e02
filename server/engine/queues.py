"""The engine thread's books of admitted, unfinished jobs, kept so that an iteration's cost
does not grow with the number of requests waiting: each model's ready jobs as batcher
`Candidate`s in arrival order (built once per job, not once per iteration), the text jobs
whose prompts are not encoded yet, and a heap of deadlines. Adding, removing and finding the
expired jobs cost O(log n) per job; nothing walks the whole queue.

Only the engine thread touches it (submissions reach it through the engine's inbox).
"""

from __future__ import annotations

import heapq

from denoised.server.engine.batcher import Candidate
from denoised.server.engine.jobs import Job

# The deadline heap keeps the entries of jobs that ended before their deadline until it is
# rebuilt from the live jobs, once it holds this many times more entries than there are jobs.
_HEAP_SLACK = 4


def candidate(job: Job) -> Candidate:
    """`job` as the batcher sees it (its conditioning must be known: text bytes count)."""
    p = job.params
    assert job.conditioning is not None  # text jobs become candidates once encoded
    return Candidate(
        id=job.seq,
        model=p.model,
        shape=p.latent_shape,
        samples=p.n,
        guided=p.guided,
        params=p.batch_key,
        text_bytes=job.conditioning.nbytes,
    )


class JobQueues:
    def __init__(self) -> None:
        self.jobs: dict[int, Job] = {}  # by seq, in arrival order
        self.ready: dict[str, dict[int, Candidate]] = {}  # per model: what the batcher reads
        self.unencoded: dict[int, Job] = {}  # text jobs waiting for their prompts' encoding
        self._deadlines: list[tuple[float, int]] = []

    def __bool__(self) -> bool:
        return bool(self.jobs)

    def add(self, job: Job) -> None:
        self.jobs[job.seq] = job
        heapq.heappush(self._deadlines, (job.deadline, job.seq))
        if job.conditioning is None:
            self.unencoded[job.seq] = job
        else:
            self.mark_ready(job)

    def mark_ready(self, job: Job) -> None:
        """`job` has its conditioning (its prompts were encoded): it may join forwards."""
        self.unencoded.pop(job.seq, None)
        self.ready.setdefault(job.params.model, {})[job.seq] = candidate(job)

    def remove(self, job: Job) -> bool:
        """Forget `job` (finished, failed, cancelled or timed out); False if it was gone."""
        if self.jobs.pop(job.seq, None) is None:
            return False
        self.unencoded.pop(job.seq, None)
        queue = self.ready.get(job.params.model)
        if queue is not None:
            queue.pop(job.seq, None)
            if not queue:
                del self.ready[job.params.model]
        if len(self._deadlines) > _HEAP_SLACK * (len(self.jobs) + 16):
            self._deadlines = [(j.deadline, seq) for seq, j in self.jobs.items()]
            heapq.heapify(self._deadlines)
        return True

    def expired(self, now: float) -> list[Job]:
        """The jobs whose deadline is before `now`, oldest deadline first (still queued: the
        caller ends and removes them)."""
        late = []
        while self._deadlines and self._deadlines[0][0] < now:
            _, seq = heapq.heappop(self._deadlines)
            job = self.jobs.get(seq)
            if job is not None:
                late.append(job)
        return late

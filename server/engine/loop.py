"""The engine: one dedicated thread owns the device and the loaded models and loops —
the batcher picks the requests for the next forward, a `ModelRunner` advances them by one
model evaluation, finished requests leave at once: the engine thread decodes them (the VAE,
batched across the requests that finished together) and a small thread pool encodes the
images. HTTP handlers on the event loop `submit` jobs into an inbox and await their futures;
the engine takes them into its own books (`queues.JobQueues`) and checks cancellations,
deadlines and draining once per iteration, at a cost that does not grow with the queue.

A forward that runs out of device memory is split and retried, and the model's forwards are
then planned within a lower row limit (`batcher.BatchLimit`), probed back up after a run of
successful iterations, so a lasting shortage does not cost a failed forward every iteration.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from denoised.models.sampling.samplers import SAMPLER_NAMES
from denoised.server.admission import GenerationRequest, admit
from denoised.server.engine.batcher import PROBE_AFTER, BatchLimit, make_batcher
from denoised.server.engine.jobs import (
    Draining,
    GenerationParams,
    Job,
    JobError,
    JobResult,
    Progress,
    QueueFull,
)
from denoised.server.engine.queues import JobQueues
from denoised.server.engine.runner import ModelRunner
from denoised.server.faults import parse_faults
from denoised.server.imaging import encode_image, encode_stack_npy, preview_png, to_unit_range
from denoised.server.metrics import Metrics
from denoised.server.registry import ModelRegistry, ServedModel
from denoised.server.settings import Settings

log = logging.getLogger("denoised.engine")


def _rows(jobs: list[Job]) -> int:
    """Backbone rows of a forward over `jobs` (guided samples count twice)."""
    return sum(job.params.rows for job in jobs)


# Most images one VAE decode call takes (a request with more is decoded alone): batching
# lowers the cost per image, the bound keeps a large VAE's activations in check.
DECODE_BATCH = 16


def _decode_chunks(jobs: list[Job]) -> list[list[Job]]:
    """`jobs` in order, grouped into runs of at most `DECODE_BATCH` images."""
    chunks: list[list[Job]] = []
    images = DECODE_BATCH  # the images in chunks[-1]; start a new chunk first
    for job in jobs:
        if images + job.params.n > DECODE_BATCH:
            chunks.append([])
            images = 0
        chunks[-1].append(job)
        images += job.params.n
    return chunks


def _memory_reader(device: torch.device):
    if device.type == "cuda":
        return lambda: float(torch.cuda.memory_allocated(device))
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> float:
        with open("/proc/self/statm") as fh:
            return float(int(fh.read().split()[1]) * page)

    return rss


def _about(job: Job) -> dict:
    """`extra=` for a log line about one request: the line shows its id, as lines written
    while the event loop handles the request do (`middleware.RequestIdLogFilter`)."""
    return {"request_id": job.params.request_id}


def _log_outcome(job: Job, outcome: str, level: int = logging.INFO) -> None:
    p = job.params
    log.log(
        level,
        "request %s %s: model=%s sampler=%s steps=%d/%d n=%d guidance=%g %.3fs",
        p.request_id, outcome, p.model, p.sampler, job.state.step_index, p.nfe, p.n,
        p.guidance_scale, time.monotonic() - job.admitted_at, extra=_about(job),
    )  # fmt: skip


@dataclass
class _WarmupItem:
    """A request-shaped probe for warm-up, run before the engine admits anything."""

    params: GenerationParams
    state: Any
    conditioning: Any = None  # set as a Job's is: from the params, or by encoding the prompt
    prompt_tokens: int | None = None
    truncated: bool | None = None

    def __post_init__(self) -> None:
        if self.conditioning is None:
            self.conditioning = self.params.conditioning


class Engine:
    def __init__(
        self,
        registry: ModelRegistry,
        settings: Settings,
        metrics: Metrics,
        device: torch.device,
        probe_after: int = PROBE_AFTER,
    ) -> None:
        """`probe_after`: successful iterations before a model's row limit, lowered after
        running out of memory, is probed upward (see `batcher.PROBE_AFTER`)."""
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.device = device
        faults = parse_faults(settings.fault_injection)
        if faults.active:
            log.warning("fault injection is on (tests only): %s", faults)
        cache_bytes = int(settings.prompt_cache_mb * 2**20)
        self.runners = {
            name: ModelRunner(m.loaded, faults, settings.compile, settings.max_batch, cache_bytes)
            for name, m in registry.models.items()
        }
        self.batcher = make_batcher(
            settings.batching, settings.max_batch, int(settings.max_batch_text_mb * 2**20)
        )
        self.limits = {name: BatchLimit(settings.max_batch, probe_after) for name in self.runners}
        self._queues = JobQueues()  # the engine thread's own
        # Guarded by _cv: what the event loop hands over, and the counts it reads.
        self._cv = threading.Condition()
        self._inbox: list[Job] = []  # submitted, not yet taken into `_queues`
        self._cancelled: list[Job] = []  # their clients went away
        self._waiting: Counter[str] = Counter()  # per model: admitted, no forward yet
        self._active: Counter[str] = Counter()  # per model: in forwards, not finished
        self._finishing = 0  # finished jobs still being encoded
        self._draining = False
        self._stopping = False
        self._request_seconds = 1.0  # running mean, for Retry-After
        self._pool = ThreadPoolExecutor(settings.encode_threads, "denoised-finish")
        self._thread = threading.Thread(target=self._loop, name="denoised-engine", daemon=True)
        for name in registry.models:
            metrics.register_model(name, SAMPLER_NAMES)
            if registry.models[name].conditioning == "text":
                metrics.register_text_model(name)
            metrics.batch_limit.labels(model=name).set(settings.max_batch)
        if device.type == "cuda" or os.path.exists("/proc/self/statm"):
            metrics.watch_device_memory(str(device), _memory_reader(device))

    # ---- event-loop side -------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (a no-op when it runs already)."""
        if not self._thread.is_alive():
            self._thread.start()

    def submit(self, job: Job) -> None:
        """Admit a job, or raise `Draining` (503) / `QueueFull` (429)."""
        labels = {"model": job.params.model, "sampler": job.params.sampler}
        with self._cv:
            if self._draining:
                self.metrics.requests.labels(**labels, status="rejected").inc()
                raise Draining()
            if self._waiting.total() >= self.settings.max_queue:
                self.metrics.requests.labels(**labels, status="rejected").inc()
                raise QueueFull(retry_after=max(1, math.ceil(self._request_seconds)))
            self._inbox.append(job)
            self._count(job.params.model, waiting=1)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Drop a job at the start of the next iteration (its client went away); a job that
        has finished already is left alone."""
        with self._cv:
            self._cancelled.append(job)
            self._cv.notify()

    def drain(self) -> None:
        """Stop admitting; work already admitted runs to completion."""
        with self._cv:
            self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def idle(self) -> bool:
        with self._cv:
            unfinished = self._waiting.total() + self._active.total()
            return unfinished == 0 and self._finishing == 0

    def stop(self) -> None:
        """End the loop after the current iteration; jobs still admitted fail with 503."""
        with self._cv:
            self._stopping = True
            self._draining = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join()
        self._pool.shutdown(wait=True)

    def render_preview(self, model: str, prediction: torch.Tensor) -> bytes:
        """PNG of a [1, C, h, w] data prediction (decoded by the VAE for latent models)."""
        image = self._to_images(model, prediction)
        return preview_png(to_unit_range(image)[0], self.settings.preview_size)

    # ---- warm-up (before start) ------------------------------------------------------------
    def warm_up(self) -> None:
        """Per model: compile its backbone (with `compile`), then one short guided generation:
        first-call costs are paid before /ready. A model whose warm-up fails is dropped
        (listed as unavailable) and the others serve."""
        for name, served in list(self.registry.models.items()):
            try:
                self._warm_up(name, served)
            except Exception as exc:
                log.exception("warm-up of %s failed: not serving it", name)
                del self.runners[name], self.limits[name]
                self.registry.drop(name, f"warm-up failed: {type(exc).__name__}: {exc}")

    def _warm_up(self, name: str, served: ServedModel) -> None:
        seconds = self.runners[name].compile()
        if seconds:
            log.info("compiled %s in %.1f s", name, seconds)
        request = GenerationRequest(
            label=0 if served.num_classes else None,
            steps=2,
            guidance_scale=2.0 if served.can_guide else 1.0,
        )
        params, state = admit(served, request, self.settings, "warmup", self.device)
        item = _WarmupItem(params, state)
        if item.conditioning is None:
            self.runners[name].encode_prompts([item])
        while not state.done:
            outcome = self.runners[name].step([item])
            if outcome.failed:
                raise RuntimeError(outcome.failed[0])
        self._to_images(name, state.x)
        log.info("warmed up %s", name)

    # ---- engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        queues = self._queues
        while True:
            with self._cv:
                while not (self._inbox or self._cancelled or queues or self._stopping):
                    self._cv.wait()
                if self._stopping:
                    for job in self._inbox:
                        queues.add(job)
                    self._inbox = []
                    break
                new, self._inbox = self._inbox, []
                cancelled, self._cancelled = self._cancelled, []
            for job in new:
                queues.add(job)
            self._reap(cancelled)
            self._encode_pending()
            limits = {name: limit.rows for name, limit in self.limits.items()}
            chosen = [queues.jobs[c.id] for c in self.batcher.select(queues.ready, limits)]
            if chosen:
                self._iterate(chosen)
        for job in list(queues.jobs.values()):
            self._end(job, Draining("the server stopped before this request finished"), "failed")

    def _encode_pending(self) -> None:
        """Encode the prompts of the text jobs that have none yet, one batch per model (so a
        request's prompt is encoded once, not per step); they then join forwards. The jobs
        of a model whose encoding fails fail."""
        pending: dict[str, list[Job]] = {}
        for job in self._queues.unencoded.values():
            pending.setdefault(job.params.model, []).append(job)
        for model, group in pending.items():
            runner = self.runners[model]
            cache = runner.prompt_cache
            assert cache is not None  # only text jobs come without conditioning (admission)
            hits, misses = cache.hits, cache.misses
            try:
                runner.encode_prompts(group)
            except Exception as exc:
                log.exception("encoding %d prompts of %s failed", len(group), model)
                for job in group:
                    error = JobError(500, f"encoding the prompt failed: {type(exc).__name__}",
                                     "internal_error")  # fmt: skip
                    self._end(job, error, "failed")
            else:
                for job in group:
                    self._queues.mark_ready(job)
            self.metrics.prompt_cache_hits.labels(model=model).inc(cache.hits - hits)
            self.metrics.prompt_cache_misses.labels(model=model).inc(cache.misses - misses)

    def _reap(self, cancelled: list[Job]) -> None:
        """End the jobs whose clients went away, and those past their deadline."""
        for job in cancelled:
            if job.seq in self._queues.jobs:
                self._end(job, JobError(499, "cancelled by the client", "cancelled"), "cancelled")
        for job in self._queues.expired(time.monotonic()):
            p = job.params
            done = job.state.step_index
            message = f"timeout of {p.timeout:g} s exceeded after {done} of {p.nfe} evaluations"
            self.metrics.deadline_misses.labels(model=p.model).inc()
            self._end(job, JobError(504, message, "timeout"), "timeout")

    def _iterate(self, jobs: list[Job]) -> None:
        model = jobs[0].params.model
        now = time.monotonic()
        first = {job for job in jobs if job.started_at is None}
        for job in first:
            job.started_at = now
            self.metrics.queue_wait.labels(model=model).observe(now - job.admitted_at)
        if first:
            with self._cv:
                self._count(model, waiting=-len(first), active=len(first))

        started = time.perf_counter()
        ran: list[int] = []
        out_of_memory: list[int] = []
        predictions, failed = self._step_isolating(self.runners[model], jobs, ran, out_of_memory)
        elapsed = time.perf_counter() - started
        self._record_rows(model, ran, out_of_memory)
        self.metrics.forward_seconds.labels(model=model).observe(elapsed)
        self.metrics.batch_samples.labels(model=model).observe(_rows(jobs))
        self.metrics.batch_requests.labels(model=model).observe(len(jobs))

        now = time.monotonic()
        done: list[Job] = []
        for job in jobs:
            p = job.params
            if job in failed:
                self._end(job, JobError(500, failed[job], "internal_error"), "failed")
                continue
            self.metrics.steps.labels(model=model, sampler=p.sampler).inc()
            if job in first:
                self.metrics.time_to_first_step.labels(model=model).observe(now - job.admitted_at)
            if job.events is not None:
                steps = job.preview_steps
                wanted = p.preview and (steps is None or job.state.step_index in steps)
                preview = predictions[job][:1].float().cpu() if wanted else None
                job.post_progress(Progress(job.state.step_index, p.nfe, preview))
            if job.state.done:
                done.append(job)
        self._complete(model, done)

    def _step_isolating(
        self, runner: ModelRunner, jobs: list[Job], ran: list[int], out_of_memory: list[int]
    ):
        """Run one step; if the batch raises, split it until the failing requests are alone,
        so one bad request fails by itself and its batch-mates still advance. The rows of
        each forward that ran, or ran out of memory, are appended to `ran` / `out_of_memory`."""
        try:
            outcome = runner.step(jobs)
        except Exception as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                out_of_memory.append(_rows(jobs))
                log.warning(
                    "out of memory in a forward of %d requests (%d rows): splitting",
                    len(jobs), out_of_memory[-1],
                )  # fmt: skip
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()  # the failed forward's blocks, before the retry
            if len(jobs) == 1:
                log.exception(
                    "step failed for request %s", jobs[0].params.request_id, extra=_about(jobs[0])
                )
                return {}, {jobs[0]: f"the model step failed: {type(exc).__name__}"}
            half = len(jobs) // 2
            left = self._step_isolating(runner, jobs[:half], ran, out_of_memory)
            right = self._step_isolating(runner, jobs[half:], ran, out_of_memory)
            return {**left[0], **right[0]}, {**left[1], **right[1]}
        ran.append(_rows(jobs))
        predictions = dict(zip(jobs, outcome.predictions, strict=True))
        return predictions, {jobs[i]: why for i, why in outcome.failed.items()}

    def _record_rows(self, model: str, ran: list[int], out_of_memory: list[int]) -> None:
        """Count the out-of-memory forwards and move the model's row limit (logged)."""
        limit = self.limits[model]
        before = limit.rows
        limit.record(ran, out_of_memory)
        if out_of_memory:
            self.metrics.out_of_memory.labels(model=model).inc(len(out_of_memory))
        if limit.rows != before:
            self.metrics.batch_limit.labels(model=model).set(limit.rows)
        if limit.rows < before:
            log.warning("%s: forwards limited to %d rows after running out of memory",
                        model, limit.rows)  # fmt: skip
        elif limit.rows > before:
            log.info("%s: probing forwards of up to %d rows", model, limit.rows)

    def _remove(self, job: Job, finishing: bool) -> None:
        if not self._queues.remove(job):
            return
        with self._cv:
            if job.started_at is None:
                self._count(job.params.model, waiting=-1)
            else:
                self._count(job.params.model, active=-1)
            if finishing:
                self._finishing += 1

    def _end(self, job: Job, error: JobError, status: str) -> None:
        self._remove(job, finishing=False)
        p = job.params
        self.metrics.requests.labels(model=p.model, sampler=p.sampler, status=status).inc()
        level = logging.ERROR if status == "failed" else logging.INFO
        _log_outcome(job, f"{status} ({error.status}: {error.message})", level)
        job.finish(error)

    def _complete(self, model: str, jobs: list[Job]) -> None:
        """Decode finished jobs here, up to `DECODE_BATCH` images a call, and hand the images
        to the pool to encode. Decoding on the pool beside the next forward would contend
        for the same cores on a CPU (both slow down), and on a GPU it queues on the same
        device anyway; a batched decode is cheaper per image than one per request."""
        for chunk in _decode_chunks(jobs):
            for job in chunk:
                self._remove(job, finishing=True)
            try:
                pixels = self._to_images(model, torch.cat([job.state.x for job in chunk]))
            except Exception as exc:
                log.exception("decoding failed for %d requests", len(chunk))
                error = JobError(
                    500, f"decoding the images failed: {type(exc).__name__}", "internal_error"
                )
                for job in chunk:
                    self._pool.submit(self._finalize, job, error)
                continue
            counts = np.cumsum([job.params.n for job in chunk])[:-1]
            for job, images in zip(chunk, np.split(pixels, counts), strict=True):
                self._pool.submit(self._finalize, job, images)

    # ---- finishing pool --------------------------------------------------------------------
    def _to_images(self, model: str, x: torch.Tensor) -> np.ndarray:
        """Samples in model space → [n, C, H, W] float32 numpy in [-1, 1]-ish pixel space."""
        vae = self.registry.models[model].loaded.vae
        with torch.inference_mode():
            if vae is not None:
                x = vae.decode(x)
            return x.float().cpu().numpy()

    def _finalize(self, job: Job, images: np.ndarray | JobError) -> None:
        """Encode a finished job's decoded images and answer it (or pass on its decode
        error)."""
        p = job.params
        try:
            if isinstance(images, JobError):
                self.metrics.requests.labels(
                    model=p.model, sampler=p.sampler, status="failed"
                ).inc()
                job.finish(images)
                return
            pixels = to_unit_range(images)
            if p.response_format == "bytes" and p.output_format == "npy":
                files = [encode_stack_npy(pixels)]
            else:
                files = [encode_image(image, p.output_format) for image in pixels]
            now = time.monotonic()
            total = now - job.admitted_at
            assert job.started_at is not None  # set when its first forward was chosen
            result = JobResult(pixels, files, job.started_at - job.admitted_at, total)
            self.metrics.images.labels(model=p.model).inc(p.n)
            self.metrics.request_duration.labels(model=p.model).observe(total)
            self.metrics.requests.labels(model=p.model, sampler=p.sampler, status="ok").inc()
            self._request_seconds += 0.1 * (total - self._request_seconds)
            _log_outcome(job, "ok")
            job.finish(result)
        except Exception as exc:
            log.exception("encoding failed for request %s", p.request_id, extra=_about(job))
            self.metrics.requests.labels(model=p.model, sampler=p.sampler, status="failed").inc()
            job.finish(
                JobError(500, f"encoding the images failed: {type(exc).__name__}", "internal_error")
            )
        finally:
            with self._cv:
                self._finishing -= 1

    def _count(self, model: str, waiting: int = 0, active: int = 0) -> None:
        """Move `model`'s counts of waiting and active requests, and their gauges (call with
        the lock held)."""
        self._waiting[model] += waiting
        self._active[model] += active
        self.metrics.queue_depth.labels(model=model).set(self._waiting[model])
        self.metrics.active_requests.labels(model=model).set(self._active[model])

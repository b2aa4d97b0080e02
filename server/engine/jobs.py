"""One admitted generation request as the engine tracks it, and how it ends.

A `Job` is created by the HTTP handler (on the event loop) and then owned by the engine
thread; results and progress travel back to the loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from denoised.models.conditioning import Conditioning
from denoised.server.imaging import OutputFormat

_arrival = itertools.count()


@dataclass(frozen=True)
class GenerationParams:
    """A request with every default filled in and validated against its model and limits."""

    request_id: str
    model: str
    label: int | None  # class id; None: unlabelled (the null class on class models)
    label_name: str | None
    n: int
    size: str
    latent_shape: tuple[int, int, int]
    sampler: str
    steps: int
    nfe: int
    guidance_scale: float
    sampler_options: dict[str, Any]
    seed: int
    output_format: OutputFormat
    response_format: str
    timeout: float
    stream: bool
    preview: bool
    guided: bool  # whether unconditional rows run alongside (`conditioning.guides`)
    # The rows' model inputs; None for a text model's request, whose prompts the engine
    # encodes (`prompt`, and `negative_prompt` or "" for its unconditional rows).
    conditioning: Conditioning | None = None
    prompt: str | None = None
    negative_prompt: str | None = None

    @property
    def rows(self) -> int:
        """Backbone rows per evaluation: a guided sample also runs unconditionally."""
        return self.n * (2 if self.guided else 1)

    @property
    def batch_key(self) -> tuple:
        """Equal for requests that request-level batching may put in one batch."""
        options = tuple(sorted(self.sampler_options.items()))
        return (self.sampler, self.steps, self.guidance_scale, options)


class JobError(Exception):
    """A request that ended without images; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


class QueueFull(JobError):
    def __init__(self, retry_after: int) -> None:
        super().__init__(429, "the request queue is full; retry later", "rate_limited")
        self.retry_after = retry_after


class Draining(JobError):
    def __init__(self, reason: str = "the server is shutting down") -> None:
        super().__init__(503, reason, "unavailable")


@dataclass
class JobResult:
    pixels: np.ndarray  # [n, H, W, C] float32 in [0, 1]
    files: list[bytes]  # one encoded file per image, in the requested output format
    queue_seconds: float
    total_seconds: float


@dataclass
class Progress:
    step: int
    total: int
    preview: Any = None  # [1, C, h, w] CPU tensor: the current data prediction, if asked for


@dataclass(eq=False)
class Job:
    params: GenerationParams
    state: Any  # the request's SamplerState (models.samplers)
    loop: asyncio.AbstractEventLoop
    seq: int = field(default_factory=lambda: next(_arrival))
    admitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # first forward chosen
    conditioning: Conditioning | None = None  # params.conditioning, or the encoded prompts
    prompt_tokens: int | None = None  # text models: the prompt's tokens, before truncation
    truncated: bool | None = None  # whether the prompt was cut to the encoder's limit
    # With `params.preview`: the evaluations (1-based) that get a preview, None for every one;
    # a mapping carries what the stream numbers them by (OpenAI's partial_image_index).
    preview_steps: Mapping[int, int] | None = None
    result: asyncio.Future = field(init=False)
    events: asyncio.Queue | None = field(init=False)  # Progress, then None when finished

    def __post_init__(self) -> None:
        if self.conditioning is None:
            self.conditioning = self.params.conditioning
        self.result = self.loop.create_future()
        # Retrieve the outcome even when no one awaits it (the client went away).
        self.result.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.events = asyncio.Queue() if self.params.stream else None

    @property
    def deadline(self) -> float:
        return self.admitted_at + self.params.timeout

    # Called on the engine thread (or the finishing pool); everything lands on the loop.
    def post_progress(self, progress: Progress) -> None:
        if self.events is not None:
            self._call_on_loop(self.events.put_nowait, progress)

    def finish(self, outcome: JobResult | JobError) -> None:
        self._call_on_loop(self._settle, outcome)

    def _call_on_loop(self, fn, arg) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self.loop.call_soon_threadsafe(fn, arg)

    def _settle(self, outcome: JobResult | JobError) -> None:
        if not self.result.done():
            if isinstance(outcome, JobError):
                self.result.set_exception(outcome)
            else:
                self.result.set_result(outcome)
        if self.events is not None:
            self.events.put_nowait(None)

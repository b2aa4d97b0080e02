"""Load generation: closed loop (a fixed number of clients, each sending its next request
when the last one finishes) and open loop (Poisson arrivals at a fixed rate, whatever the
server's state), each until a duration or a request count. Every request is streamed, so
its time to first step is measured on the client."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from denoised_client.async_client import AsyncClient
from denoised_client.bench.workload import Workload
from denoised_client.errors import APIConnectionError, APIStatusError, APITimeoutError, StreamError
from denoised_client.types import GenerationRequest


@dataclass(frozen=True)
class Limit:
    """When a load stops sending: after `duration` seconds or `requests` requests."""

    duration: float | None = None
    requests: int | None = None

    def __post_init__(self) -> None:
        if (self.duration is None) == (self.requests is None):
            raise ValueError("give exactly one of duration (seconds) or requests (a count)")
        if (self.duration is not None and self.duration <= 0) or (
            self.requests is not None and self.requests < 1
        ):
            raise ValueError(f"duration and requests must be positive, got {self}")

    def reached(self, sent: int, elapsed: float) -> bool:
        if self.requests is not None:
            return sent >= self.requests
        return elapsed >= self.duration

    def split(self, parts: int) -> Limit:
        """This limit shared out over `parts` interleaved slices."""
        if self.requests is not None:
            return Limit(requests=max(1, -(-self.requests // parts)))
        return Limit(duration=self.duration / parts)


@dataclass
class RequestRecord:
    """One request as the benchmark saw it; times in seconds from its slice's start."""

    group: str  # the workload's name for the request's kind, e.g. "dpmpp-2m steps=20"
    sampler: str  # as asked ("default" when the mix leaves it to the server)
    steps: int | None
    guidance_scale: float | None
    n: int
    start: float
    end: float
    status: str  # "ok", an HTTP status ("429", "504", ...), "timeout", "connection", "stream"
    ttfs: float | None = None  # time to the first progress event
    nfe: int | None = None
    images: int = 0

    @property
    def latency(self) -> float:
        return self.end - self.start


async def timed_request(
    client: AsyncClient, workload: Workload, request: GenerationRequest, t0: float
) -> RequestRecord:
    """Send one streamed request and record its outcome (errors are outcomes, not raised)."""
    start = time.perf_counter()
    record = RequestRecord(
        group=workload.group(request),
        sampler=request.sampler or "default",
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        n=request.n,
        start=start - t0,
        end=start - t0,
        status="ok",
    )
    try:
        async with client.open_stream(request, endpoint=workload.endpoint) as stream:
            async for _ in stream:
                if record.ttfs is None:
                    record.ttfs = time.perf_counter() - start
        result = stream.result
        record.steps, record.nfe, record.images = result.steps, result.nfe, len(result.images)
    except APIStatusError as exc:
        record.status = str(exc.status)
    except APITimeoutError:
        record.status = "timeout"
    except APIConnectionError:
        record.status = "connection"
    except StreamError:
        record.status = "stream"
    record.end = time.perf_counter() - t0
    return record


async def closed_loop(
    client: AsyncClient, workload: Workload, concurrency: int, limit: Limit, rng: random.Random
) -> list[RequestRecord]:
    """`concurrency` workers, each with one request in flight at a time."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    t0 = time.perf_counter()
    records: list[RequestRecord] = []
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while not limit.reached(sent, time.perf_counter() - t0):
            sent += 1
            request = workload.pick(rng)
            records.append(await timed_request(client, workload, request, t0))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


async def open_loop(
    client: AsyncClient, workload: Workload, rate: float, limit: Limit, rng: random.Random
) -> list[RequestRecord]:
    """Requests arriving as a Poisson process of `rate` per second; all are awaited."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    t0 = time.perf_counter()
    tasks: list[asyncio.Task] = []
    arrival = 0.0
    while True:
        arrival += rng.expovariate(rate)
        if limit.reached(len(tasks), arrival):
            break
        await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
        request = workload.pick(rng)
        tasks.append(asyncio.create_task(timed_request(client, workload, request, t0)))
    return list(await asyncio.gather(*tasks))

"""Load and soak against a real server process on loopback: nothing lost, nothing leaked.

1. Load: `--requests` (default 10,000) mixed requests — every sampler, several step counts,
   guided and unguided, n = 1–4, over every served model — from `--concurrency` (default 64)
   closed-loop clients. A client that gets 429 waits its Retry-After and moves on.
2. Soak: the same mix for `--soak-seconds` (default 600) while the server's RSS is sampled;
   growth is reported and checked against `--max-rss-growth-mib`.

Pass: every request answered (no transport errors), 0 responses 5xx, every other non-200
a 429 with Retry-After, RSS growth over the soak within the bound. Exit status 1 otherwise.

    python benchmarks/soak.py                                  # the shipped default models
    python benchmarks/soak.py --model DIR --requests 500 --soak-seconds 60   # reduced
    python benchmarks/soak.py --server-flags="--max-queue 16"  # more 429s

Traffic goes to 127.0.0.1 only; both phases stop by themselves (count and time bounds).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import httpx
from engine_batching import free_port, machine, wait_ready

STEPS = (4, 8, 16)
MAX_N = 4
GUIDANCE = 3.0
MiB = 2**20


def mixed_bodies(cards: list[dict], seed: int = 0) -> Iterator[dict]:
    """An endless, seeded stream of request bodies over the served models: every sampler,
    `STEPS`, guided and unguided (class models), n in 1..MAX_N."""
    rng = random.Random(seed)
    for index in itertools.count():
        card = rng.choice(cards)
        body = {
            "model": card["id"],
            "sampler": rng.choice(card["samplers"]),
            "steps": rng.choice(STEPS),
            "n": rng.randint(1, MAX_N),
            "seed": index,
        }
        if card.get("classes"):
            body["label"] = rng.randrange(len(card["classes"]))
            body["guidance_scale"] = rng.choice((1.0, GUIDANCE))
        yield body


@dataclass
class Tally:
    """What the clients saw."""

    statuses: Counter = field(default_factory=Counter)
    transport_errors: Counter = field(default_factory=Counter)
    rejected_without_retry_after: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, answered 200s
    images: int = 0
    seconds: float = 0.0

    @property
    def sent(self) -> int:
        return sum(self.statuses.values()) + sum(self.transport_errors.values())

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)

    @property
    def unexpected(self) -> dict[int, int]:
        """Statuses that are neither 200 nor 429."""
        return {s: c for s, c in self.statuses.items() if s not in (200, 429)}

    def problems(self) -> list[str]:
        found = []
        if self.transport_errors:
            found.append(f"unanswered requests: {dict(self.transport_errors)}")
        if self.unexpected:
            found.append(f"statuses other than 200/429: {self.unexpected}")
        if self.rejected_without_retry_after:
            found.append(f"{self.rejected_without_retry_after} 429s without Retry-After")
        return found

    def summary(self) -> str:
        ok = self.statuses.get(200, 0)
        line = (
            f"{self.sent} requests in {self.seconds:.1f} s: {ok} ok, "
            f"{self.statuses.get(429, 0)} rejected (429), {self.server_errors} 5xx, "
            f"{sum(self.transport_errors.values())} unanswered {dict(self.transport_errors)}; "
            f"{self.images} images "
            f"({self.images / max(self.seconds, 1e-9):.1f}/s)"
        )
        if self.latencies:
            q = statistics.quantiles(self.latencies, n=100) if len(self.latencies) > 1 else None
            p50, p99 = (q[49], q[98]) if q else (self.latencies[0],) * 2
            line += f"; latency p50 {p50:.3f} s, p99 {p99:.3f} s"
        return line


async def run_load(
    url: str,
    bodies: Iterable[dict],
    concurrency: int,
    seconds: float,
    headers: dict[str, str] | None = None,
    request_timeout: float = 300.0,
) -> Tally:
    """`concurrency` closed-loop clients send `bodies` until they run out or `seconds`
    pass. A 429 is honoured (its Retry-After, at most 5 s) before the client goes on."""
    tally = Tally()
    source = iter(bodies)
    deadline = time.monotonic() + seconds
    started = time.monotonic()

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline and (body := next(source, None)) is not None:
            sent = time.monotonic()
            try:
                response = await client.post("/v1/generate", json=body)
            except httpx.TransportError as exc:
                tally.transport_errors[type(exc).__name__] += 1
                continue
            tally.statuses[response.status_code] += 1
            if response.status_code == 200:
                tally.latencies.append(time.monotonic() - sent)
                tally.images += len(response.json()["images"])
            elif response.status_code == 429:
                retry_after = response.headers.get("retry-after", "")
                if not retry_after.isdigit():
                    tally.rejected_without_retry_after += 1
                    continue
                await asyncio.sleep(min(int(retry_after), 5, max(deadline - time.monotonic(), 0)))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, timeout=request_timeout, limits=limits, headers=headers
    ) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    tally.seconds = time.monotonic() - started
    return tally


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def sample_rss(pid: int, every: float, into: list[tuple[float, int]]) -> None:
    """Append (seconds, RSS bytes) every `every` seconds until cancelled."""
    start = time.monotonic()
    while True:
        into.append((time.monotonic() - start, rss_bytes(pid)))
        await asyncio.sleep(every)


def rss_growth(samples: list[tuple[float, int]]) -> tuple[float, float]:
    """(growth in bytes from the first to the last quarter's median, least-squares slope in
    bytes per minute over the second half): medians and the late slope ignore warm-up."""
    k = max(1, len(samples) // 4)
    first = statistics.median(v for _, v in samples[:k])
    last = statistics.median(v for _, v in samples[-k:])
    late = samples[len(samples) // 2 :]
    if len(late) < 2:
        return last - first, 0.0
    slope = statistics.linear_regression([t for t, _ in late], [v for _, v in late]).slope
    return last - first, slope * 60


def launch(models: list[str], threads: int, flags: list[str], log) -> subprocess.Popen:
    args = [sys.executable, "-m", "denoised.server.cli", "serve", "--port", str(free_port()),
            "--threads", str(threads), *flags]  # fmt: skip
    for directory in models:
        args += ["--model", directory]
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)


async def soak(args: argparse.Namespace, url: str, pid: int) -> bool:
    cards = httpx.get(url + "/v1/models").json()["data"]
    print(f"models: {', '.join(c['id'] for c in cards)}; machine: {machine()}")
    bodies = mixed_bodies(cards, args.seed)
    load = await run_load(
        url, itertools.islice(bodies, args.requests), args.concurrency, args.load_seconds
    )
    print(f"load: {load.summary()}")
    samples: list[tuple[float, int]] = []
    sampler = asyncio.create_task(sample_rss(pid, args.rss_every, samples))
    soaked = await run_load(url, bodies, args.concurrency, args.soak_seconds)
    sampler.cancel()
    print(f"soak: {soaked.summary()}")
    growth, slope = rss_growth(samples)
    peak = max(v for _, v in samples)
    print(
        f"soak RSS: start {samples[0][1] / MiB:.1f} MiB, end {samples[-1][1] / MiB:.1f} MiB, "
        f"peak {peak / MiB:.1f} MiB over {samples[-1][0]:.0f} s ({len(samples)} samples); "
        f"growth (first→last quarter medians) {growth / MiB:+.1f} MiB, "
        f"late slope {slope / MiB:+.2f} MiB/min"
    )
    problems = load.problems() + soaked.problems()
    if growth > args.max_rss_growth_mib * MiB:
        problems.append(f"RSS grew {growth / MiB:.1f} MiB > {args.max_rss_growth_mib} MiB")
    if load.sent < args.requests and load.seconds >= args.load_seconds:
        problems.append(f"load phase hit its {args.load_seconds:.0f} s bound")
    for problem in problems:
        print(f"FAIL: {problem}")
    return not problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[], help="model dir (repeatable)")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--load-seconds", type=float, default=3600, help="bound on phase 1")
    parser.add_argument("--soak-seconds", type=float, default=600)
    parser.add_argument("--rss-every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--max-rss-growth-mib", type=float, default=64.0)
    parser.add_argument("--threads", type=int, default=0, help="server torch threads")
    parser.add_argument("--server-flags", default="", help="extra `denoised serve` flags")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryFile() as log:
        process = launch(args.model, args.threads, shlex.split(args.server_flags), log)
        url = f"http://127.0.0.1:{process.args[process.args.index('--port') + 1]}"
        try:
            wait_ready(process, url, log)
            ok = asyncio.run(soak(args, url, process.pid))
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                code = None
        print(f"server exit status after SIGTERM: {code}")
    return 0 if ok and code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""What step-level batching buys, measured over real HTTP against real server processes.

1. Throughput (images/s) at concurrency 1, 8 and 32 (closed loop: each client sends its next
   request when the previous one returns): step-level batching vs `--max-batch 1`.
2. p50 latency of 10-step requests under a mixed load (half the clients send 10-step, half
   50-step requests): step-level batching vs `--batching request` (equal parameters only,
   each batch run to completion — what servers that batch whole requests do).

    python benchmarks/engine_batching.py                 # the shipped default model
    python benchmarks/engine_batching.py --model DIR --device cuda
    python benchmarks/engine_batching.py --model models/zoo/shapes-text   # a text model

A text model gets prompts of four lengths (the empty one among them), a class model labels.

Every figure is measured in this run; ratios are against the baselines of this run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from denoised.server.registry import default_model_dirs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(model: str, device: str, threads: int, *flags: str):
    """A `denoised serve` process; yields its URL once /ready answers."""
    port = free_port()
    args = [sys.executable, "-m", "denoised.server.cli", "serve", "--model", model,
            "--port", str(port), "--device", device, "--threads", str(threads),
            "--max-queue", "4096", *flags]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(process, url, log)
            yield url
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


# Warm-up compiles every model: minutes on a small shared CPU.
READY_SECONDS = 900


def wait_ready(process: subprocess.Popen, url: str, log) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while True:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready after {READY_SECONDS} s")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


# Prompts of different lengths (the empty one too) for text models.
PROMPTS = ("a red circle", "a small blue square on the left", "", "a green triangle above a "
           "yellow circle")  # fmt: skip


def body(steps: int, seed: int, text: bool) -> dict:
    condition = {"prompt": PROMPTS[seed % len(PROMPTS)]} if text else {"label": str(seed % 10)}
    return {**condition, "sampler": "dpmpp-2m", "steps": steps, "guidance_scale": 2.0,
            "seed": seed}  # fmt: skip


def is_text_model(url: str) -> bool:
    """Whether the server's (first) model is conditioned on text prompts."""
    return httpx.get(url + "/v1/models").json()["data"][0]["conditioning"] == "text"


# The server's own counters (summed over models): its forwards, their seconds and rows, and
# the images it finished.
SERVER_SERIES = (
    "denoised_forward_seconds_count",
    "denoised_forward_seconds_sum",
    "denoised_batch_samples_sum",
    "denoised_images_total",
)


async def server_totals(client: httpx.AsyncClient) -> dict[str, float]:
    totals = dict.fromkeys(SERVER_SERIES, 0.0)
    for family in text_string_to_metric_families((await client.get("/metrics")).text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals


async def closed_loop(
    url: str, workers: list[int], warmup: float, seconds: float, text: bool
) -> tuple[list, int, dict[str, float]]:
    """Each worker sends requests of its step count back to back. Returns (steps, latency)
    of the requests that started after `warmup` seconds and ended inside the `seconds` window
    that follows, the number of requests that ended inside it (for throughput), and how much
    each of the server's `SERVER_SERIES` grew per second over that window."""
    records: list[tuple[int, float, float]] = []  # (steps, start, end)
    begin = time.perf_counter()
    window = (begin + warmup, begin + warmup + seconds)
    limits = httpx.Limits(max_connections=len(workers) + 4)

    async def worker(client: httpx.AsyncClient, index: int, steps: int) -> None:
        seed = index * 100_000
        while time.perf_counter() < window[1]:
            started = time.perf_counter()
            response = await client.post("/v1/generate", json=body(steps, seed, text))
            response.raise_for_status()
            records.append((steps, started, time.perf_counter()))
            seed += 1

    async def server_rates(client: httpx.AsyncClient) -> dict[str, float]:
        await asyncio.sleep(window[0] - time.perf_counter())
        first, started = await server_totals(client), time.perf_counter()
        await asyncio.sleep(window[1] - time.perf_counter())
        last, elapsed = await server_totals(client), time.perf_counter() - started
        return {name: (last[name] - first[name]) / elapsed for name in SERVER_SERIES}

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        rates = asyncio.ensure_future(server_rates(client))
        await asyncio.gather(*(worker(client, i, s) for i, s in enumerate(workers)))
        server_side = await rates
    ended = [r for r in records if window[0] <= r[2] <= window[1]]
    measured = [(steps, end - start) for steps, start, end in ended if start >= window[0]]
    return measured, len(ended), server_side


def throughput(
    url: str, concurrency: int, steps: int, warmup: float, seconds: float, text: bool
) -> tuple[float, float, float]:
    """(images/s, rows per forward, milliseconds per forward) under closed-loop load; the
    last two from the server's own counters."""
    _, finished, rates = asyncio.run(closed_loop(url, [steps] * concurrency, warmup, seconds, text))
    forwards = max(rates["denoised_forward_seconds_count"], 1e-9)
    rows = rates["denoised_batch_samples_sum"] / forwards
    return finished / seconds, rows, 1e3 * rates["denoised_forward_seconds_sum"] / forwards


def short_p50(url: str, clients: int, warmup: float, seconds: float, text: bool) -> tuple[float]:
    workers = [10, 50] * (clients // 2)
    measured, _, _ = asyncio.run(closed_loop(url, workers, warmup, seconds, text))
    return (statistics.median([latency for steps, latency in measured if steps == 10]),)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as info:
            names = [ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} logical cores, {gpu}, torch {torch.__version__}"


def alternate(measure, urls: dict[str, str], rounds: int) -> dict[str, tuple[float, ...]]:
    """Median of `rounds` measurements per server (each a tuple of figures, medians taken
    figure by figure), taken in turn (A, B, A, B, …), so a change in the machine's load
    during the run touches every server alike."""
    values: dict[str, list[tuple[float, ...]]] = {name: [] for name in urls}
    for _ in range(rounds):
        for name, url in urls.items():
            values[name].append(measure(url))
    return {name: tuple(map(statistics.median, zip(*v, strict=True))) for name, v in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the first shipped model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=20, help="steps per throughput request")
    parser.add_argument("--seconds", type=float, default=5.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=2.0, help="load before the window")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per figure")
    parser.add_argument("--mixed-clients", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="server CPU threads (0: all)")
    args = parser.parse_args()
    model = args.model or str(default_model_dirs()[0])
    print(f"model {model}\nmachine: {machine()}; server threads: {args.threads or 'all'}\n")

    modes = {"step": [], "single": ["--max-batch", "1"], "request": ["--batching", "request"]}
    with contextlib.ExitStack() as stack:
        urls = {
            mode: stack.enter_context(server(model, args.device, args.threads, *flags))
            for mode, flags in modes.items()
        }
        text = is_text_model(urls["step"])
        rates = {
            c: alternate(
                lambda url, c=c: throughput(url, c, args.steps, args.warmup, args.seconds, text),
                {m: urls[m] for m in ("step", "single")},
                args.rounds,
            )
            for c in (1, 8, 32)
        }
        p50 = alternate(
            lambda url: short_p50(url, args.mixed_clients, args.warmup, args.seconds, text),
            {m: urls[m] for m in ("step", "request")},
            args.rounds,
        )

    kind = "text prompts of 4 lengths" if text else "class labels"
    print(f"Throughput, images/s ({args.steps}-step guided requests on {kind}, closed loop; "
          f"median of {args.rounds})")  # fmt: skip
    print("| concurrency | step-level | --max-batch 1 | ratio |\n|---|---|---|---|")
    for c, r in rates.items():
        step, single = r["step"][0], r["single"][0]
        print(f"| {c} | {step:.1f} | {single:.1f} | {step / single:.2f}x |")
    print("\nThe servers' forwards over the same windows (their own counters): rows per forward, "
          "ms per forward (backbone + batched update)")  # fmt: skip
    print("| concurrency | step-level | --max-batch 1 |\n|---|---|---|")
    for c, r in rates.items():
        (_, *step), (_, *single) = r["step"], r["single"]
        print(f"| {c} | {step[0]:.1f} rows, {step[1]:.1f} ms | {single[0]:.1f} rows, "
              f"{single[1]:.1f} ms |")  # fmt: skip
    print(f"\np50 latency (s) of 10-step requests, {args.mixed_clients} clients: half 10-step, "
          f"half 50-step (median of {args.rounds})")  # fmt: skip
    step, request = p50["step"][0], p50["request"][0]
    print("| step-level | --batching request | ratio |\n|---|---|---|")
    print(f"| {step:.3f} | {request:.3f} | {request / step:.2f}x |")


if __name__ == "__main__":
    main()

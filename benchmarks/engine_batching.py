"""What step-level batching buys, measured over real HTTP against real server processes.

1. Throughput (images/s) at concurrency 1, 8 and 32 (closed loop: each client sends its next
   request when the previous one returns): step-level batching vs `--max-batch 1`.
2. p50 latency of 10-step requests under a mixed load (half the clients send 10-step, half
   50-step requests): step-level batching vs `--batching request` (equal parameters only,
   each batch run to completion — what servers that batch whole requests do).

    python benchmarks/engine_batching.py                 # the shipped default model
    python benchmarks/engine_batching.py --model DIR --device cuda

Every figure is measured in this run; ratios are against the baselines of this run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import httpx
import torch

from denoised.server.registry import default_model_dirs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
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


def wait_ready(process: subprocess.Popen, url: str, log) -> None:
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError("server not ready after 300 s")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def body(steps: int, seed: int) -> dict:
    return {"label": str(seed % 10), "sampler": "dpmpp-2m", "steps": steps,
            "guidance_scale": 2.0, "seed": seed}  # fmt: skip


async def closed_loop(url: str, workers: list[int], warmup: float, seconds: float) -> list:
    """Each worker sends requests of its step count back to back. Returns (steps, latency)
    of the requests that started after `warmup` seconds and ended inside the `seconds` window
    that follows, and the number of requests that ended inside it (for throughput)."""
    records: list[tuple[int, float, float]] = []  # (steps, start, end)
    begin = time.perf_counter()
    window = (begin + warmup, begin + warmup + seconds)
    limits = httpx.Limits(max_connections=len(workers) + 4)

    async def worker(client: httpx.AsyncClient, index: int, steps: int) -> None:
        seed = index * 100_000
        while time.perf_counter() < window[1]:
            started = time.perf_counter()
            response = await client.post("/v1/generate", json=body(steps, seed))
            response.raise_for_status()
            records.append((steps, started, time.perf_counter()))
            seed += 1

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await asyncio.gather(*(worker(client, i, s) for i, s in enumerate(workers)))
    ended = [r for r in records if window[0] <= r[2] <= window[1]]
    measured = [(steps, end - start) for steps, start, end in ended if start >= window[0]]
    return measured, len(ended)


def throughput(url: str, concurrency: int, steps: int, warmup: float, seconds: float) -> float:
    _, finished = asyncio.run(closed_loop(url, [steps] * concurrency, warmup, seconds))
    return finished / seconds


def short_p50(url: str, clients: int, warmup: float, seconds: float) -> tuple[float, int]:
    measured, _ = asyncio.run(closed_loop(url, [10, 50] * (clients // 2), warmup, seconds))
    short = [latency for steps, latency in measured if steps == 10]
    return statistics.median(short), len(short)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as info:
            names = [ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} logical cores, {gpu}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the first shipped model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=20, help="steps per throughput request")
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=5.0, help="load before the window")
    parser.add_argument("--mixed-clients", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="server CPU threads (0: all)")
    args = parser.parse_args()
    model = args.model or str(default_model_dirs()[0])
    print(f"model {model}\nmachine: {machine()}; server threads: {args.threads or 'all'}\n")

    rates: dict[str, dict[int, float]] = {}
    p50: dict[str, tuple[float, int]] = {}
    for mode, flags in [("step-level", []), ("max-batch 1", ["--max-batch", "1"]),
                        ("request-level", ["--batching", "request"])]:  # fmt: skip
        with server(model, args.device, args.threads, *flags) as url:
            if mode != "request-level":
                rates[mode] = {c: throughput(url, c, args.steps, args.seconds) for c in (1, 8, 32)}
            if mode != "max-batch 1":
                p50[mode] = short_p50(url, args.mixed_clients, args.warmup, args.seconds)

    print(f"Throughput, images/s ({args.steps}-step guided requests, closed loop)")
    print("| concurrency | step-level | --max-batch 1 | ratio |\n|---|---|---|---|")
    for c in (1, 8, 32):
        step, single = rates["step-level"][c], rates["max-batch 1"][c]
        print(f"| {c} | {step:.1f} | {single:.1f} | {step / single:.2f}x |")
    print(f"\np50 latency of 10-step requests, {args.mixed_clients} clients, half 10-step, "
          "half 50-step")  # fmt: skip
    print("| batching | p50 (s) | 10-step requests measured |\n|---|---|---|")
    for mode in ("step-level", "request-level"):
        print(f"| {mode} | {p50[mode][0]:.3f} | {p50[mode][1]} |")
    ratio = p50["request-level"][0] / p50["step-level"][0]
    print(f"\nrequest-level / step-level p50: {ratio:.2f}x")


if __name__ == "__main__":
    main()

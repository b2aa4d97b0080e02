"""What a long queue costs the engine: iterations per second with nothing waiting against
the same engine with thousands of requests waiting behind the running ones, and the time to
admit them.

The engine runs in this process on the shipped default model (no HTTP): `--running` guided
requests that keep every forward full, plus `depth` younger requests waiting behind them.
Over a window it counts the forwards (the server's own `denoised_batch_samples` counter),
for each `--max-batch`: 64 (step-level batching) and 1 (one request per forward, where the
per-iteration bookkeeping weighs most against a small forward).

    python benchmarks/engine_queue.py
    python benchmarks/engine_queue.py --depths 0 1000 10000 --max-batch 64 1 --no-compile

Every figure is measured in this run; ratios are against depth 0 of the same engine.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from denoised.server.admission import GenerationRequest, admit
from denoised.server.engine.jobs import Job
from denoised.server.engine.loop import Engine
from denoised.server.metrics import Metrics
from denoised.server.registry import default_model_dirs, load_registry
from denoised.server.settings import Settings

CPU = torch.device("cpu")


async def forwards_per_second(
    engine: Engine, model: str, running: int, depth: int, steps: int, seconds: float
) -> tuple[float, float]:
    """(forwards per second over `seconds`, seconds to submit all jobs) with `running`
    requests in front of `depth` waiting ones, all of `steps` steps."""
    loop = asyncio.get_running_loop()
    served = engine.registry.get(model)
    jobs = []
    for i in range(running + depth):
        request = GenerationRequest(label=i % 10, steps=steps, guidance_scale=2.0, seed=i)
        params, state = admit(served, request, engine.settings, f"q{i}", CPU)
        jobs.append(Job(params, state, loop))
    started = time.perf_counter()
    for job in jobs:
        engine.submit(job)
    submit_seconds = time.perf_counter() - started

    def forwards() -> float:
        count = engine.metrics.registry.get_sample_value(
            "denoised_batch_samples_count", {"model": model}
        )
        return count or 0.0

    await asyncio.sleep(0.5)  # the first iterations: allocator, caches
    before, started = forwards(), time.perf_counter()
    await asyncio.sleep(seconds)
    rate = (forwards() - before) / (time.perf_counter() - started)
    if rate == 0:
        raise SystemExit("no forward in the window: the requests finished first; raise --steps")
    for job in jobs:
        engine.cancel(job)
    await asyncio.gather(*(job.result for job in jobs), return_exceptions=True)
    return rate, submit_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the first shipped model)")
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 1000, 10000])
    parser.add_argument("--max-batch", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--running", type=int, default=32, help="requests in the forwards")
    parser.add_argument("--steps", type=int, default=100, help="steps of every request")
    parser.add_argument("--seconds", type=float, default=3.0, help="measurement window")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or str(default_model_dirs()[0])
    registry = load_registry([model_dir], CPU, torch.float32)
    model = registry.default
    print(f"model {model} (float32, {args.threads} thread(s), compiled: {args.compile})")
    print("| max batch | waiting | forwards/s | vs 0 waiting | submit (µs per request) |")
    print("|---|---|---|---|---|")
    for max_batch in args.max_batch:
        settings = Settings(compile=args.compile, max_batch=max_batch, max_queue=10**9)
        engine = Engine(registry, settings, Metrics(), CPU)
        engine.warm_up()
        engine.start()
        base = None
        for depth in args.depths:
            rate, submit = asyncio.run(
                forwards_per_second(engine, model, args.running, depth, args.steps, args.seconds)
            )
            base = base or rate
            per_request = submit / (args.running + depth) * 1e6
            print(f"| {max_batch} | {depth} | {rate:.1f} | {rate / base:.2f}x "
                  f"| {per_request:.1f} |")  # fmt: skip
        engine.stop()


if __name__ == "__main__":
    main()

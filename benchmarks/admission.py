"""What admitting a request costs the event loop: `admit` (validation, the sampler's plan, the
initial noise) as the server runs it, with plans cached per model, sampler, steps and options,
against the same call with the plan cache emptied before each request (every plan built anew).

    python benchmarks/admission.py
    python benchmarks/admission.py --steps 50 --samplers dpmpp-2m unipc

Both are timed in turn in this run; each figure is a median over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from denoised.models.sampling import samplers
from denoised.server.admission import GenerationRequest, admit
from denoised.server.registry import default_model_dirs, load_registry
from denoised.server.settings import Settings

CPU = torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the first shipped model)")
    parser.add_argument("--samplers", nargs="+", default=["dpmpp-2m", "ddim", "unipc", "heun"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--requests", type=int, default=50, help="admissions per round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    registry = load_registry([args.model or str(default_model_dirs()[0])], CPU, torch.float32)
    served, settings = registry.get(registry.default), Settings()
    label = 0 if served.num_classes else None
    print(f"{served.name}, {args.steps} steps, guided; µs per admitted request")
    print("| sampler | plans cached (the server) | built each time | ratio |\n|---|---|---|---|")
    for name in args.samplers:
        request = GenerationRequest(label=label, sampler=name, steps=args.steps,
                                    guidance_scale=2.0, seed=0)  # fmt: skip
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for cached in (True, False):
                started = time.perf_counter()
                for _ in range(args.requests):
                    if not cached:
                        samplers._cached_plan.cache_clear()  # the path before plans were cached
                    admit(served, request, settings, "bench", CPU)
                times[cached].append((time.perf_counter() - started) / args.requests * 1e6)
        hit, miss = statistics.median(times[True]), statistics.median(times[False])
        print(f"| {name} | {hit:.0f} | {miss:.0f} | {miss / hit:.1f}x |")


if __name__ == "__main__":
    main()

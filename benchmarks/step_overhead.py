"""What one engine iteration spends outside the backbone forward: `ModelRunner.step` over
guided requests of mixed samplers (stacking the states, the per-row tensors, the batched
guidance + solver update, the finiteness check, splitting) against the same runner's
forward alone on the rows that step stacks.

The two are timed in turn, call after call, and each figure is a median; the share outside
the forward is what keeping per-request state in persistent batch buffers could save at most.

    python benchmarks/step_overhead.py                       # the shipped default model
    python benchmarks/step_overhead.py --requests 16 --n 2 --no-compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from denoised.server.admission import GenerationRequest, admit
from denoised.server.engine.runner import ModelRunner
from denoised.server.registry import default_model_dirs, load_registry
from denoised.server.settings import Settings

CPU = torch.device("cpu")
SAMPLERS = ("dpmpp-2m", "ddim", "euler", "dpmpp-2m-sde", "unipc")


class Request:
    """What `ModelRunner.step` needs of a job: its params, state and conditioning."""

    def __init__(self, params, state) -> None:
        self.params, self.state, self.conditioning = params, state, params.conditioning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the first shipped model)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--n", type=int, default=1, help="images per request")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10, help="requests run to the end")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    registry = load_registry([args.model or str(default_model_dirs()[0])], CPU, torch.float32)
    served = registry.get(registry.default)
    settings = Settings(compile=args.compile, max_batch=2 * args.requests * args.n)
    runner = ModelRunner(served.loaded, compiled=args.compile, max_batch=settings.max_batch)
    runner.compile()
    forward = runner.compiled or served.loaded.backbone  # what `step` calls

    def requests() -> list[Request]:
        made = []
        for i in range(args.requests):
            body = GenerationRequest(label=i % served.num_classes if served.num_classes else None,
                                     n=args.n, sampler=SAMPLERS[i % len(SAMPLERS)],
                                     steps=args.steps, guidance_scale=2.0, seed=i)  # fmt: skip
            made.append(Request(*admit(served, body, settings, f"r{i}", CPU)))
        return made

    steps, forwards = [], []
    rows = 0
    with torch.inference_mode():
        for _ in range(args.rounds):
            batch = requests()
            while not batch[0].state.done:
                # The forward alone on the rows this step stacks (conditional, then the
                # unconditional rows of the guided requests).
                x = torch.cat([r.state.x for r in batch] * 2)
                t = torch.full((x.shape[0],), batch[0].state.model_time())
                y = None
                if served.num_classes:
                    y = torch.cat([r.conditioning.inputs for r in batch]
                                  + [r.conditioning.null_inputs for r in batch])  # fmt: skip
                started = time.perf_counter()
                forward(x, t, y)
                forwards.append(time.perf_counter() - started)
                started = time.perf_counter()
                runner.step(batch)
                steps.append(time.perf_counter() - started)
                rows = x.shape[0]
    step, alone = statistics.median(steps) * 1e3, statistics.median(forwards) * 1e3
    print(f"{served.name}: {rows} rows ({args.requests} guided requests of n={args.n}, "
          f"samplers {', '.join(SAMPLERS)}), compiled: {args.compile}, "
          f"{args.threads} thread(s)")  # fmt: skip
    print("| ModelRunner.step (ms) | forward alone (ms) | outside the forward |")
    print("|---|---|---|")
    print(f"| {step:.2f} | {alone:.2f} | {step - alone:.2f} ms ({(step - alone) / step:.1%}) |")


if __name__ == "__main__":
    main()

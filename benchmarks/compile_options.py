"""Inductor options for a served backbone on CPU: the compiled forward as the server builds it
(`server.engine.compiled`) against the same backbone compiled with inductor's `freezing`
(weights folded into the graph, linears prepacked for oneDNN) and with `cpp_wrapper` (the
graph's kernel calls from C++ instead of Python), at a small and a large batch. The last row
is the floor under every build: the backbone's linear layers alone (eager `F.linear` on the
shapes one forward gives them), the GEMMs that are most of a DiT's FLOPs.

Every variant is compiled in this process and the timed calls alternate between them, round
after round, so the machine's drifting load touches each alike; each figure is the median over
rounds, and the ratios are against the server's build in the same run. Outputs are checked
against the eager backbone first.

    python benchmarks/compile_options.py                       # the shipped default model
    python benchmarks/compile_options.py --model DIR --rows 2 32 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F

from denoised.models.checkpoints.model_dir import load_model_dir
from denoised.server.device import check_inputs
from denoised.server.engine.compiled import compile_backbone

# Dynamo decides whether to lift weights for freezing from the global flag, not from
# `torch.compile(options=...)` (pytorch/pytorch#139272): it is set around the first call.
VARIANTS = {"server": {}, "freezing": {"freezing": True}, "cpp_wrapper": {"cpp_wrapper": True}}
LINEARS = "linears alone (eager)"


def batch(example: tuple, rows: int) -> tuple:
    """`rows` rows of the model's own check inputs, repeated in turn (class ids or none: text
    models are served eager, so they have no compiled build to compare)."""
    reps = -(-rows // example[0].shape[0])
    tile = [None if v is None else v.repeat(reps, *[1] * (v.dim() - 1))[:rows] for v in example]
    return tuple(tile)


def linears_alone(backbone: torch.nn.Module, example: tuple) -> Callable[[], None]:
    """A call that runs every linear layer of one forward of `backbone` on `example`, on inputs
    of the shapes that forward gave it."""
    calls: list[tuple[torch.Tensor, torch.nn.Linear]] = []
    hooks = [
        module.register_forward_hook(lambda m, args, out: calls.append((args[0].clone(), m)))
        for module in backbone.modules()
        if isinstance(module, torch.nn.Linear)
    ]
    backbone(*example)
    for hook in hooks:
        hook.remove()

    def run() -> None:
        for x, linear in calls:
            F.linear(x, linear.weight, linear.bias)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/zoo/digits-dit", help="model directory")
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 64])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10, help="timed calls per round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    loaded = load_model_dir(args.model)
    backbone = loaded.backbone.to(dtype).eval()
    x, t, y = check_inputs(loaded)
    inputs = {rows: batch((x.to(dtype), t, y), rows) for rows in args.rows}
    print(f"{args.model}: {args.dtype}, {args.threads} thread(s), torch {torch.__version__}")

    calls = {}
    with torch.inference_mode():
        for name, options in VARIANTS.items():
            started = time.perf_counter()
            if options:
                compiled = torch.compile(copy.deepcopy(backbone), dynamic=True, options=options)
            else:
                compiled = compile_backbone(copy.deepcopy(backbone), max(args.rows))
            with inductor_config.patch(options):
                for rows, example in inputs.items():
                    got, want = compiled(*example).float(), backbone(*example).float()
                    error = ((got - want).norm() / want.norm()).item()
                    assert error < 1e-2, f"{name} at {rows} rows: relative error {error:.2g}"
            print(f"{name}: compiled in {time.perf_counter() - started:.1f} s")
            calls[name] = compiled
        floors = {rows: linears_alone(backbone, example) for rows, example in inputs.items()}

        runs = {(n, r): partial(fn, *inputs[r]) for n, fn in calls.items() for r in inputs}
        runs |= {(LINEARS, r): floor for r, floor in floors.items()}
        times: dict[tuple[str, int], list[float]] = {key: [] for key in runs}
        for _ in range(args.rounds):
            for key, run in runs.items():
                run()
                started = time.perf_counter()
                for _ in range(args.calls):
                    run()
                times[key].append((time.perf_counter() - started) / args.calls)

    print("\n| variant | " + " | ".join(f"{r} rows (ms)" for r in inputs) + " | vs server |")
    print("|---|" + "---|" * len(inputs) + "---|")
    median = {key: statistics.median(values) * 1e3 for key, values in times.items()}
    for name in [*calls, LINEARS]:
        cells = " | ".join(f"{median[name, r]:.2f}" for r in inputs)
        ratios = " / ".join(f"{median['server', r] / median[name, r]:.2f}x" for r in inputs)
        print(f"| {name} | {cells} | {ratios} |")


if __name__ == "__main__":
    main()

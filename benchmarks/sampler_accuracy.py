"""Sampler accuracy against the exact probability-flow endpoint on Gaussian-mixture data.

For each deterministic sampler and NFE 5/10/20/50 (Heun: the nearest odd count 2N − 1 below),
prints the RMSE between the sampler's final sample and the exact endpoint: the probability-
flow ODE solved by DOP853 at rtol 1e-11 from the same initial noise to the grid's last noise
level, then denoised (the final step of every grid is the data prediction there). Data: 8
Gaussian modes (exact closed-form denoiser), 256 samples. This is the table in
docs/samplers.md.

With --lower-order-final it prints instead the table of docs/samplers.md that compares
dpmpp-3m under diffusers' rule for multistep orders (full-order steps into the end of every
grid from 15 steps on; our option `{"lower_order_final": False}`, which equals it there)
with ours (the default: step down at the end of every grid), and dpmpp-2m for scale: RMSE
at 15/20/30/50 steps in 16-D, geometric mean over the mixtures of seeds 1, 2, 3.

    python benchmarks/sampler_accuracy.py
    python benchmarks/sampler_accuracy.py --lower-order-final
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))

from gaussian_mixture import GaussianMixture, sampler_rmse

from denoised.models.sampling.process import FlowProcess, VPProcess

DETERMINISTIC = ("ddim", "dpmpp-2m", "dpmpp-3m", "euler", "heun", "unipc")
NFES = (5, 10, 20, 50)
SETTINGS = [
    ("VP linear, logSNR grid, 2-D", VPProcess("linear"), 2, {"spacing": "logsnr"}, True),
    ("VP linear, logSNR grid, 16-D", VPProcess("linear"), 16, {"spacing": "logsnr"}, True),
    ("VP linear, trailing grid (default), 16-D", VPProcess("linear"), 16, {}, False),
    ("Flow (rectified), linspace grid (default), 16-D", FlowProcess(), 16, {}, True),
]


# (title, process, grid options) of the --lower-order-final table.
ORDER_SETTINGS = [
    ("flow, linspace", FlowProcess(), {}),
    ("VP linear, trailing", VPProcess("linear"), {}),
    ("VP cosine, trailing", VPProcess("squaredcos_cap_v2"), {}),
    (
        'VP scaled-linear, Karras, `final="min"`',
        VPProcess("scaled_linear", 0.00085, 0.012),
        {"spacing": "karras", "final": "min"},
    ),
]
ORDER_STEPS = (15, 20, 30, 50)
ORDER_SEEDS = (1, 2, 3)
ORDER_DIM = 16


def lower_order_final_table() -> None:
    # Columns: dpmpp-3m with full-order final steps (diffusers' rule from 15 steps on), with
    # ours (the default), and dpmpp-2m (default) for scale; one grid per step count, so the
    # three runs share the exact endpoint.
    variants = [
        ("dpmpp-3m", {"lower_order_final": False}),
        ("dpmpp-3m", {}),
        ("dpmpp-2m", {}),
    ]
    steps = " / ".join(map(str, ORDER_STEPS))
    print(
        f"RMSE to the exact probability-flow endpoint at {steps} steps ({ORDER_DIM}-D, "
        f"geometric mean over the 8-mode mixtures of seeds {', '.join(map(str, ORDER_SEEDS))}; "
        "256 samples)\n"
    )
    print("| process, grid | dpmpp-3m, diffusers rule | dpmpp-3m, ours | dpmpp-2m |")
    print("|---|---|---|---|")
    for title, process, grid_options in ORDER_SETTINGS:
        logs = np.zeros((len(variants), len(ORDER_STEPS)))
        for seed in ORDER_SEEDS:
            gmm = GaussianMixture.random(ORDER_DIM, 8, seed=seed)
            for j, steps in enumerate(ORDER_STEPS):
                reference = None
                for v, (name, options) in enumerate(variants):
                    err, _, reference = sampler_rmse(
                        gmm, process, name, steps, options={**grid_options, **options},
                        reference=reference,
                    )  # fmt: skip
                    logs[v, j] += np.log(err) / len(ORDER_SEEDS)
        cells = [" / ".join(f"{e:.2e}" for e in np.exp(row)) for row in logs]
        print(f"| {title} | " + " | ".join(cells) + " |")


def sampler_table() -> None:
    print("RMSE to the exact probability-flow endpoint (8-mode Gaussian mixture, 256 samples)\n")
    for title, process, dim, options, shared_endpoints in SETTINGS:
        gmm = GaussianMixture.random(dim, 8, seed=1)
        print(f"**{title}**\n")
        print("| sampler | " + " | ".join(f"NFE {n}" for n in NFES) + " |")
        print("|---|" + "---:|" * len(NFES))
        reference = None  # grids sharing their end points share the exact endpoint
        orders = {}
        for name in DETERMINISTIC:
            cells, errors = [], []
            for nfe in NFES:
                steps = (nfe + 1) // 2 if name == "heun" else nfe
                err, used, ref = sampler_rmse(
                    gmm, process, name, steps, options=options, reference=reference
                )
                if shared_endpoints:
                    reference = ref
                errors.append(err)
                cells.append(f"{err:.2e}" + (f" ({used})" if used != nfe else ""))
            orders[name] = np.log(errors[2] / errors[3]) / np.log(50 / 20)
            print(f"| {name} | " + " | ".join(cells) + " |")
        print(
            "\nempirical order between NFE 20 and 50: "
            + ", ".join(f"{n} {o:.2f}" for n, o in orders.items())
            + "\n"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--lower-order-final",
        action="store_true",
        help="compare dpmpp-3m's final-step orders (diffusers' rule vs ours) instead",
    )
    args = parser.parse_args(argv)
    if args.lower_order_final:
        lower_order_final_table()
    else:
        sampler_table()


if __name__ == "__main__":
    main()

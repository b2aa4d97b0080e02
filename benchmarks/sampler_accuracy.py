"""Sampler accuracy against the exact probability-flow endpoint on Gaussian-mixture data.

For each deterministic sampler and NFE 5/10/20/50 (Heun: the nearest odd count 2N − 1 below),
prints the RMSE between the sampler's final sample and the exact endpoint: the probability-
flow ODE solved by DOP853 at rtol 1e-11 from the same initial noise to the grid's last noise
level, then denoised (the final step of every grid is the data prediction there). Data: 8
Gaussian modes (exact closed-form denoiser), 256 samples. This is the table in
docs/samplers.md.

    python benchmarks/sampler_accuracy.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))

from gaussian_mixture import GaussianMixture, sampler_rmse

from denoised.models.process import FlowProcess, VPProcess

DETERMINISTIC = ("ddim", "dpmpp-2m", "dpmpp-3m", "euler", "heun", "unipc")
NFES = (5, 10, 20, 50)
SETTINGS = [
    ("VP linear, logSNR grid, 2-D", VPProcess("linear"), 2, {"spacing": "logsnr"}, True),
    ("VP linear, logSNR grid, 16-D", VPProcess("linear"), 16, {"spacing": "logsnr"}, True),
    ("VP linear, trailing grid (default), 16-D", VPProcess("linear"), 16, {}, False),
    ("Flow (rectified), linspace grid (default), 16-D", FlowProcess(), 16, {}, True),
]


def main() -> None:
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


if __name__ == "__main__":
    main()

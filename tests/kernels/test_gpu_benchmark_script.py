"""benchmarks/gpu_kernels.py --smoke: the GPU benchmark's every section runs (here through
Triton's interpreter, on tiny shapes) and its numeric cross-checks hold, so the script works
the first time a GPU session runs it."""

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_kernels.py"


def test_gpu_benchmark_smoke_runs_every_section():
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, env=env
    )
    out = run.stdout
    assert run.returncode == 0, run.stderr[-3000:]
    for heading in ("1. Attention forward", "2. Guidance + solver step", "3. DiT-S/8"):
        assert heading in out, out
    # The attention row's last column: max |Triton − SDPA| on fp32 inputs.
    attention_row = next(line for line in out.splitlines() if re.match(r"\s+1\s+2\s+17\s+72", line))
    assert float(attention_row.split()[-1]) < 1e-4, attention_row
    # The fused sampling run against eager, relative to the sample's scale.
    relative = float(re.search(r"max \|x_eager\| ([0-9.e+-]+)\)", out).group(1))
    assert relative < 1e-4, out

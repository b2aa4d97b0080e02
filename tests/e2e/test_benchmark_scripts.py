"""The benchmark scripts stay runnable: each one's module-level code runs and its arguments
parse, and `vs_diffusers`' saturation window counts a real server's work from its /metrics.
(A signature change once broke a script at import time with no test noticing.)"""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.stem)
def test_script_parses_its_arguments(script: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=BENCHMARKS
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "usage:" in run.stdout


def test_saturation_window_counts_the_servers_work(server, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from vs_diffusers import saturated_work

    steps = 4
    rows, images = saturated_work(server.url, 4, steps, warmup=1.0, seconds=3.0)
    assert images > 0
    # The benchmark's requests are guided: two backbone rows per image and evaluation.
    assert rows / images == pytest.approx(2 * steps, rel=0.5)


def test_queue_benchmark_runs_and_counts_forwards() -> None:
    """A short run on the shipped default model: every row reports forwards it counted (the
    requests, 1,000 steps each, outlast the window even on a fast machine)."""
    run = subprocess.run(
        [sys.executable, "engine_queue.py", "--no-compile", "--depths", "0", "200",
         "--max-batch", "2", "--running", "2", "--steps", "1000", "--seconds", "0.5"],
        capture_output=True, text=True, cwd=BENCHMARKS, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| 2 ")]
    assert [int(row[1]) for row in rows] == [0, 200]
    assert all(float(row[2]) > 0 for row in rows)

"""Benchmark output files: `results.json` (everything), `summary.csv` (one row per target,
scenario and group — by default a group is a sampler — plus an `all` row per scenario),
`requests.csv` (one row per request), and `ab.csv` (B/A ratios) in A/B mode. Figures that
do not exist (a percentile of no successful requests) are null in JSON and empty in CSV."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from denoised_client.bench.runner import RATIO_FIGURES
from denoised_client.bench.stats import PERCENTILES

# The scalar figures of a summary, in column order.
COUNTS = (
    "requests",
    "ok",
    "failed",
    "images",
    "elapsed_s",
    "images_per_s",
    "requests_per_s",
    "steps_per_s",
    "sample_evals_per_s",
)
SUMMARY_COLUMNS = [
    "target",
    "scenario",
    "kind",
    "level",
    "group",
    *COUNTS,
    "errors",
    *[f"latency_p{q}_s" for q in PERCENTILES],
    "latency_max_s",
    "latency_mean_s",
    *[f"ttfs_p{q}_s" for q in PERCENTILES],
    "ttfs_max_s",
    "server_mean_batch_samples",
    "server_mean_batch_requests",
    "server_mean_queue_wait_s",
    "server_mean_forward_s",
    "server_forwards",
]
_REQUEST_NUMBERS = {
    **dict.fromkeys(("round", "slice", "steps", "n", "nfe", "images"), int),
    **dict.fromkeys(("guidance_scale", "start", "end", "latency", "ttfs"), float),
}
REQUEST_COLUMNS = [
    "target",
    "scenario",
    "round",
    "slice",
    "group",
    "sampler",
    "steps",
    "guidance_scale",
    "n",
    "status",
    "start",
    "end",
    "latency",
    "ttfs",
    "nfe",
    "images",
]


def _clean(value: Any) -> Any:
    """NaN → None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def summary_rows(results: dict) -> list[dict]:
    rows = []
    for s in results["scenarios"]:
        server = s["server"] or {}
        for group, figures in [("all", s["overall"]), *s["groups"].items()]:
            row = {
                "target": s["target"],
                "scenario": s["scenario"],
                "kind": s["kind"],
                "level": s["level"],
                "group": group,
                **{k: figures[k] for k in COUNTS},
                "errors": ";".join(f"{k}:{v}" for k, v in figures["errors"].items()),
                **{f"latency_{k}_s": v for k, v in figures["latency_s"].items()},
                **{f"ttfs_{k}_s": v for k, v in figures["ttfs_s"].items() if k != "mean"},
                **{f"server_{k}": v for k, v in server.items()},
            }
            rows.append(row)
    return rows


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in _clean(row).items()})
    return path


def read_reports(out: Path) -> tuple[dict, list[dict]]:
    """`results.json` and the rows of `requests.csv` (numbers as numbers) from a run's folder."""
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    with (out / "requests.csv").open(newline="", encoding="utf-8") as fh:
        requests = list(csv.DictReader(fh))
    for row in requests:
        for key, cast in _REQUEST_NUMBERS.items():
            row[key] = cast(row[key]) if row[key] != "" else None
    return results, requests


def write_reports(results: dict, requests: list[dict], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json"]
    written[0].write_text(json.dumps(_clean(results), indent=2, allow_nan=False) + "\n")
    written.append(_write_csv(out / "summary.csv", SUMMARY_COLUMNS, summary_rows(results)))
    written.append(_write_csv(out / "requests.csv", REQUEST_COLUMNS, requests))
    if results["ab"]:
        rows = [
            {"scenario": row["scenario"], "group": group, **ratios}
            for row in results["ab"]
            for group, ratios in [("all", row["ratios"]), *row["groups"].items()]
        ]
        columns = ["scenario", "group", *RATIO_FIGURES]
        written.append(_write_csv(out / "ab.csv", columns, rows))
    return written

"""`denoised-bench` against real servers: closed- and open-loop runs write results whose
figures agree with each other and with the per-request rows, plots that are real images,
and A/B runs (two servers; two mixes on one server) whose ratios are B's figures over A's."""

import csv
import json
import math
import statistics
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from denoised_client.bench.cli import main as bench_main
from denoised_client.bench.load import RequestRecord
from denoised_client.bench.runner import RATIO_FIGURES, failures
from denoised_client.bench.stats import summarize

PERCENTILE_KEYS = ("p50", "p90", "p99", "max")


def run_bench(out: Path, *args: str) -> tuple[dict, list[dict], list[dict]]:
    assert bench_main([*args, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    with open(out / "requests.csv", newline="") as fh:
        requests = list(csv.DictReader(fh))
    with open(out / "summary.csv", newline="") as fh:
        summary = list(csv.DictReader(fh))
    return results, requests, summary


def check_consistent(figures: dict, rows: list[dict]) -> None:
    """A summary's counts, rates and percentiles against the request rows it covers."""
    ok = [r for r in rows if r["status"] == "ok"]
    assert figures["requests"] == len(rows)
    assert figures["ok"] + figures["failed"] == figures["requests"]
    assert figures["ok"] == len(ok) and sum(figures["errors"].values()) == figures["failed"]
    assert figures["errors"] == dict(Counter(r["status"] for r in rows if r["status"] != "ok"))
    assert figures["images"] == sum(int(r["images"]) for r in ok) == sum(int(r["n"]) for r in ok)
    elapsed = figures["elapsed_s"]
    assert figures["images_per_s"] == pytest.approx(figures["images"] / elapsed)
    assert figures["requests_per_s"] == pytest.approx(len(ok) / elapsed)
    assert figures["steps_per_s"] == pytest.approx(sum(int(r["steps"]) for r in ok) / elapsed)
    latency, ttfs = figures["latency_s"], figures["ttfs_s"]
    if len(ok) < 2:
        return
    values = [latency[k] for k in PERCENTILE_KEYS]
    assert values == sorted(values) and values[-1] <= elapsed
    assert [ttfs[k] for k in PERCENTILE_KEYS] == sorted(ttfs[k] for k in PERCENTILE_KEYS)
    # Each request's first step comes before its end, so each order statistic does too.
    assert all(ttfs[k] <= latency[k] + 1e-9 for k in PERCENTILE_KEYS)
    # Percentiles against an independent implementation (linear interpolation = inclusive).
    reference = statistics.quantiles([float(r["latency"]) for r in ok], n=100, method="inclusive")
    assert latency["p50"] == pytest.approx(reference[49])
    assert latency["p90"] == pytest.approx(reference[89])
    assert latency["max"] == pytest.approx(max(float(r["latency"]) for r in ok))


def check_scenario(scenario: dict, rows: list[dict]) -> None:
    mine = [r for r in rows if r["target"] == scenario["target"]]
    mine = [r for r in mine if r["scenario"] == scenario["scenario"]]
    check_consistent(scenario["overall"], mine)
    groups = scenario["groups"]
    assert set(groups) == {r["group"] for r in mine}
    for name, figures in groups.items():
        check_consistent(figures, [r for r in mine if r["group"] == name])
    for key in ("requests", "ok", "failed", "images"):
        assert sum(g[key] for g in groups.values()) == scenario["overall"][key]


def check_png(path: Path) -> None:
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.width >= 400 and image.height >= 250
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 20  # lines, text and axes, not a blank canvas
    assert max(count for count, _ in colours) < 0.98 * image.width * image.height


def test_closed_and_open_loop_results_are_consistent(server, tmp_path):
    mix = tmp_path / "mix.json"
    mix.write_text(
        json.dumps(
            {
                "model": "tiny-dit",
                "label": "3",
                "mix": [
                    {"sampler": ["ddim", "dpmpp-2m"], "steps": [3, 6], "guidance_scale": 2.0},
                    {"sampler": "heun", "steps": 3, "n": 2, "weight": 2},
                ],
            }
        )
    )
    out = tmp_path / "out"
    results, rows, summary = run_bench(
        out, "--url", server.url, "--mix", str(mix), "--concurrency", "1,3", "--rate", "20",
        "--requests", "12", "--warmup", "2",
    )  # fmt: skip
    names = [s["scenario"] for s in results["scenarios"]]
    assert names == ["closed-c1", "closed-c3", "open-r20"]
    assert results["ab"] == [] and not (out / "ab.csv").exists()
    assert len(rows) == 3 * 12  # warm-up requests are not recorded
    for scenario in results["scenarios"]:
        assert scenario["overall"]["requests"] == 12
        check_scenario(scenario, rows)
        server_view = scenario["server"]
        assert server_view["forwards"] >= 1 and server_view["mean_batch_samples"] >= 1
        assert server_view["mean_queue_wait_s"] >= 0
    # Sharing forwards needs concurrent requests: one client at a time never shares one.
    by_name = {s["scenario"]: s["server"] for s in results["scenarios"]}
    assert by_name["closed-c1"]["mean_batch_requests"] == pytest.approx(1.0)
    assert by_name["closed-c3"]["mean_batch_requests"] > 1.0
    # summary.csv: an `all` row and one per group for every scenario, with the JSON's counts.
    groups = {s["scenario"]: s["groups"] for s in results["scenarios"]}
    assert len(summary) == sum(1 + len(g) for g in groups.values())
    for row in summary:
        figures = next(s for s in results["scenarios"] if s["scenario"] == row["scenario"])
        figures = (
            figures["overall"] if row["group"] == "all" else groups[row["scenario"]][row["group"]]
        )
        assert int(row["requests"]) == figures["requests"] and int(row["ok"]) == figures["ok"]
    assert {r["group"] for r in rows} == {"ddim", "dpmpp-2m", "heun"}
    check_png(out / "latency_throughput.png")
    check_png(out / "latency_cdf.png")
    # --replot redraws the same plots from the files alone.
    for png in out.glob("*.png"):
        png.unlink()
    assert bench_main(["--replot", str(out)]) == 0
    check_png(out / "latency_throughput.png")
    check_png(out / "latency_cdf.png")


def ab_check(results: dict, rows: list[dict]) -> None:
    for scenario in results["scenarios"]:
        check_scenario(scenario, rows)
    (row,) = results["ab"]
    pair = {s["target"]: s for s in results["scenarios"]}
    for figure, (key, sub) in RATIO_FIGURES.items():
        a, b = pair["A"]["overall"][key], pair["B"]["overall"][key]
        a, b = (a[sub], b[sub]) if sub else (a, b)
        expected = b / a if a else None
        assert row["ratios"][figure] == (pytest.approx(expected) if expected else None)
    # Interleaved A B, then B A; within a round both targets were sent the same requests.
    for round_, first in ((0, "A"), (1, "B")):
        mine = [r for r in rows if int(r["round"]) == round_]
        slices = {r["target"]: int(r["slice"]) for r in mine}
        assert slices[first] < slices["B" if first == "A" else "A"]
        sent = {t: Counter(r["group"] for r in mine if r["target"] == t) for t in "AB"}
        assert sent["A"] == sent["B"] and sum(sent["A"].values()) == 4


def test_ab_between_two_servers(server, one_slot_server, tmp_path):
    """B serves one sample per forward with a queue of one: at four clients some of its
    requests are refused (429) and counted as errors; none of A's are."""
    out = tmp_path / "ab"
    results, rows, _ = run_bench(
        out, "--url", server.url, "--b-url", one_slot_server.url, "--api-key", "k1",
        "--model", "tiny-flow", "--sampler", "euler", "--steps", "30", "--concurrency", "4",
        "--requests", "8", "--warmup", "1",
    )  # fmt: skip
    ab_check(results, rows)
    pair = {s["target"]: s for s in results["scenarios"]}
    assert pair["A"]["overall"]["failed"] == 0
    assert set(pair["B"]["overall"]["errors"]) <= {"429"}
    assert pair["B"]["server"]["mean_batch_samples"] == pytest.approx(1.0)
    assert pair["A"]["server"]["mean_batch_samples"] > 1.0
    with open(out / "ab.csv", newline="") as fh:
        ab_rows = list(csv.DictReader(fh))
    assert ab_rows[0]["group"] == "all"
    assert float(ab_rows[0]["images_per_s"]) == pytest.approx(
        results["ab"][0]["ratios"]["images_per_s"]
    )
    check_png(out / "ab_ratios.png")


def test_ab_between_two_solvers_on_one_server(server, tmp_path):
    """Two configurations on one server (DDIM against DPM-Solver++ 2M at the same step
    counts), grouped by steps so that each step count gets its own ratios."""
    mixes = {}
    for name, sampler in (("a", "ddim"), ("b", "dpmpp-2m")):
        mixes[name] = tmp_path / f"{name}.json"
        mixes[name].write_text(
            json.dumps({"model": "tiny-dit", "mix": [{"sampler": sampler, "steps": [2, 8]}]})
        )
    results, rows, _ = run_bench(
        tmp_path / "out", "--url", server.url, "--mix", str(mixes["a"]),
        "--b-mix", str(mixes["b"]), "--group-by", "steps", "--concurrency", "2",
        "--requests", "8", "--warmup", "0", "--no-plots",
    )  # fmt: skip
    ab_check(results, rows)
    (row,) = results["ab"]
    assert set(row["groups"]) == {"steps=2", "steps=8"}
    pair = {s["target"]: s for s in results["scenarios"]}
    for group, ratios in row["groups"].items():
        a = pair["A"]["groups"][group]["latency_s"]["p50"]
        b = pair["B"]["groups"][group]["latency_s"]["p50"]
        assert ratios["latency_p50"] == pytest.approx(b / a)
    assert {r["sampler"] for r in rows if r["target"] == "B"} == {"dpmpp-2m"}
    assert not math.isnan(row["ratios"]["steps_per_s"])
    assert not list((tmp_path / "out").glob("*.png"))


def test_failures_under_load_are_data_but_rejections_and_empty_scenarios_are_not():
    def run(*statuses: str) -> dict:
        records = [
            RequestRecord("ddim", "ddim", 2, None, 1, 0.0, 1.0, status, nfe=2, images=1)
            for status in statuses
        ]
        overall = summarize(records, 1.0)
        return {"scenarios": [{"target": "A", "scenario": "closed-c4", "overall": overall}]}

    assert failures(run("ok", "429", "429", "503", "504", "500", "timeout", "connection")) == []
    assert failures(run("429", "503", "429")) == [
        "[A] closed-c4: no request succeeded (429×2, 503×1)"
    ]
    assert failures(run("ok", "422", "429", "404")) == [
        "[A] closed-c4: the server rejected 2 request(s) (404×1, 422×1, 429×1)"
    ]

"""Benchmark statistics: percentiles against the standard library, summaries of records,
limits, and the server-metrics window."""

import math
import random
import statistics

import pytest

from denoised_client.bench.load import Limit, RequestRecord
from denoised_client.bench.server_metrics import MetricsWindow, parse_totals
from denoised_client.bench.stats import by_group, distribution, percentile, summarize


def test_percentiles_match_linear_interpolation_of_the_standard_library():
    rng = random.Random(1)
    for size in (2, 3, 10, 101, 257):
        values = sorted(rng.lognormvariate(0, 1) for _ in range(size))
        reference = statistics.quantiles(values, n=100, method="inclusive")
        for q in (1, 50, 90, 99):
            assert percentile(values, q) == pytest.approx(reference[q - 1])
        assert percentile(values, 0) == values[0] and percentile(values, 100) == values[-1]
    assert percentile([4.0], 99) == 4.0 and math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match=r"0\.\.100"):
        percentile([1.0], 101)


def record(group, status="ok", start=0.0, end=1.0, n=1, steps=10, nfe=10, ttfs=0.1):
    ok = status == "ok"
    return RequestRecord(group=group, sampler=group, steps=steps, guidance_scale=None, n=n,
                         start=start, end=end, status=status, ttfs=ttfs if ok else None,
                         nfe=nfe if ok else None, images=n if ok else 0)  # fmt: skip


def test_summaries_count_rates_and_latency_of_successes_only():
    records = [
        record("ddim", end=0.5, n=2),
        record("ddim", status="429", end=0.01),
        record("heun", start=0.2, end=1.2, nfe=19),
        record("heun", status="504", end=4.0),
    ]
    summary = summarize(records, elapsed=4.0)
    assert (summary["requests"], summary["ok"], summary["failed"]) == (4, 2, 2)
    assert summary["errors"] == {"429": 1, "504": 1}
    assert summary["images"] == 3 and summary["images_per_s"] == 0.75
    assert summary["steps_per_s"] == 5.0 and summary["sample_evals_per_s"] == (20 + 19) / 4
    assert summary["latency_s"]["max"] == 1.0 and summary["latency_s"]["p50"] == 0.75
    groups = by_group(records, elapsed=4.0)
    assert groups["ddim"]["errors"] == {"429": 1} and groups["heun"]["images"] == 1
    empty = distribution([])
    assert all(math.isnan(v) for v in empty.values())


def test_limits():
    assert Limit(requests=3).reached(3, 0.0) and not Limit(requests=3).reached(2, 99.0)
    assert Limit(duration=2.0).reached(0, 2.0) and not Limit(duration=2.0).reached(100, 1.9)
    assert Limit(requests=5).split(2) == Limit(requests=3)
    assert Limit(duration=9.0).split(3) == Limit(duration=3.0)
    for bad in ({}, {"duration": 1, "requests": 1}, {"requests": 0}, {"duration": -1.0}):
        with pytest.raises(ValueError):
            Limit(**bad)


PAGE_BEFORE = """# HELP denoised_batch_samples Backbone rows per forward
# TYPE denoised_batch_samples histogram
denoised_batch_samples_bucket{le="1.0",model="a"} 3.0
denoised_batch_samples_sum{model="a"} 10.0
denoised_batch_samples_count{model="a"} 5.0
denoised_batch_samples_sum{model="b"} 2.0
denoised_batch_samples_count{model="b"} 1.0
denoised_queue_wait_seconds_sum{model="a"} 0.5
denoised_queue_wait_seconds_count{model="a"} 5.0
"""


def test_metrics_window_takes_means_over_the_difference_of_two_scrapes():
    before = parse_totals(PAGE_BEFORE)
    assert before["denoised_batch_samples_sum"] == 12.0
    after = dict(before)
    after["denoised_batch_samples_sum"] += 30.0  # ten forwards of three rows
    after["denoised_batch_samples_count"] += 10.0
    after["denoised_queue_wait_seconds_sum"] += 1.0
    after["denoised_queue_wait_seconds_count"] += 4.0
    window = MetricsWindow()
    window.add(before, after)
    window.add(after, after)  # a slice with nothing in it changes nothing
    figures = window.figures()
    assert figures["forwards"] == 10 and figures["mean_batch_samples"] == 3.0
    assert figures["mean_queue_wait_s"] == 0.25
    assert math.isnan(figures["mean_batch_requests"])  # not on the page: no observations

"""Figures of a set of request records: counts, throughput and latency percentiles."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

from denoised_client.bench.load import RequestRecord

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of sorted `values`, interpolating linearly between
    neighbouring ranks; NaN for no values."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    rank = (len(values) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def distribution(values: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of `values` (NaN when there are none)."""
    ordered = sorted(values)
    figures = {f"p{q}": percentile(ordered, q) for q in PERCENTILES}
    figures["max"] = ordered[-1] if ordered else math.nan
    figures["mean"] = sum(ordered) / len(ordered) if ordered else math.nan
    return figures


def summarize(records: Sequence[RequestRecord], elapsed: float) -> dict:
    """Counts and rates over `elapsed` seconds. Latencies count successful requests only;
    failures are counted by status in `errors`."""
    ok = [r for r in records if r.status == "ok"]
    errors = Counter(r.status for r in records if r.status != "ok")
    per_second = (lambda x: x / elapsed) if elapsed > 0 else (lambda x: math.nan)
    return {
        "requests": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "errors": dict(sorted(errors.items())),
        "images": sum(r.images for r in ok),
        "elapsed_s": elapsed,
        "images_per_s": per_second(sum(r.images for r in ok)),
        "requests_per_s": per_second(len(ok)),
        "steps_per_s": per_second(sum(r.steps for r in ok)),
        # Backbone work: model evaluations × samples (a guided sample costs two rows more).
        "sample_evals_per_s": per_second(sum(r.nfe * r.n for r in ok)),
        "latency_s": distribution(r.latency for r in ok),
        "ttfs_s": distribution(r.ttfs for r in ok if r.ttfs is not None),
    }


def by_group(records: Sequence[RequestRecord], elapsed: float) -> dict[str, dict]:
    """`summarize` per group (by default, per sampler), rates over the same `elapsed` (each
    group's share of the throughput)."""
    names = sorted({r.group for r in records})
    return {name: summarize([r for r in records if r.group == name], elapsed) for name in names}


def elapsed_of(records: Iterable[RequestRecord]) -> float:
    """From the slice's start to the last answer."""
    return max((r.end for r in records), default=0.0)

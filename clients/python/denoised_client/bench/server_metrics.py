"""The server's own view of a benchmark window, from `/metrics` scraped before and after:
how full its batches were and how long requests waited for their first forward."""

from __future__ import annotations

import math
import re
from collections import defaultdict

# figure: (histogram) — each figure is the histogram's mean over the window (Δsum / Δcount).
HISTOGRAMS = {
    "mean_batch_samples": "denoised_batch_samples",  # backbone rows per forward
    "mean_batch_requests": "denoised_batch_requests",  # requests sharing a forward
    "mean_queue_wait_s": "denoised_queue_wait_seconds",
    "mean_forward_s": "denoised_forward_seconds",
}

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)")


def parse_totals(text: str) -> dict[str, float]:
    """Each sample name of a Prometheus text page, summed over its label sets."""
    totals: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            try:
                totals[match.group(1)] += float(match.group(3))
            except ValueError:
                continue
    return dict(totals)


class MetricsWindow:
    """Histogram sums and counts accumulated over one or more before/after scrapes."""

    def __init__(self) -> None:
        self.delta: dict[str, float] = defaultdict(float)

    def add(self, before: dict[str, float], after: dict[str, float]) -> None:
        for histogram in HISTOGRAMS.values():
            for suffix in ("_sum", "_count"):
                name = histogram + suffix
                self.delta[name] += after.get(name, 0.0) - before.get(name, 0.0)

    def figures(self) -> dict[str, float]:
        """Mean per histogram over the window (NaN where nothing was observed), plus the
        number of backbone forwards."""
        out = {"forwards": self.delta["denoised_batch_samples_count"]}
        for figure, histogram in HISTOGRAMS.items():
            count = self.delta[histogram + "_count"]
            out[figure] = self.delta[histogram + "_sum"] / count if count > 0 else math.nan
        return out

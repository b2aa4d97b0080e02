"""PNG plots of a benchmark (matplotlib, from the `bench` extra):

- `latency_throughput.png`: per group (by default a sampler), latency (p50 solid, p99 dashed)
  against the scenario's throughput in images/s, one point per load level; closed and open
  loop side by side.
- `latency_cdf.png`: per scenario, the distribution of latencies of each group.
- `ab_ratios.png` (A/B mode): B/A throughput and p50 latency per scenario.
"""

from __future__ import annotations

import math
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend, or an ImportError saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "plots need matplotlib: pip install 'denoised-client[bench]' (or pass --no-plots)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _present(value: float | None) -> bool:
    """Whether a figure exists (NaN in a fresh run, null once read back from JSON)."""
    return value is not None and not math.isnan(value)


def latency_throughput(results: dict, path: Path) -> Path:
    plt = pyplot()
    kinds = [k for k in ("closed", "open") if any(s["kind"] == k for s in results["scenarios"])]
    targets = [t["name"] for t in results["targets"]]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = sorted({name for s in results["scenarios"] for name in s["groups"]})
    for ax, kind in zip(axes[0], kinds, strict=True):
        drawn: list[float] = []
        for target in targets:
            runs = sorted(
                (s for s in results["scenarios"] if s["kind"] == kind and s["target"] == target),
                key=lambda s: s["level"],
            )
            for i, group in enumerate(groups):
                points = [
                    (s["overall"]["images_per_s"], s["groups"][group]["latency_s"], s["scenario"])
                    for s in runs
                    if group in s["groups"]
                ]
                points = [p for p in points if _present(p[1]["p50"])]
                if not points:
                    continue
                x = [p[0] for p in points]
                label = group if len(targets) == 1 else f"{target}: {group}"
                style = {"marker": "o" if targets.index(target) == 0 else "s"}
                colour = colours[i % len(colours)]
                ax.plot(x, [p[1]["p50"] for p in points], "-", color=colour, label=label, **style)
                ax.plot(x, [p[1]["p99"] for p in points], "--", color=colour, **style)
                drawn += [p[1][k] for p in points for k in ("p50", "p99")]
                for xi, p in zip(x, points, strict=True):
                    ax.annotate(
                        p[2].split("-")[1],
                        (xi, p[1]["p50"]),
                        fontsize=7,
                        textcoords="offset points",
                        xytext=(3, 3),
                    )
        ax.set_title(f"{kind} loop (labels: c = clients, r = arrivals/s)")
        ax.set_xlabel("throughput, images/s")
        ax.set_ylabel("latency, s (p50 solid, p99 dashed)")
        if drawn and min(drawn) > 0 and max(drawn) / min(drawn) > 20:
            ax.set_yscale("log")  # overload stretches latency over decades
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def latency_cdf(results: dict, requests: list[dict], path: Path) -> Path:
    plt = pyplot()
    names = list(dict.fromkeys(s["scenario"] for s in results["scenarios"]))
    targets = [t["name"] for t in results["targets"]]
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        ok = [r for r in requests if r["scenario"] == name and r["status"] == "ok"]
        for target in targets:
            for group in sorted({r["group"] for r in ok}):
                latencies = sorted(
                    r["latency"] for r in ok if r["target"] == target and r["group"] == group
                )
                if not latencies:
                    continue
                fraction = [(i + 1) / len(latencies) for i in range(len(latencies))]
                label = group if len(targets) == 1 else f"{target}: {group}"
                ls = "-" if targets.index(target) == 0 else "--"
                ax.step(latencies, fraction, ls, where="post", label=label)
        ax.set_title(name)
        ax.set_xlabel("latency, s")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def ab_chart(results: dict, path: Path) -> Path:
    plt = pyplot()
    rows = results["ab"]
    figures = ["images_per_s", "latency_p50", "latency_p99"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(rows) + 2), 4))
    width = 0.8 / len(figures)
    for j, figure in enumerate(figures):
        values = [row["ratios"][figure] for row in rows]
        xs = [i + (j - (len(figures) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [v if _present(v) else 0 for v in values], width, label=figure)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [row["scenario"] for row in rows])
    ax.set_ylabel(f"ratio {rows[0]['b']} / {rows[0]['a']}")
    ax.set_title("A/B: B relative to A")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(results: dict, requests: list[dict], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [
        latency_throughput(results, out / "latency_throughput.png"),
        latency_cdf(results, requests, out / "latency_cdf.png"),
    ]
    if results["ab"]:
        written.append(ab_chart(results, out / "ab_ratios.png"))
    return written

"""`denoised-bench`: solvers under load.

    # closed loop at 1, 4 and 16 clients, then Poisson arrivals at 2 and 8 requests/s,
    # 30 s each, over a mix of samplers and step counts
    denoised-bench --url http://127.0.0.1:8000 --model digits-dit --label 3 \\
        --sampler ddim,dpmpp-2m,heun --steps 10,20 --guidance 3 \\
        --concurrency 1,4,16 --rate 2,8 --duration 30 --out bench-out

    # the mix from a file (JSON, or YAML with the bench extra)
    denoised-bench --mix mix.yaml --concurrency 8 --requests 200

    # A/B: two servers (or one server, two mixes) interleaved, with B/A ratios
    denoised-bench --url http://a:8000 --b-url http://b:8000 --concurrency 4 --duration 20

Writes results.json, summary.csv, requests.csv (ab.csv in A/B mode) and PNG plots to --out.

Failed requests under load (429 queue full, 503, 504, 500, timeouts) are results: the table
counts them by status and the exit status stays 0. The exit status is 1 when the run could
not measure what it was asked to: a warm-up request failed with anything but 429 (the run
stops at once with the server's message), the server rejected a measured request as invalid
(400, 401, 404, 413, 422: the mix is wrong), or a target and scenario had no successful
request at all; the results are still written. Argument errors exit with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from denoised_client._core import DEFAULT_URL
from denoised_client.bench import plots
from denoised_client.bench.load import Limit
from denoised_client.bench.report import read_reports, write_reports
from denoised_client.bench.runner import (
    BenchConfig,
    Scenario,
    Target,
    failures,
    run_benchmark,
)
from denoised_client.bench.workload import Workload, load_workload, workload_from_spec
from denoised_client.errors import DenoisedError


def _list(cast):
    def parse(text: str) -> list:
        try:
            return [cast(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list, got {text!r}"
            ) from None

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="denoised-bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--url", default=os.environ.get("DENOISED_URL", DEFAULT_URL), help="server (A)")
    add("--api-key", default=os.environ.get("DENOISED_API_KEY"))
    mix = p.add_argument_group("workload (a --mix file, or the flags below as one cross product)")
    mix.add_argument("--mix", help="mix file, JSON or YAML")
    mix.add_argument("--model")
    mix.add_argument("--label", help="class name (omit: unconditional)")
    mix.add_argument("--sampler", type=_list(str), help="e.g. ddim,dpmpp-2m,heun")
    mix.add_argument("--steps", type=_list(int), help="e.g. 10,20,50")
    mix.add_argument("--guidance", type=_list(float), help="e.g. 1,3")
    mix.add_argument("--n", type=_list(int), help="images per request, e.g. 1,4")
    mix.add_argument("--endpoint", choices=("generate", "images"), default="generate")
    mix.add_argument(
        "--group-by",
        type=_list(str),
        help="fields that split the results, e.g. sampler,steps (default: the mix "
        "file's group_by, else sampler)",
    )
    load = p.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        type=_list(int),
        default=[],
        help="closed-loop levels: concurrent clients, e.g. 1,4,16",
    )
    load.add_argument(
        "--rate",
        type=_list(float),
        default=[],
        help="open-loop levels: Poisson arrivals per second, e.g. 2,8",
    )
    load.add_argument("--duration", type=float, help="seconds per scenario (and target)")
    load.add_argument("--requests", type=int, help="requests per scenario (and target)")
    load.add_argument("--warmup", type=int, default=4, help="warm-up requests (default 4)")
    load.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    load.add_argument("--seed", type=int, default=0)
    ab = p.add_argument_group("A/B (interleaved; ratios are B over A)")
    ab.add_argument("--b-url", help="the B server (default: --url)")
    ab.add_argument("--b-mix", help="the B workload (default: A's)")
    ab.add_argument("--names", default="A,B", help="names of the two targets (default A,B)")
    ab.add_argument("--rounds", type=int, help="slices per scenario (default 2 with A/B, else 1)")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="bench-out", help="folder for results and plots")
    out.add_argument("--no-plots", action="store_true")
    out.add_argument("--no-metrics", action="store_true", help="do not scrape /metrics")
    out.add_argument(
        "--replot",
        metavar="DIR",
        help="only redraw the plots (and print the table) of an earlier run's --out folder",
    )
    return p


def _flag_workload(args: argparse.Namespace) -> Workload:
    entry = {
        "sampler": args.sampler,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "n": args.n,
    }
    spec = {
        "endpoint": args.endpoint,
        "mix": [{k: v for k, v in entry.items() if v is not None}],
        **({"model": args.model} if args.model else {}),
        **({"label": args.label} if args.label is not None else {}),
    }
    return workload_from_spec(spec)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    workload = load_workload(args.mix) if args.mix else _flag_workload(args)
    if args.group_by:
        workload = dataclasses.replace(workload, group_by=tuple(args.group_by))
    names = [n.strip() for n in args.names.split(",")]
    targets = [Target(names[0], args.url, workload, args.api_key)]
    if args.b_url or args.b_mix:
        if len(names) != 2:
            raise ValueError(f"--names wants two names, got {args.names!r}")
        b_workload = load_workload(args.b_mix) if args.b_mix else workload
        b_workload = dataclasses.replace(b_workload, group_by=workload.group_by)
        targets.append(Target(names[1], args.b_url or args.url, b_workload, args.api_key))
    scenarios = [Scenario("closed", c) for c in args.concurrency]
    scenarios += [Scenario("open", r) for r in args.rate]
    if args.duration is None and args.requests is None:
        args.duration = 10.0
    return BenchConfig(
        targets=tuple(targets),
        scenarios=tuple(scenarios),
        limit=Limit(duration=args.duration, requests=args.requests),
        warmup=args.warmup,
        rounds=args.rounds or (2 if len(targets) == 2 else 1),
        seed=args.seed,
        scrape_metrics=not args.no_metrics,
        timeout=args.timeout,
    )


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}g}"


def _width(header: str, names: Iterable[str]) -> int:
    """A column as wide as its longest entry, plus two spaces."""
    return 2 + max(len(header), *map(len, names))


def print_table(results: dict, out=sys.stdout) -> None:
    scenarios = results["scenarios"]
    wt = _width("target", (s["target"] for s in scenarios))
    ws = _width("scenario", (s["scenario"] for s in scenarios))
    wg = _width("group", (g for s in scenarios for g in s["groups"]))
    header = f"{'target':<{wt}}{'scenario':<{ws}}{'group':<{wg}}{'ok/sent':>9}{'img/s':>9}"
    header += f"{'p50 s':>9}{'p90 s':>9}{'p99 s':>9}{'ttfs50':>9}  errors"
    print(header, file=out)
    for s in scenarios:
        for group, f in [("all", s["overall"]), *s["groups"].items()]:
            lat, ttfs = f["latency_s"], f["ttfs_s"]
            errors = ",".join(f"{k}×{v}" for k, v in f["errors"].items())
            print(
                f"{s['target']:<{wt}}{s['scenario']:<{ws}}{group:<{wg}}"
                f"{f['ok']:>4}/{f['requests']:<4}{_fmt(f['images_per_s']):>9}"
                f"{_fmt(lat['p50']):>9}{_fmt(lat['p90']):>9}{_fmt(lat['p99']):>9}"
                f"{_fmt(ttfs['p50']):>9}  {errors}",
                file=out,
            )
    for row in results["ab"]:
        ratios = "  ".join(f"{k} {_fmt(v)}" for k, v in row["ratios"].items())
        print(f"{row['b']}/{row['a']} {row['scenario']}: {ratios}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.no_plots or args.replot:
        try:
            plots.pyplot()
        except ImportError as exc:
            parser.error(str(exc))
    if args.replot:
        try:
            results, requests = read_reports(Path(args.replot))
        except (OSError, ValueError, KeyError) as exc:
            parser.error(f"--replot {args.replot}: not a benchmark output folder ({exc})")
        written = plots.write_plots(results, requests, Path(args.replot))
        print_table(results)
        print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
        return 0
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    try:
        results, requests = asyncio.run(
            run_benchmark(config, say=lambda line: print(line, file=sys.stderr))
        )
    except (DenoisedError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    written = write_reports(results, requests, out)
    if not args.no_plots:
        written += plots.write_plots(results, requests, out)
    print_table(results)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    problems = failures(results)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

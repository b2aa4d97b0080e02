"""Solvers under load: closed- and open-loop load over a workload mix, per-sampler latency
and throughput figures, JSON/CSV results, PNG plots, and interleaved A/B comparisons."""

from denoised_client.bench.load import Limit, RequestRecord, closed_loop, open_loop
from denoised_client.bench.runner import BenchConfig, Scenario, Target, run_benchmark
from denoised_client.bench.workload import WorkItem, Workload, load_workload, workload_from_spec

__all__ = [
    "BenchConfig",
    "Limit",
    "RequestRecord",
    "Scenario",
    "Target",
    "WorkItem",
    "Workload",
    "closed_loop",
    "load_workload",
    "open_loop",
    "run_benchmark",
    "workload_from_spec",
]

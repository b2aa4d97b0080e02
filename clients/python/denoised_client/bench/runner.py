"""A benchmark run: warm-up, then every scenario (closed-loop concurrency levels, open-loop
arrival rates) against one target, or interleaved against two (A/B).

A/B interleaving splits each scenario into `rounds` slices and alternates the order of the
targets from round to round (A B, B A, A B, ...), so a drift of the machine over time (heat,
other load) weighs on both alike. Within a round both targets get the same request sequence
(the same seeds, mix draws and arrival times).

Failures: the warm-up sends one request at a time to a ready server, so a failure there is
not load; any but a 429 (another client filling the queue) stops the run at once with the
server's message. In the measured scenarios failures are data (counted by status), except
that `failures` names a run whose figures cannot be trusted: a request the server rejected
as invalid (a 4xx other than 429: the mix is wrong), or a target and scenario with no
successful request at all (nothing was measured).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from denoised_client._core import NO_RETRY
from denoised_client.async_client import AsyncClient
from denoised_client.bench.load import Limit, RequestRecord, closed_loop, open_loop
from denoised_client.bench.server_metrics import MetricsWindow, parse_totals
from denoised_client.bench.stats import by_group, elapsed_of, summarize
from denoised_client.bench.workload import Workload
from denoised_client.errors import DenoisedError, RateLimitError

# B/A ratios reported in A/B mode: (figure, key in a summary, key inside it or None).
RATIO_FIGURES = {
    "images_per_s": ("images_per_s", None),
    "requests_per_s": ("requests_per_s", None),
    "steps_per_s": ("steps_per_s", None),
    "latency_p50": ("latency_s", "p50"),
    "latency_p99": ("latency_s", "p99"),
    "ttfs_p50": ("ttfs_s", "p50"),
}


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    workload: Workload
    api_key: str | None = None


@dataclass(frozen=True)
class Scenario:
    kind: Literal["closed", "open"]
    level: float  # closed: concurrent clients; open: arrivals per second

    def __post_init__(self) -> None:
        if self.kind not in ("closed", "open"):
            raise ValueError(f"scenario kind must be closed or open, got {self.kind!r}")
        if self.kind == "closed" and (self.level < 1 or self.level != int(self.level)):
            raise ValueError(f"concurrency must be a whole number >= 1, got {self.level}")
        if self.kind == "open" and not self.level > 0:
            raise ValueError(f"arrival rate must be > 0 per second, got {self.level}")

    @property
    def name(self) -> str:
        return f"closed-c{int(self.level)}" if self.kind == "closed" else f"open-r{self.level:g}"


@dataclass(frozen=True)
class BenchConfig:
    targets: tuple[Target, ...]
    scenarios: tuple[Scenario, ...]
    limit: Limit  # per scenario and target, over all its rounds
    warmup: int = 4  # requests per target before measuring (concurrency 1, not recorded)
    rounds: int = 1  # interleaved slices per scenario
    seed: int = 0
    scrape_metrics: bool = True
    timeout: float = 300.0

    def __post_init__(self) -> None:
        if len(self.targets) not in (1, 2):
            raise ValueError("a benchmark has one target, or two for A/B")
        if len({t.name for t in self.targets}) != len(self.targets):
            raise ValueError("A/B targets need distinct names")
        if not self.scenarios:
            raise ValueError("give at least one concurrency or arrival rate")
        if self.rounds < 1 or self.warmup < 0:
            raise ValueError("rounds must be >= 1 and warmup >= 0")


@dataclass
class _Accumulator:
    """One target's records and time within one scenario, over its slices."""

    records: list[RequestRecord] = field(default_factory=list)
    elapsed: float = 0.0
    window: MetricsWindow = field(default_factory=MetricsWindow)
    scraped: bool = True


async def _warm_up(client: AsyncClient, target: Target, count: int, rng: random.Random) -> None:
    """`count` requests one after another, unrecorded; raises on any failure but a 429."""
    for _ in range(count):
        request = target.workload.pick(rng)
        try:
            async with client.open_stream(request, endpoint=target.workload.endpoint) as stream:
                await stream.until_done()
        except RateLimitError:
            continue
        except DenoisedError as exc:
            raise DenoisedError(f"[{target.name}] warm-up request failed: {exc}") from exc


def _rejected(status: str) -> bool:
    """A measured request the server refused as invalid (no load explains a 4xx but 429)."""
    return status.isdigit() and 400 <= int(status) < 500 and status != "429"


def failures(results: dict) -> list[str]:
    """Why a finished run's figures cannot be trusted (empty when they can): requests the
    server rejected as invalid, and targets and scenarios where no request succeeded."""
    found = []
    for s in results["scenarios"]:
        where, figures = f"[{s['target']}] {s['scenario']}", s["overall"]
        errors = ", ".join(f"{k}×{v}" for k, v in figures["errors"].items())
        rejected = sum(v for k, v in figures["errors"].items() if _rejected(k))
        if rejected:
            found.append(f"{where}: the server rejected {rejected} request(s) ({errors})")
        elif not figures["ok"]:
            found.append(f"{where}: no request succeeded ({errors or 'none sent'})")
    return found


async def _scrape(client: AsyncClient) -> dict[str, float] | None:
    try:
        return parse_totals(await client.metrics())
    except DenoisedError:
        return None


def _ratio(b: float | None, a: float | None) -> float:
    if a is None or b is None or not a or math.isnan(a) or math.isnan(b):
        return math.nan
    return b / a


def _figure(summary: dict, figure: str) -> float:
    key, sub = RATIO_FIGURES[figure]
    return summary[key][sub] if sub else summary[key]


def ab_ratios(scenarios: list[dict], a: str, b: str) -> list[dict]:
    """Per scenario, B's figures over A's, overall and per group both ran."""
    rows = []
    for name in dict.fromkeys(s["scenario"] for s in scenarios):
        pair = {s["target"]: s for s in scenarios if s["scenario"] == name}
        first, second = pair[a], pair[b]
        ratios = {
            f: _ratio(_figure(second["overall"], f), _figure(first["overall"], f))
            for f in RATIO_FIGURES
        }
        groups = {
            group: {
                f: _ratio(_figure(second["groups"][group], f), _figure(summary, f))
                for f in RATIO_FIGURES
            }
            for group, summary in first["groups"].items()
            if group in second["groups"]
        }
        rows.append({"scenario": name, "a": a, "b": b, "ratios": ratios, "groups": groups})
    return rows


async def run_benchmark(
    config: BenchConfig, say: Callable[[str], object] = lambda _: None
) -> tuple[dict, list[dict]]:
    """Run every scenario; returns (results, per-request rows). `say` gets progress lines."""
    clients = {
        t.name: AsyncClient(
            t.url, api_key=t.api_key, timeout=config.timeout, retry=NO_RETRY, max_connections=1000
        )
        for t in config.targets
    }
    scenarios: list[dict] = []
    rows: list[dict] = []
    try:
        for target in config.targets:
            client = clients[target.name]
            await client.wait_ready(timeout=min(60.0, config.timeout))
            if config.warmup:
                say(f"[{target.name}] warm-up: {config.warmup} requests")
                rng = random.Random(f"{config.seed}-warmup")
                await _warm_up(client, target, config.warmup, rng)
        slice_limit = config.limit.split(config.rounds)
        slices = 0  # slices run so far: the order in which targets took turns
        for scenario in config.scenarios:
            acc = {t.name: _Accumulator() for t in config.targets}
            for round_ in range(config.rounds):
                order = config.targets if round_ % 2 == 0 else config.targets[::-1]
                for target in order:
                    say(f"[{target.name}] {scenario.name} round {round_ + 1}/{config.rounds}")
                    records = await _run_slice(
                        clients[target.name],
                        target,
                        scenario,
                        slice_limit,
                        random.Random(f"{config.seed}-{scenario.name}-{round_}"),
                        acc[target.name],
                        config.scrape_metrics,
                    )
                    rows += [
                        {
                            "target": target.name,
                            "scenario": scenario.name,
                            "round": round_,
                            "slice": slices,
                            **vars(r),
                            "latency": r.latency,
                        }
                        for r in records
                    ]
                    slices += 1
            for target in config.targets:
                scenarios.append(_scenario_result(target, scenario, acc[target.name], config))
    finally:
        for client in clients.values():
            await client.aclose()
    results = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {
            "limit": vars(config.limit),
            "warmup": config.warmup,
            "rounds": config.rounds,
            "seed": config.seed,
            "timeout": config.timeout,
        },
        "targets": [
            {
                "name": t.name,
                "url": t.url,
                "endpoint": t.workload.endpoint,
                "group_by": list(t.workload.group_by),
                "mix": t.workload.describe(),
            }
            for t in config.targets
        ],
        "scenarios": scenarios,
        "ab": ab_ratios(scenarios, *(t.name for t in config.targets))
        if len(config.targets) == 2
        else [],
    }
    return results, rows


async def _run_slice(
    client: AsyncClient,
    target: Target,
    scenario: Scenario,
    limit: Limit,
    rng: random.Random,
    acc: _Accumulator,
    scrape: bool,
) -> list[RequestRecord]:
    before = await _scrape(client) if scrape else None
    if scenario.kind == "closed":
        records = await closed_loop(client, target.workload, int(scenario.level), limit, rng)
    else:
        records = await open_loop(client, target.workload, scenario.level, limit, rng)
    after = await _scrape(client) if scrape else None
    if before is None or after is None:
        acc.scraped = False
    else:
        acc.window.add(before, after)
    acc.records += records
    acc.elapsed += elapsed_of(records)
    return records


def _scenario_result(
    target: Target, scenario: Scenario, acc: _Accumulator, config: BenchConfig
) -> dict:
    return {
        "target": target.name,
        "scenario": scenario.name,
        "kind": scenario.kind,
        "level": scenario.level,
        "overall": summarize(acc.records, acc.elapsed),
        "groups": by_group(acc.records, acc.elapsed),
        "server": acc.window.figures() if config.scrape_metrics and acc.scraped else None,
    }

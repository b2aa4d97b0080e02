"""deploy/prometheus, deploy/grafana and deploy/compose.yaml checked offline: promtool on the
configuration, the rules and the alert unit tests; every PromQL name is one the server exports
(from its metrics registry) or a recording rule defined here; the dashboard, its provisioning
and the compose stack point at each other correctly."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from deploy_helpers import (
    DEPLOY,
    REPO,
    exported_series,
    load_yaml,
    promql_identifiers,
    require_tool,
)

PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "denoised.json"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require_tool("promtool"), *args], cwd=PROM, capture_output=True, text=True, timeout=60
    )


def rules(path) -> list[dict]:
    return [rule for group in load_yaml(path)["groups"] for rule in group["rules"]]


def recorded() -> set[str]:
    return {r["record"] for r in rules(PROM / "rules.yml")}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


@pytest.mark.parametrize(
    "args",
    [
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "rules.yml", "alerts.yml"),
        ("test", "rules", "alerts.test.yml"),
    ],
    ids=["check-config", "check-rules", "alert-unit-tests"],
)
def test_promtool(args):
    result = promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_read_only_series_that_exist():
    known = exported_series() | recorded()
    for rule in rules(PROM / "rules.yml") + rules(PROM / "alerts.yml"):
        names = promql_identifiers(rule["expr"])
        assert names, f"{rule} reads no denoised series"
        assert names <= known, f"{rule.get('record') or rule.get('alert')}: {names - known}"


def test_alerts_cover_queue_wait_errors_deadlines_readiness_and_memory():
    alerts = {r["alert"]: r for r in rules(PROM / "alerts.yml")}
    read = {name: promql_identifiers(r["expr"]) for name, r in alerts.items()}
    assert read["DenoisedHighQueueWait"] == {"model:denoised_queue_wait_seconds:p95_5m"}
    assert read["DenoisedHighErrorRate"] == {"model:denoised_request_errors:ratio_rate5m"}
    assert read["DenoisedDeadlineMisses"] == {"model:denoised_deadline_misses:ratio_rate5m"}
    assert read["DenoisedNoReadyReplicas"] == {"denoised_ready"}
    assert read["DenoisedReplicaNotReady"] == {"denoised_ready"}
    assert read["DenoisedOutOfMemory"] == {"denoised_oom_total"}
    for alert in alerts.values():
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"]


def seconds(duration: str) -> int:
    """A Prometheus duration such as `15m` or `1h30m`, in seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)([smh])", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def test_replica_readiness_alert_outlasts_a_normal_start_and_drain():
    """denoised_ready is 0 while a pod starts (deploy/k8s gives the process the startup
    probe's budget to bind its port, before the models even load) and while it drains (within
    its grace period): together they must not last long enough to fire the per-replica alert."""
    (alert,) = [r for r in rules(PROM / "alerts.yml") if r["alert"] == "DenoisedReplicaNotReady"]
    pod = load_yaml(DEPLOY / "k8s/deployment.yaml")["spec"]["template"]["spec"]
    startup = pod["containers"][0]["startupProbe"]
    start_budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert seconds(alert["for"]) > start_budget + pod["terminationGracePeriodSeconds"]


def test_error_ratio_counts_the_server_statuses_that_are_errors():
    """The status values in the rules are ones the server emits (metrics.STATUSES)."""
    from denoised.server.metrics import STATUSES

    for rule in rules(PROM / "rules.yml"):
        for values in re.findall(r'status=~?"([^"]+)"', rule["expr"]):
            assert set(values.split("|")) <= set(STATUSES), rule["record"]


def test_dashboard_panels_read_known_series_and_cover_the_topics():
    dash = json.loads(DASHBOARD.read_text())
    known = exported_series() | recorded()
    read = set()
    for expr in dashboard_exprs():
        names = promql_identifiers(expr)
        assert names and names <= known, f"{expr}: {names - known}"
        read |= names
    # Throughput, latency percentiles, queue depth, batch occupancy and limit, out-of-memory
    # forwards, per-sampler step time.
    assert {
        "model:denoised_images:rate1m",
        "model:denoised_request_duration_seconds:p50_5m",
        "model:denoised_request_duration_seconds:p95_5m",
        "model:denoised_request_duration_seconds:p99_5m",
        "model:denoised_queue_depth:sum",
        "model:denoised_batch_samples:mean5m",
        "model_sampler:denoised_steps:rate1m",
        "model:denoised_forward_seconds:mean5m",
        "denoised_batch_limit",
        "denoised_oom_total",
    } <= read
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells = {}  # grid cell -> the panel covering it: no panel may overlap another
    for p in dash["panels"]:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[x, y]}"
                cells[x, y] = p["title"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    for expr in dashboard_exprs():
        assert set(re.findall(r"\$(\w+)", expr)) <= variables


def test_grafana_provisioning_matches_the_dashboard_and_compose():
    (source,) = load_yaml(GRAFANA / "provisioning/datasources/prometheus.yaml")["datasources"]
    dash = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])}
    assert uids == {source["uid"]}
    (provider,) = load_yaml(GRAFANA / "provisioning/dashboards/denoised.yaml")["providers"]
    compose = load_yaml(DEPLOY / "compose.yaml")
    volumes = [v.split(":") for v in compose["services"]["grafana"]["volumes"]]
    grafana_mounts = {target: source for source, target, *_ in volumes}
    assert (DEPLOY / grafana_mounts[provider["options"]["path"]]).resolve() == DASHBOARD.parent
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", source["url"]).groups()
    assert host in compose["services"] and f"{port}:{port}" in compose["services"][host]["ports"]


def test_compose_stack_wiring():
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"denoised", "prometheus", "grafana"}
    build = services["denoised"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == REPO / "Dockerfile"
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(".") and source != "./models":  # ./models: the user's models
                assert (DEPLOY / source).exists(), f"{name}: {source}"
    # Prometheus scrapes the compose service on the port the server listens on.
    env = services["denoised"]["environment"]
    (job,) = load_yaml(PROM / "prometheus.yml")["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    assert target == f"denoised:{env['DENOISED_PORT']}"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    grace = int(services["denoised"]["stop_grace_period"].rstrip("s"))
    assert grace > float(env["DENOISED_DRAIN_SECONDS"])

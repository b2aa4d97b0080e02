"""A real Prometheus (Debian's) scrapes a real `denoised serve` on loopback with
deploy/prometheus's configuration and rules (rewritten to the test's ports and a 1 s interval),
and answers through its HTTP API: every exported series, recording rules with the traffic the
test sent, healthy rules, no alert, the dashboard's and the autoscaler's queries."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from deploy_helpers import (
    DEPLOY,
    exported_series,
    generate,
    load_yaml,
    require_tool,
    running_server,
)
from serving import free_port

pytestmark = pytest.mark.e2e
PROM = DEPLOY / "prometheus"
SAMPLERS = ("ddim", "euler", "dpmpp-2m")


@dataclass
class Stack:
    server: str
    prometheus: str
    model: dict
    workdir: Path

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def wait_ready(self, timeout: float = 60) -> None:
        """Prometheus answers queries with plain-text 503s until its storage is open."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.prometheus}/-/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"prometheus not ready after {timeout} s")

    def wait_for(self, expr: str, timeout: float = 60) -> list[dict]:
        """Poll until the query returns a non-empty result."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if result := self.query(expr):
                return result
            time.sleep(0.5)
        raise AssertionError(f"no result for {expr} after {timeout} s")


def write_test_config(workdir: Path, target: str) -> Path:
    """deploy/prometheus with the scrape target and the intervals changed, nothing else."""
    config = load_yaml(PROM / "prometheus.yml")
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    for name in config["rule_files"]:
        rules = load_yaml(PROM / name)
        for group in rules["groups"]:
            group["interval"] = "1s"
        (workdir / name).write_text(yaml.safe_dump(rules))
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    prometheus, promtool = require_tool("prometheus"), require_tool("promtool")
    workdir = tmp_path_factory.mktemp("prometheus")
    with running_server(workdir / "server.log", DENOISED_DRAIN_SECONDS="5") as server:
        config = write_test_config(workdir, server.removeprefix("http://"))
        check = subprocess.run(
            [promtool, "check", "config", str(config)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
        port = free_port()
        log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            (model,) = httpx.get(f"{server}/v1/models", timeout=10).json()["data"][:1]
            s = Stack(server, f"http://127.0.0.1:{port}", model, workdir)
            s.wait_ready()
            s.wait_for('up{job="denoised"} == 1')
            # Traffic after the first scrape (request series exist at zero from the start), so
            # rates over it are positive.
            generate(server, model, SAMPLERS[0], seed=0)
            s.wait_for('denoised_requests_total{status="ok"} > 0')
            for seed, sampler in enumerate(SAMPLERS, start=1):
                generate(server, model, sampler, seed)
            # Settled: every rule group has evaluated over the scraped traffic.
            s.wait_for(f"count(model_sampler:denoised_steps:rate1m > 0) == {len(SAMPLERS)}")
            s.wait_for("model:denoised_request_duration_seconds:p95_5m > 0")
            s.wait_for("model:denoised_batch_samples:mean5m > 0")
            yield s
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            log.close()


def test_every_exported_series_is_scraped(stack):
    result = stack.wait_for('denoised_images_total{job="denoised"} >= 4')
    assert result[0]["metric"]["model"] == stack.model["id"]
    names = {r["metric"]["__name__"] for r in stack.query('{__name__=~"denoised_.+"}')}
    expected = exported_series()
    served = httpx.get(f"{stack.server}/v1/models", timeout=10).json()["data"]
    if not any(m["conditioning"] == "text" for m in served):  # only text models have them
        expected -= {"denoised_prompt_cache_hits_total", "denoised_prompt_cache_misses_total"}
    assert expected <= names, expected - names


def test_recording_rules_see_the_traffic(stack):
    """Each condition holds once Prometheus has scraped the traffic and evaluated the rules."""
    m = f'model="{stack.model["id"]}"'
    stack.wait_for(f"model:denoised_images:rate1m{{{m}}} > 0")
    stack.wait_for(f'model_status:denoised_requests:rate1m{{status="ok",{m}}} > 0')
    stack.wait_for(f"0 < model:denoised_request_duration_seconds:p95_5m{{{m}}} < 120")
    stack.wait_for(f"model:denoised_batch_samples:mean5m{{{m}}} >= 1")
    stack.wait_for(f"model:denoised_request_errors:ratio_rate5m{{{m}}} == 0")
    stack.wait_for("job:denoised_ready_replicas:sum == 1")
    stack.wait_for(f"count(model_sampler:denoised_steps:rate1m{{{m}}} > 0) == {len(SAMPLERS)}")
    steps = stack.query(f"model_sampler:denoised_steps:rate1m{{{m}}} > 0")
    assert {r["metric"]["sampler"] for r in steps} == set(SAMPLERS)


def test_rules_evaluate_without_errors_and_no_alert_fires(stack):
    groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = [rule for group in groups for rule in group["rules"]]
    expected = [
        rule
        for name in ("rules.yml", "alerts.yml")
        for group in load_yaml(PROM / name)["groups"]
        for rule in group["rules"]
    ]
    assert len(loaded) == len(expected)
    for rule in loaded:
        assert rule["health"] == "ok", rule
    alerts = httpx.get(f"{stack.prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    assert alerts == []


def test_dashboard_queries_run(stack):
    dashboard = json.loads((DEPLOY / "grafana/dashboards/denoised.json").read_text())
    answered = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            answered[target["expr"]] = stack.query(target["expr"].replace("$model", ".*"))
    empty = [expr for expr, result in answered.items() if not result]
    assert not empty, empty


def test_autoscaler_query_gives_one_value_per_pod(stack):
    """Prometheus Adapter's metricsQuery with its template filled in as the adapter would."""
    (rule,) = load_yaml(DEPLOY / "k8s/prometheus-adapter-values.yaml")["rules"]["custom"]
    series = rule["seriesQuery"].split("{")[0]
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", 'job="denoised"')
        .replace("<<.GroupBy>>", "instance")
    )
    (result,) = stack.query(query)
    assert result["metric"] == {"instance": stack.server.removeprefix("http://")}
    assert float(result["value"][1]) == 0  # idle: nothing queued


def test_promtool_accepts_the_live_metrics(stack):
    text = httpx.get(f"{stack.server}/metrics", timeout=10).text
    assert "denoised_ready 1.0" in text
    check = subprocess.run(
        [require_tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr

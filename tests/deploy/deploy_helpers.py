"""What the deployment tests share: paths, external tools, a real server process,
and the metric names the server exports (read from its own registry, not from a list here)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from serving import free_port

from denoised.server.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SETUP_HINT = "run `bash deploy/ci-setup.sh` (as root) to install it"


def require_tool(name: str) -> str:
    """The tool's path. Missing: a failure in CI (its .ci/run installs it), a skip elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"`{name}` is not installed; {SETUP_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def load_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def exported_series() -> set[str]:
    """Every series name the server's metrics can expose (histogram _bucket/_sum/_count etc.)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    for family in Metrics().registry.collect():
        names.update(family.name + s for s in suffixes[family.type])
    return names


def promql_identifiers(expr: str) -> set[str]:
    """Metric and recording-rule names that a PromQL expression reads."""
    return set(re.findall(r"\b((?:[a-z_]+:)?denoised_[a-z_]+(?::[a-z0-9_]+)?)\b", expr))


def wait_until_ready(base_url: str, timeout: float, alive=lambda: True) -> dict:
    """Poll GET /ready until it answers 200; returns its body. `alive()` false stops early."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not alive():
            raise AssertionError(f"the server exited before it was ready (last /ready: {last})")
        try:
            r = httpx.get(f"{base_url}/ready", timeout=5)
            if r.status_code == 200:
                return r.json()
            last = f"{r.status_code} {r.text[:1000]}"
            if r.json().get("status") == "failed":  # loading the models failed: no retry helps
                break
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(1)
    raise AssertionError(f"/ready not 200 (last answer: {last})")


def generate(base_url: str, model: dict, sampler: str, seed: int) -> dict:
    """One small image through the OpenAI-style endpoint; returns the JSON body."""
    body = {"model": model["id"], "n": 1, "steps": 4, "sampler": sampler, "seed": seed}
    if model.get("classes"):
        body["prompt"] = model["classes"][seed % len(model["classes"])]
    r = httpx.post(f"{base_url}/v1/images/generations", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@contextmanager
def running_server(log_path: Path, **env: str) -> Iterator[str]:
    """`denoised serve` (the console script, default models) on a free loopback port; yields
    its base URL once /ready, and drains it with SIGTERM afterwards."""
    port = free_port()
    environ = {**os.environ, "DENOISED_HOST": "127.0.0.1", "DENOISED_PORT": str(port),
               "DENOISED_COMPILE": "0", **env}  # fmt: skip
    exe = Path(sys.executable).with_name("denoised")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(exe), "serve"], env=environ, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_ready(base, timeout=300, alive=lambda: proc.poll() is None)
        except AssertionError as exc:
            log_tail = log_path.read_text()[-4000:]
            raise AssertionError(f"{exc}\n--- server log ---\n{log_tail}") from None
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

"""The Docker image, built and run for real with podman (no Docker engine or image registry
here): built on the local Debian base (deploy/ci-setup.sh prepares it) from an offline
wheelhouse with this venv's torch and dependency versions, run as its non-root user with a
read-only root filesystem and host networking; it must become ready, generate an image through
the API, expose its metrics, serve its API docs without a CDN, pass its HEALTHCHECK and drain
on SIGTERM with exit code 0; and serve a model directory mounted at /models instead of the
defaults."""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from deploy_helpers import REPO, SETUP_HINT, generate, require_tool, wait_until_ready
from PIL import Image
from serving import free_port
from serving_helpers import metric_samples

from denoised.server.registry import default_model_dirs

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
PODMAN = "podman-local"
BASE_IMAGE = "localhost/debian-base:bookworm"
WHEELS = REPO / "deploy" / "docker" / "wheels"


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"podman {' '.join(args)}:\n{result.stderr[-4000:]}"
    return result


def require_podman() -> None:
    """Skip only where podman cannot run a container at all; a missing base image is a setup
    step left out (a failure in CI, whose .ci/run does it), as is a missing podman."""
    require_tool(PODMAN)
    try:
        podman("info", timeout=60)
    except (FileNotFoundError, AssertionError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"podman cannot run here ({str(exc)[:200]}); {SETUP_HINT}")
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        message = f"{BASE_IMAGE} is missing; {SETUP_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def fill_wheelhouse() -> None:
    """Wheels for torch, the runtime dependencies and the build backend, at the versions this
    venv has (so the image runs what the tests ran); wheels no longer needed are removed."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = pyproject["project"]["dependencies"] + pyproject["build-system"]["requires"]
    freeze = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    constraints = WHEELS / "constraints.txt"
    constraints.write_text(freeze)
    pip = [sys.executable, "-m", "pip", "download", "--only-binary", ":all:"]
    download = subprocess.run(
        [*pip, "--dest", str(WHEELS), "--constraint", str(constraints), *wanted],
        capture_output=True,
        text=True,
        timeout=900,
    )
    constraints.unlink()
    assert download.returncode == 0, download.stdout[-2000:] + download.stderr[-2000:]
    # pip names each wheel it saved or found (by an absolute or a relative path).
    found = re.findall(r"(?:Saved|File was already downloaded) (\S+\.whl)", download.stdout)
    used = {Path(path).name for path in found}
    assert used, f"no wheel in pip's output:\n{download.stdout[-2000:]}"
    for wheel in WHEELS.glob("*.whl"):
        if wheel.name not in used:
            wheel.unlink()


@pytest.fixture(scope="module")
def image():
    require_podman()
    tag = f"localhost/denoised:test-{uuid.uuid4().hex[:8]}"
    # One build at a time per checkout: the wheelhouse is shared.
    with open(WHEELS / "README.md") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fill_wheelhouse()
        podman(
            "build", "--network", "host", "--format", "docker",
            "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
            "--build-arg", "PIP_EXTRA_ARGS=--no-index",
            "--tag", tag, str(REPO),
            timeout=1500,
        )  # fmt: skip
    yield tag
    podman("untag", tag, check=False)  # the layers stay as the next build's cache


def test_image_configuration(image):
    (info,) = json.loads(podman("image", "inspect", image).stdout)
    config = info["Config"]
    assert config["User"] == "denoised"
    assert config["Entrypoint"] == ["denoised"] and config["Cmd"] == ["serve"]
    assert "/models" in config["Volumes"]
    assert "DENOISED_HOST=0.0.0.0" in config["Env"]
    assert any("/health" in part for part in info["Healthcheck"]["Test"])
    # Only the runtime: no compiler, no tests or sources beyond the installed package.
    listing = podman("run", "--rm", "--entrypoint", "sh", image, "-c",
                     "ls /; command -v gcc || true; ls /src 2>&1 || true").stdout  # fmt: skip
    assert "gcc" not in listing and "No such file" in listing


@contextmanager
def container(image: str, *run_args: str) -> Iterator[tuple[str, str, dict]]:
    """The image running detached with host networking on a free port, as deploy/k8s runs it
    (read-only root filesystem, a writable scratch $HOME); yields (name, base URL, /ready body)
    once ready. Removed afterwards."""
    port = free_port()
    name = f"denoised-test-{uuid.uuid4().hex[:8]}"
    base = f"http://127.0.0.1:{port}"
    podman(
        "run", "--detach", "--name", name, "--network", "host",
        "--read-only", "--tmpfs", "/home/denoised:rw,U",
        "--env", f"DENOISED_PORT={port}", "--env", "DENOISED_DRAIN_SECONDS=10",
        "--env", "DENOISED_COMPILE=0",  # minutes of compiling on the small CI machine
        *run_args, image,
    )  # fmt: skip
    try:
        running = lambda: podman("inspect", "-f", "{{.State.Running}}", name).stdout  # noqa: E731
        try:
            ready = wait_until_ready(base, timeout=300, alive=lambda: "true" in running())
        except AssertionError as exc:
            logs = podman("logs", name, check=False)
            raise AssertionError(f"{exc}\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}") from None
        yield name, base, ready
    finally:
        podman("rm", "--force", name, check=False)


def generate_png(base: str, model: dict) -> dict:
    """One image through the API; checks it is a non-constant PNG of the model's size."""
    body = generate(base, model, sampler=model["defaults"]["sampler"], seed=7)
    (item,) = body["data"]
    picture = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
    assert picture.format == "PNG"
    assert "x".join(map(str, picture.size)) == model["defaults"]["size"]
    assert any(lo < hi for lo, hi in picture.convert("RGB").getextrema()), "a constant image"
    return body


def test_container_serves_the_default_model(image):
    with container(image) as (name, base, ready):
        # The default command serves what `denoised serve` serves with no arguments.
        expected = [json.loads((d / "config.json").read_text()).get("name", d.name)
                    for d in default_model_dirs()]  # fmt: skip
        assert ready["models"] == expected
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]
        body = generate_png(base, model)

        samples = metric_samples(base)
        assert samples[("denoised_images_total", (("model", model["id"]),))] == 1
        assert samples[("denoised_ready", ())] == 1
        ok = (("model", model["id"]), ("sampler", body["sampler"]), ("status", "ok"))
        assert samples[("denoised_requests_total", ok)] == 1

        # The API docs page loads Swagger UI from the image's own files, not from a CDN.
        docs = httpx.get(f"{base}/docs", timeout=10)
        assert docs.status_code == 200, docs.text
        script = re.search(r'<script src="(/[^"]+)"', docs.text)
        assert script, docs.text
        assert httpx.get(base + script.group(1), timeout=10).status_code == 200

        # The image's HEALTHCHECK, run by podman inside the container.
        health = podman("healthcheck", "run", name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr
        assert podman("exec", name, "id", "-u").stdout.strip() != "0"

        # SIGTERM: the server drains and exits 0 well within the grace period.
        podman("stop", "--time", "30", name, timeout=60)
        exit_code = podman("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
        assert exit_code == "0", podman("logs", name, check=False).stderr[-3000:]


def test_container_serves_a_model_from_the_volume(image, tmp_path):
    """A model directory mounted at /models and named by DENOISED_MODELS replaces the default."""
    source = default_model_dirs()[0]
    mounted = tmp_path / "mine"
    shutil.copytree(source, mounted)
    config = json.loads((mounted / "config.json").read_text())
    (mounted / "config.json").write_text(json.dumps({**config, "name": "mounted-model"}))
    for path in (mounted, *mounted.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)  # readable by the image's user
    mount = ("--volume", f"{mounted}:/models/mine:ro", "--env", "DENOISED_MODELS=/models/mine")
    with container(image, *mount) as (_, base, ready):
        assert ready["models"] == ["mounted-model"]
        (model,) = httpx.get(f"{base}/v1/models", timeout=10).json()["data"]
        generate_png(base, model)

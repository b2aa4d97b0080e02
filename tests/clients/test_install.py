"""The client distribution installs and works without torch: its wheel asks for httpx only,
and in a fresh virtual environment that holds nothing but that wheel and httpx's own
dependencies it imports without pulling in torch, numpy or any server module, and generates
images from a real server.

Approach (fast, offline): build the wheel from a copy of clients/python with the project
venv's setuptools, create a venv with `--without-pip` (no torch, no site-packages), unpack
the wheel into a folder (what pip would install) and link httpx's dependency closure — found
from the installed metadata — next to it; the venv's python runs with that folder as its
PYTHONPATH."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

CLIENT_SOURCE = Path(__file__).resolve().parents[2] / "clients" / "python"
FORBIDDEN = ("torch", "numpy", "denoised", "fastapi", "pydantic", "PIL", "matplotlib", "yaml")

PROBE = """
import importlib.util, json, sys
absent = [name for name in ("torch", "numpy") if importlib.util.find_spec(name) is None]
import denoised_client, denoised_client.cli, denoised_client.bench.cli
from denoised_client.cli import main
loaded = sorted({m.split(".")[0] for m in sys.modules})
code = main(["--url", sys.argv[1], "generate", "--model", "tiny-dit", "--label", "4",
             "--steps", "3", "--no-progress", "-o", sys.argv[2]])
print(json.dumps({"absent": absent, "loaded": loaded, "code": code}))
"""


def dependency_closure(name: str, seen: dict | None = None) -> dict:
    """The installed distributions `name` needs (markers evaluated, no extras)."""
    seen = {} if seen is None else seen
    dist = importlib.metadata.distribution(name)
    key = dist.metadata["Name"].lower()
    if key not in seen:
        seen[key] = dist
        for raw in dist.requires or []:
            requirement = Requirement(raw)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                dependency_closure(requirement.name, seen)
    return seen


def build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    shutil.copytree(CLIENT_SOURCE, source, ignore=shutil.ignore_patterns("*.egg-info", "build",
                                                                        "__pycache__"))  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("denoised_client-*.whl")
    return wheel


def test_wheel_requires_httpx_only_and_runs_without_torch(server, tmp_path):
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        info = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(info).decode()
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
        site = tmp_path / "site"
        archive.extractall(site)
    requires = [Requirement(line.split(":", 1)[1].strip()) for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]  # fmt: skip
    core = [r.name for r in requires if r.marker is None]
    assert core == ["httpx"]
    assert {r.name for r in requires if r.marker is not None} == {"matplotlib", "pyyaml"}
    assert "denoised-client = denoised_client.cli:main" in entry_points
    assert "denoised-bench = denoised_client.bench.cli:main" in entry_points

    closure = dependency_closure("httpx")
    assert not set(closure) & {"torch", "numpy"}
    for dist in closure.values():
        tops = {f.parts[0] for f in dist.files or []}
        for top in tops - {"..", "__pycache__"}:
            if not top.endswith(".dist-info"):
                (site / top).symlink_to(Path(dist.locate_file(top)))

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, system_site_packages=False)
    python = env_dir / "bin" / "python"
    environment = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(site)}
    image = tmp_path / "four.png"
    probe = subprocess.run(
        [str(python), "-s", "-c", PROBE, server.url, str(image)],
        env=environment, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    assert report["absent"] == ["torch", "numpy"]  # the clean venv really has neither
    assert not set(report["loaded"]) & set(FORBIDDEN), report["loaded"]
    assert "httpx" in report["loaded"] and report["code"] == 0
    assert image.read_bytes().startswith(b"\x89PNG")

"""The client tests run against real `denoised serve` processes on loopback (the fixtures of
tests/serving.py); they share one default server rather than one per module."""

import json
import shutil

import pytest
from tiny_models import write_unnamed_dit

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="session")
def server(launch):
    """A server with default settings, shared by every client test."""
    return launch()


@pytest.fixture(scope="session")
def one_slot_server(launch_env):
    """One sample per forward and one waiting request: a third concurrent request gets 429.
    It also requires an API key (`k1`)."""
    return launch_env({"DENOISED_API_KEYS": "k1"}, "--max-batch", "1", "--max-queue", "1")


@pytest.fixture(scope="session")
def mixed_server(launch, model_dirs, tmp_path_factory):
    """Besides the two tiny models: `tiny-words`, tiny-flow with its classes named "zero" to
    "nine" (so a class id and a class name differ), and `broken`, whose truncated weights fail
    to load (requests for it get 503 without Retry-After), and `tiny-ids`, tiny-dit's weights
    without class names (it takes class ids). Readiness is not strict, so the server is ready
    with the others."""
    root = tmp_path_factory.mktemp("mixed-models")
    words, broken = root / "tiny-words", root / "broken"
    shutil.copytree(model_dirs[1], words)  # tiny-flow
    shutil.copytree(model_dirs[0], broken)  # tiny-dit
    for directory, extra in ((words, {"class_names": WORDS}), (broken, {})):
        config = json.loads((directory / "config.json").read_text())
        config.update(name=directory.name, **extra)
        (directory / "config.json").write_text(json.dumps(config))
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    ids = write_unnamed_dit(root)
    models = [arg for path in (words, broken, ids) for arg in ("--model", str(path))]
    return launch("--no-strict-readiness", *models)

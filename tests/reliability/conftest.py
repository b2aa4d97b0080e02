"""Reliability tests attack real `denoised serve` processes on loopback. They reuse the
end-to-end fixtures (`launch`, `model_dirs`: tiny model directories, a free port, wait for
/ready, SIGINT at the end) from tests/e2e/conftest.py, loaded under their own module name,
and its metric helpers."""

import importlib.util
import sys
from pathlib import Path

import pytest

_E2E = Path(__file__).resolve().parents[1] / "e2e"
sys.path.insert(0, str(_E2E))
_spec = importlib.util.spec_from_file_location("e2e_server_fixtures", _E2E / "conftest.py")
_e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_e2e)

model_dirs = _e2e.model_dirs
launch = _e2e.launch


@pytest.fixture(scope="session")
def launch_env(launch):
    """`launch_env({"DENOISED_X": "v"}, *flags)`: `launch` with extra environment variables."""

    def start(env: dict[str, str], *flags: str):
        with pytest.MonkeyPatch.context() as patch:
            for name, val in env.items():
                patch.setenv(name, val)
            return launch(*flags)

    return start

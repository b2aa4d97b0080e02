"""The client tests run against real `denoised serve` processes on loopback. They reuse the
end-to-end fixtures (`launch`, `model_dirs`: tiny model directories, a free port, wait for
/ready, SIGINT at the end) from tests/e2e/conftest.py, loaded under their own module name so
pytest's own `conftest` module of that folder is left alone."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "e2e_server_fixtures", Path(__file__).resolve().parents[1] / "e2e" / "conftest.py"
)
_e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_e2e)

model_dirs = _e2e.model_dirs
launch = _e2e.launch


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    return _e2e._free_port()


@pytest.fixture(scope="session")
def server(launch):
    """A server with default settings, shared by every client test."""
    return launch()


@pytest.fixture(scope="session")
def one_slot_server(launch):
    """One sample per forward and one waiting request: a third concurrent request gets 429.
    It also requires an API key (`k1`)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DENOISED_API_KEYS", "k1")
        return launch("--max-batch", "1", "--max-queue", "1")

"""The client tests run against real `denoised serve` processes on loopback (the fixtures of
tests/serving.py); they share one default server rather than one per module."""

import pytest


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

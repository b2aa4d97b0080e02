"""Real `denoised serve` processes on free loopback ports, serving tiny model directories.

A pytest plugin (registered in tests/conftest.py), so every test folder gets the same
fixtures: `model_dirs`, `launch(*flags, defaults=False)`, `launch_env(env, *flags)`,
`server`, `shipped` and `closed_port`. Servers run until the end of the session, then get SIGINT.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from tiny_models import write_tiny_models

READY_SECONDS = 90


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def free_port() -> int:
    """A loopback port nothing listened on a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> list[str]:
    dirs = write_tiny_models(tmp_path_factory.mktemp("e2e-models"))
    return [str(d) for d in dirs.values()]


@pytest.fixture(scope="session")
def launch(model_dirs, tmp_path_factory):
    """`launch(*flags)` starts a server with both tiny models (or, with `defaults=True`, with
    no model flags: the shipped defaults) and waits for /ready."""
    servers: list[Server] = []

    def start(*flags: str, defaults: bool = False) -> Server:
        port = free_port()
        args = [sys.executable, "-m", "denoised.server.cli", "serve", "--port", str(port)]
        for directory in [] if defaults else model_dirs:
            args += ["--model", directory]
        log = tmp_path_factory.mktemp("server") / "server.log"
        # The CI machine is small and shared: one thread, and no compile (minutes per server
        # there; tests/server/test_compiled.py covers the compiled path).
        env = {**os.environ, "DENOISED_THREADS": "1", "DENOISED_COMPILE": "0"}
        with open(log, "w") as out:
            process = subprocess.Popen(
                [*args, *flags], stdout=out, stderr=subprocess.STDOUT, env=env
            )
        server = Server(process, f"http://127.0.0.1:{port}", log)
        servers.append(server)
        deadline = time.monotonic() + READY_SECONDS
        while True:
            assert process.poll() is None, f"server exited early:\n{server.output()}"
            assert time.monotonic() < deadline, f"server not ready:\n{server.output()}"
            try:
                if httpx.get(server.url + "/ready", timeout=1).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGINT)
    for server in servers:
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()


@pytest.fixture(scope="session")
def launch_env(launch):
    """`launch_env({"DENOISED_X": "v"}, *flags)`: `launch` with extra environment variables."""

    def start(env: dict[str, str], *flags: str) -> Server:
        with pytest.MonkeyPatch.context() as patch:
            for name, val in env.items():
                patch.setenv(name, val)
            return launch(*flags)

    return start


@pytest.fixture(scope="session")
def shipped(launch) -> Server:
    """One server with the shipped defaults (no model flags: the zoo models)."""
    return launch(defaults=True)


@pytest.fixture(scope="module")
def server(launch) -> Server:
    """A server with default settings, one per test module (tests/clients shares one)."""
    return launch()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    return free_port()

"""Run the app under uvicorn with a graceful drain.

SIGTERM (or Ctrl-C) does not close the listening socket at once: admission stops (new
generation requests and /ready answer 503, so a load balancer moves away), admitted requests
finish (up to `drain_seconds`), then uvicorn shuts down and the process exits 0.
A second signal exits without waiting.
"""

from __future__ import annotations

import logging
import time

import uvicorn

from denoised.server.http.api import create_app
from denoised.server.http.middleware import RequestIdLogFilter
from denoised.server.lifecycle import ServerState
from denoised.server.settings import Settings

log = logging.getLogger("denoised.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, drain_seconds: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_seconds = drain_seconds
        self.drain_requested_at: float | None = None
        self._drain_begun = False

    def handle_exit(self, sig, frame) -> None:
        # Runs as a signal handler: only note the time; the drain starts on the next tick.
        # Not calling super() keeps uvicorn from re-raising the signal at exit (exit code 0).
        if self.drain_requested_at is None:
            self.drain_requested_at = time.monotonic()
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_requested_at is not None and not self.should_exit:
            if not self._drain_begun:
                log.info("draining: no new requests; waiting for admitted ones to finish")
                self.state.begin_drain()
                self._drain_begun = True
            waited = time.monotonic() - self.drain_requested_at
            if self.state.idle or waited > self.drain_seconds:
                if not self.state.idle:
                    log.warning("drain timeout (%.0f s): stopping with work in flight", waited)
                self.should_exit = True
        return await super().on_tick(counter)


KEEP_ALIVE_SECONDS = 75

# Every line, ours and uvicorn's (access lines included), names the request it belongs to.
LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": RequestIdLogFilter}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"}
    },
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["request_id"],
            "stream": "ext://sys.stderr",
        }
    },
    "loggers": {
        "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "uvicorn.access": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
    },
    "root": {"handlers": ["stderr"], "level": "INFO"},
}


def serve(settings: Settings) -> None:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=5,
        # Longer than clients' idle-connection expiry (httpx: 5 s, load balancers: ~60 s), so
        # a client never sends a request on a connection the server is closing at that moment.
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        log_config=LOG_CONFIG,
    )
    DrainingServer(config, app.state.server, settings.drain_seconds).run()

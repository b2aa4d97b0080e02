"""The server's life: loading (models load and warm up on a background thread while /health
already answers), ready, draining (SIGTERM: no new work, in-flight work finishes), stopped.
With strict readiness (the default) a server some of whose configured models failed to load
serves the others but does not report ready."""

from __future__ import annotations

import logging
import threading
from typing import Literal

import torch

from denoised.kernels.backends import set_backends
from denoised.server.device import resolve_device, settle_dtype
from denoised.server.engine.loop import Engine
from denoised.server.metrics import Metrics
from denoised.server.registry import ModelRegistry, default_model_dirs, load_registry
from denoised.server.settings import Settings

log = logging.getLogger("denoised.server")

ServerStatus = Literal["loading", "ready", "draining", "failed"]


class NotReady(RuntimeError):
    """No generation now: the models are loading or failed to, or the server is draining."""


class ServerState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.registry: ModelRegistry | None = None
        self.engine: Engine | None = None
        self.status: ServerStatus = "loading"
        self.error: str | None = None
        self._loader = threading.Thread(target=self._load, name="denoised-loader", daemon=True)

    def start(self) -> None:
        self._loader.start()

    def _load(self) -> None:
        try:
            if self.settings.threads:
                torch.set_num_threads(self.settings.threads)
            set_backends(self.settings.attention, self.settings.fused)
            device, dtype = resolve_device(self.settings)
            dirs = list(self.settings.models) or default_model_dirs()
            log.info("loading %s on %s (%s)", ", ".join(map(str, dirs)), device, dtype)
            registry = load_registry(dirs, device, dtype, self.settings.model_roots)
            for name, served in list(registry.models.items()):
                try:
                    settle_dtype(served.loaded, device, self.settings)
                except Exception as exc:  # its forward fails: warm-up would drop it too
                    log.exception("the dtype check of %s failed: not serving it", name)
                    registry.drop(name, f"dtype check failed: {type(exc).__name__}: {exc}")
            engine = Engine(registry, self.settings, self.metrics, device)
            if self.settings.warmup:
                engine.warm_up()
            engine.start()
        except Exception as exc:
            log.exception("loading the models failed")
            self.error = f"{type(exc).__name__}: {exc}"
            self.status = "failed"
            return
        self.registry, self.engine = registry, engine
        if self.status == "loading":
            self.status = "ready"
            self.metrics.ready.set(1 if self.ready else 0)
            if self.ready:
                log.info("ready: %s", ", ".join(registry.models))
            else:
                log.warning(
                    "not ready (strict readiness): %s failed to load; serving %s",
                    ", ".join(self.unavailable), ", ".join(registry.models),
                )  # fmt: skip
        else:  # a drain began while loading
            engine.drain()

    @property
    def unavailable(self) -> dict[str, str]:
        """Configured models that failed to load while others serve: directory name → why."""
        return self.registry.unavailable if self.registry else {}

    @property
    def ready(self) -> bool:
        """What /ready and `denoised_ready` report: serving and not draining, and with strict
        readiness every configured model loaded. Generation needs only `status == "ready"`."""
        return self.status == "ready" and not (self.settings.strict_readiness and self.unavailable)

    def ready_engine(self) -> tuple[Engine, ModelRegistry]:
        """The engine and models, or NotReady saying why there are none."""
        if self.status == "ready" and self.engine is not None and self.registry is not None:
            return self.engine, self.registry
        reasons = {
            "loading": "the models are still loading",
            "draining": "the server is shutting down",
            "failed": f"the models failed to load: {self.error}",
        }
        raise NotReady(reasons[self.status])

    def begin_drain(self) -> None:
        """Stop admitting (new generation requests and /ready answer 503)."""
        if self.status in ("loading", "ready"):
            self.status = "draining"
        self.metrics.ready.set(0)
        if self.engine is not None:
            self.engine.drain()

    @property
    def idle(self) -> bool:
        return self.engine is None or self.engine.idle

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()

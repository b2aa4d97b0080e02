"""Prometheus metrics. The names are a contract: deploy/ (Prometheus rules, Grafana) reads them.

Each `Metrics` owns its registry, so several servers (or tests) in one process don't collide.
`denoised_requests_total{status}` takes the values in `STATUSES`: ok, failed (500: an exception
or non-finite numerics), cancelled (client went away), timeout (504), rejected (429 queue full,
503 draining). Requests refused by validation (404, 422) are not counted there; every HTTP
response, those included, is counted in `denoised_http_responses_total{route, code}`.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# No `*_created` series: they would double the exposition, and no rule or dashboard reads them.
disable_created_metrics()

# Seconds: from tiny CPU models (tens of ms) to large guided GPU requests (minutes), up to the
# largest request timeout a server accepts (`max_timeout`, 600 s by default).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
FORWARD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STATUSES = ("ok", "failed", "cancelled", "timeout", "rejected")
UNMATCHED_ROUTE = "unmatched"  # the `route` label of requests to paths the API does not have


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "denoised_requests",
            "Generation requests by model, sampler and final status",
            ["model", "sampler", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "denoised_request_duration_seconds",
            "End-to-end request time, admission to encoded images",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "denoised_queue_wait_seconds",
            "Time from admission to the request's first backbone forward",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_step = Histogram(
            "denoised_time_to_first_step_seconds",
            "Time from admission until the request's first sampler step completed",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "denoised_queue_depth",
            "Admitted requests waiting for their first step",
            ["model"],
            registry=r,
        )
        self.active_requests = Gauge(
            "denoised_active_requests",
            "Requests that have started and not finished",
            ["model"],
            registry=r,
        )
        self.batch_samples = Histogram(
            "denoised_batch_samples",
            "Backbone rows per forward (a guided sample counts twice)",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "denoised_batch_requests",
            "Requests sharing one backbone forward",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.forward_seconds = Histogram(
            "denoised_forward_seconds",
            "Backbone forward + batched update, seconds per engine iteration",
            ["model"],
            buckets=FORWARD_BUCKETS,
            registry=r,
        )
        self.steps = Counter(
            "denoised_steps",
            "Model evaluations executed, counted per request (Heun: about two per step)",
            ["model", "sampler"],
            registry=r,
        )
        self.images = Counter(
            "denoised_images", "Images generated and returned", ["model"], registry=r
        )
        self.deadline_misses = Counter(
            "denoised_deadline_misses",
            "Requests that hit their timeout before finishing",
            ["model"],
            registry=r,
        )
        self.out_of_memory = Counter(
            "denoised_oom",
            "Backbone forwards that ran out of device memory (the batch is split and retried)",
            ["model"],
            registry=r,
        )
        self.prompt_cache_hits = Counter(
            "denoised_prompt_cache_hits",
            "Prompts of text models found encoded in the prompt-embedding cache",
            ["model"],
            registry=r,
        )
        self.prompt_cache_misses = Counter(
            "denoised_prompt_cache_misses",
            "Prompts of text models that had to be encoded",
            ["model"],
            registry=r,
        )
        self.batch_limit = Gauge(
            "denoised_batch_limit",
            "Most rows the engine now puts in one forward of the model: max_batch, lowered "
            "after running out of memory and probed back up",
            ["model"],
            registry=r,
        )
        self.device_memory = Gauge(
            "denoised_device_memory_bytes",
            "Memory in use on the device (CUDA: allocated by torch; CPU: process RSS)",
            ["device"],
            registry=r,
        )
        self.ready = Gauge(
            "denoised_ready",
            "1 when /ready answers 200: models loaded and warmed (with strict readiness, every "
            "configured model) and not draining",
            registry=r,
        )

        self.http_responses = Counter(
            "denoised_http_responses",
            "HTTP responses by route template (or 'unmatched') and status code",
            ["route", "code"],
            registry=r,
        )

    def register_text_model(self, model: str) -> None:
        """A text model's prompt-cache series, at zero."""
        for counter in (self.prompt_cache_hits, self.prompt_cache_misses):
            counter.labels(model=model)

    def register_model(self, model: str, samplers: tuple[str, ...]) -> None:
        """Create a model's series at zero, so dashboards see them before the first request."""
        for gauge in (self.queue_depth, self.active_requests):
            gauge.labels(model=model).set(0)
        for metric in (self.images, self.deadline_misses, self.out_of_memory):
            metric.labels(model=model)
        for sampler in samplers:
            self.steps.labels(model=model, sampler=sampler)
            # Rate rules see a status's first request only if its series already exists.
            for status in STATUSES:
                self.requests.labels(model=model, sampler=sampler, status=status)

    def watch_device_memory(self, device: str, read_bytes: Callable[[], float]) -> None:
        """`read_bytes` is called at scrape time."""
        self.device_memory.labels(device=device).set_function(read_bytes)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

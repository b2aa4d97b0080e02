"""The metric names and labels are a contract with deploy/ (Prometheus rules, Grafana)."""

from prometheus_client.parser import text_string_to_metric_families

from denoised.server.metrics import LATENCY_BUCKETS, Metrics
from denoised.server.settings import Settings

# CONTRACTS §6: family name → (type, label names)
CONTRACT = {
    "denoised_requests": ("counter", {"model", "sampler", "status"}),
    "denoised_request_duration_seconds": ("histogram", {"model"}),
    "denoised_queue_wait_seconds": ("histogram", {"model"}),
    "denoised_time_to_first_step_seconds": ("histogram", {"model"}),
    "denoised_queue_depth": ("gauge", {"model"}),
    "denoised_active_requests": ("gauge", {"model"}),
    "denoised_batch_samples": ("histogram", {"model"}),
    "denoised_batch_requests": ("histogram", {"model"}),
    "denoised_forward_seconds": ("histogram", {"model"}),
    "denoised_steps": ("counter", {"model", "sampler"}),
    "denoised_images": ("counter", {"model"}),
    "denoised_deadline_misses": ("counter", {"model"}),
    "denoised_oom": ("counter", {"model"}),
    "denoised_batch_limit": ("gauge", {"model"}),
    "denoised_device_memory_bytes": ("gauge", {"device"}),
    "denoised_ready": ("gauge", set()),
    "denoised_http_responses": ("counter", {"route", "code"}),
    "denoised_prompt_cache_hits": ("counter", {"model"}),
    "denoised_prompt_cache_misses": ("counter", {"model"}),
}


def test_exposition_has_exactly_the_contracted_families_and_labels():
    metrics = Metrics()
    metrics.register_model("m", ("ddim",))
    metrics.register_text_model("m")
    metrics.requests.labels(model="m", sampler="ddim", status="ok").inc()
    for histogram in (
        metrics.request_duration,
        metrics.queue_wait,
        metrics.time_to_first_step,
        metrics.batch_samples,
        metrics.batch_requests,
        metrics.forward_seconds,
    ):
        histogram.labels(model="m").observe(0.5)  # fmt: skip
    metrics.batch_limit.labels(model="m").set(64)
    metrics.watch_device_memory("cpu", lambda: 123.0)
    metrics.ready.set(1)
    metrics.http_responses.labels(route="/v1/generate", code="422").inc()
    text = metrics.render()[0].decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == set(CONTRACT)
    for name, (kind, labels) in CONTRACT.items():
        family = families[name]
        assert family.type == kind, name
        own = {key for sample in family.samples for key in sample.labels}
        assert own - {"le"} == labels, name
    memory = [s.value for s in families["denoised_device_memory_bytes"].samples]
    assert memory == [123.0]
    steps = families["denoised_steps"].samples[0]
    assert (steps.name, steps.value) == ("denoised_steps_total", 0.0)  # exists before use
    oom = families["denoised_oom"].samples[0]
    assert (oom.name, oom.value) == ("denoised_oom_total", 0.0)


def test_latency_buckets_reach_the_longest_request_timeout():
    """A request may run up to `max_timeout`: its duration must land in a finite bucket."""
    assert LATENCY_BUCKETS[-1] >= Settings().max_timeout
    metrics = Metrics()
    metrics.request_duration.labels(model="m").observe(0.9 * Settings().max_timeout)
    families = text_string_to_metric_families(metrics.render()[0].decode())
    buckets = next(f for f in families if f.name == "denoised_request_duration_seconds").samples
    finite = [s for s in buckets if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]
    assert finite[-1].value == 1  # counted below +Inf

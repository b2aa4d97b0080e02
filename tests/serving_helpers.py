"""Reading a live server's /metrics (with prometheus_client's own parser), event streams and
npy images, and waiting."""

import base64
import io
import json
import time

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families


def metric_samples(url: str) -> dict:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    text = httpx.get(url + "/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def admitted(url: str, models: tuple[str, ...] = ("tiny-dit", "tiny-flow")) -> float:
    """Requests admitted and not finished (running or waiting) on a live server."""
    samples = metric_samples(url)
    gauges = ("denoised_active_requests", "denoised_queue_depth")
    return sum(value(samples, gauge, model=model) for gauge in gauges for model in models)


def wait_for(condition, seconds: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def read_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """The (event name, JSON data) pairs of a Server-Sent Events response."""
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def npy_images(body: dict, key: str = "data") -> list[np.ndarray]:
    """The `output_format: npy` images of a JSON generation response (`data` or `images`)."""
    return [np.load(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in body[key]]

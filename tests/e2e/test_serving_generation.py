"""Generation over real HTTP against a real server: both endpoints, a concurrent mixed load
that shares forwards, batch invariance, the SSE event sequence, and the metrics."""

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image
from serving_helpers import metric_samples, read_events, value

pytestmark = pytest.mark.e2e


def decode_all(body: dict, key: str, fmt: str) -> list:
    files = [base64.b64decode(item["b64_json"]) for item in body[key]]
    if fmt == "npy":
        return [np.load(io.BytesIO(f)) for f in files]
    images = [Image.open(io.BytesIO(f)) for f in files]
    assert all(image.format == fmt.upper() for image in images)
    return images


def test_openai_endpoint_returns_n_decodable_images_of_the_size(server):
    body = {"model": "tiny-dit", "prompt": "3", "n": 2, "size": "8x8", "steps": 4, "seed": 5}
    response = httpx.post(server.url + "/v1/images/generations", json=body, timeout=60)
    assert response.status_code == 200, response.text
    data = response.json()
    assert isinstance(data["created"], int) and data["seed"] == 5 and data["label"] == "3"
    images = decode_all(data, "data", "png")
    assert [image.size for image in images] == [(8, 8), (8, 8)]


@pytest.mark.parametrize("fmt", ["webp", "npy"])
def test_native_endpoint_returns_n_decodable_images(server, fmt):
    body = {"model": "tiny-flow", "label": 7, "n": 3, "steps": 4, "output_format": fmt}
    response = httpx.post(server.url + "/v1/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["model"] == "tiny-flow" and data["sampler"] == "euler"  # the flow default
    assert data["timings"]["total_seconds"] >= data["timings"]["queue_seconds"] >= 0
    images = decode_all(data, "images", fmt)
    assert len(images) == 3
    for image in images:
        assert (image.shape[:2] if fmt == "npy" else image.size) == (8, 8)


def mixed_load() -> list[dict]:
    """24 requests: 3 samplers × 2 step counts × guided/unguided × 2 models."""
    bodies = []
    for i, sampler in enumerate(["dpmpp-2m", "ddim", "heun"]):
        for steps in (4, 9):
            for scale in (1.0, 3.0):
                for model in ("tiny-dit", "tiny-flow"):
                    bodies.append(
                        {"model": model, "label": str(i), "sampler": sampler, "steps": steps,
                         "guidance_scale": scale, "seed": len(bodies)}
                    )  # fmt: skip
    return bodies


async def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/generate", json=b) for b in bodies))


def test_24_concurrent_mixed_requests_complete_and_share_forwards(server):
    before = metric_samples(server.url)
    bodies = mixed_load()
    responses = asyncio.run(post_all(server.url, bodies))
    assert [r.status_code for r in responses] == [200] * 24
    for body, response in zip(bodies, responses, strict=True):
        data = response.json()
        assert (data["sampler"], data["steps"], data["seed"]) == (
            body["sampler"], body["steps"], body["seed"],
        )  # fmt: skip
        assert len(data["images"]) == 1
    after = metric_samples(server.url)
    for model in ("tiny-dit", "tiny-flow"):
        requests = value(after, "denoised_batch_requests_sum", model=model) - value(
            before, "denoised_batch_requests_sum", model=model
        )
        forwards = value(after, "denoised_batch_requests_count", model=model) - value(
            before, "denoised_batch_requests_count", model=model
        )
        single = value(after, "denoised_batch_requests_bucket", model=model, le="1.0") - value(
            before, "denoised_batch_requests_bucket", model=model, le="1.0"
        )
        assert forwards > 0 and requests / forwards > 1.0
        assert forwards - single > 0  # some forwards held more than one request


def test_same_seed_same_image_alone_or_among_others(server):
    probe = {"model": "tiny-dit", "label": "4", "sampler": "dpmpp-2m-sde", "steps": 6,
             "guidance_scale": 2.0, "seed": 1234, "output_format": "npy"}  # fmt: skip
    alone = asyncio.run(post_all(server.url, [probe]))[0].json()
    crowd = [dict(b, output_format="npy") for b in mixed_load()[:10]]
    together = asyncio.run(post_all(server.url, [*crowd[:5], probe, *crowd[5:]]))[5].json()
    a = decode_all(alone, "images", "npy")[0]
    b = decode_all(together, "images", "npy")[0]
    assert a.shape == (8, 8, 1)
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)


def test_sse_sends_progress_per_evaluation_then_completed(server):
    body = {"label": "6", "sampler": "heun", "steps": 4, "stream": True, "preview": True}
    with httpx.stream("POST", server.url + "/v1/generate", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)
    names = [name for name, _ in events]
    total = events[0][1]["total"]
    assert total == 2 * 4 - 1  # Heun: two evaluations per step, one on the last
    assert names == ["progress"] * total + ["completed"]
    assert [data["step"] for _, data in events[:-1]] == list(range(1, total + 1))
    preview = Image.open(io.BytesIO(base64.b64decode(events[0][1]["preview"])))
    assert preview.size == (8, 8)
    completed = events[-1][1]
    assert completed["nfe"] == total and len(completed["images"]) == 1
    assert completed["id"] == events[0][1]["id"]


def test_sse_on_the_openai_endpoint_completes_in_its_shape(server):
    body = {"prompt": "1", "steps": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/images/generations", json=body, timeout=60) as r:
        events = read_events(r)
    assert [name for name, _ in events] == ["image_generation.completed"]  # no previews asked
    assert events[0][1]["type"] == "image_generation.completed" and events[0][1]["b64_json"]


def test_metrics_parse_and_counters_move(server):
    before = metric_samples(server.url)
    body = {"model": "tiny-dit", "label": "2", "n": 2, "sampler": "ddim", "steps": 5}
    assert httpx.post(server.url + "/v1/generate", json=body, timeout=60).status_code == 200
    after = metric_samples(server.url)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("denoised_requests_total", model="tiny-dit", sampler="ddim", status="ok") == 1
    assert moved("denoised_images_total", model="tiny-dit") == 2
    assert moved("denoised_steps_total", model="tiny-dit", sampler="ddim") == 5
    assert moved("denoised_request_duration_seconds_count", model="tiny-dit") == 1
    assert moved("denoised_queue_wait_seconds_count", model="tiny-dit") == 1
    assert moved("denoised_time_to_first_step_seconds_count", model="tiny-dit") == 1
    assert moved("denoised_forward_seconds_count", model="tiny-dit") >= 5
    assert value(after, "denoised_ready") == 1
    assert value(after, "denoised_queue_depth", model="tiny-dit") == 0
    assert value(after, "denoised_device_memory_bytes", device="cpu") > 0

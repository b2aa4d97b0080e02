"""Admission and lifecycle against a real server: 429 on a full queue, a disconnecting client
freeing its slot, and a SIGTERM drain that loses no accepted request."""

import asyncio
import signal

import httpx
import pytest
from serving_helpers import admitted, metric_samples, value, wait_for

pytestmark = pytest.mark.e2e

# Heun: 1999 evaluations, seconds of work even for the tiny model.
LONG = {"model": "tiny-dit", "sampler": "heun", "steps": 1000, "seed": 0}


@pytest.fixture(scope="module")
def one_slot(launch):
    """One sample per forward and one waiting request at most."""
    return launch("--max-batch", "1", "--max-queue", "1")


def test_a_full_queue_answers_429_with_retry_after(one_slot):
    async def burst():
        async with httpx.AsyncClient(base_url=one_slot.url, timeout=120) as client:
            body = {"model": "tiny-dit", "steps": 200}
            return await asyncio.gather(*(client.post("/v1/generate", json=body) for _ in range(8)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 429}
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["type"] == "rate_limited"
    rejected = value(
        metric_samples(one_slot.url), "denoised_requests_total",
        model="tiny-dit", sampler="dpmpp-2m", status="rejected",
    )  # fmt: skip
    assert rejected == codes.count(429)


def test_a_client_that_disconnects_frees_its_slot(one_slot):
    def heun_steps():
        return value(metric_samples(one_slot.url), "denoised_steps_total",
                     model="tiny-dit", sampler="heun")  # fmt: skip

    start = heun_steps()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(one_slot.url + "/v1/generate", json=LONG, timeout=0.5)

    def cancelled():
        samples = metric_samples(one_slot.url)
        return value(samples, "denoised_requests_total", model="tiny-dit", sampler="heun",
                     status="cancelled") == 1  # fmt: skip

    wait_for(cancelled, what="the cancellation")
    stopped_at = heun_steps()
    assert 0 < stopped_at - start < 1999  # it ran, then stopped early
    # The single slot is free: a short request goes straight through.
    quick = httpx.post(one_slot.url + "/v1/generate", json={"steps": 3}, timeout=30)
    assert quick.status_code == 200
    assert heun_steps() == stopped_at
    assert value(metric_samples(one_slot.url), "denoised_active_requests", model="tiny-dit") == 0


def test_closing_a_stream_cancels_its_request(one_slot):
    def cancelled():
        return value(metric_samples(one_slot.url), "denoised_requests_total", model="tiny-flow",
                     sampler="heun", status="cancelled")  # fmt: skip

    body = dict(LONG, model="tiny-flow", stream=True)
    with httpx.stream("POST", one_slot.url + "/v1/generate", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines) == "event: progress"  # it runs; now the client hangs up
    wait_for(lambda: cancelled() == 1, what="the cancellation")
    assert value(metric_samples(one_slot.url), "denoised_active_requests", model="tiny-flow") == 0


def test_sigterm_drains_admitted_requests_then_exits_0(launch):
    server = launch("--drain-seconds", "60")
    bodies = [dict(LONG, steps=100, seed=i, model=m) for i, m in
              enumerate(["tiny-dit", "tiny-flow", "tiny-dit", "tiny-flow"])]  # fmt: skip

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            tasks = [asyncio.create_task(client.post("/v1/generate", json=b)) for b in bodies]
            await asyncio.to_thread(
                wait_for, lambda: admitted(server.url) == len(bodies), 30, "admission"
            )
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)  # the drain starts on the server's next tick (0.1 s)
            late = await client.post("/v1/generate", json={"steps": 2})
            ready = await client.get("/ready")
            return await asyncio.gather(*tasks), late, ready

    responses, late, ready = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * len(bodies)
    assert all(len(r.json()["images"]) == 1 for r in responses)
    assert late.status_code == 503 and late.json()["error"]["type"] == "unavailable"
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert server.process.wait(timeout=30) == 0

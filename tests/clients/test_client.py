"""The Python client against a real server on loopback: both endpoints, sync and async,
streaming, raw files (`response_format="bytes"`), typed errors, and retries on a real 429."""

import asyncio
import io
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from denoised_client import (
    NO_RETRY,
    APIConnectionError,
    AsyncClient,
    AuthenticationError,
    Client,
    DeadlineExceededError,
    GenerationRequest,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    RetryPolicy,
    ServiceUnavailableError,
)


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url, retry=NO_RETRY) as client:
        yield client


def pixels(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_models_health_and_readiness(client):
    assert client.health()
    readiness = client.ready()
    assert readiness.ready and readiness.status == "ready"
    models = {m.id: m for m in client.models()}
    assert set(models) == set(readiness.models) == {"tiny-dit", "tiny-flow"}
    flow = client.model("tiny-flow")
    assert flow == models["tiny-flow"]
    assert flow.process == "flow" and flow.classes == [str(i) for i in range(10)]
    assert flow.defaults.sampler in flow.samplers and flow.sizes == ["8x8"]


def test_both_endpoints_give_the_same_images_for_the_same_seed(client, tmp_path):
    fields = {"model": "tiny-dit", "n": 2, "sampler": "dpmpp-2m", "steps": 6, "seed": 11}
    native = client.generate("3", guidance_scale=2.0, **fields)
    openai = client.generate_images("3", guidance_scale=2.0, **fields)
    for result in (native, openai):
        assert (result.model, result.label, result.seed, result.steps) == ("tiny-dit", "3", 11, 6)
        assert result.guidance_scale == 2.0 and result.nfe == 6 and result.size == "8x8"
        assert [image.index for image in result.images] == [0, 1]
    assert [i.data for i in native.images] == [i.data for i in openai.images]
    assert native.images[0].data != native.images[1].data
    assert native.timings.total_seconds >= native.timings.queue_seconds >= 0
    assert openai.timings is None
    paths = native.save(tmp_path / "three.png")
    assert [p.name for p in paths] == ["three-0.png", "three-1.png"]
    assert pixels(paths[1].read_bytes()).size == (8, 8)
    assert paths[1].read_bytes() == native.images[1].data


def test_a_class_id_and_npy_output(client):
    result = client.generate(7, model="tiny-flow", steps=3, seed=1, output_format="npy")
    assert result.label == "7" and result.output_format == "npy"
    assert result.images[0].data.startswith(b"\x93NUMPY")


def test_async_client_matches_the_sync_one(client, server):
    fields = {"model": "tiny-flow", "sampler": "euler", "steps": 5}
    expected = [client.generate("4", seed=s, **fields).images[0].data for s in range(4)]

    async def run():
        async with AsyncClient(server.url) as aclient:
            results = await asyncio.gather(
                *(aclient.generate("4", seed=s, **fields) for s in range(4))
            )
            models = await aclient.models()
            return results, models, await aclient.health()

    results, models, healthy = asyncio.run(run())
    assert [r.images[0].data for r in results] == expected
    assert healthy and {m.id for m in models} == {"tiny-dit", "tiny-flow"}


def test_bytes_are_the_json_image_with_its_seed_model_and_id(client, tmp_path):
    fields = {"model": "tiny-dit", "sampler": "dpmpp-2m", "steps": 4, "guidance_scale": 2.0}
    native = client.generate_bytes("3", seed=21, **fields)
    openai = client.generate_bytes("3", endpoint="images", seed=21, **fields)
    for file in (native, openai):
        assert (file.content_type, file.format) == ("image/png", "png")
        assert (file.model, file.seed) == ("tiny-dit", 21) and file.id.startswith("req_")
    assert native.id != openai.id
    image = pixels(native.data)
    assert image.format == "PNG" and image.size == (8, 8)
    assert native.data == openai.data == client.generate("3", seed=21, **fields).images[0].data
    assert native.save(tmp_path / "three.png").read_bytes() == native.data

    drawn = client.generate_bytes("5", model="tiny-flow", steps=3, output_format="webp")
    assert drawn.content_type == "image/webp" and pixels(drawn.data).format == "WEBP"
    again = client.generate("5", model="tiny-flow", steps=3, output_format="webp", seed=drawn.seed)
    assert again.images[0].data == drawn.data  # the reported seed reproduces the image


def test_bytes_of_several_npy_images_are_one_stacked_array(client):
    fields = {"model": "tiny-flow", "n": 3, "steps": 3, "seed": 4, "output_format": "npy"}
    file = client.generate_bytes(7, **fields)
    assert (file.content_type, file.format) == ("application/x-npy", "npy")
    stacked = np.load(io.BytesIO(file.data), allow_pickle=False)
    assert stacked.shape == (3, 8, 8, 1) and stacked.dtype == np.float32
    images = client.generate(7, **fields).images
    each = [np.load(io.BytesIO(image.data), allow_pickle=False) for image in images]
    np.testing.assert_array_equal(stacked, np.stack(each))


def test_bytes_errors_are_the_typed_errors_of_json_requests(client):
    with pytest.raises(NotFoundError) as as_json:
        client.generate("3", model="sdxl")
    with pytest.raises(NotFoundError) as as_bytes:
        client.generate_bytes("3", model="sdxl")
    fields = ("status", "type", "param", "message", "retry_after")
    assert [getattr(as_bytes.value, f) for f in fields] == [
        getattr(as_json.value, f) for f in fields
    ]
    assert as_bytes.value.param == "model" and as_bytes.value.request_id.startswith("req_")

    with pytest.raises(InvalidRequestError) as several:  # one file: n=1 unless npy
        client.generate_bytes("3", n=2)
    assert several.value.param == "response_format" and "npy" in several.value.message
    with pytest.raises(TypeError):
        client.generate_bytes("3", on_progress=print)  # a file has no progress events


def test_async_bytes_match_the_sync_ones(client, server):
    fields = {"model": "tiny-dit", "sampler": "ddim", "steps": 3}
    expected = [client.generate_bytes("6", seed=s, **fields).data for s in range(3)]

    async def run():
        async with AsyncClient(server.url, retry=NO_RETRY) as aclient:
            files = await asyncio.gather(
                *(aclient.generate_bytes("6", seed=s, **fields) for s in range(3))
            )
            with pytest.raises(NotFoundError) as missing:
                await aclient.generate_bytes("6", model="sdxl")
            return files, missing.value

    files, missing = asyncio.run(run())
    assert [f.data for f in files] == expected and [f.seed for f in files] == [0, 1, 2]
    assert missing.status == 404 and missing.param == "model"


def test_stream_yields_every_step_then_the_result(client):
    request = GenerationRequest(label="5", model="tiny-dit", sampler="heun", steps=4, seed=3)
    plain = client.create(request)
    with client.open_stream(request, preview=True) as stream:
        events = list(stream)
    result = stream.result
    assert [e.step for e in events] == list(range(1, result.nfe + 1))
    assert {e.total for e in events} == {result.nfe} and result.nfe > result.steps  # Heun
    assert {e.id for e in events} == {result.id}
    assert all(pixels(e.preview).size[0] <= 8 for e in events)
    assert result.images[0].data == plain.images[0].data  # streaming changes nothing

    seen = []
    result = client.generate("5", model="tiny-dit", steps=3, seed=3, on_progress=seen.append)
    assert [e.fraction for e in seen] == [1 / 3, 2 / 3, 1.0] and result.steps == 3


def test_openai_shaped_streams_give_partial_images_and_every_image(client, server):
    """That endpoint streams OpenAI's image events: steps come as partial images (with
    previews only), the result from one completed event per image."""
    fields = {"model": "tiny-flow", "n": 2, "sampler": "euler", "steps": 3, "seed": 6}
    plain = client.generate_images("4", **fields)
    with client.stream("4", endpoint="images", preview=True, **fields) as stream:
        events = list(stream)
    assert [(e.step, e.total) for e in events] == [(1, 3), (2, 3), (3, 3)]
    assert {e.id for e in events} == {stream.result.id}
    assert all(pixels(e.preview).size[0] <= 8 for e in events)

    async def without_previews():
        async with (
            AsyncClient(server.url) as aclient,
            aclient.stream("4", endpoint="images", **fields) as quiet,
        ):
            return [event async for event in quiet], quiet.result

    quiet_events, quiet_result = asyncio.run(without_previews())
    assert quiet_events == []
    for result in (stream.result, quiet_result):
        assert [i.index for i in result.images] == [0, 1]
        assert [i.data for i in result.images] == [i.data for i in plain.images]
        assert (result.model, result.label, result.seed, result.nfe) == ("tiny-flow", "4", 6, 3)


def test_async_stream(server):
    async def run():
        async with AsyncClient(server.url) as aclient:
            async with aclient.stream("2", model="tiny-flow", steps=4, seed=0) as stream:
                steps = [event.step async for event in stream]
            return steps, stream.result

    steps, result = asyncio.run(run())
    assert steps == [1, 2, 3, 4] and result.nfe == 4 and result.seed == 0


def test_errors_are_typed_and_carry_the_server_fields(client):
    with pytest.raises(NotFoundError) as missing:
        client.generate(model="sdxl")
    assert missing.value.status == 404 and missing.value.param == "model"
    assert "tiny-dit" in missing.value.message and missing.value.request_id.startswith("req_")

    with pytest.raises(InvalidRequestError) as invalid:
        client.generate_images("cat", model="tiny-dit")
    assert invalid.value.param == "prompt" and "'9'" in invalid.value.message

    with pytest.raises(InvalidRequestError) as bad_option:
        client.generate(sampler="ddim", sampler_options={"etta": 1.0})
    assert bad_option.value.param == "sampler_options.etta" and "eta" in str(bad_option.value)

    with pytest.raises(InvalidRequestError):  # before the stream starts
        client.stream(steps=0).until_done()

    with pytest.raises(ValueError, match="endpoint"):
        client.create(GenerationRequest(), endpoint="edits")
    with pytest.raises(TypeError):
        client.generate(colour="red")


def test_deadline_is_a_504_plain_and_inside_a_stream(client):
    with pytest.raises(DeadlineExceededError) as plain:
        client.generate(model="tiny-dit", steps=1000, timeout=0.05)
    assert plain.value.status == 504
    with pytest.raises(DeadlineExceededError):  # arrives as an `error` event
        client.stream(model="tiny-dit", steps=1000, timeout=0.05).until_done()


def test_unreachable_server_is_a_connection_error_after_retries(closed_port, caplog):
    retry = RetryPolicy(max_retries=2, backoff=0.01)
    url = f"http://127.0.0.1:{closed_port}"
    with Client(url, retry=retry) as dead, caplog.at_level(logging.INFO):
        with pytest.raises(APIConnectionError) as error:
            dead.models()
        assert not dead.health()  # not retried
    assert error.value.request_sent is False
    assert len([r for r in caplog.records if "retry" in r.message]) == 2


def test_bytes_requests_are_retried_like_json_ones(closed_port, caplog):
    retry = RetryPolicy(max_retries=2, backoff=0.01)
    url = f"http://127.0.0.1:{closed_port}"

    async def async_bytes():
        async with AsyncClient(url, retry=retry) as dead:
            await dead.generate_bytes("3")

    with Client(url, retry=retry) as dead, caplog.at_level(logging.INFO):
        with pytest.raises(APIConnectionError) as plain:
            dead.generate_bytes("3")
        with pytest.raises(APIConnectionError) as awaited:
            asyncio.run(async_bytes())
    assert plain.value.request_sent is False and awaited.value.request_sent is False
    retries = [r for r in caplog.records if "retry" in r.message]
    assert len(retries) == 4 and all("POST /v1/generate" in r.message for r in retries)


def test_api_key(one_slot_server):
    with Client(one_slot_server.url, retry=NO_RETRY) as anonymous:
        with pytest.raises(AuthenticationError) as denied:
            anonymous.models()
        assert denied.value.status == 401
    with Client(one_slot_server.url, api_key="k1") as keyed:
        assert [m.id for m in keyed.models()] == ["tiny-dit", "tiny-flow"]


def rejected_count(url: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": "Bearer k1"}).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("denoised_requests_total") and 'status="rejected"' in line
    )


def test_retry_on_a_real_429_honours_retry_after(one_slot_server, caplog):
    """One request runs (one sample per forward), one waits (queue of one): a third is
    refused with 429 until the first finishes; the retrying client gets through."""
    url = one_slot_server.url
    long = GenerationRequest(label="1", model="tiny-dit", steps=400)
    with Client(url, api_key="k1", retry=NO_RETRY) as plain:
        running = plain.open_stream(long).__enter__()
        next(iter(running))  # the first request has started
        waiting = plain.open_stream(long).__enter__()  # admitted: it waits in the queue
        rejected_before = rejected_count(url)
        with pytest.raises(RateLimitError) as refused:
            plain.generate("2", model="tiny-dit", steps=2)
        assert refused.value.status == 429 and refused.value.retry_after >= 1
        with ThreadPoolExecutor(2) as pool:  # keep both streams read while we retry
            drained = [pool.submit(s.until_done) for s in (running, waiting)]
            retry = RetryPolicy(max_retries=20, max_retry_after=30)
            with Client(url, api_key="k1", retry=retry) as patient, caplog.at_level(logging.INFO):
                started = time.monotonic()
                result = patient.generate("2", model="tiny-dit", steps=2, seed=5)
                waited = time.monotonic() - started
            assert all(f.result().steps == 400 for f in drained)
    retries = [r for r in caplog.records if "429" in r.message and "retry" in r.message]
    assert result.label == "2" and result.seed == 5
    assert len(retries) >= 1
    assert waited >= len(retries) * 1.0  # Retry-After is whole seconds, at least 1
    assert rejected_count(url) - rejected_before == len(retries) + 1  # the server saw each try


def test_a_model_that_failed_to_load_is_not_retried(mixed_server, caplog):
    """Its 503 carries no Retry-After: retrying cannot help, so neither client does."""
    retry = RetryPolicy(max_retries=3, backoff=0.01)

    async def awaited():
        async with AsyncClient(mixed_server.url, retry=retry) as client:
            await client.generate(model="broken", steps=2)

    with Client(mixed_server.url, retry=retry) as client, caplog.at_level(logging.INFO):
        with pytest.raises(ServiceUnavailableError) as plain:
            client.generate(model="broken", steps=2)
        with pytest.raises(ServiceUnavailableError) as in_async:
            asyncio.run(awaited())
        assert client.generate(model="tiny-words", steps=2).label is None  # the rest serve
    for error in (plain.value, in_async.value):
        assert error.retry_after is None and error.param == "model"
        assert "failed to load" in error.message
    assert not [r for r in caplog.records if "retry" in r.message]


def test_a_draining_server_answers_503_with_retry_after(launch):
    """While it drains, the server refuses new work with Retry-After: 5, which the client's
    policy waits (another replica may take the retry)."""
    server = launch()
    with Client(server.url, retry=NO_RETRY) as client:
        running = client.open_stream(GenerationRequest(model="tiny-dit", steps=300))
        next(iter(running))  # admitted and started: the drain waits for it
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while client.ready().status != "draining":
            assert time.monotonic() < deadline, "the server did not start draining"
            time.sleep(0.02)
        with pytest.raises(ServiceUnavailableError) as draining:
            client.generate(model="tiny-dit", steps=2)
        assert draining.value.retry_after == 5
        assert RetryPolicy().delay(0, draining.value) == 5
        assert running.until_done().steps == 300
    assert server.process.wait(timeout=30) == 0

"""The pieces of the client with no I/O: retry decisions, Retry-After parsing, error mapping,
the Server-Sent Events parser, and request bodies."""

import email.utils
import json
import time

import httpx
import pytest

from denoised_client import (
    APIConnectionError,
    APITimeoutError,
    GenerationRequest,
    InternalServerError,
    InvalidRequestError,
    RateLimitError,
    RetryPolicy,
    ServiceUnavailableError,
    StreamError,
)
from denoised_client._core import EventParser, transport_error
from denoised_client.errors import APIStatusError, error_from_body, parse_retry_after


def rate_limited(retry_after: float | None) -> RateLimitError:
    return RateLimitError("full", status=429, retry_after=retry_after)


def test_retry_after_is_honoured_as_given_and_too_long_gives_up():
    policy = RetryPolicy(max_retries=3, max_retry_after=10)
    assert policy.delay(0, rate_limited(7)) == 7
    assert policy.delay(2, rate_limited(0)) == 0
    assert policy.delay(0, rate_limited(11)) is None
    assert policy.delay(3, rate_limited(1)) is None  # retries used up


def test_backoff_doubles_with_jitter_and_is_capped():
    policy = RetryPolicy(max_retries=10, backoff=0.5, max_backoff=3.0)
    refused = transport_error(httpx.ConnectError("refused"))
    for attempt in range(10):
        bound = min(3.0, 0.5 * 2**attempt)
        delays = [policy.delay(attempt, refused) for _ in range(200)]
        assert all(bound / 2 <= d <= bound for d in delays)
        assert max(delays) - min(delays) > bound / 10  # jittered, not fixed


def test_429_and_503_are_retried_only_with_retry_after():
    """The server sends Retry-After when it did not admit a request for now (queue full,
    loading, draining); a 503 without it is a model that failed to load: final."""
    policy = RetryPolicy(max_retries=3, backoff=0.5)
    draining = ServiceUnavailableError("shutting down", status=503, retry_after=5)
    assert policy.delay(0, draining) == 5 and policy.delay(2, draining) == 5
    failed_model = ServiceUnavailableError("failed to load", status=503)
    assert policy.delay(0, failed_model) is None
    assert policy.delay(0, rate_limited(None)) is None
    assert policy.delay(0, InternalServerError("boom", status=500, retry_after=1)) is None


def test_connection_errors_name_the_request():
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/generate")
    error = transport_error(httpx.ConnectError("[Errno 111] Connection refused", request=request))
    assert str(error) == (
        "ConnectError: [Errno 111] Connection refused (POST http://127.0.0.1:9/v1/generate)"
    )
    assert str(transport_error(httpx.ReadError(""))) == "ReadError"  # no request to name


def test_only_unadmitted_failures_are_retried():
    policy = RetryPolicy()
    assert policy.delay(0, InternalServerError("boom", status=500)) is None
    assert policy.delay(0, InvalidRequestError("bad", status=422)) is None
    refused = transport_error(httpx.ConnectError("refused"))
    assert refused.request_sent is False and policy.delay(0, refused) is not None
    read_timeout = transport_error(httpx.ReadTimeout("slow"))
    assert isinstance(read_timeout, APITimeoutError) and read_timeout.request_sent
    assert policy.delay(0, read_timeout) is None  # the server may be working on it
    assert policy.delay(0, APIConnectionError("reset")) is None
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(max_retries=-1)


def test_retry_after_parses_seconds_and_http_dates():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= parse_retry_after(in_a_minute) <= 60
    assert parse_retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0


def test_error_bodies_map_to_typed_errors():
    body = {"error": {"message": "steps: at most 50", "type": "invalid_request_error",
                      "param": "steps", "code": 422, "request_id": "req_1"}}  # fmt: skip
    error = error_from_body(422, json.dumps(body).encode())
    assert type(error) is InvalidRequestError
    assert (error.param, error.request_id, error.message) == ("steps", "req_1", "steps: at most 50")
    assert "steps" in str(error) and "req_1" in str(error)
    limited = error_from_body(429, b'{"error": {"message": "full", "code": 429}}',
                              {"retry-after": "2", "x-request-id": "req_2"})  # fmt: skip
    assert isinstance(limited, RateLimitError)
    assert (limited.retry_after, limited.request_id) == (2.0, "req_2")
    proxy = error_from_body(502, b"<html>Bad Gateway</html>")  # not our shape: kept as text
    assert type(proxy) is APIStatusError and proxy.status == 502 and "Bad Gateway" in proxy.message


def sse(*events: tuple[str, dict]) -> list[str]:
    lines = [": a comment"]
    for name, data in events:
        lines += [f"event: {name}", f"data: {json.dumps(data)}", ""]
    return lines


COMPLETED = {"id": "req_1", "model": "m", "label": None, "seed": 1, "sampler": "ddim",
             "steps": 2, "nfe": 2, "guidance_scale": 1.0, "sampler_options": {}, "size": "8x8",
             "output_format": "png", "created": 0, "object": "generation",
             "images": [{"b64_json": "iVBORw==", "index": 0}],
             "timings": {"queue_seconds": 0.1, "total_seconds": 0.5}}  # fmt: skip


def test_event_parser_yields_progress_then_the_result():
    parser = EventParser()
    lines = sse(
        ("progress", {"id": "req_1", "step": 1, "total": 2}),
        ("heartbeat", {}),
        ("progress", {"id": "req_1", "step": 2, "total": 2}),
        ("completed", COMPLETED),
    )
    events = [e for e in map(parser.feed, lines) if e is not None]
    assert [(e.step, e.total, e.fraction) for e in events] == [(1, 2, 0.5), (2, 2, 1.0)]
    result = parser.finish()
    assert result.images[0].data == b"\x89PNG" and result.timings.total_seconds == 0.5


def test_event_parser_joins_multiline_data_and_raises_error_events():
    parser = EventParser()
    for line in ["event: progress", 'data: {"id": "r", ', 'data: "step": 1, "total": 3}', ""]:
        event = parser.feed(line)
    assert event.step == 1
    error = {"error": {"message": "late", "type": "timeout", "code": 504, "request_id": "r"}}
    with pytest.raises(APIStatusError) as raised:
        for line in sse(("error", error)):
            parser.feed(line)
    assert raised.value.status == 504
    with pytest.raises(StreamError, match="without a completed"):
        parser.finish()
    fresh = EventParser()
    with pytest.raises(StreamError, match="malformed"):
        for line in ["event: progress", "data: {not json", ""]:
            fresh.feed(line)


def test_request_bodies_per_endpoint():
    request = GenerationRequest(label="3", n=2, steps=10, sampler_options={"eta": 1.0})
    assert request.body("generate") == {
        "label": "3",
        "n": 2,
        "steps": 10,
        "sampler_options": {"eta": 1.0},
        "output_format": "png",
    }
    images = request.body("images", stream=True, preview=True)
    assert images["prompt"] == "3" and "label" not in images
    assert images["stream"] is True and images["preview"] is True
    assert "label" not in GenerationRequest().body("generate")
    with pytest.raises(ValueError, match="preview needs a stream"):
        request.body("generate", preview=True)
    with pytest.raises(ValueError, match="endpoint must be one of generate, images"):
        request.body("edits")
    assert request.body("images", response_format="bytes")["response_format"] == "bytes"
    assert "response_format" not in request.body("images", response_format="b64_json")
    with pytest.raises(ValueError, match="bytes cannot stream"):
        request.body("generate", stream=True, response_format="bytes")
    with pytest.raises(ValueError, match="response_format must be b64_json or bytes"):
        request.body("generate", response_format="url")

"""The synchronous client.

from denoised_client import Client

with Client("http://127.0.0.1:8000") as client:
    result = client.generate("3", model="digits-dit", sampler="dpmpp-2m", steps=20,
                             guidance_scale=3.0, seed=0)
    result.save("three.png")
    with client.stream("7", steps=20) as stream:
        for event in stream:
            print(f"{event.step}/{event.total}")
    print(stream.result.seed)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from denoised_client._core import (
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    NO_RETRY,
    Attempts,
    ClientConfig,
    EventParser,
    RetryPolicy,
    file_of,
    generation_call,
    readiness_of,
    status_error,
    transport_error,
)
from denoised_client.errors import DenoisedError
from denoised_client.types import (
    ENDPOINT_PATHS,
    Endpoint,
    Generation,
    GenerationFile,
    GenerationRequest,
    Model,
    Progress,
    Readiness,
)


class GenerationStream:
    """A streamed generation: iterate for `Progress` events; `result` holds the `Generation`
    once the stream is exhausted. The request is sent on entering (or on first iteration);
    errors before the stream starts (422, 429, ...) raise there, after retries. Iteration
    may stop and resume: the stream is one iterator."""

    def __init__(self, open_response: Callable[[], httpx.Response]) -> None:
        self._open = open_response
        self._response: httpx.Response | None = None
        self._parser = EventParser()
        self._events: Iterator[Progress] | None = None
        self.result: Generation | None = None

    def __enter__(self) -> GenerationStream:
        if self._response is None:
            self._response = self._open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> Progress:
        if self._events is None:
            self.__enter__()
            self._events = self._read()
        return next(self._events)

    def _read(self) -> Iterator[Progress]:
        try:
            for line in self._response.iter_lines():
                if (event := self._parser.feed(line)) is not None:
                    yield event
                if self._parser.result is not None:
                    break
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        finally:
            self.close()
        self.result = self._parser.finish()

    def until_done(self) -> Generation:
        """Read the remaining events and return the result."""
        for _ in self:
            pass
        return self.result

    def close(self) -> None:
        if self._response is not None:
            self._response.close()


class Client:
    """Blocking client for a denoised server. Safe to share between threads (httpx.Client is).

    `timeout`: seconds to wait for an answer (stretched past a request's own `timeout`);
    `retry`: what to retry (default: 429 and 503 answers with Retry-After, up to 3 times).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.config = ClientConfig(base_url, api_key, timeout, retry or RetryPolicy(), headers)
        self._http = httpx.Client(base_url=self.config.base_url, headers=self.config.headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(
        self,
        method: str,
        path: str,
        json: dict | None = None,
        stream: bool = False,
        timeout: httpx.Timeout | None = None,
        retry: RetryPolicy | None = None,
    ) -> httpx.Response:
        """One call with retries; returns a success answer or raises the typed error."""
        attempts = Attempts(retry or self.config.retry, f"{method} {path}")
        request = self._http.build_request(
            method, path, json=json, timeout=timeout or self.config.http_timeout()
        )
        while True:
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                error = transport_error(exc)
            else:
                if response.is_success:
                    return response
                response.read()
                response.close()
                error = status_error(response)
            time.sleep(attempts.wait(error))

    # Generation.

    def create(
        self,
        request: GenerationRequest,
        *,
        endpoint: Endpoint = "generate",
        on_progress: Callable[[Progress], Any] | None = None,
        preview: bool = False,
    ) -> Generation:
        """Run one request; with `on_progress` it is streamed and the callback sees each step."""
        if on_progress is None:
            body = request.body(endpoint, preview=preview)
            timeout = self.config.http_timeout(request)
            return Generation.from_json(
                self._send("POST", ENDPOINT_PATHS[endpoint], body, timeout=timeout).json()
            )
        with self.open_stream(request, endpoint=endpoint, preview=preview) as stream:
            for event in stream:
                on_progress(event)
        return stream.result

    def open_stream(
        self, request: GenerationRequest, *, endpoint: Endpoint = "generate", preview: bool = False
    ) -> GenerationStream:
        body = request.body(endpoint, stream=True, preview=preview)
        timeout = self.config.http_timeout(request)
        return GenerationStream(
            lambda: self._send("POST", ENDPOINT_PATHS[endpoint], body, stream=True, timeout=timeout)
        )

    def generate(self, label: str | int | None = None, **fields: Any) -> Generation:
        """`POST /v1/generate`. Fields: those of `GenerationRequest` (model, n, size, sampler,
        steps, guidance_scale, seed, sampler_options, output_format, timeout), plus
        `on_progress` (a callback per step; streams the request) and `preview`."""
        request, options = generation_call(label, fields)
        return self.create(request, **options)

    def generate_images(self, prompt: str | None = None, **fields: Any) -> Generation:
        """`POST /v1/images/generations` (the OpenAI Images shape); `prompt` is a class name."""
        request, options = generation_call(prompt, fields)
        return self.create(request, endpoint="images", **options)

    def generate_bytes(
        self, label: str | int | None = None, *, endpoint: Endpoint = "generate", **fields: Any
    ) -> GenerationFile:
        """`response_format="bytes"`: the file itself is the answer, not JSON — one png/webp
        image (n=1), or with output_format="npy" one [n, H, W, C] array. Fields: those of
        `GenerationRequest`; `endpoint="images"` sends it to the OpenAI-shaped endpoint."""
        request = GenerationRequest(label=label, **fields)
        body = request.body(endpoint, response_format="bytes")
        timeout = self.config.http_timeout(request)
        return file_of(self._send("POST", ENDPOINT_PATHS[endpoint], body, timeout=timeout), request)

    def stream(
        self,
        label: str | int | None = None,
        *,
        endpoint: Endpoint = "generate",
        preview: bool = False,
        **fields: Any,
    ) -> GenerationStream:
        """A streamed request: `with client.stream("3", steps=20) as s: for event in s: ...`."""
        request = GenerationRequest(label=label, **fields)
        return self.open_stream(request, endpoint=endpoint, preview=preview)

    # Models and operations.

    def models(self) -> list[Model]:
        return [Model.from_json(card) for card in self._send("GET", "/v1/models").json()["data"]]

    def model(self, model_id: str) -> Model:
        return Model.from_json(self._send("GET", f"/v1/models/{model_id}").json())

    def health(self) -> bool:
        """Whether the process answers `/health` (no retries)."""
        try:
            self._send("GET", "/health", retry=NO_RETRY)
            return True
        except DenoisedError:
            return False

    def ready(self) -> Readiness:
        """`/ready` as it is now (a 503 is an answer here, not an error)."""
        try:
            response = self._http.get("/ready", timeout=self.config.http_timeout())
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        return readiness_of(response)

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.2) -> Readiness:
        """Poll `/ready` until the server is ready; TimeoutError naming its last status."""
        deadline = time.monotonic() + timeout
        last: object = "no answer"
        while time.monotonic() < deadline:
            try:
                readiness = self.ready()
                if readiness.ready:
                    return readiness
                last = readiness.status
            except DenoisedError as exc:
                last = exc
            time.sleep(interval)
        raise TimeoutError(f"{self.config.base_url} not ready after {timeout} s (last: {last})")

    def metrics(self) -> str:
        """The Prometheus text of `/metrics`."""
        return self._send("GET", "/metrics").text

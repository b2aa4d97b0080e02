"""The asyncio client: the same calls as `Client`, awaited.

async with AsyncClient("http://127.0.0.1:8000") as client:
    result = await client.generate("3", steps=20)
    async with client.stream("7", steps=20) as stream:
        async for event in stream:
            print(f"{event.step}/{event.total}")
    print(stream.result.seed)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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


class AsyncGenerationStream:
    """`async with` sends the request; `async for` yields `Progress` events; `result` holds
    the `Generation` once the stream is exhausted."""

    def __init__(self, open_response: Callable[[], Awaitable[httpx.Response]]) -> None:
        self._open = open_response
        self._response: httpx.Response | None = None
        self._parser = EventParser()
        self._events: AsyncIterator[Progress] | None = None
        self.result: Generation | None = None

    async def __aenter__(self) -> AsyncGenerationStream:
        if self._response is None:
            self._response = await self._open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncGenerationStream:
        return self

    async def __anext__(self) -> Progress:
        if self._events is None:
            await self.__aenter__()
            self._events = self._read()
        return await anext(self._events)

    async def _read(self) -> AsyncIterator[Progress]:
        try:
            async for line in self._response.aiter_lines():
                if (event := self._parser.feed(line)) is not None:
                    yield event
                if self._parser.result is not None:
                    break
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        finally:
            await self.aclose()
        self.result = self._parser.finish()

    async def until_done(self) -> Generation:
        async for _ in self:
            pass
        return self.result

    async def aclose(self) -> None:
        if self._response is not None:
            await self._response.aclose()


class AsyncClient:
    """Non-blocking client for a denoised server (one per event loop)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        headers: dict[str, str] | None = None,
        max_connections: int = 100,
    ) -> None:
        self.config = ClientConfig(base_url, api_key, timeout, retry or RetryPolicy(), headers)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=None)
        self._http = httpx.AsyncClient(
            base_url=self.config.base_url, headers=self.config.headers, limits=limits
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(
        self,
        method: str,
        path: str,
        json: dict | None = None,
        stream: bool = False,
        timeout: httpx.Timeout | None = None,
        retry: RetryPolicy | None = None,
    ) -> httpx.Response:
        attempts = Attempts(retry or self.config.retry, f"{method} {path}")
        request = self._http.build_request(
            method, path, json=json, timeout=timeout or self.config.http_timeout()
        )
        while True:
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                error = transport_error(exc)
            else:
                if response.is_success:
                    return response
                await response.aread()
                await response.aclose()
                error = status_error(response)
            await asyncio.sleep(attempts.wait(error))

    # Generation.

    async def create(
        self,
        request: GenerationRequest,
        *,
        endpoint: Endpoint = "generate",
        on_progress: Callable[[Progress], Any] | None = None,
        preview: bool = False,
    ) -> Generation:
        if on_progress is None:
            body = request.body(endpoint, preview=preview)
            timeout = self.config.http_timeout(request)
            response = await self._send("POST", ENDPOINT_PATHS[endpoint], body, timeout=timeout)
            return Generation.from_json(response.json())
        async with self.open_stream(request, endpoint=endpoint, preview=preview) as stream:
            async for event in stream:
                on_progress(event)
        return stream.result

    def open_stream(
        self, request: GenerationRequest, *, endpoint: Endpoint = "generate", preview: bool = False
    ) -> AsyncGenerationStream:
        body = request.body(endpoint, stream=True, preview=preview)
        timeout = self.config.http_timeout(request)
        return AsyncGenerationStream(
            lambda: self._send("POST", ENDPOINT_PATHS[endpoint], body, stream=True, timeout=timeout)
        )

    async def generate(self, label: str | int | None = None, **fields: Any) -> Generation:
        """`POST /v1/generate`; the fields are those of `Client.generate`."""
        request, options = generation_call(label, fields)
        return await self.create(request, **options)

    async def generate_images(self, prompt: str | None = None, **fields: Any) -> Generation:
        """`POST /v1/images/generations` (the OpenAI Images shape)."""
        request, options = generation_call(prompt, fields)
        return await self.create(request, endpoint="images", **options)

    async def generate_bytes(
        self, label: str | int | None = None, *, endpoint: Endpoint = "generate", **fields: Any
    ) -> GenerationFile:
        """The file itself rather than JSON; the fields are those of `Client.generate_bytes`."""
        request = GenerationRequest(label=label, **fields)
        body = request.body(endpoint, response_format="bytes")
        timeout = self.config.http_timeout(request)
        response = await self._send("POST", ENDPOINT_PATHS[endpoint], body, timeout=timeout)
        return file_of(response, request)

    def stream(
        self,
        label: str | int | None = None,
        *,
        endpoint: Endpoint = "generate",
        preview: bool = False,
        **fields: Any,
    ) -> AsyncGenerationStream:
        request = GenerationRequest(label=label, **fields)
        return self.open_stream(request, endpoint=endpoint, preview=preview)

    # Models and operations.

    async def models(self) -> list[Model]:
        response = await self._send("GET", "/v1/models")
        return [Model.from_json(card) for card in response.json()["data"]]

    async def model(self, model_id: str) -> Model:
        return Model.from_json((await self._send("GET", f"/v1/models/{model_id}")).json())

    async def health(self) -> bool:
        try:
            await self._send("GET", "/health", retry=NO_RETRY)
            return True
        except DenoisedError:
            return False

    async def ready(self) -> Readiness:
        try:
            response = await self._http.get("/ready", timeout=self.config.http_timeout())
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        return readiness_of(response)

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.2) -> Readiness:
        deadline = time.monotonic() + timeout
        last: object = "no answer"
        while time.monotonic() < deadline:
            try:
                readiness = await self.ready()
                if readiness.ready:
                    return readiness
                last = readiness.status
            except DenoisedError as exc:
                last = exc
            await asyncio.sleep(interval)
        raise TimeoutError(f"{self.config.base_url} not ready after {timeout} s (last: {last})")

    async def metrics(self) -> str:
        return (await self._send("GET", "/metrics")).text

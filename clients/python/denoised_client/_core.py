"""What the sync and async clients share: configuration, the retry policy, the mapping of
transport failures to typed errors, and the Server-Sent Events parser (no I/O here)."""

from __future__ import annotations

import contextlib
import json
import logging
import random
from dataclasses import dataclass
from typing import Any

import httpx

from denoised_client.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    DenoisedError,
    StreamError,
    error_from_body,
)
from denoised_client.types import (
    Generation,
    GenerationFile,
    GenerationRequest,
    Progress,
    Readiness,
    from_dict,
)

log = logging.getLogger("denoised_client")

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 300.0
# Beyond the request's own deadline, how long to wait for the server's 504 to arrive.
_DEADLINE_MARGIN = 10.0


def come_back_later(error: DenoisedError) -> bool:
    """Whether the server refused `error`'s request for now and said when to come back: a
    429 (queue full) or 503 (loading, draining) that carries Retry-After. A 503 without it
    (the named model failed to load) is as final as a 4xx."""
    return (
        isinstance(error, APIStatusError)
        and error.status in (429, 503)
        and error.retry_after is not None
    )


@dataclass(frozen=True)
class RetryPolicy:
    """Which failures are retried, and how long to wait.

    Retried: answers for which `come_back_later` holds (429 queue full, 503 loading or
    draining: the server did not admit the request and sent Retry-After), waiting Retry-After
    as given (a longer one than `max_retry_after` raises at once); and connections that failed
    before the request was sent, after `backoff · 2^attempt` seconds (capped at
    `max_backoff`), with jitter so that many clients do not come back together.
    """

    max_retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.backoff < 0 or self.max_backoff < 0 or self.max_retry_after < 0:
            raise ValueError("backoff, max_backoff and max_retry_after must be >= 0")

    def delay(self, attempt: int, error: DenoisedError) -> float | None:
        """Seconds to wait before retry number `attempt + 1`, or None to give up."""
        if attempt >= self.max_retries:
            return None
        if come_back_later(error):
            return error.retry_after if error.retry_after <= self.max_retry_after else None
        if isinstance(error, APIConnectionError) and not error.request_sent:
            return min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
        return None


NO_RETRY = RetryPolicy(max_retries=0)


class Attempts:
    """One request's retry loop: `wait(error)` is the pause before the next try, or raises."""

    def __init__(self, policy: RetryPolicy, what: str) -> None:
        self.policy = policy
        self.what = what
        self.count = 0

    def wait(self, error: DenoisedError) -> float:
        delay = self.policy.delay(self.count, error)
        if delay is None:
            raise error
        self.count += 1
        log.info(
            "%s failed (%s); retry %d/%d in %.2f s",
            self.what,
            error,
            self.count,
            self.policy.max_retries,
            delay,
        )
        return delay


def transport_error(exc: httpx.TransportError) -> APIConnectionError:
    """A typed error for an httpx failure, naming the request it failed (so a wrong URL
    shows); connect failures are known not to have sent it."""
    sent = not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
    cls = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    with contextlib.suppress(RuntimeError):  # raised outside a request: none to name
        message += f" ({exc.request.method} {exc.request.url})"
    error = cls(message)
    error.request_sent = sent
    return error


def status_error(response: httpx.Response) -> APIStatusError:
    """The typed error of an error answer whose body has been read."""
    return error_from_body(response.status_code, response.content, response.headers)


def readiness_of(response: httpx.Response) -> Readiness:
    """`/ready` answers 200 when ready and 503 (with the same body) while not."""
    if response.status_code not in (200, 503):
        raise status_error(response)
    return from_dict(Readiness, response.json())


def generation_call(
    label: str | int | None, fields: dict[str, Any]
) -> tuple[GenerationRequest, dict]:
    """Keyword arguments of `generate(label, **fields)` split into the request and the
    call's own options (`on_progress`, `preview`)."""
    options = {k: fields.pop(k) for k in ("on_progress", "preview") if k in fields}
    return GenerationRequest(label=label, **fields), options


def file_of(response: httpx.Response, request: GenerationRequest) -> GenerationFile:
    """The file of a `response_format="bytes"` answer; its headers carry what the JSON body
    would have said of the request id, model and seed."""
    headers = response.headers
    return GenerationFile(
        data=response.content,
        content_type=headers["content-type"],
        format=request.output_format,
        id=headers["x-request-id"],
        model=headers["x-model"],
        seed=int(headers["x-seed"]),
    )


class ClientConfig:
    """Settings both clients hold: where the server is, credentials, timeout, retries."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout: float,
        retry: RetryPolicy,
        headers: dict[str, str] | None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retry = retry
        self.headers = {"User-Agent": "denoised-client/0.1", **(headers or {})}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def http_timeout(self, request: GenerationRequest | None = None) -> httpx.Timeout:
        """The client timeout, stretched past a request's own server-side deadline so the
        server's 504 arrives rather than a client-side timeout."""
        read = self.timeout
        if request is not None and request.timeout is not None:
            read = max(read, request.timeout + _DEADLINE_MARGIN)
        return httpx.Timeout(read, connect=min(10.0, self.timeout))


# The OpenAI-shaped endpoint streams OpenAI's image events: a partial image per preview (with
# `id`, `step` and `total` besides), then one completed event per image with the resolved
# parameters; the stream ends after the last.
_PARTIAL_IMAGE = "image_generation.partial_image"
_COMPLETED_IMAGE = "image_generation.completed"


class EventParser:
    """Turns the lines of a `text/event-stream` answer into `Progress` events and the
    `Generation`: at the native `completed` event, or (the OpenAI shape) from the completed
    images when the stream ends. An `error` event raises its typed error."""

    def __init__(self) -> None:
        self.result: Generation | None = None
        self._event: str | None = None
        self._data: list[str] = []
        self._images: list[dict] = []  # the OpenAI shape's completed events so far

    def feed(self, line: str) -> Progress | None:
        if line:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                self._event = value
            elif name == "data":
                self._data.append(value)
            return None  # comments (":...") and unknown fields are ignored, as SSE says
        if not self._data:
            self._event = None
            return None
        event, data = self._event or "message", "\n".join(self._data)
        self._event, self._data = None, []
        try:
            body = json.loads(data)
        except ValueError:
            raise StreamError(f"malformed {event!r} event: {data[:200]!r}") from None
        if event == "progress":
            return Progress.from_json(body)
        if event == _PARTIAL_IMAGE:
            return Progress.from_json({**body, "preview": body["b64_json"]})
        if event == "completed":
            self.result = Generation.from_json(body)
        elif event == _COMPLETED_IMAGE:
            self._images.append(body)
        elif event == "error":
            raise error_from_body(int(body.get("error", {}).get("code", 500)), body)
        return None  # events this client does not know are skipped

    def finish(self) -> Generation:
        """The result, once the stream has ended."""
        if self.result is None and self._images:
            first = self._images[0]
            self.result = Generation.from_json(
                {**first, "created": first["created_at"], "data": self._images}
            )
        if self.result is None:
            raise StreamError("the event stream ended without a completed event")
        return self.result

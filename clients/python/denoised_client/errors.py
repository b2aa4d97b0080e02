"""Typed errors. Every error answer of the server has the body
`{"error": {"message", "type", "param", "code", "request_id"}}`; `APIStatusError` carries
those fields, and its subclass says which status it was."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping


class DenoisedError(Exception):
    """Base of every error this package raises."""


class APIConnectionError(DenoisedError):
    """The server could not be reached, or the connection broke before an answer."""

    request_sent: bool = True  # False when the connection failed first: safe to retry


class APITimeoutError(APIConnectionError):
    """No answer within the client's own timeout (the server may still be working)."""


class StreamError(DenoisedError):
    """An event stream ended without a `completed` or `error` event, or was malformed."""


class APIStatusError(DenoisedError):
    """The server answered with an error status."""

    status: int = 0

    def __init__(
        self,
        message: str,
        *,
        status: int,
        type: str | None = None,
        param: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.request_id = request_id
        self.retry_after = retry_after  # seconds, from the Retry-After header

    def __str__(self) -> str:
        where = f" (param {self.param!r})" if self.param else ""
        rid = f" [request {self.request_id}]" if self.request_id else ""
        return f"{self.status} {self.type or 'error'}{where}: {self.message}{rid}"


class BadRequestError(APIStatusError):
    """400: the body is not valid JSON."""


class AuthenticationError(APIStatusError):
    """401: a missing or wrong API key."""


class NotFoundError(APIStatusError):
    """404: an unknown model (the message lists the served ones)."""


class PayloadTooLargeError(APIStatusError):
    """413: the body is larger than the server accepts."""


class InvalidRequestError(APIStatusError):
    """422: a field is invalid; `param` names it and the message the allowed values."""


class RateLimitError(APIStatusError):
    """429: the server's queue is full; `retry_after` says when to come back."""


class InternalServerError(APIStatusError):
    """500: the request failed on the server (the log has it under `request_id`)."""


class ServiceUnavailableError(APIStatusError):
    """503: the server is loading its models or shutting down (with Retry-After), or the named
    model failed to load (without: retrying will not help)."""


class DeadlineExceededError(APIStatusError):
    """504: the request's own `timeout` passed before its images were done."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    422: InvalidRequestError,
    429: RateLimitError,
    500: InternalServerError,
    503: ServiceUnavailableError,
    504: DeadlineExceededError,
}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from_body(
    status: int, body: bytes | str | Mapping, headers: Mapping[str, str] | None = None
) -> APIStatusError:
    """The typed error for an error answer (its JSON body, or whatever text came instead)."""
    headers = headers or {}
    fields: Mapping = {}
    if isinstance(body, Mapping):
        fields = body.get("error", body)
    else:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            fields = parsed["error"]
        else:
            text = body.decode(errors="replace") if isinstance(body, bytes) else body
            fields = {"message": text.strip() or f"HTTP {status}"}
    status = int(fields.get("code", status))
    cls = _BY_STATUS.get(status, APIStatusError)
    return cls(
        str(fields.get("message", f"HTTP {status}")),
        status=status,
        type=fields.get("type"),
        param=fields.get("param"),
        request_id=fields.get("request_id") or headers.get("x-request-id"),
        retry_after=parse_retry_after(headers.get("retry-after")),
    )

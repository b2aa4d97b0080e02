"""Request context as plain ASGI middleware (it must not buffer streams or hide client
disconnects): a request id for every request, a limit on the body size, and a count of the
responses by route and status. The id is also a context variable, so every log line written
while handling the request carries it; threads working for a request (the engine) name it
with `extra={"request_id": ...}` instead."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid

from fastapi import HTTPException
from starlette.routing import Match

from denoised.server.http.errors import REQUEST_ID_HEADER, APIError, error_body
from denoised.server.metrics import UNMATCHED_ROUTE, Metrics

_HEADER_KEY = REQUEST_ID_HEADER.lower().encode()
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestIdLogFilter(logging.Filter):
    """Adds `request_id` to log records that do not name one (`extra=`): the id of the
    request being handled, else "-"."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id.get()
        return True


def route_template(scope) -> str:
    """The path template of the app's route that `scope` is for (also when only the method
    differs), or `UNMATCHED_ROUTE`: a label value of bounded cardinality."""
    for route in scope["app"].router.routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return route.path
    return UNMATCHED_ROUTE


class RequestContextMiddleware:
    """Sets `request.state.request_id` (the client's X-Request-ID when it is a short token,
    else a new one), echoes it as a response header, answers 413 for bodies over
    `max_body_bytes` whether announced by Content-Length or streamed, and counts every
    response in `denoised_http_responses_total{route, code}`."""

    def __init__(self, app, max_body_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = None

        async def send_counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_counted)
        except Exception:
            status = status or 500  # the outermost error handler answers it
            raise
        finally:
            if status is not None:
                route = route_template(scope)
                self.metrics.http_responses.labels(route=route, code=str(status)).inc()

    async def _handle(self, scope, receive, send) -> None:
        headers = dict(scope.get("headers") or [])
        given = headers.get(_HEADER_KEY, b"").decode("latin-1")
        request_id = given if _CLIENT_ID.match(given) else f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        current_request_id.set(request_id)  # this request's task only
        limit = self.max_body_bytes

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == _HEADER_KEY for name, _ in headers):
                    headers.append((_HEADER_KEY, request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        announced = headers.get(b"content-length", b"0")
        if announced.isdigit() and int(announced) > limit:
            await self._too_large(send_with_id, request_id)
            return
        received = 0

        async def receive_limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # FastAPI turns this into the error response
                    raise HTTPException(413, self._too_large_message)
            return message

        await self.app(scope, receive_limited, send_with_id)

    @property
    def _too_large_message(self) -> str:
        return f"the request body exceeds {self.max_body_bytes} bytes"

    async def _too_large(self, send, request_id: str) -> None:
        error = APIError(413, self._too_large_message)
        body = json.dumps(error_body(error, request_id)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

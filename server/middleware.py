"""Request context as plain ASGI middleware (it must not buffer streams or hide client
disconnects): a request id for every request, and a limit on the body size. The id is also
a context variable, so every log line written while handling the request carries it."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid

from fastapi import HTTPException

from denoised.server.errors import REQUEST_ID_HEADER, APIError, error_body

_HEADER_KEY = REQUEST_ID_HEADER.lower().encode()
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestIdLogFilter(logging.Filter):
    """Adds `request_id` to log records: the id of the request being handled, else "-"."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get()
        return True


class RequestContextMiddleware:
    """Sets `request.state.request_id` (the client's X-Request-ID when it is a short token,
    else a new one), echoes it as a response header, and answers 413 for bodies over
    `max_body_bytes` whether announced by Content-Length or streamed."""

    def __init__(self, app, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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

"""Every error the API returns has one shape, `{"error": {message, type, param, code,
request_id}}`, and carries the request id (also in the X-Request-ID header). Clients never
see a stack trace; the log has it, under the same request id."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from denoised.server.schemas import ErrorBody, ErrorResponse

log = logging.getLogger("denoised.api")

REQUEST_ID_HEADER = "X-Request-ID"

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or _TYPES.get(status, "error")
        self.headers = headers or {}


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def error_body(error: APIError, request_id: str | None) -> dict:
    body = ErrorBody(
        message=error.message,
        type=error.kind,
        param=error.param,
        code=error.status,
        request_id=request_id,
    )
    return ErrorResponse(error=body).model_dump()


def error_response(error: APIError, request_id: str | None) -> JSONResponse:
    headers = dict(error.headers)
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    return JSONResponse(error_body(error, request_id), status_code=error.status, headers=headers)


def _validation_error(exc: RequestValidationError) -> APIError:
    """The first problem, named by its field path, with pydantic's wording (which lists the
    allowed values for enumerations)."""
    errors = exc.errors()
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('msg')}", None)
    if kind == "extra_forbidden":
        return APIError(422, f"unknown field {param!r}", param)
    if kind == "missing" and not loc:
        return APIError(422, "a JSON object body is required", None)
    message = first.get("msg", "invalid value")
    union = [e for e in errors if tuple(e.get("loc", ()))[:-1] == tuple(first["loc"])[:-1]]
    if len(union) > 1 and len(loc) > 1:
        # A value that fits no member of a union (e.g. a sampler option): pydantic reports
        # one error per member under the member's name; name the field once, list them all.
        param = ".".join(loc[:-1])
        message = "; ".join(f"as {e['loc'][-1]}: {e.get('msg', 'invalid')}" for e in union)
    return APIError(422, f"{param}: {message}" if param else message, param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, request_id_of(request))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc), request_id_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if isinstance(exc.__cause__, RecursionError):  # FastAPI's body parsing gave up
            message = "the body nests too deeply to parse"
        error = APIError(exc.status_code, message, headers=dict(exc.headers or {}))
        return error_response(error, request_id_of(request))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        request_id = request_id_of(request)
        log.exception("unhandled error in request %s", request_id)
        error = APIError(500, f"internal server error (request id {request_id})")
        return error_response(error, request_id)

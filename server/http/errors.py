"""Every error the API returns has one shape, `{"error": {message, type, param, code,
request_id}}`, and carries the request id (also in the X-Request-ID header). Clients never
see a stack trace; the log has it, under the same request id."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from denoised.server.http.schemas import ErrorBody, ErrorResponse

log = logging.getLogger("denoised.api")

REQUEST_ID_HEADER = "X-Request-ID"

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
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


_JSON_TYPES = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
}


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _unreadable_body(request: Request) -> APIError | None:
    """Why a body was not read as JSON, when the headers say: it is compressed, or not sent
    as JSON. (Accepting JSON under any content type would let a web page on any origin post
    to the server without a CORS preflight.)"""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        return APIError(
            415,
            f"content encodings are not supported (Content-Encoding: {encoding[:32]}); "
            "send the JSON body uncompressed",
        )
    content_type = request.headers.get("content-type", "")
    if not _is_json(content_type):
        got = f"Content-Type: {content_type[:64]}" if content_type else "no Content-Type"
        return APIError(
            415,
            f"the body must be JSON sent with Content-Type: application/json, got {got} "
            "(curl: -H 'content-type: application/json')",
        )
    return None


def _validation_error(exc: RequestValidationError, request: Request) -> APIError:
    """The first problem, named by its field path, with pydantic's wording (which lists the
    allowed values for enumerations)."""
    errors = exc.errors()
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "missing" and not loc:
        return APIError(
            422, "a JSON object body is required (Content-Type: application/json)", None
        )
    if kind == "json_invalid" or not loc:  # the body as a whole
        if unreadable := _unreadable_body(request):
            return unreadable
        if kind == "json_invalid":
            reason = first.get("ctx", {}).get("error", first.get("msg"))
            return APIError(400, f"the body is not valid JSON: {reason} (at character {loc[0]})")
        got = _JSON_TYPES.get(type(exc.body), "null")
        return APIError(422, f"the request body must be a JSON object, got {got}", None)
    if kind == "extra_forbidden":
        return APIError(422, f"unknown field {param!r}", param)
    message = first.get("msg", "invalid value")
    union = [e for e in errors if tuple(e.get("loc", ()))[:-1] == tuple(first["loc"])[:-1]]
    if len(union) > 1 and len(loc) > 1:
        # A value that fits no member of a union (e.g. a sampler option): pydantic reports
        # one error per member under the member's name; name the field once, list them all.
        param = ".".join(loc[:-1])
        message = "; ".join(f"as {e['loc'][-1]}: {e.get('msg', 'invalid')}" for e in union)
    return APIError(422, f"{param}: {message}" if param else message, param)


def _parse_error(exc: StarletteHTTPException, request: Request) -> APIError:
    """An HTTP error; FastAPI's generic 400 for a body it could not decode says why."""
    cause = exc.__cause__
    if isinstance(cause, RecursionError):  # FastAPI's body parsing gave up
        return APIError(400, "the body nests too deeply to parse")
    if exc.status_code == 400 and isinstance(cause, UnicodeError):
        if unreadable := _unreadable_body(request):
            return unreadable
        where = f" (byte {cause.start})" if isinstance(cause, UnicodeDecodeError) else ""
        return APIError(400, f"the body is not valid UTF-8 JSON{where}")
    return APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, request_id_of(request))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc, request), request_id_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(_parse_error(exc, request), request_id_of(request))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        request_id = request_id_of(request)
        log.exception("unhandled error in request %s", request_id)
        error = APIError(500, f"internal server error (request id {request_id})")
        return error_response(error, request_id)

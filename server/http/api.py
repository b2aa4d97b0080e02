"""The HTTP API (FastAPI): two generation endpoints (OpenAI-shaped and native), the model
list, health, readiness and metrics. Handlers validate, submit a job to the engine and await
it — or stream its progress as Server-Sent Events — and cancel it if the client goes away.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from denoised.models.sampling.samplers import SAMPLER_NAMES
from denoised.server.admission import FieldError, GenerationRequest, admit
from denoised.server.engine.jobs import Job, JobError, JobResult, Progress, QueueFull
from denoised.server.engine.loop import Engine
from denoised.server.http.errors import APIError, error_body, install_error_handlers
from denoised.server.http.middleware import RequestContextMiddleware
from denoised.server.http.openai_stream import (
    COMPLETED,
    PARTIAL_IMAGE,
    CompletedEvent,
    PartialImageEvent,
    partial_image_steps,
)
from denoised.server.http.schemas import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    GenerationInfo,
    Health,
    ImageData,
    ImagesRequest,
    ImagesResponse,
    ModelCard,
    ModelDefaults,
    ModelList,
    ProgressEvent,
    Readiness,
    ReadinessStatus,
    SamplingFields,
    Timings,
)
from denoised.server.imaging import MEDIA_TYPES
from denoised.server.lifecycle import NotReady, ServerState
from denoised.server.registry import (
    ModelRegistry,
    ModelUnavailable,
    ServedModel,
    UnknownModel,
)
from denoised.server.settings import Settings

DOCS_ASSETS = "/docs/static"  # where /docs and /redoc load Swagger UI's and ReDoc's files from

API_DESCRIPTION = """
Image generation from trained diffusion and flow-matching models.

Every active request — whatever its sampler, step count, guidance scale or progress —
shares one backbone forward per engine iteration (step-level batching).

* `POST /v1/images/generations`: the OpenAI Images API shape; `prompt` is a class name.
* `POST /v1/generate`: the native endpoint; `label` is a class name or id.
* `stream: true`: Server-Sent Events. Native: `progress` (per model evaluation), then
  `completed` (the full response). Images endpoint: OpenAI's `image_generation.partial_image`
  (`partial_images` of them, or one per evaluation with `preview: true`) and one
  `image_generation.completed` per image. Either may end with `error` instead.
* Errors: `{"error": {"message", "type", "param", "code", "request_id"}}`.
"""


# The body fields admission reads (each endpoint's body has a subset of them).
ADMITTED_FIELDS = {f.name for f in dataclasses.fields(GenerationRequest)} - {"class_param"}


def _error_responses(*codes: int) -> dict:
    meanings = {
        400: "Malformed JSON or a body that is not UTF-8",
        401: "Missing or wrong API key",
        404: "Unknown model",
        413: "Body too large",
        415: "Not a JSON body (send Content-Type: application/json, uncompressed)",
        422: "Invalid field (the message names it and the allowed values)",
        429: "Queue full; see Retry-After",
        500: "Internal error (with a request id)",
        503: "Loading or shutting down",
        504: "The request's timeout passed",
    }
    return {c: {"model": ErrorResponse, "description": meanings[c]} for c in codes}


def _generation_responses(stream_example: str) -> dict:
    return {
        200: {
            "description": "Images as JSON (`b64_json`), the raw file (`bytes`), or an event "
            "stream",
            "content": {
                "image/png": {},
                "image/webp": {},
                "application/x-npy": {},
                "text/event-stream": {"example": stream_example},
            },
        },
        **_error_responses(400, 401, 404, 413, 415, 422, 429, 500, 503, 504),
    }


_NATIVE_STREAM_EXAMPLE = (
    'event: progress\ndata: {"id": "req_1", "step": 1, "total": 20}\n\n'
    'event: completed\ndata: {"id": "req_1", ...}\n\n'
)
_OPENAI_STREAM_EXAMPLE = (
    f'event: {PARTIAL_IMAGE}\ndata: {{"type": "{PARTIAL_IMAGE}", "b64_json": "iVBOR...", '
    '"partial_image_index": 0, ...}\n\n'
    f'event: {COMPLETED}\ndata: {{"type": "{COMPLETED}", "b64_json": "iVBOR...", '
    '"index": 0, ...}\n\n'
)


def _state(request: Request) -> ServerState:
    return request.app.state.server


def require_api_key(request: Request) -> None:
    """Bearer-token check when API keys are configured (constant-time comparison)."""
    keys = request.app.state.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    ok = scheme.lower() == "bearer" and any(
        hmac.compare_digest(token.encode(), key.encode()) for key in keys
    )
    if not ok:
        raise APIError(401, "a valid API key is required", headers={"WWW-Authenticate": "Bearer"})


def _info(job: Job) -> dict:
    p = job.params
    return GenerationInfo(
        id=p.request_id,
        model=p.model,
        label=p.label_name,
        seed=p.seed,
        sampler=p.sampler,
        steps=p.steps,
        nfe=p.nfe,
        guidance_scale=p.guidance_scale,
        sampler_options=p.sampler_options,
        size=p.size,
        output_format=p.output_format,
        prompt_tokens=job.prompt_tokens,
        truncated=job.truncated,
    ).model_dump()


def _images(result: JobResult) -> list[ImageData]:
    return [
        ImageData(b64_json=base64.b64encode(data).decode("ascii"), index=i)
        for i, data in enumerate(result.files)
    ]


def _render_json(openai_shape: bool, job: Job, result: JobResult) -> dict:
    created = int(time.time())
    if openai_shape:
        return ImagesResponse(**_info(job), created=created, data=_images(result)).model_dump()
    timings = Timings(queue_seconds=result.queue_seconds, total_seconds=result.total_seconds)
    return GenerateResponse(
        **_info(job), created=created, images=_images(result), timings=timings
    ).model_dump()


def _as_api_error(exc: JobError) -> APIError:
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFull) else None
    return APIError(exc.status, exc.message, kind=exc.kind, headers=headers)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _result(request: Request, engine: Engine, job: Job) -> JobResult | None:
    """The job's result, or None if the client left first (the job is then cancelled)."""
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({job.result, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not job.result.done():
        engine.cancel(job)
        return None
    try:
        return job.result.result()
    except JobError as exc:
        raise _as_api_error(exc) from None


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _previews(engine: Engine, job: Job) -> AsyncIterator[tuple[Progress, str | None]]:
    """The job's progress, with its preview (if any) as a base64 PNG rendered off the loop."""
    events = job.events
    assert events is not None  # a streamed job (params.stream) has its event queue
    while (progress := await events.get()) is not None:
        preview = None
        if progress.preview is not None:
            png = await run_in_threadpool(engine.render_preview, job.params.model, progress.preview)
            preview = base64.b64encode(png).decode("ascii")
        yield progress, preview


async def _native_stream(engine: Engine, job: Job) -> AsyncIterator[bytes]:
    """`progress` per evaluation, then `completed` with the endpoint's JSON response."""
    async for progress, preview in _previews(engine, job):
        event = ProgressEvent(
            id=job.params.request_id, step=progress.step, total=progress.total, preview=preview
        )
        yield _sse("progress", event.model_dump(exclude_none=True))
    yield _sse("completed", _render_json(False, job, job.result.result()))


async def _openai_stream(engine: Engine, job: Job) -> AsyncIterator[bytes]:
    """OpenAI's image events (`openai_stream`): partial images — `partial_images` of them at
    evenly spaced evaluations (the job's `preview_steps`), or else one per preview
    (`preview`) — then one completed event per image."""
    p = job.params
    indexes = job.preview_steps
    async for progress, preview in _previews(engine, job):
        if preview is None:  # OpenAI's stream has partial images, no bare progress
            continue
        event = PartialImageEvent(
            b64_json=preview,
            partial_image_index=progress.step - 1 if indexes is None else indexes[progress.step],
            created_at=int(time.time()),
            size=p.size,
            id=p.request_id,
            step=progress.step,
            total=progress.total,
        )
        yield _sse(PARTIAL_IMAGE, event.model_dump())
    result, info, created = job.result.result(), _info(job), int(time.time())
    for image in _images(result):
        completed = CompletedEvent(
            **info, b64_json=image.b64_json, index=image.index, created_at=created
        )
        yield _sse(COMPLETED, completed.model_dump())


async def _event_stream(
    engine: Engine, job: Job, events: Callable[[Engine, Job], AsyncIterator[bytes]]
) -> AsyncIterator[bytes]:
    """The endpoint's `events`, or an `error` event if the request fails."""
    try:
        async for event in events(engine, job):
            yield event
    except JobError as exc:
        yield _sse("error", error_body(_as_api_error(exc), job.params.request_id))
    finally:  # the client went away (or the stream ended): nothing more to compute
        if not job.result.done():
            engine.cancel(job)


def _ready(server: ServerState) -> tuple[Engine, ModelRegistry]:
    """The engine and models, or 503 (with Retry-After) saying why there are none."""
    try:
        return server.ready_engine()
    except NotReady as exc:
        raise APIError(503, str(exc), headers={"Retry-After": "5"}) from None


def model_card(model: ServedModel) -> ModelCard:
    """`GET /v1/models`' description of a served model."""
    loaded = model.loaded
    return ModelCard(
        id=model.name,
        created=model.created,
        architecture=loaded.config["family"],
        process=model.process,
        prediction=loaded.process.prediction,
        classes=model.classes,
        num_classes=model.num_classes or None,
        conditioning=model.conditioning,
        max_prompt_tokens=model.max_prompt_tokens,
        sizes=list(model.sizes),
        samplers=list(SAMPLER_NAMES),
        defaults=ModelDefaults(**dataclasses.asdict(model.defaults)),
        latent=loaded.vae is not None,
    )


def _served_model(registry: ModelRegistry, name: str | None, param: str) -> ServedModel:
    """The model a request names: 404 when none is so named, 503 when it failed to load."""
    try:
        return registry.get(name)
    except UnknownModel as exc:
        raise APIError(404, str(exc), param=param) from None
    except ModelUnavailable as exc:
        raise APIError(503, str(exc), param=param) from None


async def _generate(
    request: Request,
    body: SamplingFields,
    openai_shape: bool,
    events: Callable[[Engine, Job], AsyncIterator[bytes]],
    partial_images: int = 0,
) -> Response:
    server = _state(request)
    engine, registry = _ready(server)
    request_id = request.state.request_id
    model = _served_model(registry, body.model, "model")
    fields = body.model_dump(include=ADMITTED_FIELDS)
    wanted = GenerationRequest(**fields, class_param="prompt" if openai_shape else "label")
    try:
        params, sampler_state = admit(model, wanted, server.settings, request_id, engine.device)
    except FieldError as exc:
        raise APIError(422, str(exc), param=exc.param) from None
    job = Job(params, sampler_state, asyncio.get_running_loop())
    if partial_images:  # previews only after the evaluations that send a partial image
        job.preview_steps = partial_image_steps(params.nfe, partial_images)
    try:
        engine.submit(job)
    except JobError as exc:
        raise _as_api_error(exc) from None

    headers = {"X-Seed": str(params.seed), "X-Model": params.model}
    if params.stream:
        return StreamingResponse(
            _event_stream(engine, job, events),
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    result = await _result(request, engine, job)
    if result is None:  # nobody to answer
        return Response(status_code=499)
    if params.response_format == "bytes":
        return Response(
            result.files[0], media_type=MEDIA_TYPES[params.output_format], headers=headers
        )
    return Response(
        json.dumps(_render_json(openai_shape, job, result)),
        media_type="application/json",
        headers=headers,
    )


def create_app(settings: Settings) -> FastAPI:
    server = ServerState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        try:
            yield
        finally:
            await run_in_threadpool(server.stop)

    # /docs (Swagger UI) and /redoc load their scripts, styles and icon from the server itself
    # (fastapi-offline ships them), not from a CDN, so they work where the server has no
    # internet access. The validator badge is off: it would fetch from validator.swagger.io.
    app = FastAPIOffline(
        title="denoised",
        version="0.1.0",
        description=API_DESCRIPTION,
        lifespan=lifespan,
        static_url=DOCS_ASSETS,
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.server = server
    app.state.api_keys = settings.all_api_keys()
    if settings.cors_origins:  # off by default: browsers on other origins get no access
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "X-Seed", "X-Model", "Retry-After"],
        )
    # Added last, so outermost: every response, CORS preflights too, carries a request id.
    app.add_middleware(
        RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, metrics=server.metrics
    )
    install_error_handlers(app)
    guarded = [Depends(require_api_key)]

    @app.post(
        "/v1/images/generations",
        response_model=ImagesResponse,
        responses=_generation_responses(_OPENAI_STREAM_EXAMPLE),
        dependencies=guarded,
        tags=["generation"],
        summary="Generate images (OpenAI Images API shape)",
    )
    async def images_generations(body: ImagesRequest, request: Request) -> Response:
        """`prompt` names a class of the model (omit it for unconditional generation).
        Accepts the extension fields `sampler`, `steps`, `guidance_scale`, `seed`,
        `sampler_options`, `output_format`, `timeout`, `stream` and `preview`. With `stream`
        it sends OpenAI's image streaming events, which OpenAI's SDKs parse; `partial_images`
        (0–3) of them are previews of the first image at evenly spaced evaluations."""
        partial_images = body.partial_images or 0
        if partial_images:  # partial images are the job's previews, sent at chosen evaluations
            body = body.model_copy(update={"preview": True})
        return await _generate(request, body, True, _openai_stream, partial_images)

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        responses=_generation_responses(_NATIVE_STREAM_EXAMPLE),
        dependencies=guarded,
        tags=["generation"],
        summary="Generate images (native)",
    )
    async def generate(body: GenerateRequest, request: Request) -> Response:
        """`label` is a class name or a class id. The response echoes every resolved
        parameter (the seed too) and the request's queue and total time."""
        return await _generate(request, body, openai_shape=False, events=_native_stream)

    @app.get(
        "/v1/models",
        response_model=ModelList,
        dependencies=guarded,
        tags=["models"],
        responses=_error_responses(401, 503),
        summary="Served models (OpenAI list shape) with classes, sizes, samplers and defaults",
    )
    async def list_models(request: Request) -> ModelList:
        _, registry = _ready(_state(request))
        return ModelList(data=[model_card(m) for m in registry.models.values()])

    @app.get(
        "/v1/models/{model_id}",
        response_model=ModelCard,
        dependencies=guarded,
        tags=["models"],
        responses=_error_responses(401, 404, 503),
        summary="One served model",
    )
    async def get_model(model_id: str, request: Request) -> ModelCard:
        _, registry = _ready(_state(request))
        return model_card(_served_model(registry, model_id, "model_id"))

    @app.get("/health", response_model=Health, tags=["operations"], summary="Process alive")
    async def health() -> Health:
        return Health()

    # Probes and load balancers may ask with HEAD: the same status, no body (the server
    # drops it). Not in the schema, where it would repeat the GET operation.
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    @app.get(
        "/ready",
        response_model=Readiness,
        tags=["operations"],
        responses={
            503: {"model": Readiness, "description": "Loading, draining, failed or degraded"}
        },
        summary="Models loaded and warmed, and not draining",
    )
    async def ready(request: Request) -> Response:
        """503 while loading, draining, when no model loaded (`failed`), and with strict
        readiness when some configured model failed to load (`degraded`: the others serve).
        `detail.unavailable` maps each model that failed to load to the reason."""
        server = _state(request)
        models = list(server.registry.models) if server.registry else []
        detail: dict[str, Any] = {"error": server.error} if server.error else {}
        status: ReadinessStatus = server.status
        if server.unavailable:  # served, but not all models
            detail["unavailable"] = server.unavailable
            if status == "ready" and not server.ready:
                status = "degraded"
                detail["error"] = (
                    f"configured models failed to load: {', '.join(server.unavailable)} "
                    "(strict readiness; the others serve)"
                )
        body = Readiness(ready=server.ready, status=status, models=models, detail=detail)
        return Response(
            body.model_dump_json(),
            status_code=200 if body.ready else 503,
            media_type="application/json",
        )

    app.add_api_route("/ready", ready, methods=["HEAD"], include_in_schema=False)

    metrics_guard = guarded if settings.metrics_auth else []

    @app.get(
        "/metrics",
        dependencies=metrics_guard,
        tags=["operations"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}},
        summary="Prometheus metrics (names prefixed denoised_)",
    )
    async def metrics(request: Request) -> Response:
        content, content_type = _state(request).metrics.render()
        return Response(content, media_type=content_type)

    return app

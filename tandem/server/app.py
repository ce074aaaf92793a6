"""The FastAPI app: OpenAI-compatible routes over the engine thread, plus /health and /metrics.

`create_app(options, runtime_factory)` returns an app with its own engine, queue and metrics registry;
nothing is global, so tests can run several apps in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tandem.config import SpecOptions
from tandem.errors import BadInputError, ModelNotFoundError, TandemError
from tandem.runtime import Runtime
from tandem.server.body import check_api_key, parse, read_json
from tandem.server.errors import install_error_handlers
from tandem.server.metrics import CONTENT_TYPE, Metrics
from tandem.server.options import ServerOptions
from tandem.server.responses import Builder, Piece, sse
from tandem.server.schemas import ChatRequest, CompletionRequest, ModelCard, ModelList
from tandem.server.worker import SERVING, Engine, EngineStatus, JobHandle, JobSpec, ModelInfo, not_ready_error
from tandem.spec.generate import Done, GenParams
from tandem.spec.sampling import SamplingParams

_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"})


class _RequestMetrics:
    """ASGI middleware: counts every request by endpoint and status, and times it to the response's end."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_)
        finally:
            path = scope["path"] if scope["path"] in _ENDPOINTS else "other"
            self.metrics.record_request(path, status, time.perf_counter() - t0)


def _check_model(name: str | None, info: ModelInfo) -> None:
    if name and name not in info.aliases:
        raise ModelNotFoundError(f"model {name!r} is not served here; this server serves {info.id!r}",
                                 f"omit `model` or use {info.id!r} (GET /v1/models lists it)",
                                 param="model", code="model_not_found")


_GEN_FIELDS = frozenset(f.name for f in dataclasses.fields(GenParams))
_SPEC_DEFAULTS = tuple(f.name for f in dataclasses.fields(SpecOptions) if f.name in _GEN_FIELDS)
"""Speculation knobs the server's SpecOptions sets by default for every generation."""
_SPEC_REQUEST_FIELDS = ("draft_max", "draft_min", "draft_p_min", "draft_policy")
"""Speculation knobs a request may set, where GenParams has them."""


def _gen_params(req: ChatRequest | CompletionRequest, max_tokens: int, spec: SpecOptions) -> GenParams:
    """GenParams from a request over the server's defaults; values are range-checked again by
    SamplingParams and GenParams (their BadInputErrors are 400s too)."""
    sampling = SamplingParams(temperature=1.0 if req.temperature is None else req.temperature,
                              top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p,
                              min_p=req.min_p or 0.0, seed=req.seed)
    knobs = {name: getattr(spec, name) for name in _SPEC_DEFAULTS}
    for name in _SPEC_REQUEST_FIELDS:
        value = getattr(req, name)
        if value is None:
            continue
        if name not in _GEN_FIELDS:
            raise BadInputError(f"{name} is not supported by this server", f"omit {name}", param=name)
        knobs[name] = value
    return GenParams(max_tokens=max_tokens, sampling=sampling, stop=req.stop_list, **knobs)


async def _stream(handle: JobHandle, first: list, builder: Builder, include_usage: bool) -> AsyncIterator[str]:
    """SSE lines until [DONE]. Leaving early (client gone) cancels the generation."""
    events, is_first = first, True
    try:
        while True:
            piece = Piece.of(events)
            for line in builder.stream(piece, first=is_first, include_usage=include_usage):
                yield line
            if piece.done is not None:
                return
            is_first = False
            events = [await handle.next()]
            events += handle.ready()
    except TandemError as e:  # the engine failed mid-stream: say so in the stream, as OpenAI does
        yield sse(e.to_openai())
    finally:
        handle.cancel()


def create_app(options: ServerOptions, runtime_factory: Callable[[], Runtime], spec: SpecOptions | None = None,
               *, on_status: Callable[[EngineStatus], None] | None = None) -> FastAPI:
    """A new app serving the Runtime that `runtime_factory` builds (called in the engine thread at startup)."""
    spec = spec or SpecOptions()
    metrics = Metrics()
    engine = Engine(runtime_factory, metrics, allow_draft_paths=options.draft_paths, on_status=on_status)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="Tandem", description="OpenAI-compatible API with lossless speculative decoding",
                  lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.options = engine, metrics, options
    install_error_handlers(app)
    app.add_middleware(_RequestMetrics, metrics=metrics)

    def require_key(request: Request) -> None:
        check_api_key(request, options.api_key)

    def ready_model() -> ModelInfo:
        st = engine.status
        if st.state not in SERVING or st.model is None:
            raise not_ready_error(st)
        return st.model

    async def run(request: Request, req: ChatRequest | CompletionRequest, job: JobSpec, model_id: str) -> Response:
        """Queue the job and answer from its events: a stream once the first event is in, or one JSON body.

        Waiting for the first event before answering means errors found by the engine (unknown or
        incompatible draft, prompt over the context) still get their HTTP status, even when streaming.
        """
        builder = Builder(job.endpoint, model_id, token_sources=req.return_token_sources)
        handle = engine.submit(job)
        try:
            first = [await handle.next(request.is_disconnected)]
        except BaseException:
            handle.cancel()
            raise
        first += handle.ready()
        if req.stream:
            return StreamingResponse(_stream(handle, first, builder, req.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(handle.cancel))
        events = first
        try:
            while not isinstance(events[-1], Done):
                events.append(await handle.next(request.is_disconnected))
                events += handle.ready()
        finally:
            handle.cancel()
        return JSONResponse(builder.whole(Piece.of(events)))

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse(ChatRequest, await read_json(request, options.max_body_bytes))
        info = ready_model()
        _check_model(req.model, info)
        gp = _gen_params(req, req.token_limit or info.n_ctx, spec)
        job = JobSpec("chat", gp, messages=req.message_dicts(), draft_model=req.draft_model)
        return await run(request, req, job, info.id)

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        req = parse(CompletionRequest, await read_json(request, options.max_body_bytes))
        info = ready_model()
        _check_model(req.model, info)
        gp = _gen_params(req, req.token_limit, spec)
        job = JobSpec("completion", gp, prompt=req.prompt_value(), draft_model=req.draft_model)
        return await run(request, req, job, info.id)

    @v1.get("/models")
    async def models() -> dict:
        info = ready_model()
        card = ModelCard(id=info.id, created=info.created, path=info.path, n_ctx=info.n_ctx,
                         draft_model=info.draft_model, speculative=info.draft_model is not None)
        return ModelList(data=[card]).model_dump(mode="json")

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        st = engine.status
        body: dict = {"status": st.state}
        if st.reason:
            body["reason"] = st.reason
        if st.model is not None:
            body["model"] = {k: v for k, v in asdict(st.model).items() if k != "aliases"}
            body["speculative"] = st.model.draft_model is not None
        return JSONResponse(body, status_code=200 if st.state in SERVING else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app

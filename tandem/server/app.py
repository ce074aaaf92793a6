"""The FastAPI app: OpenAI-compatible routes over the engine thread, plus /health, /metrics and the chat page (/).

`create_app(options, runtime_factory)` returns an app with its own engine, queue and metrics registry;
nothing is global, so tests can run several apps in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tandem.config import SpecOptions
from tandem.errors import BadInputError, ModelNotFoundError, TandemError
from tandem.runtime import Runtime
from tandem.server.body import check_api_key, lookup_scope, parse, read_json
from tandem.server.errors import install_error_handlers
from tandem.server.messages_api import messages_router
from tandem.server.metrics import CONTENT_TYPE, Metrics
from tandem.server.models import ModelDirectory, ModelSource
from tandem.server.openapi import STREAM_EVENT, errors, install, request_body
from tandem.server.options import ServerOptions
from tandem.server.responses import Builder, Piece, sse
from tandem.server.responses_api import Generation, responses_router
from tandem.server.schemas import (ChatRequest, Completion, CompletionRequest, Health, LMStudioList, LMStudioModel,
                                   ModelCard, ModelList)
from tandem.server.templating import template_router
from tandem.server.structured import grammar_of
from tandem.server.web import PAGES, web_router
from tandem.server.events import all_events, cancel, first_events
from tandem.server.worker import SERVING, Engine, EngineStatus, JobHandle, JobSpec, ModelInfo, not_ready_error
from tandem.spec.generate import GenParams
from tandem.spec.penalties import DEFAULT_REPEAT_LAST_N, penalty_processors
from tandem.spec.processors import Processors
from tandem.spec.sampling import SamplingParams
from tandem.templates import ChatFormat
from tandem.tool_grammar import check_choice

_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models", "/api/v0/models",
                        "/health", "/metrics", "/apply-template", "/v1/messages",
                        "/v1/messages/count_tokens", *PAGES})


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


_GENERATION_RESPONSES: dict[int | str, dict] = {
    200: {"model": Completion, "description": "The completion: one JSON body, or with `stream: true` server-sent "
                                              "events of chunks (each a Completion) ending with `data: [DONE]`",
          "content": {"text/event-stream": {"schema": STREAM_EVENT}}},
    **errors(400, 401, 403, 404, 413, 422, 500, 503, 507)}
"""What the generation routes answer (tandem.server.openapi)."""

_GEN_FIELDS = frozenset(f.name for f in dataclasses.fields(GenParams))
_SPEC_DEFAULTS = tuple(f.name for f in dataclasses.fields(SpecOptions) if f.name in _GEN_FIELDS)
"""Speculation knobs the server's SpecOptions sets by default for every generation."""
_SPEC_REQUEST_FIELDS = ("draft_max", "draft_min", "draft_p_min", "draft_policy", "cache_prompt")
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
    penalties = penalty_processors(
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        repeat_penalty=1.0 if req.repeat_penalty is None else req.repeat_penalty,
        repeat_last_n=DEFAULT_REPEAT_LAST_N if req.repeat_last_n is None else req.repeat_last_n,
        logit_bias=req.logit_bias)
    return GenParams(max_tokens=max_tokens, sampling=sampling, stop=req.stop_list, processors=Processors(penalties),
                     logprobs=req.logprob_count,
                     grammar=grammar_of(req.response_format, req.grammar, req.json_schema), **knobs)


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


@dataclasses.dataclass(frozen=True)
class _Target:
    """The models one request resolved to."""

    model_id: str
    """Shown in the response."""
    model: str | None
    """Registry id for the engine (None: the startup model)."""
    draft_model: str | None
    """draft_model for the engine's selector (None: the model's configured draft)."""
    draft_path: Path | None
    """A registry draft, checked against the model."""
    spec: SpecOptions
    """Speculation defaults for this model."""


def create_app(options: ServerOptions, runtime_factory: Callable[[], Runtime], spec: SpecOptions | None = None,
               *, on_status: Callable[[EngineStatus], None] | None = None,
               source: ModelSource | None = None) -> FastAPI:
    """A new app serving the Runtime that `runtime_factory` builds (called in the engine thread at startup).

    With a `source` (the registry), every registry model is listed and may be requested by id: models
    that are not loaded are loaded on demand. Without one, only the startup model is served.
    """
    spec = spec or SpecOptions()
    metrics = Metrics()
    directory = ModelDirectory(source, allow_draft_paths=options.draft_paths) if source is not None else None
    engine = Engine(runtime_factory, metrics, allow_draft_paths=options.draft_paths, on_status=on_status,
                    load_model=directory.load if directory else None,
                    model_id=directory.model_id if directory else None,
                    max_loaded=options.max_loaded_models, ttl=options.ttl, max_queue=options.max_queue)
    # Registry lookups and rescans read the models folder: off the event loop, on one thread of the app's own
    # (a shared pool would grow a thread per concurrent request and keep them), which also serializes rescans.
    registry_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-registry")

    async def off_loop(fn: Callable, *args: object):
        return await asyncio.get_running_loop().run_in_executor(registry_thread, fn, *args)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)
        registry_thread.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Tandem", description="OpenAI-compatible API with lossless speculative decoding",
                  lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.options = engine, metrics, options
    install_error_handlers(app)
    app.add_middleware(_RequestMetrics, metrics=metrics)
    if options.cors:  # outermost, so that error responses carry the headers too and the page can read them
        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)

    async def require_key(request: Request) -> None:  # async: a sync dependency would take a worker thread
        check_api_key(request, options.api_key)

    def ready_model() -> ModelInfo:
        st = engine.status
        if st.state not in SERVING or st.model is None:
            raise not_ready_error(st)
        return st.model

    async def target(req: ChatRequest | CompletionRequest) -> _Target:
        """Which model and draft the request names; registry names are resolved (and checked) here."""
        info = ready_model()
        if directory is None:
            _check_model(req.model, info)
            return _Target(info.id, None, req.draft_model, None, spec)
        entry = await off_loop(directory.main, req.model) if req.model else directory.entry_of(info)
        if entry is None:  # the startup model is not in the registry (it always is when `tandem serve` runs)
            return _Target(info.id, None, req.draft_model, None, spec)
        is_default = entry.path == Path(info.path)
        st = engine.status
        loaded = next((i for i in st.loaded if Path(i.path) == entry.path), info if is_default else None)
        draft_model, draft_path = req.draft_model, None
        if req.draft_model is not None:
            draft_path = await off_loop(directory.draft, entry, req.draft_model, loaded)
            if draft_path is None and req.draft_model.lower() != "none":
                draft_model = None  # the draft the model is loaded with
        model_spec = spec if is_default else directory.options_for(entry)[1]
        return _Target(entry.id, None if is_default else entry.id, draft_model, draft_path, model_spec)

    async def run(request: Request, req: ChatRequest | CompletionRequest, job: JobSpec, model_id: str) -> Response:
        """Queue the job and answer from its events: a stream once the first event is in, or one JSON body.

        Waiting for the first event before answering means errors found by the engine (unknown or
        incompatible draft, prompt over the context) still get their HTTP status, even when streaming.
        """
        builder = Builder(job.endpoint, model_id, token_sources=req.return_token_sources,
                          logprobs=req.logprob_count is not None)
        handle = engine.submit(job)
        first = await first_events(handle, request)
        if job.tools is not None:  # the model is loaded now: its tool format is known
            fmt = loaded_format(job.model)
            builder.read_tool_calls(fmt.tool_format if fmt else "generic", job.tools)
        if req.stream:
            return StreamingResponse(_stream(handle, first, builder, req.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(cancel, handle))
        return JSONResponse(builder.whole(Piece.of(await all_events(handle, first, request))))

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @v1.post("/chat/completions", openapi_extra=request_body(ChatRequest), responses=_GENERATION_RESPONSES)
    async def chat_completions(request: Request) -> Response:
        req = parse(ChatRequest, await read_json(request, options.max_body_bytes))
        t = await target(req)
        gp = _gen_params(req, req.token_limit or 1, t.spec)
        gp = dataclasses.replace(gp, lookup_scope=lookup_scope(request, options.api_key, t.spec.suffix_cache))
        tools = req.tool_request()
        check_choice(tools, gp.grammar)  # the call's grammar is built for the model when the job starts
        job = JobSpec("chat", gp, messages=req.message_dicts(), draft_model=t.draft_model, model=t.model,
                      draft_path=t.draft_path, max_tokens_from_context=req.token_limit is None, tools=tools)
        return await run(request, req, job, t.model_id)

    @v1.post("/completions", openapi_extra=request_body(CompletionRequest), responses=_GENERATION_RESPONSES)
    async def completions(request: Request) -> Response:
        req = parse(CompletionRequest, await read_json(request, options.max_body_bytes))
        t = await target(req)
        gp = _gen_params(req, req.token_limit, t.spec)
        gp = dataclasses.replace(gp, lookup_scope=lookup_scope(request, options.api_key, t.spec.suffix_cache))
        job = JobSpec("completion", gp, prompt=req.prompt_value(), draft_model=t.draft_model, model=t.model,
                      draft_path=t.draft_path)
        return await run(request, req, job, t.model_id)

    @v1.get("/models", response_model=None, responses={200: {"model": ModelList}, **errors(401, 503)})
    async def models() -> dict:
        info = ready_model()
        if directory is not None:
            await off_loop(directory.rescan)
            return directory.openai_list(engine.status)
        card = ModelCard(id=info.id, created=info.created, path=info.path, n_ctx=info.n_ctx,
                         draft_model=info.draft_model, speculative=info.draft_model is not None)
        return ModelList(data=[card]).model_dump(mode="json")

    app.include_router(v1)

    lms = APIRouter(prefix="/api/v0", dependencies=[Depends(require_key)])

    @lms.get("/models", response_model=None, responses={200: {"model": LMStudioList}, **errors(401, 503)})
    async def lmstudio_models() -> dict:
        """LM Studio's REST listing: every model with its state and compatible drafts."""
        info = ready_model()
        if directory is None:
            return {"object": "list", "data": [_lmstudio_loaded(info)]}
        await off_loop(directory.rescan)
        return directory.lmstudio_list(engine.status)

    @lms.get("/models/{model_id:path}", response_model=None,
             responses={200: {"model": LMStudioModel}, **errors(400, 401, 403, 404, 503)})
    async def lmstudio_model(model_id: str) -> dict:
        info = ready_model()
        if directory is None:
            _check_model(model_id, info)
            return _lmstudio_loaded(info)
        entry = await off_loop(directory.main, model_id)
        loaded = next((i for i in engine.status.loaded if Path(i.path) == entry.path), None)
        return directory.lmstudio_model(entry, loaded)

    app.include_router(lms)

    # -- chat templates ------------------------------------------------------------------------------------
    def loaded_format(model: str | None) -> ChatFormat | None:
        """The ChatFormat of a loaded model (None: the startup model), None if it is not loaded."""
        st = engine.status
        info = st.model if model is None else next((i for i in st.loaded if i.id == model), None)
        return info.chat if info is not None else None

    async def request_format(req: ChatRequest) -> ChatFormat:
        t = await target(req)
        fmt = loaded_format(t.model)
        if fmt is None:
            raise BadInputError(f"model {t.model_id} is not loaded, so its chat template is not known yet",
                                "send a chat completion to it first (that loads it), or omit `model`", param="model")
        return fmt

    app.include_router(template_router(request_format, require_key, options.max_body_bytes))
    app.include_router(messages_router(engine, options, target=target, loaded_format=loaded_format,
                                       gen_params=_gen_params))
    app.include_router(responses_router(Generation(engine, target, _gen_params, loaded_format, require_key, options)))

    @app.get("/health", response_model=None,
             responses={200: {"model": Health},
                        503: {"model": Health, "description": "Not serving: `status` says why"}})
    async def health() -> JSONResponse:
        st = engine.status
        body: dict = {"status": st.state}
        if st.reason:
            body["reason"] = st.reason
        if st.model is not None:
            body["model"] = {k: v for k, v in asdict(st.model).items() if k not in ("aliases", "chat")}
            body["model"]["chat_template"] = st.model.chat.summary() if st.model.chat else None
            body["speculative"] = st.model.draft_model is not None and not st.model.draft_paused
            body["model"]["draft_policy"] = metrics.policy.get(st.model.path, {})
            body["model"]["suffix_cache"] = metrics.suffix.get(st.model.path)
        if st.state in SERVING:
            body["requests"] = {"running": engine.running, "waiting": engine.waiting}
            body["kv_cache_usage"] = round(engine.kv_usage, 4)
            body["loaded_models"] = [i.id for i in st.loaded]
            if st.loading:
                body["loading_models"] = list(st.loading)
        return JSONResponse(body, status_code=200 if st.state in SERVING else 503)

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.include_router(web_router())
    install(app, (ChatRequest, CompletionRequest))
    return app


def _lmstudio_loaded(info: ModelInfo) -> dict:
    """The startup model in LM Studio's shape, for a server without a registry."""
    return {"id": info.id, "object": "model", "type": "llm", "state": "loaded", "loaded_context_length": info.n_ctx,
            "draft_model": info.draft_model,
            "compatible_draft_models": [info.draft_model] if info.draft_model else []}

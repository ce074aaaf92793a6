"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens, for Claude Code and the `anthropic` SDK.

A Messages request is turned into the chat request of /v1/chat/completions (tandem.server.messages_schema) and
runs the same engine path, JobSpec("chat", ...): the model's template and tool format, call grammars under
tool_choice any/tool, speculation, the prompt cache, the suffix cache's per-key scope, and cancellation when the
client goes away. Only the answer's shape differs (tandem.server.messages_out).

These routes answer in Anthropic's shapes, errors included: `{"type": "error", "error": {"type", "message"}}`,
and `event: error` in a stream. They take the API key as `x-api-key` (ANTHROPIC_API_KEY) or as
`Authorization: Bearer` (ANTHROPIC_AUTH_TOKEN). `anthropic-version` and `anthropic-beta` headers are accepted and
ignored. The routes stay out of /openapi.json, whose error bodies are OpenAI's (docs/api.md describes them).
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.background import BackgroundTask

from tandem.config import SpecOptions
from tandem.errors import AuthError, TandemError
from tandem.server.body import api_keys, key_index, parse, read_json
from tandem.server.errors import to_tandem_error
from tandem.server.messages_out import MessageBuilder, error_body, error_event
from tandem.server.messages_schema import CountTokensRequest, MessagesRequest, chat_request
from tandem.server.options import ServerOptions
from tandem.server.responses import Piece
from tandem.server.schemas import ChatRequest
from tandem.server.events import all_events, cancel, first_events
from tandem.server.worker import Counted, Engine, JobHandle, JobSpec
from tandem.spec.generate import GenParams
from tandem.templates import ChatFormat
from tandem.tool_grammar import check_choice

log = logging.getLogger("tandem.server")

_KEY_FIX = ("send the key given to `tandem serve --api-key` as the header 'x-api-key: KEY' (ANTHROPIC_API_KEY) or "
            "'Authorization: Bearer KEY' (ANTHROPIC_AUTH_TOKEN)")


class _AnthropicRoute(APIRoute):
    """A route whose errors (its dependencies' included) get Anthropic's body instead of the app's OpenAI one."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - every error leaves in Anthropic's shape
                where = f"{request.method} {request.url.path}"
                err = to_tandem_error(exc, where)
                if err.http_status >= 500 and not isinstance(exc, TandemError):
                    log.error("%s: unhandled %s: %s", where, type(exc).__name__, exc, exc_info=exc)
                else:
                    log.info("%s -> %d: %s", where, err.http_status, err.message)
                retry = getattr(err, "retry_after", None)
                return JSONResponse(error_body(err), status_code=err.http_status,
                                    headers={"Retry-After": str(retry)} if retry else None)

        return route


def anthropic_key_index(request: Request, key: str | None) -> int | None:
    """Which of the server's keys the request carries, in x-api-key or as a bearer token (None: none of them)."""
    token = request.headers.get("x-api-key")
    if token is None:
        return key_index(request, key)
    found = None
    for i, k in enumerate(api_keys(key)):  # every key compared, in constant time each
        if hmac.compare_digest(token.strip().encode(), k.encode()):
            found = i
    return found


def _scope(request: Request, key: str | None, suffix_cache: str) -> str | None:
    """The suffix cache scope, as tandem.server.body.lookup_scope gives it (one per key, whichever header has it)."""
    if suffix_cache != "shared":
        return None
    return "" if key is None else f"key{anthropic_key_index(request, key)}"


async def _stream(handle: JobHandle, first: list, builder: MessageBuilder) -> AsyncIterator[str]:
    """Anthropic's events until message_stop. Leaving early (client gone) cancels the generation."""
    events = first
    try:
        lines = builder.start()
        while True:
            piece = Piece.of(events)
            for line in lines + builder.stream(piece):
                yield line
            if piece.done is not None:
                return
            lines = []
            events = [await handle.next()]
            events += handle.ready()
    except TandemError as e:  # the engine failed mid-stream: say so in the stream, as Anthropic does
        yield error_event(e)
    finally:
        handle.cancel()


def messages_router(engine: Engine, options: ServerOptions, *, target: Callable[[Any], Awaitable[Any]],
                    loaded_format: Callable[[str | None], ChatFormat | None],
                    gen_params: Callable[[ChatRequest, int, SpecOptions], GenParams]) -> APIRouter:
    """The routes, over the app's engine. `target(req)` resolves the request's model and draft as for chat
    completions (tandem.server.app), `loaded_format(model)` is a loaded model's ChatFormat, and `gen_params` builds
    a chat request's GenParams."""

    async def require_key(request: Request) -> None:  # async: a sync dependency would take a worker thread
        if options.api_key is None:
            return
        if request.headers.get("x-api-key") is None and request.headers.get("authorization") is None:
            raise AuthError("this server requires an API key and the request has neither an x-api-key nor an "
                            "Authorization header", _KEY_FIX, code="missing_api_key")
        if anthropic_key_index(request, options.api_key) is None:
            which = "x-api-key" if request.headers.get("x-api-key") is not None else "Authorization"
            raise AuthError(f"the API key in the {which} header is wrong", _KEY_FIX, code="invalid_api_key")

    router = APIRouter(prefix="/v1/messages", dependencies=[Depends(require_key)], route_class=_AnthropicRoute)

    async def job_of(request: Request, req: CountTokensRequest, endpoint: str) -> tuple[JobSpec, str]:
        """The engine job for a request (run as the chat request it maps onto), and the model id to answer with."""
        chat = chat_request(req)
        t = await target(chat)
        gp = gen_params(chat, chat.token_limit or 1, t.spec)
        stops = getattr(req, "stops", ())
        gp = dataclasses.replace(gp, lookup_scope=_scope(request, options.api_key, t.spec.suffix_cache),
                                 logprobs=0 if len(stops) > 1 else None)  # see MessageBuilder
        tools = chat.tool_request()
        check_choice(tools, gp.grammar)
        job = JobSpec(endpoint, gp, messages=chat.message_dicts(), draft_model=t.draft_model, model=t.model,
                      draft_path=t.draft_path, tools=tools)
        return job, t.model_id

    @router.post("", include_in_schema=False)
    async def messages(request: Request) -> Response:
        req = parse(MessagesRequest, await read_json(request, options.max_body_bytes))
        job, model_id = await job_of(request, req, "chat")
        handle = engine.submit(job)
        first = await first_events(handle, request)
        fmt = loaded_format(job.model) if job.tools is not None else None  # loaded now: its tool format is known
        builder = MessageBuilder(model_id, stops=req.stops, tools=job.tools,
                                 tool_format=fmt.tool_format if fmt else "generic")
        if req.stream:
            return StreamingResponse(_stream(handle, first, builder), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"}, background=BackgroundTask(cancel, handle))
        return JSONResponse(builder.whole(Piece.of(await all_events(handle, first, request))))

    @router.post("/count_tokens", include_in_schema=False)
    async def count_tokens(request: Request) -> dict[str, int]:
        """The prompt's length in tokens, by the model's own template (tools included) and tokenizer."""
        req = parse(CountTokensRequest, await read_json(request, options.max_body_bytes))
        job, _model = await job_of(request, req, "count")
        handle = engine.submit(job)
        try:
            counted = await handle.next(request.is_disconnected)
        finally:
            handle.cancel()
        assert isinstance(counted, Counted), counted
        return {"input_tokens": counted.tokens}

    return router

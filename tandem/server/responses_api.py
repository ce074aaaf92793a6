"""POST /v1/responses (OpenAI's Responses API, as Codex CLI and `client.responses.create` speak it), GET and DELETE
/v1/responses/{id}.

A Responses request is rewritten as the chat completion it asks for (tandem.server.responses_schema) and runs through
the chat route's own steps, which `create_app` lends in `Generation`: model resolution (`target`), sampling and
structured output (`gen_params`), the suffix-cache scope, tool grammars, the engine job and its cancellation. Only
the answer's shape is this module's (tandem.server.responses_build).

Stored responses (`store`, true by default) stay in memory, in a bounded LRU per API key: `previous_response_id`
continues one (its conversation, then its output, then the new input; the new `instructions` replace the old, as
OpenAI does), GET returns it, DELETE forgets it. An id stored under one key is not found with another. The store is
lost on restart, so a client that chains responses across a restart gets a 404 naming the id.

The routes are left out of GET /openapi.json, as /v1/messages is: the document (and `tandem bench fuzz`, which
checks every route against it) describes OpenAI's chat shapes and their `data:`-only streams.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import TypeAdapter
from starlette.background import BackgroundTask

from tandem.config import SpecOptions
from tandem.errors import BadInputError, TandemError
from tandem.server.body import key_index, lookup_scope, read_json
from tandem.server.options import ServerOptions
from tandem.server.responses import Piece
from tandem.server.responses_build import ResponseBuilder
from tandem.server.responses_schema import Item, ResponsesRequest, parse_request, responses_param
from tandem.server.schemas import ChatRequest
from tandem.server.events import all_events, cancel, first_events
from tandem.server.worker import Engine, JobHandle, JobSpec
from tandem.spec.generate import GenParams
from tandem.templates import ChatFormat
from tandem.tool_grammar import check_choice

MAX_STORED = 1024
"""Most responses kept (all keys together); the least recently used goes first."""
MAX_STORED_BYTES = 64 << 20
"""Most JSON kept (responses and their conversations), however few responses that is."""

_ITEMS = TypeAdapter(list[Item])


class ResponseNotFoundError(TandemError):
    """previous_response_id or a GET/DELETE names a response this server does not hold for this key."""

    http_status = 404
    error_type = "invalid_request_error"


@dataclasses.dataclass(frozen=True)
class Generation:
    """What the Responses routes borrow from create_app, so that a Responses request runs as a chat completion does."""

    engine: Engine
    target: Callable[[ChatRequest], Awaitable[Any]]
    """create_app's `target`: the model and draft a request resolves to (a _Target)."""
    gen_params: Callable[[ChatRequest, int, SpecOptions], GenParams]
    loaded_format: Callable[[str | None], ChatFormat | None]
    require_key: Callable[[Request], Awaitable[None]]
    options: ServerOptions


@dataclasses.dataclass
class _Stored:
    response: dict[str, Any]
    items: list[Any]
    """The whole conversation it ended: earlier items, its input, its output (without instructions)."""
    size: int


class ResponseStore:
    """Stored responses by (key scope, id), least recently used dropped first past MAX_STORED or MAX_STORED_BYTES."""

    def __init__(self, max_count: int = MAX_STORED, max_bytes: int = MAX_STORED_BYTES):
        self.max_count, self.max_bytes = max_count, max_bytes
        self._by_id: OrderedDict[tuple[str, str], _Stored] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # handlers run on the event loop, but tests and tools may read it elsewhere

    def put(self, scope: str, response: dict[str, Any], items: list[Any]) -> None:
        size = len(json.dumps(response)) + len(json.dumps(_ITEMS.dump_python(items, mode="json")))
        with self._lock:
            self._by_id[(scope, response["id"])] = _Stored(response, items, size)
            self._bytes += size
            while self._by_id and (len(self._by_id) > self.max_count or self._bytes > self.max_bytes):
                _, old = self._by_id.popitem(last=False)
                self._bytes -= old.size

    def get(self, scope: str, response_id: str, param: str | None = None) -> _Stored:
        with self._lock:
            found = self._by_id.get((scope, response_id))
            if found is not None:
                self._by_id.move_to_end((scope, response_id))
                return found
        raise ResponseNotFoundError(
            f"no stored response with id {response_id!r} (it was sent with store: false, was dropped to stay within "
            f"this server's {self.max_count} stored responses, belongs to another API key, or the server restarted)",
            "send the whole conversation as input instead of previous_response_id", param=param,
            code="previous_response_not_found" if param else "response_not_found")

    def delete(self, scope: str, response_id: str) -> None:
        self.get(scope, response_id)
        with self._lock:
            old = self._by_id.pop((scope, response_id), None)
            if old is not None:
                self._bytes -= old.size


def _output_items(response: dict[str, Any]) -> list[Any]:
    """A response's output as input items for the next turn."""
    return _ITEMS.validate_python([{k: v for k, v in item.items() if k not in ("id", "status")}
                                   for item in response["output"]])


def responses_router(gen: Generation) -> APIRouter:
    """The /v1/responses routes over `gen` (the app's engine and chat steps), with their own response store."""
    store = ResponseStore()
    options = gen.options
    router = APIRouter(prefix="/v1", dependencies=[Depends(gen.require_key)])

    def scope(request: Request) -> str:
        index = key_index(request, options.api_key)
        return "" if index is None else f"key{index}"

    async def stream(handle: JobHandle, first: list, builder: ResponseBuilder,
                     on_done: Callable[[dict[str, Any]], None]) -> AsyncIterator[str]:
        """The events until response.completed (or .incomplete); leaving early cancels the generation."""
        events = first
        try:
            for line in builder.start():
                yield line
            while True:
                piece = Piece.of(events)
                for line in builder.stream(piece):
                    yield line
                if piece.done is not None:
                    assert builder.final is not None
                    on_done(builder.final)
                    return
                events = [await handle.next()]
                events += handle.ready()
        except TandemError as e:  # the engine failed mid-stream: say so in the stream, as OpenAI does
            for line in builder.failed(e):
                yield line
        finally:
            handle.cancel()

    @router.post("/responses", include_in_schema=False)
    async def create(request: Request) -> Response:
        raw = await read_json(request, options.max_body_bytes)
        req = parse_request(raw)
        key = scope(request)
        history = store.get(key, req.previous_response_id, "previous_response_id").items \
            if req.previous_response_id else []
        chat = req.chat_request(history, raw)
        try:
            t = await gen.target(chat)
            gp = gen.gen_params(chat, chat.token_limit or 1, t.spec)
            gp = dataclasses.replace(gp, lookup_scope=lookup_scope(request, options.api_key, t.spec.suffix_cache))
            tools = chat.tool_request()
            check_choice(tools, gp.grammar)
        except BadInputError as e:
            raise responses_param(e) from None
        job = JobSpec("chat", gp, messages=chat.message_dicts(), draft_model=t.draft_model, model=t.model,
                      draft_path=t.draft_path, max_tokens_from_context=chat.token_limit is None, tools=tools)
        builder = ResponseBuilder(req, t.model_id)
        handle = gen.engine.submit(job)
        try:
            first = await first_events(handle, request)
        except BadInputError as e:  # the template refused the messages, the prompt is over the context, ...
            raise responses_param(e) from None
        if tools is not None:  # the model is loaded now: its tool format is known
            fmt = gen.loaded_format(job.model)
            builder.read_tool_calls(fmt.tool_format if fmt else "generic", tools)
        conversation = [*history, *req.items()]

        def keep(response: dict[str, Any]) -> None:
            if req.store:
                store.put(key, response, conversation + _output_items(response))

        if req.stream:
            return StreamingResponse(stream(handle, first, builder, keep), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"}, background=BackgroundTask(cancel, handle))
        body = builder.whole(Piece.of(await all_events(handle, first, request)))
        keep(body)
        return JSONResponse(body)

    @router.get("/responses/{response_id}", include_in_schema=False)
    async def retrieve(request: Request, response_id: str) -> dict:
        return store.get(scope(request), response_id).response

    @router.delete("/responses/{response_id}", include_in_schema=False)
    async def delete(request: Request, response_id: str) -> dict:
        store.delete(scope(request), response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    return router

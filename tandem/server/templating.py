"""POST /apply-template (llama-server's endpoint): the prompt text a chat request would give the model."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends, Request

from tandem import chat
from tandem.server.body import parse, read_json
from tandem.server.schemas import ChatRequest
from tandem.templates import ChatFormat


def template_router(chat_format: Callable[[ChatRequest], Awaitable[ChatFormat]], require_key: Callable[..., None],
                    max_body_bytes: int) -> APIRouter:
    """The route: a chat completion's body in, {"prompt": text} out. `chat_format(req)` is the ChatFormat of the
    model the request names (it raises the request's error when that model is not served or not loaded)."""
    router = APIRouter(dependencies=[Depends(require_key)])

    @router.post("/apply-template")
    async def apply_template(request: Request) -> dict:
        req = parse(ChatRequest, await read_json(request, max_body_bytes))
        fmt = await chat_format(req)
        return {"prompt": chat.prompt_text(fmt, req.message_dicts(), req.tool_request())}

    return router

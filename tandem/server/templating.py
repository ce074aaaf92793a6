"""POST /apply-template (llama-server's endpoint): the prompt text a chat request would give the model."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from tandem import chat
from tandem.server.body import parse, read_json
from tandem.server.openapi import errors, request_body
from tandem.server.schemas import ChatRequest
from tandem.templates import ChatFormat


class AppliedTemplate(BaseModel):
    """What POST /apply-template answers."""

    prompt: str
    """The exact text the model would be given: chat template and tool prompt applied."""


def template_router(chat_format: Callable[[ChatRequest], Awaitable[ChatFormat]], require_key: Callable[..., None],
                    max_body_bytes: int) -> APIRouter:
    """The route: a chat completion's body in, {"prompt": text} out. `chat_format(req)` is the ChatFormat of the
    model the request names (it raises the request's error when that model is not served or not loaded)."""
    router = APIRouter(dependencies=[Depends(require_key)])

    @router.post("/apply-template", openapi_extra=request_body(ChatRequest), response_model=None,
                 responses={200: {"model": AppliedTemplate}, **errors(400, 401, 403, 404, 413, 503)})
    async def apply_template(request: Request) -> dict:
        req = parse(ChatRequest, await read_json(request, max_body_bytes))
        fmt = await chat_format(req)
        return {"prompt": chat.prompt_text(fmt, req.message_dicts(), req.tool_request())}

    return router

"""Anthropic's Messages API requests (POST /v1/messages, /v1/messages/count_tokens), read and turned into the chat
request of /v1/chat/completions (ChatRequest), so that both APIs run the one engine path: same templates, tool
prompts and call grammars, speculation, prompt cache.

The conversion: `system` becomes a system message; an assistant message's text blocks become its content and its
tool_use blocks its tool_calls (arguments as JSON text); a user message's tool_result blocks become tool messages
(tool_call_id = tool_use_id), in order, then its text blocks one user message. Text blocks of one message are
joined with a blank line. Thinking blocks in the history are dropped (Tandem's models write none; a history from
another server may carry them). Blocks Tandem cannot read (image, document, ...) are refused, as are server tools
and an assistant message at the end (a prefill, which the chat templates cannot continue).

Every error names the Anthropic field (`messages[1].content[0]`, `tools[2].input_schema`), not the chat field it
maps onto. Unknown fields are ignored (`metadata`, `thinking`, `cache_control`, `service_tier`, ...).
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tandem.errors import BadInputError
from tandem.server.errors import validation_error
from tandem.server.schemas import ChatRequest
from tandem.tools import tool_schema_problem

M = TypeVar("M", bound=BaseModel)

_TEXT_ONLY = ("Tandem serves text models: send the content as text blocks "
              '({"type": "text", "text": ...}) or a string')
_REFUSED_BLOCKS = {"image", "document", "search_result", "container_upload", "server_tool_use",
                   "web_search_tool_result", "web_fetch_tool_result", "code_execution_tool_result",
                   "mcp_tool_use", "mcp_tool_result"}
"""Content block types Anthropic defines and Tandem refuses by name (any other unknown type is refused too)."""
_DROPPED_BLOCKS = {"thinking", "redacted_thinking"}
"""Blocks of an assistant's history that carry no answer text: left out of the prompt."""


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextBlock(_Strict):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock] = ""
    is_error: bool = False

    def text(self) -> str:
        body = self.content if isinstance(self.content, str) else "\n\n".join(b.text for b in self.content)
        return f"Error: {body}" if self.is_error else body


class ToolParam(_Strict):
    """A custom tool: Anthropic's {name, description, input_schema}."""

    type: Literal["custom"] | None = None
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, min_length=1)
    disable_parallel_tool_use: bool = False


class CountTokensRequest(_Strict):
    """POST /v1/messages/count_tokens: the prompt part of a Messages request."""

    model: str | None = None
    """Optional here (default: the start-up model); Anthropic requires it, and every client sends it."""
    messages: list[dict[str, Any]] = Field(min_length=1)
    """Checked block by block in `chat_messages`, so that errors name the block."""
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    draft_model: str | None = Field(None, min_length=1)
    """Tandem's extension, as on /v1/chat/completions ("none": no speculation)."""


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages."""

    max_tokens: int = Field(ge=1)
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stop_sequences: list[str] | None = Field(None, max_length=16)
    stream: bool = False
    output_config: dict[str, Any] | None = None
    """Its `format` ({"type": "json_schema", "schema": {...}}) holds the answer to the schema, as response_format
    json_schema does on chat completions; `effort` is ignored."""

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(s for s in self.stop_sequences or () if s)


def _check(model: type[M], data: Any, where: str) -> M:
    """`data` validated as `model`; an error names the field under `where` (e.g. messages[0].content[1].input)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = validation_error(list(e.errors()))
        err.cause = f"{where}.{err.cause}" if err.param else f"{where}: {err.cause}"
        err.param = f"{where}.{err.param}" if err.param else where
        err.args = (err.message,)
        raise err from e


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """A message's (or system's) content as a list of block objects: a string is one text block."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise BadInputError(f"{where} is {'an empty list' if content == [] else type(content).__name__}",
                            "send a string or a non-empty list of content blocks", param=where)
    for j, b in enumerate(content):
        if not isinstance(b, dict) or not isinstance(b.get("type"), str):
            raise BadInputError(f"{where}[{j}] is not a content block", 'send objects with a "type", e.g. '
                                '{"type": "text", "text": ...}', param=f"{where}[{j}]")
    return content


def _refuse(kind: str, where: str, allowed: str) -> BadInputError:
    if kind in _REFUSED_BLOCKS or kind in ("tool_use", "tool_result", "text"):
        cause = f"{where} is a {kind} block, which this server does not take here"
    else:
        cause = f"{where} has the unknown block type {kind!r}"
    fix = _TEXT_ONLY if kind in ("image", "document") else f"send {allowed}"
    return BadInputError(cause, fix, param=f"{where}.type", code="invalid_value")


def system_text(system: str | list[dict[str, Any]] | None) -> str | None:
    if system is None:
        return None
    blocks = _blocks(system, "system")
    for j, b in enumerate(blocks):
        if b["type"] != "text":
            raise _refuse(b["type"], f"system[{j}]", "text blocks")
    return "\n\n".join(_check(TextBlock, b, f"system[{j}]").text for j, b in enumerate(blocks))


def chat_messages(req: CountTokensRequest) -> list[dict[str, Any]]:
    """The request's system prompt and messages as the chat messages the templates take (see the module doc)."""
    system = system_text(req.system)
    out: list[dict[str, Any]] = [] if system is None else [{"role": "system", "content": system}]
    calls: set[str] = set()  # ids of the tool_use blocks so far: a tool_result must answer one
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadInputError(f"{where} is not an object", 'send {"role": "user", "content": ...}', param=where)
        role = m.get("role")
        if role not in ("user", "assistant"):
            fix = ("send the system prompt in the top-level `system` field" if role == "system" else
                   "send tool results as tool_result blocks of a user message" if role == "tool" else
                   "use 'user' or 'assistant'")
            raise BadInputError(f"{where}.role is {role!r}; the Messages API has the roles user and assistant", fix,
                                param=f"{where}.role", code="invalid_value")
        if "content" not in m:
            raise BadInputError(f"{where}.content is required", "send a string or a list of content blocks",
                                param=f"{where}.content")
        blocks = _blocks(m["content"], f"{where}.content")
        if role == "assistant":
            out.append(_assistant(blocks, f"{where}.content", calls))
        else:
            out += _user(blocks, f"{where}.content", calls)
    if req.messages[-1].get("role") == "assistant":
        last = f"messages[{len(req.messages) - 1}]"
        raise BadInputError(f"{last} is an assistant message at the end (a prefill), which the chat templates cannot "
                            "continue", "end with a user message", param=last)
    return out


def _assistant(blocks: list[dict[str, Any]], where: str, calls: set[str]) -> dict[str, Any]:
    texts, tool_calls = [], []
    for j, b in enumerate(blocks):
        if b["type"] == "text":
            texts.append(_check(TextBlock, b, f"{where}[{j}]").text)
        elif b["type"] == "tool_use":
            use = _check(ToolUseBlock, b, f"{where}[{j}]")
            calls.add(use.id)
            tool_calls.append({"id": use.id, "type": "function",
                               "function": {"name": use.name, "arguments": json.dumps(use.input, ensure_ascii=False)}})
        elif b["type"] not in _DROPPED_BLOCKS:
            raise _refuse(b["type"], f"{where}[{j}]", "text and tool_use blocks in an assistant message")
    text = "\n\n".join(texts)
    msg: dict[str, Any] = {"role": "assistant", "content": text or (None if tool_calls else "")}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return msg


def _user(blocks: list[dict[str, Any]], where: str, calls: set[str]) -> list[dict[str, Any]]:
    out, texts = [], []
    for j, b in enumerate(blocks):
        here = f"{where}[{j}]"
        if b["type"] == "text":
            texts.append(_check(TextBlock, b, here).text)
        elif b["type"] == "tool_result":
            inner = b.get("content")
            if isinstance(inner, list):
                for k, c in enumerate(inner):
                    kind = c.get("type") if isinstance(c, dict) else None
                    if isinstance(kind, str) and kind != "text":
                        raise _refuse(kind, f"{here}.content[{k}]", "text blocks in a tool_result")
            result = _check(ToolResultBlock, b, here)
            if result.tool_use_id not in calls:
                raise BadInputError(f"{here}.tool_use_id {result.tool_use_id!r} answers no tool_use block of an "
                                    "earlier assistant message", "send the id of the tool_use block it answers",
                                    param=f"{here}.tool_use_id")
            out.append({"role": "tool", "tool_call_id": result.tool_use_id, "content": result.text()})
        else:
            raise _refuse(b["type"], here, "text and tool_result blocks in a user message")
    if texts:
        out.append({"role": "user", "content": "\n\n".join(texts)})
    return out


def chat_tools(req: CountTokensRequest) -> dict[str, Any]:
    """The ChatRequest fields for the request's tools: tools, tool_choice and parallel_tool_calls."""
    tools = []
    for i, t in enumerate(req.tools or ()):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind not in (None, "custom"):
            raise BadInputError(f"tools[{i}] is a {kind!r} tool, which Anthropic runs on its own side",
                                "send custom tools: {\"name\", \"description\", \"input_schema\"}",
                                param=f"tools[{i}].type", code="invalid_value")
        tool = _check(ToolParam, t, f"tools[{i}]")
        problem = tool_schema_problem(tool.input_schema)
        if problem:
            raise BadInputError(f"tools[{i}].input_schema is not a JSON schema of an object: {problem}",
                                'send {"type": "object", "properties": {...}}', param=f"tools[{i}].input_schema")
        fn = {"name": tool.name, "parameters": tool.input_schema}
        tools.append({"type": "function", "function": fn if tool.description is None
                      else {**fn, "description": tool.description}})
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise BadInputError("two tools have the same name", "give each tool a distinct name", param="tools")
    if req.tool_choice is None:
        return {"tools": tools} if tools else {}
    choice = _check(ToolChoice, req.tool_choice, "tool_choice")
    if choice.type in ("any", "tool") and not tools:
        raise BadInputError(f"tool_choice {choice.type!r} needs tools", "send tools, or tool_choice auto",
                            param="tool_choice")
    if choice.type == "tool" and choice.name not in names:
        raise BadInputError(f"tool_choice names the tool {choice.name!r}, which is not in tools",
                            f"name one of {names}", param="tool_choice.name")
    mapped: Any = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type) or \
        {"type": "function", "function": {"name": choice.name}}
    out = {"tool_choice": mapped, "parallel_tool_calls": not choice.disable_parallel_tool_use}
    return {"tools": tools, **out} if tools else {}


def _response_format(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """Structured output (output_config.format) as chat completions' response_format."""
    fmt = (config or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise BadInputError("output_config.format is not a JSON schema format",
                            'send {"type": "json_schema", "schema": {...}}', param="output_config.format")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


def chat_request(req: CountTokensRequest) -> ChatRequest:
    """The /v1/chat/completions request that asks the engine for what `req` asks."""
    body: dict[str, Any] = {"model": req.model, "messages": chat_messages(req), "draft_model": req.draft_model,
                            **chat_tools(req)}
    if isinstance(req, MessagesRequest):
        body.update(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                    stop=list(req.stops) or None, response_format=_response_format(req.output_config))
    body = {k: v for k, v in body.items() if v is not None}
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as e:  # what the conversion let through (it should let nothing through)
        raise validation_error(list(e.errors())) from e

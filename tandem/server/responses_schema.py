"""OpenAI's Responses API request (POST /v1/responses) and its translation into a chat completion request.

A Responses request is validated here with its own field names (errors name `input[2].content[0]`, not
`messages[...]`), then rewritten as the ChatRequest the chat route would have parsed: `instructions` becomes the
first system message, input items become chat messages (function_call items the assistant's tool_calls,
function_call_output items tool messages), `tools` and `tool_choice` take the chat shape, `text.format` becomes
`response_format`. The chat path then runs it unchanged, so speculation, caches, tool grammars and structured output
behave as they do for /v1/chat/completions.

As in the chat schemas, unknown fields are ignored and known fields are strict. Fields whose meaning Tandem cannot
honour (background, conversation, prompt, truncation "auto", logprobs, hosted tools, image input) are refused with
a 400 that says so, rather than ignored; `reasoning`, `include` and `text.verbosity` are accepted and have no
effect (the models served here have no reasoning mode: docs/api.md, OpenAI Responses API).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, \
    model_validator

from tandem.errors import BadInputError
from tandem.server.errors import validation_error
from tandem.server.schemas import ChatRequest, FunctionDef

EXTENSIONS = ("draft_model", "draft_max", "draft_min", "draft_p_min", "draft_policy", "cache_prompt", "seed", "top_k",
              "min_p", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "repeat_penalty",
              "repeat_last_n")
"""Tandem's (and llama-server's) chat request fields a Responses request may also send; the chat schema checks them."""

_HOSTED = ("web_search", "web_search_preview", "file_search", "code_interpreter", "computer_use_preview",
           "image_generation", "mcp", "local_shell", "custom", "apply_patch", "shell")
_TEXT_ONLY = "Tandem serves text-only models"


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def _kind(default: str, known: tuple[str, ...]):
    """A discriminator: the value's `type` (`default` when absent); any other type is routed to "unsupported"."""

    def pick(v: Any) -> str:
        kind = v.get("type", default) if isinstance(v, dict) else getattr(v, "type", default)
        return kind if kind in known else "unsupported"
    return pick


# -- content parts -------------------------------------------------------------------------------------------
class TextPart(_Strict):
    """Text in a message: input_text (what users send) or output_text (an earlier answer sent back)."""

    type: Literal["input_text", "output_text"]
    text: str


class _UnsupportedPart(_Strict):
    type: str

    @model_validator(mode="after")
    def _refuse(self) -> _UnsupportedPart:
        if self.type in ("input_image", "input_file", "input_audio"):
            raise ValueError(f"{self.type} parts are not supported: {_TEXT_ONLY}; send the content as input_text "
                             "parts or a string")
        raise ValueError(f"content parts of type {self.type!r} are not supported; send input_text parts "
                         "({\"type\": \"input_text\", \"text\": ...}) or a string")


_text_kind = _kind("input_text", ("input_text", "output_text"))  # a part without type: TextPart says it is missing
Part = Annotated[Annotated[TextPart, Tag("text")] | Annotated[_UnsupportedPart, Tag("unsupported")],
                 Discriminator(lambda v: "unsupported" if _text_kind(v) == "unsupported" else "text")]
Content = str | Annotated[list[Part], Field(min_length=1)]


def _text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


# -- input items ---------------------------------------------------------------------------------------------
class MessageItem(_Strict):
    """A message: `{"role", "content"}` (EasyInputMessage) or `{"type": "message", ...}` (an earlier output)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content


class FunctionCallItem(_Strict):
    """A call the model made earlier (an output item sent back)."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    namespace: str | None = None


class FunctionCallOutputItem(_Strict):
    """The result of a call, for the model's next turn."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: Content


class _UnsupportedItem(_Strict):
    type: str

    @model_validator(mode="after")
    def _refuse(self) -> _UnsupportedItem:
        why = {"item_reference": "items are not looked up by id here; send the item itself, or use "
                                 "previous_response_id",
               "reasoning": "Tandem's models have no reasoning items; drop them from the input"}.get(
            self.type, "send message, function_call or function_call_output items")
        raise ValueError(f"input items of type {self.type!r} are not supported: {why}")


_ITEM_TAGS = ("message", "function_call", "function_call_output")
Item = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                 | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
                 | Annotated[_UnsupportedItem, Tag("unsupported")], Discriminator(_kind("message", _ITEM_TAGS))]


# -- tools -----------------------------------------------------------------------------------------------------
class FunctionTool(FunctionDef):
    """A function tool: the chat API's `function` object, flattened (`{"type": "function", "name", ...}`)."""

    type: Literal["function"]


class NamespaceTool(_Strict):
    """Function tools grouped under a name (Codex CLI sends these); the model is offered the functions themselves,
    and a call to one comes back with `namespace` set."""

    type: Literal["namespace"]
    name: str = Field(min_length=1)
    description: str | None = None
    tools: list[FunctionTool]


class _UnsupportedTool(_Strict):
    type: str

    @model_validator(mode="after")
    def _refuse(self) -> _UnsupportedTool:
        hosted = " (a hosted tool that only OpenAI's servers run)" if self.type in _HOSTED else ""
        codex = ' (Codex CLI: set web_search = "disabled" in its config.toml)' if "web_search" in self.type else ""
        raise ValueError(f"tools of type {self.type!r} are not supported{hosted}; send function tools "
                         f"({{\"type\": \"function\", \"name\", \"parameters\"}}) only{codex}")


Tool = Annotated[Annotated[FunctionTool, Tag("function")] | Annotated[NamespaceTool, Tag("namespace")]
                 | Annotated[_UnsupportedTool, Tag("unsupported")], Discriminator(_kind("", ("function", "namespace")))]


class FunctionChoice(_Strict):
    type: Literal["function"]
    name: str = Field(min_length=1)


class TextFormat(_Strict):
    """`text.format`: text, json_object, or json_schema with its name, schema and strict flag at the top level."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError('json_schema needs schema: {"type": "json_schema", "name": ..., "schema": {...}}')
        return self

    def response_format(self) -> dict[str, Any]:
        if self.type != "json_schema":
            return {"type": self.type}
        return {"type": "json_schema", "json_schema": {"name": self.name or "response", "schema": self.schema_,
                                                       "strict": bool(self.strict)}}


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # a hint for OpenAI's models; no effect here


class Reasoning(_Strict):
    """Accepted for clients that always send it (Codex CLI); the models served here do not reason separately."""

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed", "none"] | None = None


# -- the request -----------------------------------------------------------------------------------------------
class ResponsesRequest(_Strict):
    """POST /v1/responses (docs/api.md, OpenAI Responses API)."""

    model: str | None = None
    input: str | list[Item]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    previous_response_id: str | None = Field(None, min_length=1)
    store: bool = True
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = None
    reasoning: Reasoning | None = None
    include: list[str] | None = None
    # Refused when set to something Tandem cannot do (a 400 rather than silently doing something else).
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    truncation: Literal["auto", "disabled"] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("input")
    @classmethod
    def _not_empty(cls, v: str | list) -> str | list:
        if isinstance(v, list) and not v:
            raise ValueError("input is an empty list; send a string or at least one item")
        return v

    @model_validator(mode="after")
    def _refused(self) -> ResponsesRequest:
        if self.background:
            raise ValueError("background responses are not supported: omit background (the response is generated "
                             "while the request waits, or streamed)")
        if self.conversation is not None:
            raise ValueError("conversation objects are not supported: chain responses with previous_response_id")
        if self.prompt is not None:
            raise ValueError("reusable prompt templates (prompt) are not supported: send the text as instructions "
                             "and input")
        if self.truncation == "auto":
            raise ValueError('truncation "auto" is not supported: a conversation over the context is a 400; start a '
                             'new one or send fewer items')
        if self.top_logprobs or "message.output_text.logprobs" in (self.include or ()):
            raise ValueError("log probabilities are not supported on /v1/responses: use /v1/chat/completions with "
                             "logprobs: true")
        return self

    def items(self) -> list[MessageItem | FunctionCallItem | FunctionCallOutputItem]:
        """The input as a list of items (a string is one user message)."""
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)  # type: ignore[arg-type]

    def functions(self) -> tuple[list[FunctionTool], dict[str, str]]:
        """The function tools, namespaces flattened, and the namespace of each function that has one."""
        out: list[FunctionTool] = []
        namespaces: dict[str, str] = {}
        for t in self.tools or ():
            if isinstance(t, NamespaceTool):
                out += t.tools
                namespaces.update({f.name: t.name for f in t.tools})
            else:
                out.append(t)  # type: ignore[arg-type]
        return out, namespaces

    def chat_request(self, history: list, raw: dict[str, Any]) -> ChatRequest:
        """The chat completion request this asks for: `history` (the items of previous_response_id) before the
        input, `raw` the body as sent (for Tandem's extension fields)."""
        messages = ([{"role": "system", "content": self.instructions}] if self.instructions is not None else []) + \
            chat_messages([*history, *self.items()])
        functions, _ = self.functions()
        body: dict[str, Any] = {k: raw[k] for k in EXTENSIONS if k in raw}
        body.update(model=self.model, messages=messages, max_completion_tokens=self.max_output_tokens,
                    temperature=self.temperature, top_p=self.top_p, stream=self.stream,
                    parallel_tool_calls=self.parallel_tool_calls)
        if functions:
            body["tools"] = [{"type": "function", "function": f.model_dump(exclude={"type"}, exclude_none=True)}
                             for f in functions]
        if isinstance(self.tool_choice, FunctionChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        if self.text is not None and self.text.format is not None:
            body["response_format"] = self.text.format.response_format()
        try:
            return ChatRequest.model_validate(body)
        except ValidationError as e:
            raise responses_param(validation_error(list(e.errors()))) from e


def chat_messages(items: list) -> list[dict[str, Any]]:
    """Chat messages for Responses items: function_call items join the assistant message before them (or start
    one), function_call_output items become tool messages."""
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": _text(item.content)})  # type: ignore[arg-type]
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if out and out[-1]["role"] == "assistant":  # the same turn: its text, then its calls
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            out.append({"role": "tool", "tool_call_id": item.call_id,
                        "content": _text(item.output)})  # type: ignore[arg-type]
    return out


_PARAMS = (("messages", "input"), ("max_completion_tokens", "max_output_tokens"), ("response_format", "text.format"))


def responses_param(err: BadInputError | Any) -> Any:
    """The error with its param named as the Responses request names it (the chat path names chat fields):
    messages -> input (chat indices differ from item indices, so the index goes), tools[i].function.x -> tools[i].x,
    response_format -> text.format."""
    param = getattr(err, "param", None)
    if not param:
        return err
    for chat, ours in _PARAMS:
        if param == chat or param.startswith((chat + ".", chat + "[")):
            param = ours if chat == "messages" else ours + param[len(chat):]
            break
    err.param = param.replace(".function.", ".", 1) if param.startswith("tools[") else param
    return err


def parse_request(data: dict[str, Any]) -> ResponsesRequest:
    """Validate a body; errors are 400s naming the field (union tags left out of the path)."""
    try:
        return ResponsesRequest.model_validate(data)
    except ValidationError as e:
        tags = {"text", "unsupported", "function", "namespace", *_ITEM_TAGS}
        errors = [{**err, "loc": tuple(p for i, p in enumerate(err.get("loc", ()))
                                       if not (p in tags and i and isinstance(err["loc"][i - 1], int)))}
                  for err in e.errors()]
        raise validation_error(errors) from e

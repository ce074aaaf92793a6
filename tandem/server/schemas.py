"""OpenAI-shaped request and response models.

Requests are strict (no "10" for an int, no 1 for a bool), ignore unknown fields, and reject values
of known fields that Tandem does not support (n != 1, ...) with a 400.
Responses are dumped with `exclude_unset`, so optional extensions (token_sources) appear only when set.

The JSON schemas of the request models are what GET /openapi.json publishes (see tandem.server.openapi). Where
a validator refuses values the field's type allows (n != 1, a penalty other than 0), the field carries the
narrower schema (`_schema`), so the published schema accepts exactly what the server accepts, field by field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator,
                      model_validator)

from tandem.chat import ROLES
from tandem.errors import BadInputError
from tandem.spec.logprobs import MAX_TOP
from tandem.spec.penalties import LogitBias
from tandem.tools import ToolRequest, tool_schema_problem

Role = Literal["system", "user", "assistant", "tool", "developer"]
assert set(Role.__args__) == set(ROLES)  # type: ignore[attr-defined]


def _schema(*allowed: dict[str, Any]) -> WithJsonSchema:
    """The published JSON schema of a field: any of `allowed`, or null."""
    return WithJsonSchema({"anyOf": [*allowed, {"type": "null"}]})


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Strict):
    """One part of a message's content; only text parts are supported."""

    model_config = ConfigDict(json_schema_extra={"properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                                                 "required": ["type", "text"]})
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text" or self.text is None:
            raise ValueError(f"content parts of type {self.type!r} are not supported; send text parts "
                             "({\"type\": \"text\", \"text\": ...}) or a plain string")
        return self


class CallFunction(_Strict):
    name: str = Field(min_length=1)
    arguments: str
    """The arguments as JSON text, as OpenAI sends them."""


class MessageToolCall(_Strict):
    """A call in an assistant message of the history."""

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: CallFunction


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        problem = tool_schema_problem(v)
        if problem:
            raise ValueError(f"not an object JSON schema: {problem}; send {{\"type\": \"object\", \"properties\": "
                             "{...}}")
        return v


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str = Field(min_length=1)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


def _content_schema(schema: dict[str, Any]) -> None:
    """A message's published content: a string, a non-empty list of parts, or null (which only an assistant
    message with tool_calls may send: the validator refuses the others)."""
    for s in schema["anyOf"]:
        if s.get("type") == "array":
            s["minItems"] = 1
    schema.pop("default", None)


class ChatMessage(_Strict):
    """One chat message. docs/api.md ("Messages OpenAI refuses") lists what is refused, and why."""

    role: Role
    tool_calls: list[MessageToolCall] | None = None
    """An assistant message's calls (its content may then be null)."""
    content: str | list[ContentPart] | None = Field(None, json_schema_extra=_content_schema, validate_default=True)
    name: str | None = None
    tool_call_id: str | None = Field(None, validate_default=True)
    """A tool message's answer to this call."""

    @field_validator("content")
    @classmethod
    def _has_content(cls, v: str | list[ContentPart] | None, info: ValidationInfo) -> str | list[ContentPart] | None:
        # OpenAI refuses a message without content (only an assistant message with tool calls may omit it)
        role = info.data.get("role", "chat")
        if v is None and role == "assistant" and info.data.get("tool_calls"):
            return v
        if v is None:
            raise ValueError(f"a {role} message needs content: a string or a list of text parts, not null")
        if isinstance(v, list) and not v:
            raise ValueError(f"a {role} message has an empty list of content parts; send at least one text part, "
                             "or a string")
        return v

    @field_validator("tool_call_id")
    @classmethod
    def _answers_a_call(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and info.data.get("role") == "tool":
            raise ValueError("a tool message needs tool_call_id: the id of the tool call it answers")
        return v

    @field_validator("tool_calls")
    @classmethod
    def _assistant_calls(cls, v: list[MessageToolCall] | None, info: ValidationInfo) -> list[MessageToolCall] | None:
        if v and info.data.get("role") != "assistant":
            raise ValueError(f"a {info.data.get('role')} message cannot carry tool_calls; only assistant messages do")
        return v

    def as_dict(self) -> dict[str, Any]:
        """The message as chat templates read it: content as text, and the tool fields when set."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenRequest(_Strict):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Annotated[str | list[str] | None,
                    _schema({"type": "string"}, {"type": "array", "maxItems": 16, "items": {"type": "string"}})] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int | None, _schema({"const": 1})] = None
    # Tandem extensions.
    draft_model: str | None = Field(None, min_length=1)
    draft_max: int | None = Field(None, ge=0, le=64)
    draft_min: int | None = Field(None, ge=0, le=64)
    draft_p_min: float | None = Field(None, ge=0.0, le=1.0)
    draft_policy: str | None = Field(None, min_length=1)
    return_token_sources: bool = False
    cache_prompt: bool | None = None  # llama-server's name: false decodes the whole prompt again
    # Structured output (tandem.server.structured): OpenAI's response_format; llama-server's grammar (GBNF or
    # Lark) and json_schema.
    response_format: dict[str, Any] | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    # Penalties and biases (tandem.spec.penalties); repeat_penalty and repeat_last_n are llama-server's.
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, Any] | None = None
    repeat_penalty: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    repeat_last_n: int | None = Field(None, ge=-1)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError(f"n={v} is not supported: Tandem returns one choice per request; omit n or use 1")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError(f"at most 16 stop strings are supported, got {len(v)}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict | None) -> dict | None:
        if v:
            try:
                LogitBias.parse(v)
            except BadInputError as e:
                raise ValueError(e.message.removeprefix("logit_bias: ")) from e
        return v

    @model_validator(mode="after")
    def _check(self) -> _GenRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        if self.draft_min is not None and self.draft_max is not None and self.draft_min > self.draft_max:
            raise ValueError(f"draft_min ({self.draft_min}) is larger than draft_max ({self.draft_max})")
        return self

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_GenRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP)

    @model_validator(mode="after")
    def _chat_check(self) -> ChatRequest:
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("two tools have the same function name; give each tool a distinct name")
        forced = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
        if forced is not None and forced not in names:
            raise ValueError(f"tool_choice names function {forced!r}, which is not in tools; name one of "
                             f"{names or 'the tools (none were sent)'}")
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools; send tools or use 'auto'")
        return self

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true; send both, or omit top_logprobs")
        return v

    @property
    def logprob_count(self) -> int | None:
        """GenParams.logprobs: the alternatives per token, None when logprobs are off."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.as_dict() for m in self.messages]

    def tool_request(self) -> ToolRequest | None:
        """The tools offered to the model (None: no tools, or tool_choice none)."""
        if not self.tools or self.tool_choice == "none":
            return None
        choice = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else \
            (self.tool_choice or "auto")
        tools = tuple(t.model_dump(exclude_none=True) for t in self.tools)
        return ToolRequest(tools, choice, self.parallel_tool_calls)


class CompletionRequest(_GenRequest):
    """POST /v1/completions. `prompt` is text, one-element list of text, or token ids."""

    prompt: Annotated[str | list[str] | list[int], WithJsonSchema({"anyOf": [
        {"type": "string"},
        {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "string"}},
        {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}]})]
    echo: Annotated[bool, WithJsonSchema({"const": False})] = False
    best_of: Annotated[int | None, _schema({"const": 1})] = None
    suffix: Annotated[str | None, _schema({"const": ""})] = None
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy API: the alternatives per token, up to 5

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt is an empty list; send a string or a list of token ids")
            if isinstance(v[0], str) and len(v) != 1:
                raise ValueError(f"{len(v)} prompts were sent; Tandem takes one prompt per request")
            if isinstance(v[0], int) and min(v) < 0:
                raise ValueError("token ids must be >= 0")
        return v

    @model_validator(mode="after")
    def _completion_check(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported; omit the field or send false")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported; omit the field or send 1")
        if self.suffix:
            raise ValueError("suffix is not supported; omit the field")
        return self

    @property
    def token_limit(self) -> int:
        return self.max_tokens or 16  # OpenAI's default for text completions

    @property
    def logprob_count(self) -> int | None:
        """GenParams.logprobs: the alternatives per token, None when logprobs are off."""
        return self.logprobs

    def prompt_value(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return self.prompt[0]  # type: ignore[return-value]
        return self.prompt  # type: ignore[return-value]


# -- responses ------------------------------------------------------------------------------------
class TokenSource(BaseModel):
    text: str
    source: Literal["draft", "grammar", "guess", "main"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """A chat choice's logprobs: one entry per token."""

    content: list[ChatTokenLogprob] | None


class TextLogprobs(BaseModel):
    """A text completion choice's logprobs (the legacy shape): parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None
    token_sources: list[TokenSource] | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None
    logprobs: ChatLogprobs | None
    token_sources: list[TokenSource] | None = None


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: TextLogprobs | None
    token_sources: list[TokenSource] | None = None


class Completion(BaseModel):
    """A whole response or one streamed chunk; `object` says which."""

    id: str
    object: Literal["chat.completion", "chat.completion.chunk", "text_completion"]
    created: int
    model: str
    choices: list[ChatChoice] | list[ChatChunkChoice] | list[TextChoice]
    usage: Usage | None = None
    stats: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None


class ModelCard(BaseModel):
    """One model in GET /v1/models; registry models carry more fields (docs/api.md)."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tandem"
    path: str
    n_ctx: int | None
    """The loaded context (null: not loaded)."""
    draft_model: str | None
    speculative: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LMStudioModel(BaseModel):
    """One model in LM Studio's listing (GET /api/v0/models); registry models carry more fields."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["model"] = "model"
    type: Literal["llm"] = "llm"
    state: Literal["loaded", "not-loaded"]
    compatible_draft_models: list[str]


class LMStudioList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LMStudioModel]


class Health(BaseModel):
    """GET /health (docs/api.md lists every field)."""

    model_config = ConfigDict(extra="allow")
    status: Literal["loading", "ready", "degraded", "failed", "draining", "stopped"]
    reason: str | None = None


class ErrorDetail(BaseModel):
    message: str
    """The cause, then a fix."""
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error body, which every 4xx and 5xx carries."""

    error: ErrorDetail

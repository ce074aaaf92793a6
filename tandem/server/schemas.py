"""OpenAI-shaped request and response models.

Requests are strict (no "10" for an int, no 1 for a bool), ignore unknown fields, and reject values
of known fields that Tandem does not support (n != 1, logprobs, penalties, tools, ...) with a 400.
Responses are dumped with `exclude_unset`, so optional extensions (token_sources) appear only when set.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tandem.chat import ROLES

Role = Literal["system", "user", "assistant", "tool", "developer"]
assert set(Role.__args__) == set(ROLES)  # type: ignore[attr-defined]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Strict):
    """One part of a message's content; only text parts are supported."""

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text" or self.text is None:
            raise ValueError(f"content parts of type {self.type!r} are not supported; send text parts "
                             "({\"type\": \"text\", \"text\": ...}) or a plain string")
        return self


class ChatMessage(_Strict):
    role: Role
    content: str | list[ContentPart] | None = None

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        # OpenAI refuses a message without content (only an assistant message with tool calls may omit it)
        if self.content is None:
            raise ValueError(f"a {self.role} message needs content: a string or a list of text parts, not null")
        return self

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
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
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
    # Known OpenAI fields whose non-default values are not supported (checked in _unsupported).
    logprobs: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None

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

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("repetition penalties are not supported (they would change the main model's "
                             "distribution); omit the field or send 0")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict | None) -> dict | None:
        if v:
            raise ValueError("logit_bias is not supported; omit the field")
        return v

    @model_validator(mode="after")
    def _check(self) -> _GenRequest:
        if self.logprobs not in (None, False, 0):
            raise ValueError("logprobs are not supported; omit the field")
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
    tools: list[Any] | None = None
    top_logprobs: int | None = None

    @model_validator(mode="after")
    def _chat_check(self) -> ChatRequest:
        if self.tools:
            raise ValueError("tools are not supported; omit the field")
        if self.top_logprobs:
            raise ValueError("top_logprobs is not supported; omit the field")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_GenRequest):
    """POST /v1/completions. `prompt` is text, one-element list of text, or token ids."""

    prompt: str | list[str] | list[int]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None
    token_sources: list[TokenSource] | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None
    logprobs: None
    token_sources: list[TokenSource] | None = None


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None
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
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tandem"
    path: str
    n_ctx: int
    draft_model: str | None
    speculative: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

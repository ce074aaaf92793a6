"""Turning generation events into OpenAI response bodies and stream chunks (pure: no I/O)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tandem.server.logprobs import chat_logprobs, text_length, text_logprobs
from tandem.server.schemas import (AssistantMessage, ChatChoice, ChatChunkChoice, Completion, Delta,
                                   PromptTokensDetails, TextChoice, TokenSource, Usage)
from tandem.spec.generate import Done, Token
from tandem.spec.logprobs import TokenLogprob
from tandem.spec.stats import SpecStats
from tandem.tools import Parsed, ToolRequest, ToolStream, call_deltas, parse

_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


def finish_reason(stop_reason: str) -> str | None:
    """OpenAI's finish_reason for a generation's stop reason (cancelled generations have none)."""
    return _FINISH.get(stop_reason)


def usage(stats: SpecStats) -> Usage:
    return Usage(prompt_tokens=stats.prompt_tokens, completion_tokens=stats.generated_tokens,
                 total_tokens=stats.prompt_tokens + stats.generated_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=stats.cached_tokens))


@dataclass
class Piece:
    """Text of some consecutive events, its per-token sources and logprobs, and the Done event if it came."""

    text: str = ""
    sources: list[TokenSource] = field(default_factory=list)
    done: Done | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @classmethod
    def of(cls, events: Sequence[Token | Done]) -> Piece:
        out = cls()
        parts: list[str] = []
        for ev in events:
            text, source = (ev.text, ev.source) if isinstance(ev, Token) else (ev.tail, "main")
            if text:
                parts.append(text)
                out.sources.append(TokenSource(text=text, source=source))
            if isinstance(ev, Token) and ev.logprob is not None:
                out.logprobs.append(ev.logprob)
            if isinstance(ev, Done):
                out.done = ev
                break
        out.text = "".join(parts)
        return out


def sse(obj: dict[str, Any] | str) -> str:
    """One server-sent event line exactly as OpenAI writes them."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class Builder:
    """Builds the bodies of one response: chat or text completion, whole or chunked."""

    def __init__(self, endpoint: str, model: str, *, token_sources: bool, logprobs: bool = False):
        self.chat = endpoint == "chat"
        self.model = model
        self.token_sources = token_sources
        self._tools: ToolStream | None = None
        self.logprobs = logprobs
        self._offset = 0  # a streamed text completion's text_offset so far
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def read_tool_calls(self, tool_format: str, req: ToolRequest | None) -> None:
        """Read the answer's tool calls in this format (a chat offered `req`'s tools; None: it offered none)."""
        self._tools = ToolStream(tool_format, req) if req is not None and self.chat else None

    def _obj(self, obj: str, choices: list, **extra: Any) -> dict[str, Any]:
        c = Completion(id=self.id, object=obj, created=self.created, model=self.model,  # type: ignore[arg-type]
                       choices=choices, **extra)
        return c.model_dump(mode="json", exclude_unset=True)

    def _sources(self, piece: Piece) -> dict[str, Any]:
        return {"token_sources": piece.sources} if self.token_sources else {}

    def _logprobs(self, piece: Piece, chunk: bool = False) -> Any:
        """The choice's logprobs for the piece's tokens: None when not asked for, or on a chunk without tokens."""
        if not self.logprobs or (chunk and not piece.logprobs):
            return None
        if self.chat:
            return chat_logprobs(piece.logprobs)
        out = text_logprobs(piece.logprobs, self._offset)
        self._offset += text_length(piece.logprobs)
        return out

    def _extras(self, stats: SpecStats) -> dict[str, Any]:
        return {"usage": usage(stats), "stats": stats.to_dict(), "timings": stats.timings()}

    def whole(self, piece: Piece) -> dict[str, Any]:
        """The non-streamed response for all events of a generation."""
        assert piece.done is not None
        stats = piece.done.stats
        reason = finish_reason(stats.stop_reason)
        if self.chat:
            found = Parsed(piece.text) if self._tools is None else parse(piece.text, self._tools.fmt, self._tools.req)
            calls = {"tool_calls": [c.to_openai() for c in found.calls]} if found.calls else {}
            message = AssistantMessage(role="assistant", content=found.content, **calls)
            reason = "tool_calls" if found.calls else reason
            choice: Any = ChatChoice(index=0, message=message, finish_reason=reason, logprobs=self._logprobs(piece),
                                     **self._sources(piece))
            return self._obj("chat.completion", [choice], **self._extras(stats))
        choice = TextChoice(index=0, text=piece.text, finish_reason=reason, logprobs=self._logprobs(piece),
                            **self._sources(piece))
        return self._obj("text_completion", [choice], **self._extras(stats))

    def _chunk(self, piece: Piece, *, role: bool = False, finish: str | None = None,
               extras: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.chat:
            delta = Delta(role="assistant", content=piece.text) if role else Delta(content=piece.text)
            if finish is not None and not piece.text:
                delta = Delta()
            choice: Any = ChatChunkChoice(index=0, delta=delta, finish_reason=finish,
                                          logprobs=self._logprobs(piece, chunk=True), **self._sources(piece))
            return self._obj("chat.completion.chunk", [choice], **(extras or {}))
        choice = TextChoice(index=0, text=piece.text, finish_reason=finish, logprobs=self._logprobs(piece, chunk=True),
                            **self._sources(piece))
        return self._obj("text_completion", [choice], **(extras or {}))

    def _call_chunks(self, rest: Parsed) -> list[str]:
        """The end of a tool-reading stream: the text held back, then each call as delta.tool_calls chunks."""
        lines = [sse(self._chunk(Piece(rest.content)))] if rest.content else []
        for calls in call_deltas(rest.calls):
            choice = ChatChunkChoice(index=0, delta=Delta(tool_calls=calls), finish_reason=None, logprobs=None)
            lines.append(sse(self._obj("chat.completion.chunk", [choice])))
        return lines

    def stream(self, piece: Piece, *, first: bool, include_usage: bool) -> list[str]:
        """SSE lines for a piece of a stream; the last piece also gets the final chunk(s) and [DONE]."""
        lines: list[str] = []
        if first and self.chat:
            lines.append(sse(self._chunk(Piece(), role=True)))
        text = piece.text if self._tools is None else self._tools.feed(piece.text)
        text_piece = Piece(text, piece.sources, logprobs=piece.logprobs)
        if text or piece.logprobs:  # a token whose text is pending still sends its logprobs
            lines.append(sse(self._chunk(text_piece)))
        if piece.done is None:
            return lines
        stats = piece.done.stats
        finish = finish_reason(stats.stop_reason) or "stop"
        if self._tools is not None:
            rest = self._tools.finish()
            lines += self._call_chunks(rest)
            finish = "tool_calls" if rest.calls else finish
        if include_usage:
            lines.append(sse(self._chunk(Piece(), finish=finish)))
            lines.append(sse(self._obj(("chat.completion.chunk" if self.chat else "text_completion"), [],
                                       **self._extras(stats))))
        else:
            lines.append(sse(self._chunk(Piece(), finish=finish, extras=self._extras(stats))))
        lines.append(sse("[DONE]"))
        return lines

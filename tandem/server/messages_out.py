"""Turning generation events into Anthropic's message object and its stream events (pure: no I/O).

The answer is read for tool calls with the same reader as /v1/chat/completions (tandem.tools), so a streamed
answer and a whole one hold the same blocks: text (when there is any), then one tool_use block per call, whose
`input` is the call's arguments parsed. Speculation stats ride along as Tandem's extension, as on chat
completions: `stats` and `timings` on the message, and on the stream's message_delta.

Usage follows Anthropic's split: `input_tokens` are the prompt tokens decoded for this request,
`cache_read_input_tokens` the ones the prompt cache already held (their sum is the prompt's length, which
count_tokens gives). A stream's message_start is sent before the prompt's length is known: its usage is 0 and the
message_delta at the end carries the real counts (the SDK's final message takes them from there).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from tandem.errors import TandemError
from tandem.server.responses import Piece
from tandem.spec.stats import SpecStats
from tandem.tools import Parsed, ToolCall, ToolRequest, ToolStream, parse

_STOP = {"eos": "end_turn", "stop": "stop_sequence", "length": "max_tokens",
         "context": "model_context_window_exceeded"}
"""Anthropic's stop_reason for a generation's stop reason (a cancelled one has none)."""

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
                503: "overloaded_error"}


def error_body(err: TandemError) -> dict[str, Any]:
    """Anthropic's error body for an error: its type from the HTTP status, the message naming cause and fix."""
    status = err.http_status
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    if err.code == "model_load_failed":  # a 503 that retrying does not cure
        kind = "api_error"
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def event(name: str, data: dict[str, Any]) -> str:
    """One server-sent event as Anthropic writes them: its type named twice (the event line and data.type)."""
    return f"event: {name}\ndata: {json.dumps({'type': name, **data}, ensure_ascii=False, separators=(',', ':'))}\n\n"


def error_event(err: TandemError) -> str:
    return event("error", {"error": error_body(err)["error"]})


def tool_use_id(call: ToolCall) -> str:
    """Anthropic's id shape (toolu_...) for a call; the id comes back in tool_use/tool_result blocks as it is."""
    return "toolu_" + call.id.removeprefix("call_") if call.id.startswith("call_") else call.id


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": tool_use_id(call), "name": call.name, "input": json.loads(call.arguments)}


def _usage(stats: SpecStats) -> dict[str, int]:
    return {"input_tokens": stats.prompt_tokens - stats.cached_tokens, "output_tokens": stats.generated_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": stats.cached_tokens}


class MessageBuilder:
    """Builds one answer: the whole message object, or its stream events piece by piece.

    `stops`: the request's stop_sequences. With more than one, the request asks for each token's logprob (which
    carries its bytes): the text stops before the stop sequence, so only the raw output tells which one matched.
    """

    def __init__(self, model: str, *, stops: tuple[str, ...] = (), tools: ToolRequest | None = None,
                 tool_format: str = "generic"):
        self.model, self.stops = model, stops
        self.id = "msg_" + uuid.uuid4().hex[:24]
        self._tools, self._fmt = tools, tool_format
        self._reader = ToolStream(tool_format, tools) if tools is not None else None
        self._raw = bytearray()  # the output's bytes, where several stop sequences need them
        self._blocks = 0  # content blocks started in the stream
        self._text_open = False

    def _stop(self, stats: SpecStats, calls: tuple[ToolCall, ...]) -> tuple[str | None, str | None]:
        """stop_reason and stop_sequence."""
        if calls:
            return "tool_use", None
        reason = _STOP.get(stats.stop_reason)
        if reason != "stop_sequence" or not self.stops:
            return reason, None
        if len(self.stops) == 1:
            return reason, self.stops[0]
        raw = self._raw.decode("utf-8", "replace")
        hits = [(raw.find(s), len(s), s) for s in self.stops if s in raw]  # the first match; at a tie the shorter
        return reason, min(hits)[2] if hits else None

    def _record(self, piece: Piece) -> None:
        if len(self.stops) > 1:
            self._raw += b"".join(lp.chosen.bytes for lp in piece.logprobs)

    def _message(self, content: list[dict[str, Any]], stop: tuple[str | None, str | None],
                 usage: dict[str, int]) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop[0], "stop_sequence": stop[1], "usage": usage}

    def whole(self, piece: Piece) -> dict[str, Any]:
        """The message object for all events of a generation."""
        assert piece.done is not None
        self._record(piece)
        stats = piece.done.stats
        found = Parsed(piece.text) if self._tools is None else parse(piece.text, self._fmt, self._tools)
        content = [{"type": "text", "text": found.content}] if found.content else []
        content += [_tool_use(c) for c in found.calls]
        return {**self._message(content, self._stop(stats, found.calls), _usage(stats)),
                "stats": stats.to_dict(), "timings": stats.timings()}

    def start(self) -> list[str]:
        """The stream's opening events."""
        usage = {"input_tokens": 0, "output_tokens": 0}
        return [event("message_start", {"message": self._message([], (None, None), usage)}), event("ping", {})]

    def _text(self, text: str) -> list[str]:
        if not text:
            return []
        out = []
        if not self._text_open:
            out.append(event("content_block_start", {"index": self._blocks, "content_block": {"type": "text",
                                                                                                "text": ""}}))
            self._text_open, self._blocks = True, self._blocks + 1
        out.append(event("content_block_delta", {"index": self._blocks - 1,
                                                 "delta": {"type": "text_delta", "text": text}}))
        return out

    def stream(self, piece: Piece) -> list[str]:
        """Events for a piece of the stream; the last piece also closes the blocks and the message."""
        self._record(piece)
        out = self._text(piece.text if self._reader is None else self._reader.feed(piece.text))
        if piece.done is None:
            return out
        calls: tuple[ToolCall, ...] = ()
        if self._reader is not None:
            rest = self._reader.finish()
            out += self._text(rest.content or "")
            calls = rest.calls
        if self._text_open:
            out.append(event("content_block_stop", {"index": self._blocks - 1}))
        for call in calls:
            block = _tool_use(call)
            out.append(event("content_block_start", {"index": self._blocks, "content_block": {**block, "input": {}}}))
            out.append(event("content_block_delta", {"index": self._blocks, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}}))
            out.append(event("content_block_stop", {"index": self._blocks}))
            self._blocks += 1
        stats = piece.done.stats
        reason, sequence = self._stop(stats, calls)
        out.append(event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                           "usage": _usage(stats), "stats": stats.to_dict(),
                                           "timings": stats.timings()}))
        out.append(event("message_stop", {}))
        return out

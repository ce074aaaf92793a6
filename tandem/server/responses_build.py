"""Turning generation events into Responses API objects and stream events (pure: no I/O).

The text is read for tool calls exactly as the chat path reads it (tandem.tools: `parse` for a whole answer,
`ToolStream` as it streams, so both agree); only the shapes differ. The output is at most one `message` item
(the text, as one `output_text` part), then one `function_call` item per call. A stream sends OpenAI's events
in OpenAI's order, each with its `sequence_number`; the message item opens with the first text that cannot be
part of a call, so an answer that is only calls has no message item, streamed or not.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from tandem.errors import TandemError
from tandem.server.responses import Piece
from tandem.server.responses_schema import ResponsesRequest
from tandem.spec.stats import SpecStats
from tandem.tools import Parsed, ToolCall, ToolRequest, ToolStream, parse

_INCOMPLETE = {"length": "max_output_tokens", "context": "max_output_tokens"}
"""Stop reasons that leave a response incomplete, and OpenAI's reason for it."""


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def event(obj: dict[str, Any]) -> str:
    """One server-sent event as OpenAI writes Responses events: its type, then its JSON."""
    return f"event: {obj['type']}\ndata: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(stats: SpecStats) -> dict[str, Any]:
    return {"input_tokens": stats.prompt_tokens, "input_tokens_details": {"cached_tokens": stats.cached_tokens},
            "output_tokens": stats.generated_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": stats.prompt_tokens + stats.generated_tokens}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseBuilder:
    """The response object of one request, whole or as a stream of events."""

    def __init__(self, req: ResponsesRequest, model: str):
        self.req, self.model = req, model
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self._tools: ToolStream | None = None
        self._namespaces = req.functions()[1]
        self._seq = 0
        self._message: dict[str, Any] | None = None  # the streamed message item, once open
        self._text: list[str] = []  # its text so far
        self.output: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None
        """The finished response (set by `whole`, or by `stream` at the end)."""

    def read_tool_calls(self, tool_format: str, tools: ToolRequest | None) -> None:
        """Read the answer's calls in the loaded model's format (None: no tools were offered)."""
        self._tools = ToolStream(tool_format, tools) if tools is not None else None

    # -- the response object --------------------------------------------------------------------------------
    def response(self, status: str, stats: SpecStats | None = None) -> dict[str, Any]:
        """The response object (OpenAI's fields, echoing the request) with the output so far."""
        req = self.req
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else \
            {"type": "text"}
        choice: Any = req.tool_choice.model_dump() if req.tool_choice is not None and \
            not isinstance(req.tool_choice, str) else (req.tool_choice or "auto")
        body: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "background": False, "error": None,
            "incomplete_details": {"reason": _INCOMPLETE[stats.stop_reason]} if status == "incomplete" and stats
            else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": self.model,
            "output": list(self.output), "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None},  # accepted, not applied: the models do not reason
            "store": req.store, "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": fmt}, "tool_choice": choice,
            "tools": [t.model_dump(by_alias=True, exclude_none=True) for t in req.tools or ()],
            "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": "disabled",
            "usage": usage(stats) if stats else None, "user": req.user, "metadata": req.metadata or {}}
        if stats is not None:  # Tandem's extensions, as on chat completions
            body["stats"], body["timings"] = stats.to_dict(), stats.timings()
        return body

    def _status(self, stats: SpecStats, calls: bool) -> str:
        return "incomplete" if stats.stop_reason in _INCOMPLETE and not calls else "completed"

    def _call_item(self, call: ToolCall, status: str = "completed") -> dict[str, Any]:
        item = {"id": new_id("fc"), "type": "function_call", "status": status, "call_id": call.id,
                "name": call.name, "arguments": call.arguments}
        if call.name in self._namespaces:
            item["namespace"] = self._namespaces[call.name]
        return item

    def _message_item(self, text: str, status: str, item_id: str | None = None) -> dict[str, Any]:
        return {"id": item_id or new_id("msg"), "type": "message", "status": status, "role": "assistant",
                "content": [_text_part(text)]}

    def whole(self, piece: Piece) -> dict[str, Any]:
        """The non-streamed response for all events of a generation."""
        assert piece.done is not None
        stats = piece.done.stats
        found = Parsed(piece.text) if self._tools is None else parse(piece.text, self._tools.fmt, self._tools.req)
        status = self._status(stats, bool(found.calls))
        if found.content is not None:
            self.output.append(self._message_item(found.content, status))
        self.output += [self._call_item(c) for c in found.calls]
        self.final = self.response(status, stats)
        return self.final

    # -- the stream --------------------------------------------------------------------------------------------
    def _event(self, kind: str, **fields: Any) -> str:
        out = event({"type": kind, "sequence_number": self._seq, **fields})
        self._seq += 1
        return out

    def start(self) -> list[str]:
        """The stream's first events: the response created, then in progress."""
        return [self._event("response.created", response=self.response("in_progress")),
                self._event("response.in_progress", response=self.response("in_progress"))]

    def _open_message(self) -> list[str]:
        self._message = {"id": new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                         "content": []}
        index = len(self.output)
        return [self._event("response.output_item.added", output_index=index, item=self._message),
                self._event("response.content_part.added", item_id=self._message["id"], output_index=index,
                            content_index=0, part=_text_part(""))]

    def _delta(self, text: str) -> list[str]:
        lines = [] if self._message is not None else self._open_message()
        assert self._message is not None
        if text:
            self._text.append(text)
            lines.append(self._event("response.output_text.delta", item_id=self._message["id"],
                                     output_index=len(self.output), content_index=0, delta=text, logprobs=[]))
        return lines

    def _close_message(self, status: str) -> list[str]:
        assert self._message is not None
        text, item_id, index = "".join(self._text), self._message["id"], len(self.output)
        item = self._message_item(text, status, item_id)
        self.output.append(item)
        return [self._event("response.output_text.done", item_id=item_id, output_index=index, content_index=0,
                            text=text, logprobs=[]),
                self._event("response.content_part.done", item_id=item_id, output_index=index, content_index=0,
                            part=_text_part(text)),
                self._event("response.output_item.done", output_index=index, item=item)]

    def _call_events(self, call: ToolCall) -> list[str]:
        item, index = self._call_item(call), len(self.output)
        self.output.append(item)
        return [self._event("response.output_item.added", output_index=index,
                            item={**item, "status": "in_progress", "arguments": ""}),
                self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                            delta=call.arguments),
                self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            name=call.name, arguments=call.arguments),
                self._event("response.output_item.done", output_index=index, item=item)]

    def stream(self, piece: Piece) -> list[str]:
        """Events for a piece of the stream; the last piece also closes the items and the response."""
        text = piece.text if self._tools is None else self._tools.feed(piece.text)
        lines = self._delta(text) if text else []
        if piece.done is None:
            return lines
        stats = piece.done.stats
        rest = Parsed(None) if self._tools is None else self._tools.finish()
        status = self._status(stats, bool(rest.calls))
        if rest.content or (self._message is None and not rest.calls):  # an empty answer is an empty message
            lines += self._delta(rest.content or "")
        if self._message is not None:
            lines += self._close_message(status)
        for call in rest.calls:
            lines += self._call_events(call)
        self.final = self.response(status, stats)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return [*lines, self._event(kind, response=self.final)]

    def failed(self, err: TandemError) -> list[str]:
        """An error after the stream started: an `error` event, then the response as failed."""
        code = err.code or err.error_type
        failed = {**self.response("failed"), "error": {"code": code, "message": err.message}}
        return [self._event("error", code=code, message=err.message, param=err.param),
                self._event("response.failed", response=failed)]

"""Tool calls: offering tools to a model in its family's format, and reading its calls back (pure functions).

The formats (see tandem.templates.TOOL_FORMATS): the template of a model that supports tools describes them
itself (they are passed to the jinja2 render as `tools`, as Hugging Face templates expect); a template without
tool support gets Tandem's generic prompt (`generic_messages`): a system message listing the tools and asking for
one JSON object, {"tool_calls": [{"name", "arguments"}]} or {"response": "..."}.

`ToolStream` reads a model's output as it streams: text that cannot be the start of a call goes out at once,
the rest is held and parsed at the end. `parse` is the same reader run on a whole text, so a streamed answer and
a whole one always agree.

Qwen2.5-Coder (hermes format) often answers a tool request under tool_choice auto with a ```json fenced block (or a
bare JSON object) {"name", "arguments"} instead of its own <tool_call> tags; an answer that is only such JSON, every
object naming a declared tool, is read as those calls (`whole_json_calls`). Anything else in that shape (a name not
declared, text around it) stays text. So a hermes answer that opens like that is held as a call would be.

Under `tool_choice: required` (or a named function) a grammar holds the output to calls in the model's format
(tandem.tool_grammar). A call that repeats an earlier one (same name and arguments) is dropped: a model stuck in
a loop writes the same call again and again.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

CHOICES = ("none", "auto", "required")
"""tool_choice strings; a dict {"type": "function", "function": {"name": ...}} names one function."""


@dataclass(frozen=True)
class ToolRequest:
    """The tools of one chat request, as the prompt and the reader need them."""

    tools: tuple[dict, ...]
    """OpenAI tool objects ({"type": "function", "function": {"name", "description", "parameters"}})."""
    choice: str = "auto"
    """auto, required, or the name of the one function the model must call."""
    parallel: bool = True
    """Several calls in one answer (parallel_tool_calls); False keeps the first."""

    @property
    def functions(self) -> list[dict]:
        return [t["function"] for t in self.tools]

    @property
    def forced(self) -> str | None:
        """The function the model must call (a named tool_choice), else None."""
        return None if self.choice in CHOICES else self.choice


@dataclass(frozen=True)
class ToolCall:
    """One call read from a model's output."""

    name: str
    """The function's name."""
    arguments: str
    """Its arguments as JSON text (an object)."""
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])
    """The call's id (the model's own where its format has one)."""

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Parsed:
    """A model's answer split into text and calls."""

    content: str | None
    """The text outside the calls (None when there is none and calls were made)."""
    calls: tuple[ToolCall, ...] = ()
    """The calls, in order."""


def tool_schema_problem(schema: dict) -> str | None:
    """What makes a tool's `parameters` not a JSON schema of an object (None: it is one)."""
    if schema.get("type", "object") != "object":
        return f"its type is {schema['type']!r}, not 'object'"
    props = schema.get("properties")
    if props is not None and not isinstance(props, dict):
        return "its properties is not an object"
    bad = next((k for k, v in (props or {}).items() if not isinstance(v, dict)), None)
    if bad is not None:
        return f"its properties.{bad} is not a schema object"
    required = schema.get("required")
    if required is not None and not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        return "its required is not a list of property names"
    return None


def loads(arguments: Any) -> Any:
    """Call arguments as an object where they are JSON text (as templates and models expect them)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


# -- the generic prompt --------------------------------------------------------------------------------------
def generic_instructions(req: ToolRequest) -> str:
    """The system text that offers the tools to a model whose template has no tool support."""
    listing = "\n".join(json.dumps(f, ensure_ascii=False) for f in req.functions)
    one = "" if req.parallel else " (at most one call)"
    if req.forced:
        rule = f'You must call the tool "{req.forced}": answer with the tool_calls form.'
    elif req.choice == "required":
        rule = "You must call at least one tool: answer with the tool_calls form."
    else:
        rule = 'To answer without calling a tool, answer with only:\n{"response": "<your answer>"}'
    return ("You can call tools. These are their names, descriptions and JSON schemas of their arguments:\n"
            f"{listing}\n\n"
            f"To call tools{one}, answer with only a JSON object of this form, and nothing else:\n"
            '{"tool_calls": [{"name": "<tool name>", "arguments": {<the arguments as a JSON object>}}]}\n'
            f"{rule}")


def generic_messages(messages: Sequence[dict], req: ToolRequest | None) -> list[dict]:
    """Messages for a template without tool support: the tool instructions merged into the system message (one
    is added when there is none), earlier calls written as the JSON the model is asked for, and tool results as
    user messages holding {"tool_response": {"tool_call_id", "content"}}."""
    out: list[dict] = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": loads(c["function"]["arguments"]), "id": c.get("id")}
                     for c in m["tool_calls"]]
            text = json.dumps({"tool_calls": calls}, ensure_ascii=False)
            m["content"] = f"{m['content']}\n{text}" if m.get("content") else text
            del m["tool_calls"]
        elif m.get("role") == "tool":
            m = {"role": "user", "content": json.dumps(
                {"tool_response": {"tool_call_id": m.get("tool_call_id"), "content": m.get("content")}},
                ensure_ascii=False)}
        out.append(m)
    if req is None or not req.tools:
        return out
    text = generic_instructions(req)
    if out and out[0].get("role") in ("system", "developer"):
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}" if out[0].get("content") else text}
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


# -- reading calls -------------------------------------------------------------------------------------------
_MARKERS = {"hermes": ("<tool_call>",), "mistral": ("[TOOL_CALLS]",), "llama3": ("<|python_tag|>",), "generic": ()}
"""Text that starts a call, per format."""
_JSON_FIRST = frozenset({"llama3", "generic"})
"""Formats whose call may be a bare JSON object: an answer that starts with "{" is held until the end."""


def _objects(text: str) -> list[Any] | None:
    """The JSON values `text` holds one after another (separated by whitespace, ',' or ';'); None if anything
    else is in it."""
    dec, out, i, n = json.JSONDecoder(), [], 0, len(text)
    while True:
        while i < n and text[i] in " \t\r\n,;":
            i += 1
        if i == n:
            return out
        try:
            value, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        out.append(value)


def _call(obj: Any, *args_keys: str) -> ToolCall | None:
    """A ToolCall from {"name": ..., <args key>: {...}} (arguments given as an object or as JSON text)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args: Any = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    text = json.dumps(args, ensure_ascii=False)
    cid = obj.get("id")
    return ToolCall(obj["name"], text, cid) if isinstance(cid, str) and cid else ToolCall(obj["name"], text)


def _calls(values: list[Any] | None, *args_keys: str) -> list[ToolCall] | None:
    if not values:
        return None
    flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
    calls = [_call(v, *args_keys) for v in flat]
    return None if any(c is None for c in calls) else calls  # type: ignore[return-value]


def _read_held(fmt: str, held: str) -> tuple[list[ToolCall], str] | None:
    """The calls in the held text and the text around them (None: it holds no valid call)."""
    if fmt == "hermes":
        calls, rest, pos = [], [], 0
        while (start := held.find("<tool_call>", pos)) >= 0:
            rest.append(held[pos:start])
            end = held.find("</tool_call>", start)
            body = held[start + len("<tool_call>"):end if end >= 0 else len(held)]
            found = _calls(_objects(body), "arguments", "parameters")
            if found is None:
                return None
            calls += found
            pos = len(held) if end < 0 else end + len("</tool_call>")
        rest.append(held[pos:])
        return (calls, "".join(rest).strip()) if calls else None
    if fmt == "mistral":
        body = held.split("[TOOL_CALLS]", 1)[1] if "[TOOL_CALLS]" in held else held
        found = _calls(_objects(body), "arguments", "parameters")
        return (found, "") if found else None
    if fmt == "llama3":
        body = held.split("<|python_tag|>", 1)[1] if "<|python_tag|>" in held else held
        found = _calls(_objects(body), "parameters", "arguments")
        return (found, "") if found else None
    values = _objects(held)  # generic
    if not values or len(values) != 1 or not isinstance(values[0], dict):
        return None
    obj = values[0]
    if isinstance(obj.get("response"), str) and set(obj) == {"response"}:
        return [], obj["response"]
    calls = obj.get("tool_calls", [obj["tool_call"]] if "tool_call" in obj else None)
    found = _calls([calls] if isinstance(calls, list) else None, "arguments", "parameters")
    return (found, "") if found else None


_JSON_ANSWER = frozenset({"hermes"})
"""Formats whose model may answer with a call as a whole-answer JSON object, fenced or bare (see the module doc)."""
_OPENINGS = ('{"', '[{"')
"""How a JSON answer of calls starts, whitespace left out."""
_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\r?\n(.*?)(?:\s*```)?", re.S | re.I)
"""A ```json (or bare ```) fenced block; its closing fence may be missing (an answer cut by max_tokens)."""


def _opening(lead: str) -> str:
    """Whether an answer starting with `lead` (non-empty, stripped on the left) may be a whole-answer JSON call:
    "yes", "no", or "maybe" (too short to tell)."""
    if lead.startswith("```"):
        tag, newline, rest = lead[3:].partition("\n")
        if not newline:
            return "maybe" if len(tag) < 16 and "json".startswith(tag.strip().lower()) else "no"
        if tag.strip().lower() not in ("", "json"):
            return "no"
        lead = rest
    elif "```".startswith(lead):
        return "maybe"
    head = re.sub(r"\s+", "", lead[:64])
    if head.startswith(_OPENINGS):
        return "yes"
    return "maybe" if any(o.startswith(head) for o in _OPENINGS) else "no"


def _closed_then_text(held: str) -> bool:
    """Whether a held fenced answer has text after its closing fence (then it is not only a call)."""
    lead = held.lstrip()
    if not lead.startswith("```"):
        return False
    end = lead.find("```", lead.find("\n") + 1) if "\n" in lead else -1
    return end >= 0 and bool(lead[end + 3:].strip())


def whole_json_calls(text: str, req: ToolRequest) -> list[ToolCall] | None:
    """The calls of an answer that is only a fenced or bare JSON object (or list) of {"name", "arguments"}, each
    naming one of the request's tools; None for anything else."""
    body = text.strip()
    if body.startswith("```"):
        m = _FENCE.fullmatch(body)
        if m is None:
            return None
        body = m.group(1)
    values = _objects(body)
    flat = [v for value in values or () for v in (value if isinstance(value, list) else [value])]
    declared = {f.get("name") for f in req.functions}
    if not flat or not all(isinstance(v, dict) and v.get("name") in declared and set(v) & {"arguments", "parameters"}
                           and set(v) <= {"name", "arguments", "parameters", "id"} for v in flat):
        return None
    return _calls(flat, "arguments", "parameters")


def _unique(calls: list[ToolCall]) -> list[ToolCall]:
    """The calls without those that repeat an earlier one (same name, same arguments)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for c in calls:
        key = (c.name, json.dumps(json.loads(c.arguments), sort_keys=True))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _partial_marker(text: str, markers: Sequence[str]) -> int:
    """Length of the longest end of `text` that a marker starts with (it may be completed by the next piece)."""
    best = 0
    for mk in markers:
        for k in range(min(len(mk) - 1, len(text)), best, -1):
            if text.endswith(mk[:k]):
                best = k
                break
    return best


class ToolStream:
    """Reads a model's output piece by piece: `feed` returns the text that can go out now, `finish` the rest
    and the calls. Text from a call marker on (or the whole answer, in the JSON formats, when it starts with
    "{"; in hermes, when it opens as a JSON call, fenced or bare) is held until the end; so is trailing
    whitespace, which a call after it would drop. A held fenced block with text after its closing fence is not
    only a call: it goes out then."""

    def __init__(self, fmt: str, req: ToolRequest):
        self.fmt, self.req = fmt, req
        self._markers = _MARKERS.get(fmt, ())
        self._pending = ""  # text not sent yet
        self._held = False  # a call may have started: nothing more goes out before finish()
        self._sent = False  # some text went out
        self._answer = fmt in _JSON_ANSWER  # the answer's opening is still to be read for a whole-answer JSON call
        self._json = False  # held as a whole-answer JSON call

    def feed(self, text: str) -> str:
        """The text that can be sent now."""
        self._pending += text
        if self._held:
            if not self._json or not _closed_then_text(self._pending):
                return ""
            self._held = self._json = False  # a fenced block and more text: text (a marker after it still holds)
        if not self._sent and self.fmt in _JSON_FIRST:
            lead = self._pending.lstrip()
            if not lead:
                return ""
            if lead.startswith("{"):
                self._held = True
                return ""
        if not self._sent and self._answer:
            lead = self._pending.lstrip()
            if not lead:
                return ""
            opening = _opening(lead)
            if opening == "maybe":
                return ""
            self._answer = False
            if opening == "yes":
                self._held = self._json = True
                return ""
        cut = min((i for i in (self._pending.find(m) for m in self._markers) if i >= 0), default=-1)
        if cut >= 0:
            cut = len(self._pending[:cut].rstrip())  # whitespace before a call goes with it
            out, self._pending, self._held = self._pending[:cut], self._pending[cut:], True
        else:
            partial = _partial_marker(self._pending, self._markers)
            body = self._pending[:len(self._pending) - partial]
            keep = partial + len(body) - len(body.rstrip())  # a possible marker, and the whitespace before it
            out, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        if out.strip() or self._sent:
            self._sent = self._sent or bool(out)
            return out
        self._pending = out + self._pending  # leading whitespace waits for the first real text
        return ""

    def finish(self) -> Parsed:
        """The rest of the text and the calls (what `content` still lacks; None when only calls remain)."""
        held, self._pending = self._pending, ""
        read = _read_held(self.fmt, held) if self._held else None
        if read is None and self._json:
            found = whole_json_calls(held, self.req)
            read = (found, "") if found else None
        if read is None:
            return Parsed(held.rstrip() if self._sent else held.strip())
        calls, rest = read
        if self.req.forced:
            calls = [c for c in calls if c.name == self.req.forced]
        if not calls:
            return Parsed(rest if rest or not read[0] else held.strip())
        calls = _unique(calls)
        if not self.req.parallel:
            calls = calls[:1]
        return Parsed(rest or None, tuple(calls))


def parse(text: str, fmt: str, req: ToolRequest) -> Parsed:
    """A whole answer split into text and calls (content is None when the answer is only calls)."""
    stream = ToolStream(fmt, req)
    sent = stream.feed(text)
    tail = stream.finish()
    content = sent + (tail.content or "")
    return Parsed(content if content or not tail.calls else None, tail.calls)


def call_deltas(calls: Sequence[ToolCall]) -> list[list[dict]]:
    """OpenAI's streamed `delta.tool_calls` for finished calls: per call, one delta with its index, id, type
    and name (arguments ""), then one with its arguments."""
    out: list[list[dict]] = []
    for i, c in enumerate(calls):
        out.append([{"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}])
        out.append([{"index": i, "function": {"arguments": c.arguments}}])
    return out

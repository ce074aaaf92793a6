"""Holding a generation to tool calls (tool_choice required or a named function) in the model's own format.

The grammar is built for the loaded model, when its job starts: a format's markers that the vocabulary holds as
special tokens (Qwen's <tool_call>, Mistral's [TOOL_CALLS]) are written as those tokens, since a literal string
can only be spelt from plain tokens, and the model (and llguidance's forced tokens) write the special one.

How many calls: one with parallel_tool_calls false (and in the llama3 format, which has no list), else at most
PARALLEL_MAX. A small model may repeat one call over and over; `CallGuard` caps the calls at the number started
once a finished call repeats an earlier one, so a repeat ends the answer instead of filling max_tokens (and the
reader drops the repeat: tandem.tools).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np

from tandem.engine.llama import Model
from tandem.errors import BadInputError
from tandem.spec.generate import GenParams
from tandem.strict import strict_schema
from tandem.spec.grammar import JSON_OPTIONS, Grammar, GrammarProcessor
from tandem.tools import ToolRequest

PARALLEL_MAX = 8
"""Most calls in one answer with parallel_tool_calls true."""

_MARKERS = {"hermes": ("<tool_call>", "</tool_call>"), "mistral": ("[TOOL_CALLS]", "")}
"""Text around calls, per format (the open marker before each call in hermes, before the list in mistral)."""


def check_choice(tools: ToolRequest | None, grammar: Grammar | None) -> None:
    """Refuse a request that requires a call and constrains the output another way (a 400 on tool_choice)."""
    if tools is not None and tools.choice != "auto" and tools.tools and grammar is not None:
        raise BadInputError("tool_choice requires a tool call, and response_format/grammar constrain the output too",
                            "send only one of them", param="tool_choice")


def _call_schema(function: dict, args_key: str) -> dict:
    """One call's schema. No keys beyond the ones named (in the arguments too, unless the tool's schema allows
    more): an open object lets a model wander in extra keys instead of closing the call. A function with
    strict: true has every object of its arguments closed, as OpenAI does."""
    params = function.get("parameters") or {"type": "object"}
    if function.get("strict"):
        params = strict_schema(params, f"function {function['name']!r}", param="tools")
    params = {"additionalProperties": False, **params}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, args_key: params},
            "required": ["name", args_key], "additionalProperties": False}


def _json(schema: dict) -> str:
    """A Lark %json item laid out as structured output writes JSON (punctuation and names forced)."""
    return "%json " + json.dumps({"x-guidance": JSON_OPTIONS, **schema})


def _token(text: str, model: Model | None) -> str:
    """Lark for `text`: the special token the vocabulary holds for it, else the literal string."""
    if model is not None and text:
        tok = model.grammar_tokenizer()
        ids = tok.tokenize_str(text)
        if len(ids) == 1 and tok.is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
    return json.dumps(text)


class CallGrammar:
    """The grammars of one request's required calls for one model, by the most calls they allow."""

    def __init__(self, req: ToolRequest, fmt: str, model: Model | None = None):
        self.req, self.fmt, self.model = req, fmt, model
        self.most = PARALLEL_MAX if req.parallel and fmt != "llama3" else 1
        functions = [f for f in req.functions if req.forced is None or f["name"] == req.forced]
        args_key = "parameters" if fmt == "llama3" else "arguments"
        calls = [_call_schema(f, args_key) for f in functions]
        self.one = {"anyOf": calls} if len(calls) > 1 else calls[0]
        self._cache: dict[int, Grammar] = {}

    def lark(self, n: int) -> str:
        """The Lark grammar of 1 to n calls."""
        many = {"type": "array", "items": self.one, "minItems": 1, "maxItems": n}
        if self.fmt == "hermes":
            start, end = (_token(m, self.model) for m in _MARKERS["hermes"])
            more = f' ("\\n" call){{0,{n - 1}}}' if n > 1 else ""
            # a newline may follow the last call (Qwen2.5 writes one before it stops)
            return f'start: call{more} "\\n"?\ncall: {start} "\\n" {_json(self.one)} "\\n" {end}\n'
        if self.fmt == "mistral":
            return f'start: {_token(_MARKERS["mistral"][0], self.model)} " " {_json(many)}\n'
        if self.fmt == "llama3":
            return f"start: {_json(self.one)}\n"
        wrap = {"type": "object", "properties": {"tool_calls": many}, "required": ["tool_calls"],
                "additionalProperties": False}
        return f"start: {_json(wrap)}\n"

    def grammar(self, n: int) -> Grammar:
        if n not in self._cache:
            self._cache[n] = Grammar.lark(self.lark(n), param="tool_choice")
        return self._cache[n]


def constrain(params: GenParams, req: ToolRequest | None, fmt: str, model: Model) -> GenParams:
    """`params` holding the output to the calls `req` requires, in tool format `fmt` (unchanged for auto)."""
    if req is None or req.choice == "auto" or not req.tools:
        return params
    calls = CallGrammar(req, fmt, model)
    if calls.most == 1:
        return dataclasses.replace(params, grammar=calls.grammar(1))
    return dataclasses.replace(params, processors=params.processors.then(CallGuard(calls)))


def scan(fmt: str, text: str) -> tuple[list[str], int]:
    """The finished calls in an output so far (each as canonical JSON) and how many calls it has started."""
    if fmt == "hermes":
        parts = text.split("<tool_call>")[1:]
        done = [_canonical(p.split("</tool_call>", 1)[0]) for p in parts if "</tool_call>" in p]
        after = text.rsplit("</tool_call>", 1)[-1] if done and len(done) == len(parts) else ""
        return done, len(parts) + bool(after.strip())  # text after the last call (a newline aside) starts one
    body = text.split("[TOOL_CALLS]", 1)[-1] if fmt == "mistral" else text
    i = body.find("[")
    if i < 0:
        return [], 0
    dec, done, i, more = json.JSONDecoder(), [], i + 1, False
    while True:  # a "," after a call starts the next one (a token may close one call and start the next)
        while i < len(body) and body[i] in " ,\n":
            more, i = more or body[i] == ",", i + 1
        if i >= len(body) or body[i] == "]":
            return done, len(done) + (more and i >= len(body))
        try:
            value, i = dec.raw_decode(body, i)
        except json.JSONDecodeError:
            return done, len(done) + 1
        done.append(json.dumps(value, sort_keys=True))
        more = False


def _canonical(text: str) -> str:
    try:
        return json.dumps(json.loads(text), sort_keys=True)
    except json.JSONDecodeError:
        return text.strip()


class CallGuard:
    """The grammar of up to `calls.most` calls, until a finished call repeats an earlier one: from there on, the
    grammar of as many calls as the output has started (the one under way may finish; no more may start)."""

    def __init__(self, calls: CallGrammar):
        self.calls = calls

    def for_prompt(self, prompt: Sequence[int], n_vocab: int) -> _BoundGuard:
        return _BoundGuard(self.calls, list(prompt))


class _BoundGuard:
    """CallGuard bound to one generation: one grammar matcher per cap, each following the history it is given."""

    def __init__(self, calls: CallGrammar, prompt: list[int]):
        self.calls, self.prompt = calls, prompt
        self._procs: dict[int, GrammarProcessor] = {}
        self._tok = calls.model.grammar_tokenizer()

    def _proc(self, history: Sequence[int]) -> GrammarProcessor:
        n = self.calls.most
        out = history[len(self.prompt):]
        if out:
            done, started = scan(self.calls.fmt, self._tok.decode_bytes(list(out)).decode("utf-8", "replace"))
            if len(set(done)) < len(done):
                n = max(1, min(n, started))
        if n not in self._procs:
            proc = GrammarProcessor(self.calls.model, self.calls.grammar(n))
            proc.sync(self.prompt)  # the output starts after the prompt, whatever history it first sees
            self._procs[n] = proc
        return self._procs[n]

    def __call__(self, history: Sequence[int], logits: np.ndarray) -> np.ndarray:
        return self._proc(history)(history, logits)

    def forced(self, history: Sequence[int]) -> list[int]:
        return self._proc(history).forced(history)

    def admissible(self, history: Sequence[int], tokens: Sequence[int]) -> int:
        return self._proc(history).admissible(history, tokens)

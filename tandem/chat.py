"""Chat prompts: a model's ChatFormat (tandem.templates) rendered with jinja2 in a sandbox."""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tandem import tools as toolcalls
from tandem.errors import BadInputError
from tandem.templates import ChatFormat, builtin_source

ROLES = ("system", "user", "assistant", "tool", "developer")


def _raise(msg: str) -> None:
    raise BadInputError(f"the chat template refused the messages: {msg}",
                        "check the roles and their order", param="messages")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    """Hugging Face's tojson: plain JSON (jinja2's own escapes <, > and & for HTML)."""
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    return env.from_string(source)


def _check(messages: Sequence[dict]) -> None:
    if not messages:
        raise BadInputError("messages is empty", "send at least one message", param="messages")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise BadInputError(f"messages[{i}].role is {m.get('role')!r}",
                                f"use one of {', '.join(ROLES)}", param=f"messages[{i}].role")


def render(template: str | None, messages: Sequence[dict], *, bos_token: str = "", eos_token: str = "",
           tools: Sequence[dict] | None = None) -> str:
    """The prompt text for `messages`, ending with the assistant's generation prompt (ChatML without a template).
    `tools` (OpenAI tool objects) reach the template as `tools`, as Hugging Face templates expect."""
    _check(messages)
    extra = {"tools": list(tools)} if tools else {}
    try:
        return _compile(template or builtin_source("chatml")).render(
            messages=list(messages), add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token, **extra)
    except (TemplateError, TypeError) as e:
        raise BadInputError(f"the model's chat template failed: {type(e).__name__}: {e}",
                            "send raw text to /v1/completions, or use another template (--chat-template)") from e


def _for_template(m: dict) -> dict:
    """A message as Hugging Face templates read it: content a string, tool call arguments an object."""
    out = {**m, "content": m.get("content") or ""}
    if m.get("tool_calls"):
        out["tool_calls"] = [
            {**c, "function": {**c["function"], "arguments": toolcalls.loads(c["function"]["arguments"])}}
            for c in m["tool_calls"]]
    return out


def prompt_text(fmt: ChatFormat, messages: Sequence[dict], tools: toolcalls.ToolRequest | None = None) -> str:
    """The prompt for a chat request: the tools go to a template that supports them; a template that does not
    gets them, and any earlier calls and results, through Tandem's generic tool prompt (see tandem.tools)."""
    _check(messages)
    if fmt.tool_format == "generic":
        messages = toolcalls.generic_messages(messages, tools)
        tools = None
    msgs = [_for_template(m) for m in messages]
    return render(fmt.source, msgs, bos_token=fmt.bos_token, eos_token=fmt.eos_token,
                  tools=tools.tools if tools else None)

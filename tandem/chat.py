"""Chat templates from GGUF metadata, rendered with jinja2 in a sandbox."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tandem.errors import BadInputError

ROLES = ("system", "user", "assistant", "tool", "developer")

#: ChatML, used when a model carries no template of its own.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _raise(msg: str) -> None:
    raise BadInputError(f"the chat template refused the messages: {msg}",
                        "check the roles and their order", param="messages")


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(source)


def render(template: str | None, messages: Sequence[dict], *, bos_token: str = "", eos_token: str = "") -> str:
    """The prompt text for `messages`, ending with the assistant's generation prompt."""
    if not messages:
        raise BadInputError("messages is empty", "send at least one message", param="messages")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise BadInputError(f"messages[{i}].role is {m.get('role')!r}",
                                f"use one of {', '.join(ROLES)}", param=f"messages[{i}].role")
    try:
        return _compile(template or CHATML).render(messages=list(messages), add_generation_prompt=True,
                                                   bos_token=bos_token, eos_token=eos_token)
    except TemplateError as e:
        raise BadInputError(f"the model's chat template failed: {e}",
                            "send raw text to /v1/completions, or fix the template") from e

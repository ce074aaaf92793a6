"""Chat templates Tandem ships, one per model family, and which one a model gets.

A model's own template (GGUF `tokenizer.chat_template`) is used when it has one. `--chat-template NAME|FILE` (or
`chat_template` in models.toml) replaces it. A model without one gets its family's template, picked from
`general.architecture` (and, for `llama`, from its vocabulary), with a warning at load and in /health: a base
model such as Gemma-3-270M carries none, and formatting its chats as ChatML would silently give worse answers.

Each family also names its tool-call format (see tandem.tools): how the model is told about tools and how its
calls are read back. A template from a GGUF or a file gets the format its text shows ("generic" when it shows none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tandem.errors import BadInputError

TOOL_FORMATS = ("hermes", "llama3", "mistral", "generic")
"""hermes: <tool_call>{"name", "arguments"}</tool_call> (Qwen, Hermes, ChatML); llama3: a bare JSON object
{"name", "parameters"}; mistral: [TOOL_CALLS] [{"name", "arguments"}]; generic: Tandem's JSON prompt for templates
without tool support ({"tool_calls": [...]} or {"response": ...})."""

BUILTIN: dict[str, str] = {"chatml": "hermes", "gemma": "generic", "llama3": "llama3", "llama2": "generic",
                           "mistral": "mistral", "phi3": "generic"}
"""Tandem's templates (tandem/templates/NAME.jinja) and their tool-call formats."""

_ARCHS: dict[str, str] = {
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma", "gemma-embedding": "gemma",
    "qwen2": "chatml", "qwen2moe": "chatml", "qwen2vl": "chatml", "qwen3": "chatml", "qwen3moe": "chatml",
    "smollm3": "chatml", "mistral": "mistral", "mistral3": "mistral", "phi3": "phi3", "phimoe": "phi3",
}
"""general.architecture -> template name (llama is decided from the vocabulary: see family_template)."""

ORIGINS = ("gguf", "option", "architecture", "default")
"""Where a model's template came from: its GGUF, --chat-template / models.toml, its architecture (no template in
the GGUF), or ChatML for an architecture Tandem does not know (no template in the GGUF)."""


@dataclass(frozen=True)
class ChatFormat:
    """How one model's chats become prompt text (plain values: safe to share between threads)."""

    name: str
    """The template's name: 'gguf' (the model's own), a built-in name (chatml, gemma, ...), or a file path."""
    source: str
    """The jinja2 template text."""
    origin: str
    """One of ORIGINS."""
    tool_format: str
    """One of TOOL_FORMATS."""
    bos_token: str = ""
    """The model's BOS token text (templates write it themselves)."""
    eos_token: str = ""
    """The model's EOS token text."""
    warning: str | None = None
    """Why the template may not be the model's own (a fallback was used); None when it is, or when one was asked for."""

    def summary(self) -> dict:
        """What /health shows: name, origin, tool format and the fallback warning (not the template text)."""
        return {"name": self.name, "origin": self.origin, "tool_format": self.tool_format, "warning": self.warning}


def builtin_source(name: str) -> str:
    """The text of a built-in template (KeyError for an unknown name)."""
    if name not in BUILTIN:
        raise KeyError(name)
    return resources.files(__package__).joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def tool_format_of(source: str) -> str:
    """The tool-call format a template's text shows; 'generic' when it shows no tool support Tandem can read."""
    if "<tool_call>" in source:
        return "hermes"
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if "<|python_tag|>" in source or "ipython" in source:
        return "llama3"
    return "generic"


def family_template(arch: str, has_token: Callable[[str], bool]) -> str | None:
    """The built-in template for an architecture (None: unknown). `has_token(text)`: whether the vocabulary holds
    that special token (llama-architecture files hold Llama 3, Llama 2, Mistral and ChatML models alike)."""
    if arch == "llama":
        if has_token("<|start_header_id|>"):
            return "llama3"
        if has_token("<|im_start|>"):
            return "chatml"
        if has_token("[INST]"):
            return "mistral"
        return "llama2"
    return _ARCHS.get(arch)


def from_option(value: str) -> tuple[str, str]:
    """(name, source) for --chat-template / models.toml chat_template: a built-in name or a jinja2 file."""
    if value in BUILTIN:
        return value, builtin_source(value)
    path = Path(value).expanduser()
    if not path.is_file():
        raise BadInputError(f"--chat-template {value!r} is neither a built-in template nor a file",
                            f"use one of {', '.join(BUILTIN)}, or the path of a jinja2 template file",
                            param="chat_template")
    try:
        return str(path), path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"cannot read the chat template file {path}: {e}",
                            "pass a readable UTF-8 jinja2 file", param="chat_template") from None


def select(model_name: str, *, gguf_template: str | None, arch: str, has_token: Callable[[str], bool],
           option: str | None = None, bos_token: str = "", eos_token: str = "") -> ChatFormat:
    """The ChatFormat of a model: `option` (--chat-template / models.toml) if given, else the GGUF's own
    template, else its family's (with a warning), else ChatML (with a warning)."""
    tokens = {"bos_token": bos_token, "eos_token": eos_token}
    if option:
        name, source = from_option(option)
        fmt = BUILTIN[name] if name in BUILTIN else tool_format_of(source)
        return ChatFormat(name, source, "option", fmt, **tokens)
    if gguf_template:
        return ChatFormat("gguf", gguf_template, "gguf", tool_format_of(gguf_template), **tokens)
    fix = "pass --chat-template NAME|FILE, or set chat_template for this model in models.toml"
    family = family_template(arch, has_token)
    if family is not None:
        why = (f"{model_name} has no chat template in its GGUF; using Tandem's {family} template, chosen from its "
               f"architecture ({arch}); {fix} to use another")
        return ChatFormat(family, builtin_source(family), "architecture", BUILTIN[family], warning=why, **tokens)
    why = (f"{model_name} has no chat template in its GGUF and Tandem knows no template for its architecture "
           f"({arch}); formatting chats as ChatML, which this model may not understand; {fix}")
    return ChatFormat("chatml", builtin_source("chatml"), "default", BUILTIN["chatml"], warning=why, **tokens)

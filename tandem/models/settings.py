"""Per-model defaults: a TOML file (~/.config/tandem/models.toml) with one table per model id.

    [models."Qwen2.5-7B-Instruct-Q4_K_M"]
    draft = "Qwen2.5-0.5B-Instruct-Q8_0"
    ctx_size = 8192

`tandem models set-draft` writes `draft`; the other keys are edited by hand. Explicit command-line flags
and request fields win over these; these win over the built-in defaults. Read with tomllib, written by
the small writer below (scalars only: that is all the file holds).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from tandem.engine.llama import GGML_TYPES
from tandem.errors import BadInputError

CONFIG_ENV = "TANDEM_CONFIG"
"""Environment variable that overrides the per-model defaults file."""
_HEADER = "# Tandem per-model defaults. `tandem models set-draft MAIN DRAFT` edits `draft`.\n"


def default_config_path() -> Path:
    """$TANDEM_CONFIG, else models.toml in the user config folder (~/.config/tandem, XDG_CONFIG_HOME)."""
    env = os.environ.get(CONFIG_ENV)
    return Path(env).expanduser() if env else Path(platformdirs.user_config_dir("tandem")) / "models.toml"


@dataclass(frozen=True)
class ModelSettings:
    """One model's defaults; None means "not set here" (the command line's or built-in default applies)."""

    draft: str | None = None
    """Default draft model id, or 'none' for no speculation."""
    ctx_size: int | None = None
    """Main model context size in tokens."""
    ctx_size_draft: int | None = None
    """Draft model context size in tokens."""
    draft_max: int | None = None
    """Most tokens drafted per verification step."""
    draft_min: int | None = None
    """Drafts shorter than this are not verified."""
    draft_p_min: float | None = None
    """Stop drafting when the draft's top probability falls below this."""
    cache_type_k: str | None = None
    """Main model KV cache type for K."""
    cache_type_v: str | None = None
    """Main model KV cache type for V."""
    cache_type_k_draft: str | None = None
    """Draft model KV cache type for K."""
    cache_type_v_draft: str | None = None
    """Draft model KV cache type for V."""
    chat_template: str | None = None
    """Chat template: a built-in name (chatml, gemma, llama3, llama2, mistral, phi3) or a jinja2 file path."""

    def values(self) -> dict[str, object]:
        """The fields that are set."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


_TYPES = {name: typing.get_args(tp)[0] for name, tp in typing.get_type_hints(ModelSettings).items()}
"""Field name -> the scalar type the file must hold for it."""


class SettingsFile:
    """The per-model defaults file: load, read, change, save (atomically)."""

    def __init__(self, path: Path, models: dict[str, ModelSettings] | None = None):
        self.path = path
        self.models: dict[str, ModelSettings] = dict(models or {})

    @classmethod
    def load(cls, path: Path | None = None) -> SettingsFile:
        """The file at `path` (default: default_config_path()); a missing file is an empty one."""
        path = path or default_config_path()
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            return cls(path)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise BadInputError(f"cannot read the per-model defaults file {path}: {e}",
                                "fix the TOML syntax, or delete the file to start over") from None
        tables = data.get("models", {})
        if not isinstance(tables, dict) or set(data) - {"models"}:
            raise BadInputError(f"{path} must hold only [models.\"ID\"] tables",
                                "move every setting under a [models.\"MODEL_ID\"] table")
        return cls(path, {mid: _parse(path, mid, t) for mid, t in tables.items()})

    def get(self, model_id: str) -> ModelSettings:
        return self.models.get(model_id, ModelSettings())

    def update(self, model_id: str, **changes: object) -> ModelSettings:
        """Set (or with None, clear) fields of one model; a model left with nothing set is dropped."""
        current = dataclasses.asdict(self.get(model_id))
        current.update(changes)
        new = _parse(self.path, model_id, {k: v for k, v in current.items() if v is not None})
        if new.values():
            self.models[model_id] = new
        else:
            self.models.pop(model_id, None)
        return new

    def dumps(self) -> str:
        out = [_HEADER]
        for mid in sorted(self.models):
            out.append(f"\n[models.{_string(mid)}]\n")
            out += [f"{k} = {_value(v)}\n" for k, v in self.models[mid].values().items()]
        return "".join(out)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.dumps())
        tmp.replace(self.path)


def _parse(path: Path, model_id: str, table: object) -> ModelSettings:
    where = f"{path} [models.{_string(model_id)}]"
    if not isinstance(table, dict):
        raise BadInputError(f"{where} is not a table",
                            f"write it as [models.{_string(model_id)}] followed by key = value lines")
    unknown = sorted(set(table) - set(_TYPES))
    if unknown:
        raise BadInputError(f"{where} has unknown key {unknown[0]!r}", f"use only: {', '.join(_TYPES)}")
    for key, value in table.items():
        want = _TYPES[key]
        accepted = (int, float) if want is float else (want,)  # TOML writes 1.0 as 1 too
        if isinstance(value, bool) or not isinstance(value, accepted):
            example = {str: '"value"', int: "4096", float: "0.5"}[want]
            kind = {str: "a string", int: "an integer", float: "a number"}[want]
            raise BadInputError(f"{where}: {key} must be {kind}, got {value!r}",
                                f"write e.g. {key} = {example}")
        problem = _range_problem(key, value)
        if problem:
            raise BadInputError(f"{where}: {key} {problem}, got {value!r}", f"fix {key} or remove the line")
    return ModelSettings(**{k: float(v) if _TYPES[k] is float else v for k, v in table.items()})


def _range_problem(key: str, value: object) -> str | None:
    if key.startswith("cache_type") and value not in GGML_TYPES:
        return f"must be one of {', '.join(GGML_TYPES)}"
    if key == "draft_p_min" and not 0.0 <= float(value) <= 1.0:  # type: ignore[arg-type]
        return "must be between 0 and 1"
    if isinstance(value, int) and value < (1 if key == "ctx_size" else 0):
        return "is out of range"
    if key in ("draft", "chat_template") and not str(value).strip():
        return "is empty"
    return None


def _string(s: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's, once DEL is escaped too)."""
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    return _string(str(v))

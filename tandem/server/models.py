"""The registry as HTTP handlers see it: which models a request names (confined to the models folder),
and the listings: GET /v1/models (OpenAI's shape plus Tandem's fields) and GET /api/v0/models (LM Studio's).

Names resolve to registry entries: an id, a file name, or a path. A path must lie inside the models
folder, or be exactly the file of a model the server was started with or a built-in; anything else is a
403, so clients cannot make the server open arbitrary files. A name the snapshot does not know triggers
one rescan (a file just dropped into the folder is found without a restart).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tandem.config import ModelOptions, SpecOptions
from tandem.errors import ForbiddenError, ModelNotFoundError
from tandem.models.library import Library
from tandem.models.registry import MODELS_DIR, ModelEntry, expand
from tandem.runtime import Runtime
from tandem.server.worker import EngineStatus, ModelInfo

log = logging.getLogger("tandem.server")


@dataclass(frozen=True)
class ModelSource:
    """What the server needs to list registry models and load them on demand."""

    library: Library
    """The registry and per-model defaults at start-up (rescans replace the snapshot)."""
    model_options: ModelOptions = field(default_factory=ModelOptions)
    """The command line's model options, before any model's defaults are applied."""
    spec: SpecOptions = field(default_factory=SpecOptions)
    """The command line's speculation options, before any model's defaults are applied."""
    explicit: frozenset[str] = frozenset()
    """Options given explicitly on the command line: they win over per-model defaults."""


def _looks_like_path(name: str) -> bool:
    return "/" in name or os.sep in name or name.startswith("~")


class ModelDirectory:
    """Resolution and listings over the latest registry snapshot (rescans replace it whole)."""

    def __init__(self, source: ModelSource, *, allow_draft_paths: bool = True):
        self.source = source
        self._lib = source.library
        self.allow_draft_paths = allow_draft_paths

    @property
    def library(self) -> Library:
        return self._lib

    def rescan(self) -> Library:
        """Scan again (new files appear, removed ones go); blocking: call it off the event loop."""
        self._lib = self._lib.rescan()
        return self._lib

    # -- loading -------------------------------------------------------------------------------------
    def options_for(self, entry: ModelEntry) -> tuple[ModelOptions, SpecOptions]:
        """How `entry` is loaded and what its requests default to: the command line's options with the
        model's own defaults (draft included) where no flag was given."""
        src = self.source
        base = dataclasses.replace(src.model_options, model=str(entry.path), draft=None)
        return self._lib.resolve(base, src.spec, src.explicit - {"model", "draft"})

    def load(self, model_id: str, progress: Callable[[str, float], None] | None = None) -> Runtime:
        """A Runtime for a registry model and its default draft (runs in the loader thread)."""
        entry = self._lib.registry.find(model_id)
        opts, spec = self.options_for(entry)
        log.info("loading %s (%s) with draft %s", entry.id, entry.path, opts.draft or "none")
        return Runtime(opts, spec=spec, announce=log.info, progress=progress or _log_progress())

    def model_id(self, path: Path) -> str:
        """The registry id of a loaded model's file (its stem when the registry does not list it)."""
        e = self._lib.registry.get(str(path))
        return e.id if e is not None else path.stem

    # -- resolution ----------------------------------------------------------------------------------
    def _lookup(self, name: str, param: str) -> ModelEntry | None:
        """The entry `name` names, after the path confinement check; rescans once on a miss."""
        lib = self._lib
        entry = lib.registry.get(name) if not _looks_like_path(name) else None
        if entry is None and _looks_like_path(name):
            entry = lib.registry.get(name)
            if entry is not None and entry.id == name:
                return entry  # an id with a slash (repeated stems), not a path
            if not self._path_allowed(lib, name):
                raise ForbiddenError(f"{param} {name!r} is a path outside the models folder",
                                     f"name a model by its id (GET /v1/models lists them), or put the file in "
                                     f"{lib.registry.config.models_dir}", param=param, code="path_not_allowed")
        if entry is None:
            lib = self.rescan()
            entry = lib.registry.get(name)
        return entry

    @staticmethod
    def _path_allowed(lib: Library, name: str) -> bool:
        if lib.registry.in_models_dir(name):
            return True
        target = os.path.abspath(expand(name))
        return any(e.origin != MODELS_DIR and os.path.abspath(e.path) == target for e in lib.registry)

    def main(self, name: str) -> ModelEntry:
        """The registry entry for a request's `model`."""
        entry = self._lookup(name, "model")
        if entry is None:
            ids = ", ".join(e.id for e in self._lib.registry.entries[:10])
            raise ModelNotFoundError(f"model {name!r} is not served here (models: {ids})",
                                     "use an id from GET /v1/models, or omit `model` for the default model",
                                     param="model", code="model_not_found")
        return entry

    def entry_of(self, info: ModelInfo | None) -> ModelEntry | None:
        """The registry entry of a loaded model."""
        return None if info is None else self._lib.registry.get(info.path)

    def draft(self, main: ModelEntry, name: str, loaded: ModelInfo | None) -> Path | None:
        """The draft file a request's `draft_model` names for `main`: None for 'none' or the draft `main` is
        loaded with; else a compatible registry model's path (404 unknown, 403 outside, 422 unusable)."""
        if name.lower() == "none":
            return None
        if _looks_like_path(name) and not self.allow_draft_paths:
            raise ModelNotFoundError(f"draft_model {name!r} is a path and this server does not take draft paths",
                                     f"name a draft by its id; compatible drafts of {main.id}: "
                                     f"{self._compatible(main)}", param="draft_model", code="model_not_found")
        entry = self._lookup(name, "draft_model")
        if entry is None:
            raise ModelNotFoundError(f"draft_model {name!r} is not in the registry",
                                     f"use none or a compatible draft of {main.id}: {self._compatible(main)}",
                                     param="draft_model", code="model_not_found")
        if loaded is not None and loaded.draft_path is not None and Path(loaded.draft_path) == entry.path:
            return None  # the draft it is loaded with, whatever the registry thinks of its size
        self._lib.registry.check_pair(main, entry)
        return entry.path

    def _compatible(self, main: ModelEntry) -> str:
        return ", ".join(d.id for d in self._lib.registry.compatible_drafts(main)) or "(none in the registry)"

    # -- listings ------------------------------------------------------------------------------------
    def _ordered(self, status: EngineStatus) -> list[tuple[ModelEntry, ModelInfo | None]]:
        """Every registry model with its loaded state, loaded ones first."""
        loaded = {info.path: info for info in status.loaded}
        rows = [(e, loaded.get(str(e.path))) for e in self._lib.registry]
        return sorted(rows, key=lambda r: r[1] is None)

    def openai_list(self, status: EngineStatus) -> dict:
        data = []
        for e, info in self._ordered(status):
            d = self._lib.describe(e)
            draft = info.draft_model if info is not None else d["default_draft"]
            data.append({"id": e.id, "object": "model", "created": _mtime(e.path), "owned_by": "tandem",
                         "path": str(e.path), "n_ctx": info.n_ctx if info else None, "draft_model": draft,
                         "speculative": draft is not None, "state": "loaded" if info else "not-loaded",
                         "arch": e.facts.arch, "quantization": e.facts.quantization, "n_params": e.facts.n_params,
                         "size_bytes": e.size_bytes, "max_context_length": e.facts.context_length,
                         "compatible_draft_models": d["compatible_drafts"],
                         "translated_draft_models": d["translated_drafts"], "default_draft_model": d["default_draft"]})
        return {"object": "list", "data": data}

    def lmstudio_model(self, e: ModelEntry, info: ModelInfo | None) -> dict:
        d = self._lib.describe(e)
        out = {"id": e.id, "object": "model", "type": "llm", "publisher": "local", "arch": e.facts.arch,
               "compatibility_type": "gguf", "quantization": e.facts.quantization,
               "state": "loaded" if info else "not-loaded", "max_context_length": e.facts.context_length,
               "compatible_draft_models": d["compatible_drafts"], "translated_draft_models": d["translated_drafts"],
               "default_draft_model": d["default_draft"]}
        if info is not None:
            out["loaded_context_length"] = info.n_ctx
            out["draft_model"] = info.draft_model
        return out

    def lmstudio_list(self, status: EngineStatus) -> dict:
        return {"object": "list", "data": [self.lmstudio_model(e, i) for e, i in self._ordered(status)]}


def _mtime(path: Path) -> int:
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0


def _log_progress() -> Callable[[str, float], None]:
    """progress(name, fraction) that logs every 25% of each file."""
    shown: dict[str, int] = {}

    def progress(name: str, fraction: float) -> None:
        step = int(fraction * 4)
        if step > shown.get(name, -1):
            shown[name] = step
            log.info("loading %s: %d%%", name, step * 25)

    return progress

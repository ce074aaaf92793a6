"""Choosing the drafter for one request (engine thread only): the configured draft, none, or a GGUF path.

A path is loaded on demand (by the loader thread: `load_draft`), checked against the main model's
vocabulary, and kept in one slot so a client that names the same file again does not reload it; the slot
is freed when another draft replaces it, when it sits idle past the TTL, or with its main model. Loading
or freeing a draft never touches the main model. A name that cannot be used is an error, never a silent
fallback to another draft.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tandem.engine.llama import Context, Model
from tandem.engine.vocab import check_pairing
from tandem.errors import ModelNotFoundError, TandemError, about_model
from tandem.models.fit import AllocationCheck, headroom, plan_extra_draft, repacks
from tandem.models.registry import expand
from tandem.runtime import Runtime
from tandem.spec.drafters import ModelDrafter
from tandem.spec.translate import Translator

log = logging.getLogger("tandem.server")


CONFIGURED = "configured"
"""select(): speculate as the server was configured (its draft, or none when it has none)."""
NONE = "none"
"""select(): no speculation for this request."""


@dataclass(frozen=True)
class NeedsLoad:
    """select(): the draft at `path` must be loaded first (see load_draft)."""

    path: Path
    """The draft GGUF."""
    key: tuple
    """(resolved path, mtime, size): the file version the slot will hold."""


def _aliases(path: Path, name: str) -> set[str]:
    return {name, path.name, str(path), str(path.resolve())}


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def load_draft(rt: Runtime, path: Path) -> ModelDrafter:
    """Load a draft for `rt`'s main model (see _load_draft); its errors say they are about the draft."""
    try:
        return _load_draft(rt, path)
    except TandemError as e:
        raise about_model(e, "draft") from None


def _load_draft(rt: Runtime, path: Path) -> ModelDrafter:
    """Load a draft for `rt`'s main model, refusing a vocabulary mismatch before allocating its KV cache.
    Safe off the engine thread: it only reads the main model's vocabulary."""
    plan = plan_extra_draft(rt.opts, path, headroom(rt.plan))  # 507 before allocating anything
    log.info("loading draft %s for %s", path, rt.main_model.name)
    model = Model(path, repack=repacks(plan.params))  # LoadFailedError (500) when llama.cpp cannot load it
    try:
        main = rt.main_model
        pairing = check_pairing(main.vocab_info(), model.vocab_info(), main_name=main.name, draft_name=model.name)
        ctx = Context(model, plan.params)
        log.info("memory plan vs allocation: %s",
                 AllocationCheck(plan, {**model.buffers, **ctx.buffers}, None).describe())
        return ModelDrafter(ctx, translator=Translator(main, model) if pairing.kind == "translated" else None)
    except BaseException:
        model.close()
        raise


class DraftSelector:
    """Maps a request's draft_model to a drafter, loading GGUF paths on demand."""

    def __init__(self, runtime: Runtime, *, allow_paths: bool = True):
        self.rt = runtime
        self.allow_paths = allow_paths
        self._extra: tuple[tuple, ModelDrafter] | None = None  # (file key, drafter) of the last loaded path
        self.extra_used = 0.0
        """time.monotonic() of the on-demand draft's last use."""
        d = runtime.drafter
        self._configured = _aliases(d.ctx.model.path, d.name) if d is not None else set()

    def choices(self) -> str:
        names = [self.rt.drafter.name] if self.rt.drafter else []
        names.append("none")
        if self.allow_paths:
            names.append("the path of a compatible draft GGUF")
        return ", ".join(names)

    def select(self, name: str | None, path: Path | None = None) -> ModelDrafter | NeedsLoad | str:
        """CONFIGURED (the server's own speculation), NONE, the loaded on-demand draft, or NeedsLoad, for
        draft_model `name`, or for `path` when the caller already resolved it (from the registry)."""
        if path is not None:
            return self._path(path)
        if name is None:
            return CONFIGURED
        if name in self._configured:  # named: used even where the server does not use it by default
            return self.rt.drafter if self.rt.draft_paused and self.rt.drafter else CONFIGURED
        if name.lower() == "none":
            return NONE
        p = expand(name)
        if self.allow_paths and p.is_file():
            return self._path(p)
        raise ModelNotFoundError(f"draft_model {name!r} is neither the loaded draft nor a draft GGUF file",
                                 f"use one of: {self.choices()}", param="draft_model", code="model_not_found")

    def _path(self, path: Path) -> ModelDrafter | NeedsLoad | str:
        if str(path.resolve()) in self._configured:
            return CONFIGURED
        key = _file_key(path)
        if self._extra is not None and self._extra[0] == key:
            self.extra_used = time.monotonic()
            return self._extra[1]
        return NeedsLoad(path, key)

    def install(self, key: tuple, drafter: ModelDrafter) -> None:
        """Hold a draft load_draft() made (replacing, and freeing, the previous on-demand draft)."""
        self.release()
        self._extra = (key, drafter)
        self.extra_used = time.monotonic()

    @property
    def has_extra(self) -> bool:
        return self._extra is not None

    def release(self) -> None:
        """Free the on-demand draft, if any."""
        if self._extra is not None:
            drafter = self._extra[1]
            self._extra = None
            drafter.ctx.close()
            drafter.ctx.model.close()

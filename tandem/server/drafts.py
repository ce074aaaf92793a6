"""Choosing the drafter for one request (engine thread only): the configured draft, none, or a GGUF path.

A path is loaded on demand, checked against the main model's vocabulary, and kept in one cache slot so a
client that names the same file again does not reload it. A name that cannot be used is an error, never
a silent fallback to another draft.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tandem.engine.llama import Context, Model
from tandem.engine.vocab import VocabInfo, check_compatible
from tandem.errors import ModelNotFoundError
from tandem.models.fit import AllocationCheck, headroom, plan_extra_draft
from tandem.runtime import Runtime
from tandem.spec.drafters import ModelDrafter

log = logging.getLogger("tandem.server")


CONFIGURED = "configured"
"""select(): speculate as the server was configured (its draft, or none when it has none)."""
NONE = "none"
"""select(): no speculation for this request."""


def _aliases(path: Path, name: str) -> set[str]:
    return {name, path.name, str(path), str(path.resolve())}


class DraftSelector:
    """Maps a request's draft_model to a drafter, loading GGUF paths on demand."""

    def __init__(self, runtime: Runtime, *, allow_paths: bool = True):
        self.rt = runtime
        self.allow_paths = allow_paths
        self._extra: tuple[tuple, ModelDrafter] | None = None  # (file key, drafter) of the last loaded path
        self._main_vocab: VocabInfo | None = None
        d = runtime.drafter
        self._configured = _aliases(d.ctx.model.path, d.name) if d is not None else set()

    def choices(self) -> str:
        names = [self.rt.drafter.name] if self.rt.drafter else []
        names.append("none")
        if self.allow_paths:
            names.append("the path of a compatible draft GGUF")
        return ", ".join(names)

    def select(self, name: str | None) -> ModelDrafter | str:
        """CONFIGURED (the server's own speculation), NONE, or a draft loaded on demand, for draft_model `name`."""
        if name is None or name in self._configured:
            return CONFIGURED
        if name.lower() == "none":
            return NONE
        path = Path(name).expanduser()
        if self.allow_paths and path.is_file():
            if str(path.resolve()) in self._configured:
                return CONFIGURED
            return self._load(path)
        raise ModelNotFoundError(f"draft_model {name!r} is neither the loaded draft nor a draft GGUF file",
                                 f"use one of: {self.choices()}", param="draft_model", code="model_not_found")

    def _load(self, path: Path) -> ModelDrafter:
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        if self._extra is not None and self._extra[0] == key:
            return self._extra[1]
        self.release()
        plan = plan_extra_draft(self.rt.opts, path, headroom(self.rt.plan))  # 507 before allocating anything
        log.info("loading draft %s on demand", path)
        model = Model(path)  # LoadFailedError (500) when llama.cpp cannot load it
        try:
            main = self.rt.main_model
            if self._main_vocab is None:
                self._main_vocab = main.vocab_info()
            check_compatible(self._main_vocab, model.vocab_info(), main_name=main.name, draft_name=model.name)
            ctx = Context(model, plan.params)
            log.info("memory plan vs allocation: %s", AllocationCheck(plan, {**model.buffers, **ctx.buffers},
                                                                      None).describe())
            drafter = ModelDrafter(ctx)
        except BaseException:
            model.close()
            raise
        self._extra = (key, drafter)
        return drafter

    def release(self) -> None:
        """Free the on-demand draft, if any."""
        if self._extra is not None:
            drafter = self._extra[1]
            self._extra = None
            drafter.ctx.close()
            drafter.ctx.model.close()

"""A main model and an optional draft, loaded, checked for compatibility, ready to generate."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tandem import chat
from tandem.config import SPEC_TYPES, ModelOptions, SpecOptions
from tandem.engine.llama import Context, ContextParams, Model
from tandem.engine.vocab import check_compatible
from tandem.errors import BadInputError
from tandem.models.defaults import default_pair
from tandem.spec.drafters import Drafter, ModelDrafter
from tandem.spec.generate import Done, GenParams, Token, generate
from tandem.spec.ngram import CombinedDrafter, NgramDrafter
from tandem.spec.policy import CostModel

log = logging.getLogger("tandem.runtime")

_MAX_COSTS = 16
"""Cost models kept (one per drafter name; on-demand drafts can add more)."""


@dataclass(frozen=True)
class ModelPaths:
    main: Path
    draft: Path | None


def resolve_paths(opts: ModelOptions, announce: Callable[[str], None] = print) -> ModelPaths:
    """Main and draft paths: the embedded default pair unless --model is given; --draft none turns drafting off."""
    no_draft = opts.draft is not None and opts.draft.lower() == "none"
    if opts.model is None:
        pair = default_pair(announce=announce)
        draft = None if no_draft else Path(opts.draft) if opts.draft else pair.draft
        return ModelPaths(pair.main, draft)
    return ModelPaths(Path(opts.model), None if no_draft or not opts.draft else Path(opts.draft))


def context_params(opts: ModelOptions, *, draft: bool) -> ContextParams:
    if draft:
        n_ctx = opts.ctx_size_draft or opts.ctx_size
        if n_ctx > opts.ctx_size:
            raise BadInputError(f"--ctx-size-draft {n_ctx} is larger than --ctx-size {opts.ctx_size}",
                                "use a draft context no larger than the main context")
        return ContextParams(n_ctx=n_ctx, n_batch=512, n_threads=opts.threads,
                             type_k=opts.cache_type_k_draft, type_v=opts.cache_type_v_draft)
    return ContextParams(n_ctx=opts.ctx_size, n_batch=512, n_threads=opts.threads,
                         type_k=opts.cache_type_k, type_v=opts.cache_type_v)


class Runtime:
    """Owns the llama contexts of one main model and its draft. Use from one thread only.

    `drafter` is the draft model (None without one, and with --spec-type ngram, which loads none);
    `speculator()` is what generation drafts with, per --spec-type.
    """

    def __init__(self, opts: ModelOptions, *, spec: SpecOptions | None = None,
                 announce: Callable[[str], None] = print,
                 progress: Callable[[str, float], None] | None = None):
        self.spec = spec if spec is not None else SpecOptions()
        paths = resolve_paths(opts, announce)
        if self.spec.spec_type == "both" and paths.draft is None:
            raise BadInputError("--spec-type both needs a draft model", "pass --draft PATH, or use --spec-type ngram")
        self.opts = opts
        self.main_model = Model(paths.main, progress=_named(progress, paths.main.name))
        self.ngram = NgramDrafter()  # no model, a dict per sequence: always there for spec_type per call
        self._costs: dict[str, CostModel] = {}
        self._verify_costs: dict[int, float] | None = None
        draft_model = None
        if paths.draft is not None and self.spec.spec_type != "ngram":  # refuse an unusable draft before any KV
            draft_model = Model(paths.draft, progress=_named(progress, paths.draft.name))
            check_compatible(self.main_model.vocab_info(), draft_model.vocab_info(),
                             main_name=self.main_model.name, draft_name=draft_model.name)
        self.main = Context(self.main_model, context_params(opts, draft=False))
        self.drafter: ModelDrafter | None = None
        if draft_model is not None:
            self.drafter = ModelDrafter(Context(draft_model, context_params(opts, draft=True)),
                                        main_n_ctx=self.main.n_ctx)

    @property
    def draft_name(self) -> str | None:
        d = self.speculator()
        return d.name if d else None

    def speculator(self, model: ModelDrafter | None = None, spec_type: str | None = None) -> Drafter | None:
        """The drafter generation uses with draft model `model` (default: the loaded one), per `spec_type`
        (default: --spec-type). A type needing a draft model that is not loaded raises BadInputError."""
        model = self.drafter if model is None else model
        spec_type = self.spec.spec_type if spec_type is None else spec_type
        if spec_type not in SPEC_TYPES:
            raise BadInputError(f"spec_type must be one of {', '.join(SPEC_TYPES)}, got {spec_type!r}",
                                "use draft-model, ngram or both", param="spec_type")
        if spec_type == "ngram":
            return self.ngram
        if model is None:
            if spec_type == self.spec.spec_type:  # the configured type without a draft: plain decoding
                return None
            raise BadInputError(f"spec_type {spec_type} needs a draft model and none is loaded",
                                "start with --draft PATH, or use spec_type ngram", param="spec_type")
        return CombinedDrafter(self.ngram, model) if spec_type == "both" else model

    def cost(self, drafter: Drafter) -> CostModel:
        """The measured costs of drafting with `drafter` (by name), kept across generations; a new one starts
        from the main model's measured verification costs (see calibrate_verify)."""
        if drafter.name not in self._costs:
            if len(self._costs) >= _MAX_COSTS:
                del self._costs[next(iter(self._costs))]
            if self._verify_costs is None:
                self._verify_costs = calibrate_verify(self.main, max(self.main_model.bos, 0))
            cost = CostModel()
            for size, seconds in self._verify_costs.items():
                for _ in range(cost.verify.trusted):
                    cost.observe_verify(size, seconds)
            self._costs[drafter.name] = cost
        return self._costs[drafter.name]

    def prompt(self, *, text: str | None = None, messages: Sequence[dict] | None = None,
               raw: bool = False) -> list[int]:
        """Prompt tokens, from chat messages (through the model's template) or from text."""
        m = self.main_model
        if messages is None:
            messages = [{"role": "user", "content": text or ""}]
            if raw:
                return m.tokenize(text or "", add_special=True, parse_special=False)
        bos = m.token_text(m.bos) if m.bos >= 0 else ""
        eos = m.token_text(m.eos) if m.eos >= 0 else ""
        rendered = chat.render(m.chat_template, messages, bos_token=bos, eos_token=eos)
        has_bos = bool(bos) and rendered.startswith(bos)
        return m.tokenize(rendered, add_special=not has_bos, parse_special=True)

    def close(self) -> None:
        """Free the contexts and weights now (an unloaded model must not wait for the garbage collector)."""
        if self.drafter is not None:
            self.drafter.ctx.close()
            self.drafter.ctx.model.close()
        self.main.close()
        self.main_model.close()

    def generate(self, prompt: Sequence[int], gp: GenParams, *, use_draft: bool = True, spec_type: str | None = None,
                 model: ModelDrafter | None = None,
                 cancel: Callable[[], bool] | None = None) -> Iterator[Token | Done]:
        """Generate; `use_draft=False` decodes plainly, `spec_type` overrides --spec-type for this call and
        `model` the draft model (one loaded on demand)."""
        drafter = self.speculator(model, spec_type) if use_draft else None
        return generate(self.main, prompt, gp, drafter, cancel, cost=self.cost(drafter) if drafter else None)


CALIBRATION_SIZES = (1, 2, 3, 5, 9, 17)
"""Verification batch sizes timed before the first speculative generation."""


def calibrate_verify(main: Context, token: int, *, reps: int = 3, offset: int = 32) -> dict[int, float]:
    """Median seconds of one main-model decode of n tokens (all logits), for n in CALIBRATION_SIZES.

    Online timings alone mislead the policy: a drafter that keeps drafting never times a plain
    single-token step, and verification cost is far from linear in the batch size (SmolLM2 F16 on 2
    cores: 15.7 ms for 1 token, 22.7 for 2, 46.7 for 9), so a line through the large sizes it does time
    puts a plain step at twice its real cost and drafting looks better than it is. Runs on an empty
    context (about 20 decodes; it empties it first) and leaves it empty."""
    sizes = [n for n in CALIBRATION_SIZES if offset + n <= main.n_ctx]
    out: dict[int, float] = {}
    main.rollback(0)
    try:
        main.decode([token] * offset, 0, logits="none")
        for n in sizes:
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                main.decode([token] * n, offset, logits="all")
                times.append(time.perf_counter() - t0)
                main.rollback(offset)
            out[n] = sorted(times)[len(times) // 2]
    finally:
        main.rollback(0)
    return out


def _named(progress: Callable[[str, float], None] | None, name: str) -> Callable[[float], None] | None:
    return None if progress is None else (lambda p: progress(name, p))

"""A main model and an optional draft, loaded, checked for compatibility, ready to generate."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from tandem import chat, templates
from tandem.config import SPEC_TYPES, ModelOptions, SpecOptions
from tandem.engine import exact, heap
from tandem.engine.library import EXACT_KERNELS_LEVEL, patch_level
from tandem.engine.llama import Context, Model
from tandem.engine.vocab import Pairing, check_pairing
from tandem.errors import BadInputError, TandemError, about_model
from tandem.models.defaults import default_pair
from tandem.models.fit import AllocationCheck, FitPlan, ModelPlan, plan_for, repacks
from tandem.spec.drafters import Drafter, ModelDrafter
from tandem.spec.generate import Done, GenParams, Steps, Token, generate, sequence
from tandem.spec.ngram import NGRAM_MIN
from tandem.spec.suffix import CombinedDrafter, LookupDrafter, SuffixCache
from tandem.spec.translate import Translator
from tandem.spec.costs import CostModel
from tandem.spec.payoff import PAUSE_BELOW, best_case_speedup
from tandem.tools import ToolRequest

log = logging.getLogger("tandem.runtime")

_MAX_COSTS = 48
"""Cost models kept (one per drafter name and lookup match range; on-demand drafts can add more)."""
LOOKUP_MIN_MATCH = 3
"""Shortest lookup match that drafts where lookups are the only source, or come first (--spec-type both)."""
LONG_MATCH = 8
"""Shortest lookup match that drafts ahead of a draft model (--spec-type draft-model): a repeat this long is
accepted more often than a small model's guess, at no draft cost."""


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


def plan_runtime(opts: ModelOptions, spec: SpecOptions | None = None,
                 announce: Callable[[str], None] = print) -> FitPlan:
    """The memory plan a Runtime with these options loads from (headers only: milliseconds). Raises the
    first reason not to load: a missing or non-GGUF file, invalid options (an unknown --chat-template included), or
    a plan that does not fit."""
    spec = spec if spec is not None else SpecOptions()
    if opts.chat_template:
        templates.from_option(opts.chat_template)  # an unknown name or unreadable file fails before any load
    paths = resolve_paths(opts, announce)
    if spec.spec_type == "both" and paths.draft is None:
        raise BadInputError("--spec-type both needs a draft model", "pass --draft PATH, or use --spec-type ngram")
    draft = paths.draft if spec.spec_type != "ngram" else None  # ngram speculation loads no draft model
    return plan_for(opts, paths.main, draft, draft_max=spec.draft_max)


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


class Runtime:
    """Owns the llama contexts of one main model and its draft. Use from one thread only.

    Everything is planned first (`plan`, see tandem.models.fit): the contexts are created with the plan's
    parameters, and after loading, `checks` hold the plan next to what llama.cpp allocated.
    `drafter` is the draft model (None without one, and with --spec-type ngram, which loads none);
    `speculator()` is what generation drafts with, per --spec-type. `draft_status` says why a draft that was
    asked for is not used (only with --draft-optional; otherwise that is an error).
    """

    def __init__(self, opts: ModelOptions, *, spec: SpecOptions | None = None,
                 announce: Callable[[str], None] = print,
                 progress: Callable[[str, float], None] | None = None, plan: FitPlan | None = None):
        self.spec = spec if spec is not None else SpecOptions()
        self.opts = opts
        self.plan = plan if plan is not None else plan_runtime(opts, self.spec, announce)
        self.draft_status: str | None = self.plan.draft_status
        self.checks: list[AllocationCheck] = []
        self.suffix = SuffixCache(self.spec.suffix_cache_mib << 20) if self.spec.suffix_cache == "shared" else None
        """Earlier requests' prompts and outputs, which lookups draft from (tandem.spec.suffix); None: not kept."""
        self.no_speculation = opts.draft is not None and opts.draft.lower() == "none"
        """--draft none: the configured speculation (draft-model) drafts nothing, not even lookups."""
        self.ngram = LookupDrafter(self.suffix)  # no model, a dict per sequence: always there for spec_type per call
        self._seq_ngrams: dict[int, LookupDrafter] = {}  # sequences 1.. of a parallel main context
        self._seq_drafters: dict[int, ModelDrafter] = {}
        self._costs: dict[str, CostModel] = {}
        self._verify_costs: dict[int, float] | None = None
        self._draft_costs: dict[str, dict[str, float]] = {}  # calibrate_draft per draft model, measured once
        p = self.plan
        rss0 = _rss()
        try:
            self.main_model = Model(p.main.path, progress=_named(progress, p.main.name),
                                    repack=repacks(p.main.params))
        except TandemError as e:
            raise about_model(e, "main") from None
        rss_main = _rss() - rss0
        self.chat_format: templates.ChatFormat = chat_format(self.main_model, opts.chat_template)
        """How chats become prompts for the main model (see tandem.templates); a fallback is warned about here."""
        if self.chat_format.warning:
            log.warning("%s", self.chat_format.warning)
        self.drafter: ModelDrafter | None = None
        self.draft_pairing: Pairing | None = None
        """How the loaded draft drafts for the main model: same ids, or through text (another vocabulary)."""
        draft_model, rss_draft = None, 0
        if p.draft is not None:  # refuse an unusable draft before any KV
            try:
                rss0 = _rss()
                try:
                    draft_model = Model(p.draft.path, progress=_named(progress, p.draft.name),
                                        repack=repacks(p.draft.params))
                except TandemError as e:
                    raise about_model(e, "draft") from None
                rss_draft = _rss() - rss0
                self.draft_pairing = check_pairing(self.main_model.vocab_info(), draft_model.vocab_info(),
                                                   main_name=self.main_model.name, draft_name=draft_model.name)
            except TandemError as e:
                draft_model = self._drop_draft(draft_model, e)
        rss0 = _rss()
        self.main = Context(self.main_model, p.main.params)
        self._check(p.main, self.main_model, self.main, rss_main + _rss() - rss0)
        self.invariance: exact.Invariance | None = self._probe()
        """What the load-time probe found on the main model: do a token's logits depend on how many rows share its
        batch (None when the context is too small to probe)."""
        self.sequences: exact.SequenceInvariance = exact.probe_model_sequences(self.main_model, p.main.params)
        """What the load-time probe found when several sequences share batches and the KV cache."""
        log.log(logging.INFO if self.sequences.same else logging.WARNING, "batching sequences, %s (llama.cpp patch "
                "level %d): %s", self.main_model.name, patch_level(), self.sequences.describe())
        if draft_model is not None and p.draft is not None:
            try:
                rss0 = _rss()
                ctx = Context(draft_model, p.draft.params)
                self._check(p.draft, draft_model, ctx, rss_draft + _rss() - rss0)
                self.drafter = ModelDrafter(ctx, main_n_ctx=self.main.capacity, translator=self._translator(ctx))
                # Every sequence's drafter now, as the plan counts their contexts: made on first use, per-sequence
                # contexts raised the process's memory mid-serving (a 14 MiB step in the soak at --parallel 4).
                for seq in range(1, self.main.params.n_seq_max):
                    self.sequence_drafter(seq)
            except TandemError as e:
                for d in [*self._seq_drafters.values(), *([self.drafter] if self.drafter else [])]:
                    d.ctx.close()
                self._seq_drafters.clear()
                self.drafter = None
                self._drop_draft(draft_model, e)
        if self.draft_status:
            log.warning("running without the draft (--draft-optional): %s", self.draft_status)
        self.exact_price: float | None = None
        """What exact mode's plain step (two rows) costs over a lone row, timed at load with a draft model (--exact's
        price on plain steps; verification batches cost the same either way)."""
        self.payoff: float | None = self._check_payoff()
        """With a draft model: the tokens/s ratio over plain lone-row decoding (what --draft none does) that the
        draft would give if every token were accepted (below 1: it cannot pay; a warning at load). None
        without a draft model."""
        self.draft_paused: str | None = self._pause_draft()
        """Why requests that do not name a draft decode as --draft none would (the draft cannot pay here and
        --exact was not asked for); None when the configured speculation runs."""
        heap.release()  # what loading and the probes freed (see tandem.engine.heap)

    def _pause_draft(self) -> str | None:
        """By default a draft whose best case (full acceptance) is below PAUSE_BELOW x plain decoding is not used:
        Tandem then decodes exactly as --draft none does, so the user loses neither speed nor the text --draft
        none gives. --exact keeps it (the user asked for speculation bit for bit), and a request may still name it."""
        if self.payoff is None or self.payoff >= PAUSE_BELOW or self.opts.exact or not self.spec.pause_slow_draft:
            return None
        why = (f"draft {self.drafter.name} cannot make {self.main_model.name} faster on this machine (at most "
               f"{self.payoff:.2f}x plain decoding even if every draft token were accepted; it takes "
               f"{PAUSE_BELOW}x to pay for rejected tokens), so requests decode as --draft none does; a request may "
               "still name the draft (draft_model), and --exact keeps it on")
        log.warning("%s", why)
        return why

    def _check_payoff(self) -> float | None:
        """Time the main's lone and batched decodes and the draft's, and warn when even full acceptance
        could not beat plain decoding (the calibrations are the cost models' starting points anyway)."""
        if self.drafter is None:
            return None
        if self._verify_costs is None:
            self._verify_costs = calibrate_verify(self.main, max(self.main_model.bos, 0))
        d = self.drafter
        if d.name not in self._draft_costs:
            self._draft_costs[d.name] = calibrate_draft(d.ctx, max(d.ctx.model.bos, 0))
            d.reset()
        lone = calibrate_lone(self.main, max(self.main_model.bos, 0))
        drafted = self._draft_costs[d.name].get("one")
        if lone is None or drafted is None or not self._verify_costs:
            return None
        ratio, k = best_case_speedup(self._verify_costs, drafted, lone, self.spec.draft_max)
        if 2 in self._verify_costs:
            self.exact_price = self._verify_costs[2] / lone
        if 0.0 < ratio < 1.0:
            log.warning("draft %s: even if every draft token were accepted, the best draft length (%d) would give "
                        "%.2fx the tokens/s of plain decoding (a draft token costs %.1f ms, a plain main token "
                        "%.1f ms); use a smaller or more quantized draft", d.name, k, ratio, drafted * 1e3, lone * 1e3)
        return ratio

    def _probe(self) -> exact.Invariance | None:
        """Check whether every verification batch size, and a lone row, computes a row the same way (None when the
        context is too small to probe). Where the context pairs lone rows (no batch kernels for them) they stay
        paired whatever the probe saw: it cannot rule out a rare difference at positions it did not probe. Where
        they take the batch kernels and still differ, --exact turns pairing on."""
        rows = max(self.spec.draft_max + 1, 2)
        if exact.probe_length(rows) > self.main.capacity:
            return None
        inv = exact.probe(self.main, exact.probe_tokens(self.main, exact.probe_length(rows)), max_rows=rows)
        if self.main.one_row and inv.exact and not inv.single_row and self.opts.exact:
            self.main.pairs = True  # --exact on weights whose one-row kernel still rounds its own way
        level = logging.INFO if inv.exact or not self.main.params.exact else logging.WARNING
        log.log(level, "%s decoding, %s: %s", self.exact_regime()[0], self.main_model.name, inv.describe())
        return inv

    @property
    def exact(self) -> bool:
        """Whether speculative output is bit-for-bit the main model's plain output in the regime this runtime
        decodes in: every batch size agrees (the probe), and lone rows are paired (exact mode) or were found to
        agree too."""
        inv = getattr(self, "invariance", None)
        return inv is not None and inv.exact and (self.main.pairs or inv.single_row)

    def exact_regime(self) -> tuple[str, str]:
        """How this runtime's output stays the main model's plain output, and why: "kernels" (every row count, one
        included, takes kernels that add in the same order: exactness costs nothing), "paired" (lone rows are
        decoded with the row before them, as --exact does where the library lacks such kernels), or "none"."""
        inv, main = getattr(self, "invariance", None), self.main
        if inv is None:
            return "none", "the context is too small to probe whether batch sizes agree"
        if not inv.exact:
            return "none", inv.describe()
        if main.pairs:
            why = ("this library's lone-row kernels round differently (Tandem's llama.cpp patch level "
                   f"{EXACT_KERNELS_LEVEL} or later has batch kernels for them)" if not main.one_row else
                   f"lone rows differ by up to {inv.single_row_diff:.1e} even with the batch kernels on these weights")
            return "paired", f"{why}: --exact decodes each lone token with the token before it (plain steps cost more)"
        if inv.single_row:
            return "kernels", "every batch size, one row included, gives a row the same logits (probed at load)"
        if not main.params.exact:
            return "none", "--no-exact: lone rows take llama.cpp's own one-row kernels, which round differently"
        return "none", (f"lone rows differ by up to {inv.single_row_diff:.1e} from the same rows in a batch on these "
                        "weights; --exact pairs them (plain steps then cost more)")

    def invariance_report(self) -> dict:
        """The probes' findings as plain values (for /health: see ModelInfo.invariance)."""
        inv, seqs = self.invariance, self.sequences
        return {"batch_sizes": inv.multi_row if inv else None, "batch_sizes_diff": inv.multi_row_diff if inv else None,
                "lone_row": inv.single_row if inv else None, "lone_row_diff": inv.single_row_diff if inv else None,
                "sequences": seqs.same, "sequences_diff": seqs.diff, "patch_level": patch_level(),
                "regime": self.exact_regime()[0], "regime_why": self.exact_regime()[1],
                "exact_price": None if self.exact_price is None else round(self.exact_price, 2)}

    def _drop_draft(self, model: Model | None, err: TandemError) -> None:
        """With --draft-optional, note why the draft is not used; without it, re-raise."""
        if not self.opts.draft_optional:
            raise err
        if model is not None:
            model.close()
        name = self.plan.draft.name if self.plan.draft else "draft"
        self.draft_status = f"draft {name} is not usable: {err.message}"
        return None

    def _check(self, plan: ModelPlan, model: Model, ctx: Context, rss_delta: int) -> None:
        """Log the plan next to what llama.cpp allocated; keep it in `checks`."""
        check = AllocationCheck(plan, {**model.buffers, **ctx.buffers}, rss_delta)
        self.checks.append(check)
        level = logging.INFO if check.within_tolerance else logging.WARNING
        log.log(level, "memory plan vs allocation%s: %s", "" if check.within_tolerance else
                " (off by more than 5% or 32 MiB)", check.describe())

    @property
    def draft_name(self) -> str | None:
        """What the configured speculation drafts with (also while draft_paused: a request may name it)."""
        d = self.speculator(self.drafter)
        return d.name if d else None

    def speculator(self, model: ModelDrafter | None = None, spec_type: str | None = None, *,
                   seq: int = 0) -> Drafter | None:
        """The drafter generation uses with draft model `model` (default: the loaded one), per `spec_type`
        (default: --spec-type). A type needing a draft model that is not loaded raises BadInputError. `seq`:
        which sequence of a parallel main context drafts (each keeps its own drafter state)."""
        configured = model is None and spec_type is None
        lookups = self.spec.suffix_cache != "off"
        ngram = self.ngram if seq == 0 else self._seq_ngrams.setdefault(seq, LookupDrafter(self.suffix))
        if configured and self.spec.spec_type != "ngram" and (self.no_speculation or self.draft_paused):
            # --draft none decodes plainly; a paused draft leaves the lookups, which cost nothing to draft
            return CombinedDrafter(ngram, None, min_match=LOOKUP_MIN_MATCH) if lookups and self.draft_paused else None
        model = self.sequence_drafter(seq) if model is None else model
        spec_type = self.spec.spec_type if spec_type is None else spec_type
        if spec_type not in SPEC_TYPES:
            raise BadInputError(f"spec_type must be one of {', '.join(SPEC_TYPES)}, got {spec_type!r}",
                                "use draft-model, ngram or both", param="spec_type")
        if spec_type == "ngram":
            return CombinedDrafter(ngram, None, min_match=NGRAM_MIN)
        if model is None:
            if spec_type == self.spec.spec_type:  # the configured type without a draft model: lookups only
                return CombinedDrafter(ngram, None, min_match=LOOKUP_MIN_MATCH) if lookups else None
            raise BadInputError(f"spec_type {spec_type} needs a draft model and none is loaded",
                                "start with --draft PATH, or use spec_type ngram", param="spec_type")
        if spec_type == "both":
            return CombinedDrafter(ngram, model, min_match=LOOKUP_MIN_MATCH)
        if not lookups:
            return model
        return CombinedDrafter(ngram, model, min_match=LONG_MATCH, name=model.name, model_key=model.name)

    def sequence_drafter(self, seq: int) -> ModelDrafter | None:
        """The draft model's drafter for sequence `seq` of the main context: the loaded one for 0; for the others,
        sequence `seq` of the same draft context when it holds a sequence per request (the plan's default: the
        scheduler then decodes every sequence's draft rows of a draft position as one batch), else a context of
        their own on the same weights, with the same parameters (a smaller --ctx-size-draft: its window slides)."""
        if self.drafter is None or seq == 0:
            return self.drafter
        if seq not in self._seq_drafters:
            shared = self.drafter.ctx.params.n_seq_max > 1
            ctx = self.drafter.ctx if shared else Context(self.drafter.ctx.model, self.drafter.ctx.params)
            self._seq_drafters[seq] = ModelDrafter(ctx, name=self.drafter.name, main_n_ctx=self.main.capacity,
                                                   translator=self._translator(ctx),
                                                   seq_id=seq if shared else 0)
        return self._seq_drafters[seq]

    def _translator(self, ctx: Context) -> Translator | None:
        """A translator of its own for a drafter on `ctx` when the draft has another vocabulary (each sequence keeps
        its own translated history)."""
        if self.draft_pairing is None or self.draft_pairing.kind != "translated":
            return None
        return Translator(self.main_model, ctx.model)

    def evicted(self, seq: int) -> None:
        """Sequence `seq`'s cached prefix left the main context (a shared pool made room): its drafter lets go of
        its cells too (in a shared draft pool they would stay taken until the sequence's next request)."""
        drafter = self.drafter if seq == 0 else self._seq_drafters.get(seq)
        if drafter is not None:
            drafter.reset()

    def cost(self, drafter: Drafter, key: str | None = None) -> CostModel:
        """The measured costs of drafting with `drafter` (by name), kept across generations; a new one starts
        from the main model's measured verification costs (see calibrate_verify) and, for a draft model, its
        measured draft and catch-up costs (calibrate_draft). `key` (default: the drafter's name) separates
        uses of one drafter whose acceptance differs (the model part of --spec-type both)."""
        key = drafter.name if key is None else key
        if key not in self._costs:
            if len(self._costs) >= _MAX_COSTS:
                del self._costs[next(iter(self._costs))]
            cost = CostModel()
            for size, seconds in self._verified_costs().items():
                for _ in range(cost.verify.trusted):
                    cost.observe_verify(size, seconds)
            if isinstance(drafter, ModelDrafter):  # alone and as part of `both`: one calibration
                if drafter.name not in self._draft_costs:
                    self._draft_costs[drafter.name] = calibrate_draft(drafter.ctx, max(drafter.ctx.model.bos, 0))
                    drafter.reset()
                seed_draft_costs(cost, self._draft_costs[drafter.name])
            self._costs[key] = cost
        return self._costs[key]

    def _verified_costs(self) -> dict[int, float]:
        """The main model's verification costs, timed once (decodes on the main context: call this before a
        generation starts, never during one: generate() and steps() do)."""
        if self._verify_costs is None:
            self._verify_costs = calibrate_verify(self.main, max(self.main_model.bos, 0))
        return self._verify_costs

    def suffix_report(self) -> dict | None:
        """The suffix cache's size and hit rate (None: --suffix-cache is not shared)."""
        return self.suffix.snapshot() if self.suffix is not None else None

    def policy_report(self) -> dict[str, dict]:
        """What the draft policy believes about each drafter used so far (CostModel.snapshot), by drafter key."""
        return {key: cost.snapshot() for key, cost in list(self._costs.items())}

    def prompt(self, *, text: str | None = None, messages: Sequence[dict] | None = None,
               raw: bool = False, tools: ToolRequest | None = None) -> list[int]:
        """Prompt tokens, from chat messages (through the model's template, with `tools` offered) or from text.
        Special tokens written as text (<|im_start|>, <start_of_turn>, ...) become those tokens, in raw text too,
        as llama-server reads a completion's prompt; BOS is added unless the text starts with it."""
        if messages is None and raw:
            rendered = text or ""
        else:
            rendered = self.render(messages if messages is not None else [{"role": "user", "content": text or ""}],
                                   tools)
        return tokenize_prompt(self.main_model, rendered)

    def render(self, messages: Sequence[dict], tools: ToolRequest | None = None) -> str:
        """The prompt text for chat `messages` (what /apply-template and `tandem run --show-prompt` show)."""
        return chat.prompt_text(self.chat_format, messages, tools)

    def forget_prefix(self) -> None:
        """Drop what the KV caches hold, so the next generation starts cold (no prompt prefix reused)."""
        self.main.rollback(0)
        if self.drafter is not None:
            self.drafter.reset()
        self.ngram.reset()

    def close(self) -> None:
        """Free the contexts and weights now (an unloaded model must not wait for the garbage collector)."""
        for extra in self._seq_drafters.values():
            extra.ctx.close()
        if self.drafter is not None:
            self.drafter.ctx.close()
            self.drafter.ctx.model.close()
        self.main.close()
        self.main_model.close()

    def generate(self, prompt: Sequence[int], gp: GenParams, *, use_draft: bool = True, spec_type: str | None = None,
                 model: ModelDrafter | None = None,
                 cancel: Callable[[], bool] | None = None, exact: bool | None = None) -> Iterator[Token | Done]:
        """Tokens, then Done. `use_draft=False` decodes plainly, `spec_type` overrides --spec-type for this call
        and `model` the draft model (one loaded on demand). Without the draft that was asked for
        (--draft-optional), Done's stats say why. `exact=False` decodes lone tokens alone with llama.cpp's own
        one-row kernels for this call (what llama.cpp does, which a draft may not match bit for bit: a bench
        baseline)."""
        drafter = self.speculator(model, spec_type) if use_draft else None
        if drafter is not None:  # cost models of lookup match ranges are made mid-generation: time the main now
            self._verified_costs()
        events = generate(self.main, prompt, gp, drafter, cancel, costs=self.cost)
        if exact is False and (self.main.pairs or self.main.one_row):
            events = self._lone_rows(events)
        paused = use_draft and model is None and spec_type is None and self.draft_paused
        status = self.draft_status or (paused or None)
        return events if status is None else self._with_status(events, status)

    def steps(self, prompt: Sequence[int], gp: GenParams, seq: int, *, use_draft: bool = True,
              cancel: Callable[[], bool] | None = None,
              load: Callable[[], int] | None = None,
              room: Callable[[int], int] | None = None,
              room_relocated: Callable[[int], int] | None = None) -> tuple[Steps, str | None]:
        """One generation as sequence `seq` of the main context, for a Scheduler: its sequence() generator (with
        this sequence's own drafter state, as configured), and the draft status its Done should carry (why the
        draft is not drafting, or None). `load()`: the sequences the scheduler runs (the draft policy's price);
        `room(want)`: the positions it may hold now (Scheduler.room_for); `room_relocated(want)`: those it could
        hold with its cells taken afresh (Scheduler.room_relocated_for)."""
        drafter = self.speculator(seq=seq) if use_draft else None
        if drafter is not None:
            self._verified_costs()
        paused = use_draft and self.draft_paused
        return (sequence(self.main, prompt, gp, drafter, cancel, costs=self.cost, seq_id=seq, load=load, room=room,
                         room_relocated=room_relocated),
                self.draft_status or (paused or None))

    def _lone_rows(self, events: Iterator[Token | Done]) -> Iterator[Token | Done]:
        """Run a generation with lone rows decoded as llama.cpp decodes them: no pairing, no one-row switch
        (generate starts by emptying the cache, so the exact mode's token tracking starts afresh); restore both."""
        saved = self.main.one_row
        self.main.one_row = False
        try:
            with self.main.pairing(False):
                yield from events
        finally:
            self.main.one_row = saved

    def _with_status(self, events: Iterator[Token | Done], status: str) -> Iterator[Token | Done]:
        """Done's stats say why the draft that was asked for is not drafting (--draft-optional, or paused)."""
        for ev in events:
            if isinstance(ev, Done):
                ev.stats.draft_status = status
            yield ev


def chat_format(model: Model, option: str | None = None) -> templates.ChatFormat:
    """The model's ChatFormat: `option` (--chat-template), else its GGUF template, else its family's."""
    def has_token(text: str) -> bool:
        ids = model.tokenize(text, add_special=False, parse_special=True)
        return len(ids) == 1 and model.token_text(ids[0]) == text

    return templates.select(model.name, gguf_template=model.chat_template, arch=model.meta("general.architecture")
                            or "unknown", has_token=has_token, option=option,
                            bos_token=model.token_text(model.bos) if model.bos >= 0 else "",
                            eos_token=model.token_text(model.eos) if model.eos >= 0 else "")


def tokenize_prompt(model: Model, text: str) -> list[int]:
    """Prompt text as tokens, special tokens parsed; BOS added (where the model wants it) unless already there."""
    bos = model.token_text(model.bos) if model.bos >= 0 else ""
    return model.tokenize(text, add_special=not (bos and text.startswith(bos)), parse_special=True)


CALIBRATION_SIZES = (1, 2, 3, 5, 9, 17)
"""Verification batch sizes timed before the first speculative generation."""


def calibrate_verify(main: Context, token: int, *, reps: int = 3, offset: int = 32) -> dict[int, float]:
    """Median seconds of one main-model decode of n tokens (all logits), for n in CALIBRATION_SIZES.

    Online timings alone mislead the policy: a drafter that keeps drafting never times a plain
    single-token step, and verification cost is far from linear in the batch size (SmolLM2 F16 on 2
    cores: 15.7 ms for 1 token, 22.7 for 2, 46.7 for 9), so a line through the large sizes it does time
    puts a plain step at twice its real cost and drafting looks better than it is. Runs on an empty
    context (about 20 decodes; it empties it first) and leaves it empty."""
    return _time_decodes(main, token, [n for n in CALIBRATION_SIZES if offset + n <= main.capacity], reps, offset)


def calibrate_lone(main: Context, token: int, *, reps: int = 3, offset: int = 32) -> float | None:
    """Median seconds of one lone-row decode of the main model, as llama.cpp's plain decoding runs it (exact
    mode's pairing off for the measurement). None when the context is too small; leaves it empty."""
    with main.pairing(False):
        return _time_decodes(main, token, [1] if offset + 1 <= main.capacity else [], reps, offset).get(1)


def _time_decodes(main: Context, token: int, sizes: Sequence[int], reps: int, offset: int) -> dict[int, float]:
    """Median seconds of a decode of n tokens (all logits) after `offset` cached tokens, for each n in sizes;
    empties the context first and leaves it empty ({} when sizes is empty: a context too small to time in,
    whose costs are then learnt online only)."""
    out: dict[int, float] = {}
    if not sizes:
        return out
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


def calibrate_draft(ctx: Context, token: int, *, reps: int = 3, batch: int = 32) -> dict[str, float]:
    """Median seconds of a draft model's decodes: "one" and "two" tokens at position `batch`, and "batch"
    tokens from position 0 (the catch-up on a prompt). About 10 decodes; leaves the context empty.

    Without them a new drafter's first request learns its costs by drafting: it probed at a loss where
    drafting cannot pay (F16 main: 0.76x on a first request), and it took a batched catch-up for a tenth
    of a single decode where the Q4_1 draft's is about half of one (141 tokens: 0.73 s)."""
    if ctx.capacity < batch + 2:
        return {}
    med = lambda ts: sorted(ts)[len(ts) // 2]  # noqa: E731
    out: dict[str, list[float]] = {"one": [], "two": [], "batch": []}
    ctx.rollback(0)
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            ctx.decode([token] * batch, 0, logits="none")
            out["batch"].append(time.perf_counter() - t0)
            for name, n in (("one", 1), ("two", 2)):
                t0 = time.perf_counter()
                ctx.decode([token] * n, batch, logits="last")
                out[name].append(time.perf_counter() - t0)
                ctx.rollback(batch)
            ctx.rollback(0)
    finally:
        ctx.rollback(0)
    return {name: med(ts) for name, ts in out.items()}


def seed_draft_costs(cost: CostModel, measured: dict[str, float], *, batch: int = 32, long: int = 8) -> None:
    """Seed a cost model from calibrate_draft: drafting k tokens decodes the 1-2 new tokens, then k - 1 one
    at a time; a catch-up costs the batched decode's time per token."""
    if not measured:
        return
    first = (measured["one"] + measured["two"]) / 2
    for _ in range(cost.draft.trusted):
        cost.observe_draft(1, first)
        cost.observe_draft(long, first + (long - 1) * measured["one"])
    cost.observe_catch_up(batch, measured["batch"])


def _named(progress: Callable[[str, float], None] | None, name: str) -> Callable[[float], None] | None:
    return None if progress is None else (lambda p: progress(name, p))

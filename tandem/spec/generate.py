"""The speculative decode loop: draft, verify in one batch, roll back, emit.

In a shared pool of KV cells (tandem.sched.Scheduler.room) a sequence that has no room left after its last page,
while the pool's free pages below it could hold it, relocates: it drops its cells and decodes everything it held
again, into the lowest free pages, and goes on (sequence() step 2b; SpecStats.relocations counts it)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from tandem.engine.llama import Context, SeqRows
from tandem.errors import BadInputError, ContextOverflowError, EngineError
from tandem.spec.drafters import Drafter
from tandem.spec.logprobs import MAX_TOP, TokenLogprob, token_logprob
from tandem.spec.grammar import Grammar, GrammarProcessor
from tandem.spec.costs import CostModel
from tandem.spec.ngram import NgramDrafter
from tandem.spec.policy import POLICIES, DraftPolicy, make_policy, regime
from tandem.spec.processors import NONE, Processors, common_prefix
from tandem.spec.sampling import SamplingParams, probs, sample
from tandem.spec.stats import SpecStats
from tandem.spec.suffix import CombinedDrafter, LookupDrafter
from tandem.spec.steps import Decode, Steps as DraftSteps, decode
from tandem.spec.text import TextAssembler
from tandem.spec.verify import EMPTY, DraftProposal, uniforms_needed, verify

log = logging.getLogger("tandem.spec")


@dataclass(frozen=True)
class GenParams:
    """One generation's settings."""

    max_tokens: int = 256
    """Most tokens to generate."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """Temperature, top-k, top-p, min-p, seed."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; they are not part of the output."""
    draft_max: int = 8
    """Most draft tokens per verification step."""
    draft_min: int = 0
    """Drafts shorter than this are not verified (a plain step is taken instead)."""
    draft_p_min: float = 0.0
    """Drafting stops when the draft's top probability falls below this."""
    draft_policy: str = "adaptive"
    """adaptive: draft the number of tokens (0 included) with the most expected tokens per second;
    fixed: always up to draft_max. A seed at T > 0 with seed_matches_plain False uses fixed, so that the same seed
    gives the same text."""
    seed_matches_plain: bool = True
    """With a seed at T > 0: the same text with a draft as without one (each position samples the main model's
    token with the random number plain decoding uses there, and accepts a draft token only if it is that
    sample). False: rejection sampling, which accepts more drafts; the same seed then gives the same text
    only with the same draft and draft lengths."""
    lookup_scope: str | None = ""
    """Which earlier requests' text lookups may draft from (tandem.spec.suffix.SuffixCache): requests of the same
    scope (the server's: one per API key) see each other's prompts and outputs; None: only this request's own text.
    The generation's prompt and output join its scope's cache when it ends."""
    cache_prompt: bool = True
    """Reuse the start of the prompt that the main model's KV cache still holds (the previous turn of a chat, as
    llama-server's cache_prompt) instead of decoding it again. False: a cold start (benchmarks)."""
    spare_guess: bool = True
    """Exact mode (the main model never decodes a lone row): a plain step fills its second row with an n-gram
    guess of the next token instead of decoding the previous token again. The step costs the same; a right
    guess gives one more token."""
    processors: Processors = NONE
    """Logits processors (penalties, biases, a grammar) shaping every row the main model chooses or verifies a
    token from, and every row the draft model samples from (tandem.spec.processors). Per generation."""
    logprobs: int | None = None
    """Log probabilities (tandem.spec.logprobs): None, off (nothing is computed); n (0-20), each Token carries
    its own and the n most likely tokens' at its position."""
    grammar: Grammar | None = None
    """A constraint the output must satisfy (JSON schema, GBNF, Lark; tandem.spec.grammar): each generation
    applies it after `processors` through a matcher of its own."""
    forced_drafts: bool = True
    """With a grammar: propose the tokens it forces next as draft tokens (verified like any draft, counted as
    drafted and accepted, token source "grammar"), ahead of the drafter's own. False: only the drafter drafts."""
    grammar_ngram: bool = True
    """With a grammar and a draft model: draft the continuation of an n-gram match in the prompt and output
    (GRAMMAR_MIN_MATCH tokens or more) instead of the draft model's, as --spec-type both does. Extraction
    copies spans of the prompt into the output, and structured output repeats itself (array items, the same
    keys and values): these drafts cost a dict lookup instead of a draft decode per token. False: the
    drafter alone."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise BadInputError(f"max_tokens must be >= 1, got {self.max_tokens}", "ask for at least one token",
                                param="max_tokens")
        if self.draft_max < 0 or self.draft_min < 0:
            raise BadInputError("draft_max and draft_min must be >= 0", "use 0 to switch drafting off",
                                param="draft_max")
        if not 0.0 <= self.draft_p_min <= 1.0:
            raise BadInputError(f"draft_p_min must be in [0, 1], got {self.draft_p_min}", "use e.g. 0.5",
                                param="draft_p_min")
        if self.draft_policy not in POLICIES:
            raise BadInputError(f"draft_policy must be one of {', '.join(POLICIES)}, got {self.draft_policy!r}",
                                "use adaptive (the default) or fixed", param="draft_policy")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP:
            raise BadInputError(f"logprobs must be between 0 and {MAX_TOP} top entries, got {self.logprobs}",
                                "ask for fewer alternatives per token", param="logprobs")


@dataclass(frozen=True)
class Token:
    """One generated token. `text` may be empty (a UTF-8 sequence or a possible stop string is pending)."""

    id: int
    text: str
    source: str  # "main", "draft" (proposed by the drafter, accepted), "grammar" (forced by the grammar,
    # verified) or "guess" (a plain step's spare-row guess)
    logprob: TokenLogprob | None = None  # the main model's log probabilities here, when GenParams.logprobs asks


@dataclass(frozen=True)
class Done:
    """The last event: stats, and any text held back until the end."""

    stats: SpecStats
    tail: str = ""


class _Output:
    """Emits tokens and decides when generation stops (EOS, stop string, max_tokens)."""

    def __init__(self, ctx: Context, gp: GenParams, stats: SpecStats):
        self.model, self.gp, self.stats = ctx.model, gp, stats
        self.text = TextAssembler(gp.stop)
        self.done = False

    def finish(self, reason: str) -> None:
        self.done = True
        self.stats.stop_reason = reason

    def emit(self, tokens: Sequence[int], n_draft: int, source: str = "draft",
             rows: np.ndarray | None = None, drafted_by: str = "model") -> Iterator[Token]:
        """Yield tokens (the first n_draft came from the drafter, or were a guess) until a stop; count unused
        drafts as ignored (of source `drafted_by`, SpecStats.drafted_by_source). rows[i] is the processed row token
        i was chosen or verified from (for logprobs)."""
        used = 0
        for i, tok in enumerate(tokens):
            used = i + 1
            if self.model.is_eog(tok):
                self.finish("eos")
                break
            self.stats.generated_tokens += 1
            lp = (token_logprob(rows[i], tok, self.gp.logprobs, self.model.piece)
                  if rows is not None and self.gp.logprobs is not None else None)
            yield Token(tok, self.text.push(self.model.piece(tok)), source if i < n_draft else "main", lp)
            if self.text.stopped:
                self.finish("stop")
                break
            if self.stats.generated_tokens >= self.gp.max_tokens:
                self.finish("length")
                break
        if n_draft > used and source != "guess":
            self.stats.unuse(n_draft - used, drafted_by)

    @property
    def remaining(self) -> int:
        return self.gp.max_tokens - self.stats.generated_tokens


class _Speculator:
    """A drafter and the policy choosing its draft lengths; times drafts and verifications for the cost model."""

    def __init__(self, drafter: Drafter, gp: GenParams, cost: CostModel, load: Callable[[], int] = lambda: 1,
                 remaining: Callable[[], int | None] = lambda: None):
        self.drafter, self.gp, self.cost, self.load, self.remaining = drafter, gp, cost, load, remaining
        self._load = 1  # sequences in the current step (this one included)
        # Wall-clock timings must not steer a seeded rejection-sampling run: the draft length changes which random
        # numbers are drawn, so the same seed would give different text. Sample and compare (seed_matches_plain)
        # draws one uniform per emitted token whatever the draft length, so the adaptive policy is free there (a
        # fixed length made a seeded request with a draft the tiny models cannot predict 12x slower).
        rejection = gp.sampling.seed is not None and not gp.sampling.greedy and not gp.seed_matches_plain
        name = "fixed" if rejection else gp.draft_policy
        # The draft's probabilities steer a rejection-sampled run too: each of its draft decodes runs in a batch of
        # its own, so that the rows of other sequences cannot change them (and the same seed gives the same text).
        self.alone = rejection
        self.regime = regime(0.0 if gp.sampling.greedy else gp.sampling.temperature)
        self.policy: DraftPolicy = make_policy(name, cost, gp.draft_max, draft_min=gp.draft_min, regime=self.regime)
        self.asked = 0
        self.draft_seconds = 0.0  # the last propose() call's wall time
        self._seen = 0  # history length at the last propose(): what the drafter has seen
        self._drafted_last_step = False  # then the drafter catches up on one step's tokens only

    def prefill(self, history: Sequence[int], max_k: int) -> DraftSteps[None]:
        """Catch the drafter up on the prompt now, right after the first token, when the policy will draft at the
        first step anyway (it would pay the same catch-up there): generation then runs at the speculative rate at
        once. The first token goes out before (a draft model's prompt costs more than the main model's: its
        quantized weights have no many-row kernels), and a draft model's catch-up is a Decode the caller runs. A
        failed catch-up costs drafts only: the drafter starts over at its first draft."""
        load = self.load()
        if max_k <= 0 or not self.policy.expects_draft(max_k, load, len(history) - 1 - self._seen, self.remaining()):
            return
        steps = getattr(self.drafter, "prefill_steps", None)
        if load > 1 and steps is not None:  # other sequences share the step: read the prompt a chunk a step
            return
        t0 = time.perf_counter()
        try:
            if steps is not None:
                yield from steps(history)
            else:
                self.drafter.prefill(history)
        except EngineError as e:
            log.warning("draft %s: catching up on the prompt failed (%s); it starts over at its first draft",
                        self.drafter.name, e.cause)
            self.drafter.reset()
            return
        if load == 1:  # (under load the wall time around its decode ran the other sequences' work too)
            self.cost.observe_catch_up(len(history) - 1 - self._seen, time.perf_counter() - t0)
        self._seen, self._drafted_last_step = len(history) - 1, True

    def propose(self, history: Sequence[int], max_k: int, rng: np.random.Generator,
                stop: Callable[[], bool] | None = None) -> DraftSteps[DraftProposal]:
        """The policy's number of draft tokens (at most max_k), or EMPTY for a plain step; a drafter with
        propose_steps (a draft model) yields its draft decodes for the caller to run, and ends early when
        `stop()` says so (the request was cancelled)."""
        backlog = len(history) - self._seen  # tokens the drafter has not seen (the prompt at first)
        self.cost.locate(len(history) - 1, self.drafter.kv_cells(len(history)))  # costs grow with the KV cache
        self._load = max(1, self.load())
        # After a drafting step the drafter reads only what that step accepted, which its draft cost includes.
        unpaid = 0 if self._drafted_last_step else backlog
        self.asked = self.policy.choose(max_k, unpaid, self._load, self.remaining()) if max_k > 0 else 0
        typical, self._drafted_last_step = self._drafted_last_step, self.asked > 0
        if self.asked == 0:
            self.cost.observe_choice(0)
            return EMPTY
        chunk = self.catch_up_chunk()
        if self._load > 1 and unpaid > chunk and hasattr(self.drafter, "prefill_steps"):
            # 3a. Other sequences share this step: read one chunk of the backlog now, draft once it is read.
            yield from self._catch_up(history, chunk)
            self.policy.defer()
            self.asked, self._drafted_last_step = 0, False
            self.cost.observe_choice(0)
            return EMPTY
        self.cost.observe_choice(self.asked)
        t0 = time.perf_counter()
        args = (history, self.asked, self.gp.sampling, rng)
        kw = {"p_min": self.gp.draft_p_min, "processors": self.gp.processors}
        steps = getattr(self.drafter, "propose_steps", None)
        proposal = ((yield from steps(*args, **kw, alone=self.alone, stop=stop)) if steps is not None
                    else self.drafter.propose(*args, **kw))
        self.draft_seconds = time.perf_counter() - t0
        self._seen = len(history)
        # Under load the wall time between its draft decodes ran the other sequences' work too: no draft cost then.
        # Alone, after plain steps or the prompt, the drafter's catch-up would inflate the per-step cost. A drafter
        # that decodes nothing (text lookups) times only itself at any load: its cost is learnt under load too (else
        # a server always busy with several requests never learnt it and drafted one token a step).
        if isinstance(self.drafter, (LookupDrafter, NgramDrafter)) or (self._load == 1 and typical):
            self.cost.observe_draft(len(proposal.tokens), self.draft_seconds)
        elif self._load == 1 and self.cost.draft.known and backlog > 2:
            step = min(self.draft_seconds, self.cost.draft_cost(len(proposal.tokens)))
            self.cost.observe_catch_up(backlog, self.draft_seconds - step)
        return proposal if len(proposal.tokens) >= max(self.gp.draft_min, 1) else EMPTY

    def catch_up_chunk(self) -> int:
        """Most tokens the drafter reads in one step shared with other sequences: what costs about a plain step
        of theirs, so that a long prompt's catch-up never stalls them for longer (at least CATCH_UP_MIN)."""
        per_token = self.cost.catch_up
        if per_token <= 0.0:
            return CATCH_UP_MIN
        return max(CATCH_UP_MIN, int(self.cost.verify_cost(self._load) / per_token))

    def _catch_up(self, history: Sequence[int], chunk: int) -> DraftSteps[None]:
        """Feed the drafter up to `chunk` tokens of what it has not read (its decode yielded, batched with the
        other sequences' draft rows); a failed decode makes it start over, as a failed prefill does."""
        try:
            yield from self.drafter.prefill_steps(history, limit=chunk)
        except EngineError as e:
            log.warning("draft %s: catching up failed (%s); it starts over", self.drafter.name, e.cause)
            self.drafter.reset()
            self._seen = 0
            return
        self._seen = min(len(history) - 1, self._seen + chunk)

    def restart(self) -> None:
        """The drafter starts over from an empty cache: its next draft catches up on the whole history."""
        self._seen, self._drafted_last_step = 0, False

    def verified(self, n_drafted: int, accepted: int, seconds: float, rows: int | None = None) -> None:
        """Feed the step's verification time (of `rows` rows, n_drafted + 1 when None) and outcome to the cost
        model and the policy. A step shared with other sequences teaches acceptance only: its time is the batch's
        (and the others' drafting), not this sequence's verification."""
        if self._load == 1:
            self.cost.observe_verify(rows or n_drafted + 1, seconds)
        if self.asked > 0:
            self.policy.observe(n_drafted, accepted)
            self.cost.observe_verified(self.asked, accepted, self.regime)  # (declined tokens count as rejected)


class _Speculation:
    """The speculators of one generation: one for a drafter alone; for a combined drafter (text lookups, then a draft
    model) one per match-size range of the lookups (LookupDrafter.bucket) and one for the model, each with its own
    cost model and policy. A step goes to the lookups when they match at least min_match tokens and that range's
    policy drafts, else to the model (if any; else it is a plain step)."""

    def __init__(self, drafter: Drafter, gp: GenParams, costs: Callable[[Drafter, str], CostModel],
                 load: Callable[[], int] = lambda: 1, remaining: Callable[[], int | None] = lambda: None):
        self.drafter = drafter
        self._args = (gp, costs, load, remaining)
        self.lookup: LookupDrafter | None = drafter.lookup if isinstance(drafter, CombinedDrafter) else None
        self._buckets: dict[int, _Speculator] = {}
        # A part's acceptance depends on the steps routed to it (the model part of `both` gets only the steps
        # without a long enough match), so it keeps a cost model apart from the same drafter used alone.
        model = drafter.model if isinstance(drafter, CombinedDrafter) else drafter
        self.model = (None if model is None else
                      _Speculator(model, gp, costs(model, drafter.model_key if self.lookup else model.name), load,
                                  remaining))
        self.last: _Speculator | None = self.model  # the speculator of the current step
        self.source = "model" if self.lookup is None else "ngram"
        """Where the current step's drafts come from: "model" (a drafter alone, or the model part), "ngram" (this
        request's text) or "cache" (earlier requests', tandem.spec.suffix)."""

    @property
    def parts(self) -> list[_Speculator]:
        return [*self._buckets.values(), *([self.model] if self.model else [])]

    def _bucket(self, size: int) -> _Speculator:
        if size not in self._buckets:
            gp, costs, load, remaining = self._args
            self._buckets[size] = _Speculator(self.lookup, gp, costs(self.lookup, f"{self.drafter.name}/lookup:{size}+"),
                                              load, remaining)
        return self._buckets[size]

    def prefill(self, history: Sequence[int], max_k: int) -> DraftSteps[None]:
        if self.lookup is not None:
            self.lookup.prefill(history)
        if self.model is not None:
            yield from self.model.prefill(history, max_k)

    def propose(self, history: Sequence[int], max_k: int, rng: np.random.Generator,
                stop: Callable[[], bool] | None = None) -> DraftSteps[DraftProposal]:
        if self.lookup is not None:
            match = self.lookup.find(history)
            if match is not None and match.size >= self.drafter.min_match:
                self.last, self.source = self._bucket(self.lookup.bucket(match)), match.source
                proposal = yield from self.last.propose(history, min(max_k, self.lookup.cap(match)), rng, stop)
                if proposal.tokens:
                    return proposal
        self.last, self.source = self.model, "model"
        if self.model is None:
            return EMPTY
        return (yield from self.model.propose(history, max_k, rng, stop))

    def verified(self, n_drafted: int, accepted: int, seconds: float, rows: int | None = None) -> None:
        if self.last is not None:
            self.last.verified(n_drafted, accepted, seconds, rows)

    def restart(self) -> None:
        """Drop what the drafter holds (its draft model's cells), as when its sequence's prefix is evicted
        (tandem.runtime.Runtime.evicted); it catches up at its next draft."""
        self.drafter.reset()
        for part in self.parts:
            part.restart()

    def remember(self, history: Sequence[int]) -> None:
        """The generation ended: the lookups' cache keeps its text for later requests (tandem.spec.suffix)."""
        if self.lookup is not None:
            self.lookup.remember(history)


CATCH_UP_MIN = 16
"""Fewest tokens a shared step's catch-up reads: below that the decode's fixed cost dominates."""


GRAMMAR_MIN_MATCH = 2
"""Shortest n-gram match that drafts instead of the draft model under a grammar (GenParams.grammar_ngram).
Replayed offline on the greedy outputs of `tandem bench grammar` (6 schemas, default pair): forced tokens alone
took 317 verification steps, forced tokens then the n-gram continuation of a 2+ token match 184 (3+: 198)."""


def _grammar_drafter(drafter: Drafter) -> Drafter:
    """Under a grammar, a draft model alone becomes n-gram drafting first, then the model; a combined drafter
    drafts from matches of GRAMMAR_MIN_MATCH tokens on (a drafter that is n-gram lookup alone stays as it is). Its
    cost models are keyed apart: acceptance under a grammar is not acceptance in free text."""
    if isinstance(drafter, (NgramDrafter, LookupDrafter)):
        return drafter
    if isinstance(drafter, CombinedDrafter):
        return CombinedDrafter(drafter.lookup, drafter.model, min_match=GRAMMAR_MIN_MATCH,
                               name=f"grammar:{drafter.name}")  # (its model part keyed apart too)
    return CombinedDrafter(LookupDrafter(), drafter, min_match=GRAMMAR_MIN_MATCH, name=f"grammar:ngram+{drafter.name}")


def _fresh_costs() -> Callable[[Drafter, str], CostModel]:
    """A cost model per key, for one generate() call (the Runtime keeps its own across calls)."""
    costs: dict[str, CostModel] = {}
    return lambda _d, key: costs.setdefault(key, CostModel())


def _cut(proposal: DraftProposal, n: int) -> DraftProposal:
    """The proposal's first n tokens."""
    if n >= len(proposal.tokens):
        return proposal
    return DraftProposal(proposal.tokens[:n], proposal.probs[:n] if proposal.probs is not None else None)


def _after_forced(forced: Sequence[int], proposal: DraftProposal) -> DraftProposal:
    """The forced tokens, then the proposal. With draft probabilities, a forced token's distribution is all on
    itself (it was not sampled): verification accepts it with the main model's probability of it, and samples
    a rejection's replacement from the rest of that distribution."""
    if proposal.probs is None:
        return DraftProposal([*forced, *proposal.tokens])
    onehot = np.zeros((len(forced), proposal.probs.shape[1]), dtype=proposal.probs.dtype)
    onehot[np.arange(len(forced)), forced] = 1.0
    return DraftProposal([*forced, *proposal.tokens], np.concatenate([onehot, proposal.probs]))


def _pick(logits: np.ndarray, sp: SamplingParams, rng: np.random.Generator) -> int:
    return int(logits.argmax()) if sp.greedy else sample(probs(logits, sp), rng.random())


Steps = Generator[Decode | Token | Done, np.ndarray | None, None]
"""What sequence() returns: a generation one decode at a time (tandem.spec.steps.Decode: of the main model, or of
a draft model while it drafts)."""


def generate(main: Context, prompt: Sequence[int], gp: GenParams, drafter: Drafter | None = None,
             cancel: Callable[[], bool] | None = None,
             costs: Callable[[Drafter, str], CostModel] | None = None) -> Iterator[Token | Done]:
    """Generate from `prompt` with the main model, speculating with `drafter` when given: sequence() with each
    of its decodes run at once, alone (a scheduler runs several sequences' decodes as one batch instead).

    Output equals the main model's alone: token for token at T = 0, in distribution at T > 0.
    `costs(drafter, key)` gives a drafter's (or a part's) measured draft and verify costs, kept across
    generations by the caller (fresh ones when None).
    """
    steps = sequence(main, prompt, gp, drafter, cancel, costs)
    logits: np.ndarray | None = None
    try:
        while True:
            try:
                ev = steps.send(logits)
            except StopIteration:
                return
            logits = None
            if isinstance(ev, Decode):  # the main model's, or a draft decode (ev.ctx)
                try:
                    logits = decode(ev.ctx or main, ev.rows)
                except BaseException as e:
                    steps.throw(e)  # the sequence rolls back its step and re-raises
                    raise
            else:
                yield ev
    finally:
        steps.close()  # a caller that stops early: the sequence's own cleanup runs now


def sequence(main: Context, prompt: Sequence[int], gp: GenParams, drafter: Drafter | None = None,
             cancel: Callable[[], bool] | None = None,
             costs: Callable[[Drafter, str], CostModel] | None = None,
             seq_id: int = 0, load: Callable[[], int] | None = None,
             room: Callable[[int], int] | None = None,
             room_relocated: Callable[[int], int] | None = None) -> Steps:
    """One generation as a sequence of steps: yields Decode for each decode it needs (and expects its logits back
    through send()), Token for each generated token, and Done last. Everything of the sequence but the decodes
    themselves happens here: drafting, verification, rollback of its own KV cells (sequence `seq_id` of `main`),
    stats, stop conditions. A draft model's decodes (Decode.ctx set) come one draft position at a time, so a
    scheduler can run every sequence's draft rows of a position as one batch. `load()`: how many sequences a
    scheduler decodes in this sequence's steps (the draft policy prices a step as the whole batch costs; None: 1).
    `room(want)`: how many positions it may hold now, in a pool of cells shared with other sequences
    (tandem.sched.Scheduler.room; None: its capacity); when that has no room for the next token it relocates if
    `room_relocated(want)` (Scheduler.room_relocated: the room it would have with its cells taken afresh from the
    lowest free pages; None: it never relocates) has room, else it ends as at the end of its context."""
    if not prompt:
        raise BadInputError("the prompt is empty", "send at least one token of text")
    n_ctx = main.capacity  # positions this sequence may hold
    if len(prompt) >= n_ctx:
        raise ContextOverflowError(
            f"the prompt has {len(prompt)} tokens but the context holds {n_ctx}",
            "shorten the prompt or start with a larger --ctx-size", param="messages", code="context_length_exceeded")
    if gp.processors:  # bind the processors to this generation (where its output starts, the vocabulary)
        gp = dataclasses.replace(gp, processors=gp.processors.start(prompt, main.model.n_vocab))
    if gp.grammar is not None:  # this generation's own matcher, applied last
        gp = dataclasses.replace(gp, processors=gp.processors.then(GrammarProcessor(main.model, gp.grammar)),
                                 grammar=None)
    stats = SpecStats(prompt_tokens=len(prompt), draft_model=drafter.name if drafter else None)
    if gp.grammar_ngram and drafter is not None and gp.processors.guided:
        drafter = _grammar_drafter(drafter)
    # The main KV cache may still hold the start of this prompt (the previous turn of a chat): reuse it, but
    # decode at least the last two prompt tokens (the last one's logits choose the first token; two rows take the
    # kernels a whole prompt's batch takes, where one row would round differently).
    reuse = max(0, min(common_prefix(main.held(seq_id), prompt), len(prompt) - 2)) if gp.cache_prompt else 0
    out = _Output(main, gp, stats)
    rng = np.random.default_rng(gp.sampling.seed)
    seeded = gp.sampling.seed is not None and not gp.sampling.greedy and gp.seed_matches_plain
    # With a seed, the same seed gives the same text with a draft as without one: the drafter samples from a
    # stream of its own, and each verified position samples the main model's token with the uniform plain
    # decoding would use there (sample and compare), one per emitted token, the unused ones kept for later.
    draft_rng = np.random.default_rng([gp.sampling.seed, 1]) if seeded else rng
    plain_uniforms: list[float] = []
    spec = (_Speculation(drafter, gp, costs or _fresh_costs(), load or (lambda: 1), lambda: out.remaining)
            if drafter is not None else None)
    guesser = NgramDrafter() if main.pairs and gp.spare_guess else None
    t0 = time.perf_counter()
    # 1. Evaluate the prompt with the main model (past what its cache already holds) and choose the first token.
    main.rollback(reuse, seq_id=seq_id)
    stats.cached_tokens = reuse
    try:
        first = yield Decode(SeqRows(seq_id, prompt[reuse:], reuse, "last"))
    except BaseException:
        main.rollback(reuse, seq_id=seq_id)
        raise
    first_row = gp.processors.row(prompt, first[0])
    history = [*prompt, _pick(first_row, gp.sampling, rng)]
    stats.prompt_time = time.perf_counter() - t0
    yield from out.emit(history[-1:], 0, rows=first_row[None])
    if spec is not None:
        bind = getattr(drafter, "bind", None)
        if bind is not None:
            bind(gp.lookup_scope)
    if spec is not None and not out.done:
        # 1b. Catch the drafter up on the prompt now, after the first token, if it is to draft at the first step
        # (a drafter keeps what it holds of a shared prefix too).
        drafter.reset(history if gp.cache_prompt else None)
        yield from spec.prefill(history, min(gp.draft_max, gp.max_tokens - 1))
    while not out.done:
        n_past = len(history) - 1  # the main KV holds everything but the newest token
        # 2. Stop when asked to, or when the context (or a shared pool's room) has no room for the newest token.
        if cancel is not None and cancel():
            out.finish("cancelled")
            break
        want = n_past + 2 + gp.draft_max
        limit = n_ctx if room is None else min(n_ctx, room(want))
        if n_past + 1 > limit and room_relocated is not None and min(n_ctx, room_relocated(want)) > n_past:
            # 2b. Relocate: no free page is left after this sequence's last one, but the pool's free pages (below it)
            # can hold it. Drop its cells and decode everything it held again from position 0, as a prompt is
            # decoded: the new cells take the lowest free pages, and the rows' values do not depend on the batch
            # they are computed in (exact decoding), so the output stays what it is alone. The drafter lets go of
            # its cells too (a shared draft pool fragments the same way) and catches up at its next draft.
            main.rollback(0, seq_id=seq_id)
            if spec is not None:
                spec.restart()
            stats.relocations += 1
            try:
                yield Decode(SeqRows(seq_id, history[:-1], 0, "last"))
            except BaseException:
                main.rollback(0, seq_id=seq_id)
                raise
            continue
        if n_past + 1 > limit:
            out.finish("context")
            break
        # 3. Draft as many tokens as the policy finds worth it (0: a plain step), within max_tokens and the context:
        # first the tokens a grammar forces, then the drafter's after them, cut at the first token it refuses.
        space = min(out.remaining - 1, limit - n_past - 1)
        forced = gp.processors.forced(history)[:space] if gp.forced_drafts and gp.processors and space > 0 else []
        ahead = [*history, *forced] if forced else history
        k = min(gp.draft_max, space - len(forced))
        proposal = (yield from spec.propose(ahead, k, draft_rng, cancel)) if spec is not None else EMPTY
        if proposal.tokens and gp.processors:
            proposal = _cut(proposal, gp.processors.admissible(ahead, proposal.tokens))
        if forced:
            proposal = _after_forced(forced, proposal)
        if seeded and proposal.probs is not None:
            proposal = DraftProposal(proposal.tokens)  # sample and compare: the plain decoding's draws
        # 3b. Exact mode: a plain step decodes two rows anyway, so let the second be a guess instead of a repeat.
        guess = not proposal.tokens and guesser is not None and min(out.remaining, limit - n_past) > 1
        if guess:
            proposal = guesser.propose(history, 1)
        # 4. Verify the newest token and the drafts in ONE llama_decode, then keep the agreed prefix.
        keep, t_verify = n_past, time.perf_counter()
        try:
            logits = yield Decode(SeqRows(seq_id, [history[-1], *proposal.tokens], n_past, "all"))
            n = len(proposal.tokens)
            if gp.processors:
                logits = gp.processors.rows(history, proposal.tokens, logits)
            if seeded:  # no acceptance tests; position i samples with plain decoding's next uniforms
                plain_uniforms.extend(rng.random(max(0, n + 1 - len(plain_uniforms))))
                uniforms = np.array([0.0] * n + plain_uniforms[:n + 1])
            else:
                uniforms = rng.random(uniforms_needed(n))
            result = verify(proposal, logits, gp.sampling, uniforms)
            if seeded:
                del plain_uniforms[:result.accepted + 1]
            keep, t_verify = n_past + 1 + result.accepted, time.perf_counter() - t_verify
        finally:
            # 5. Roll the main KV back past the rejected drafts (on error, past the whole step).
            main.rollback(keep, seq_id=seq_id)
        # 6. Record the step; let the cost model and the policy learn from it (a guess step is a plain step).
        new, n_drafted = result.tokens(proposal), 0 if guess else len(proposal.tokens)
        n_forced = min(len(forced), result.accepted)  # forced tokens accepted; the drafter's come after them
        source = spec.source if spec is not None else "model"
        stats.record_step(n_drafted, result.accepted, guessed=len(proposal.tokens) if guess else 0,
                          sources=() if guess else ((("grammar", len(forced), n_forced),) if forced else ())
                          + ((source, n_drafted - len(forced), result.accepted - n_forced),))
        if spec is not None:
            spec.verified(n_drafted - len(forced), 0 if guess else result.accepted - n_forced, t_verify,
                          rows=len(proposal.tokens) + 1)
        # 7. Emit the accepted drafts (or guess) and the main model's own token; stop early if needed.
        if n_forced:
            yield from out.emit(new[:n_forced], n_forced, "grammar", rows=logits, drafted_by="grammar")
        if out.done:
            stats.unuse(result.accepted - n_forced, source)
        else:
            yield from out.emit(new[n_forced:], result.accepted - n_forced, "guess" if guess else "draft",
                                rows=logits[n_forced:], drafted_by=source)
        history.extend(new)
    stats.generation_time = time.perf_counter() - t0 - stats.prompt_time
    if spec is not None:
        spec.remember(history)
    yield Done(stats, out.text.flush())

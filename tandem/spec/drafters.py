"""Drafters propose tokens for the main model to verify. All share one small interface."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from tandem.engine.llama import Context, SeqRows
from tandem.errors import BadInputError, EngineError
from tandem.spec.processors import NONE, Processors
from tandem.spec.sampling import SamplingParams, probs, sample, top_prob
from tandem.spec.steps import Decode, Steps, run
from tandem.spec.translate import Translator
from tandem.spec.verify import EMPTY, DraftProposal
from tandem.spec.window import DEFAULT_DISCARD, DEFAULT_KEEP, Window


log = logging.getLogger("tandem.draft")

GREEDY = SamplingParams()
"""A translated draft's sampling: its proposals are deterministic (see ModelDrafter)."""


class Drafter(Protocol):
    """Anything that can guess the next tokens of a sequence. A drafter that decodes a model (ModelDrafter) also
    has propose_steps: propose() yielding its decodes, for a scheduler to batch with other sequences' drafts."""

    name: str

    def reset(self, history: Sequence[int] | None = None) -> None:
        """Forget the previous sequence (a new generation starts), keeping what it shares with `history` (the new
        prompt) where the drafter can: a chat's next turn need not be read again."""

    def prefill(self, history: Sequence[int]) -> None:
        """Catch up on all of history but its newest token now (in the prompt phase), in one batch."""

    def kv_cells(self, n_history: int) -> int:
        """KV cells the drafter's attention reads when drafting after n_history tokens (0: no KV cache)."""

    def propose(self, history: Sequence[int], max_tokens: int, sp: SamplingParams,
                rng: np.random.Generator, p_min: float | None = None,
                processors: Processors = NONE) -> DraftProposal:
        """Up to max_tokens tokens that may follow `history` (prompt + output so far).

        A drafter with a confidence measure stops early when it falls below p_min. A drafter with logits
        chooses from rows shaped by `processors`, as the main model's are."""


class ModelDrafter:
    """Drafts with a small model: one that shares the main model's vocabulary, or one with a tokenizer of its own
    through a `translator` (tandem.spec.translate: it then reads the history as text in its own ids and proposes
    greedily, deterministic proposals the main model verifies by sampling its own distribution at T > 0).

    Its KV cache mirrors the history through a sliding `Window` (tandem.spec.window): all of it while it
    fits, else the pinned first tokens plus the most recent ones. Each step it rewinds to the longest
    prefix the history still agrees with, slides the window if the step would not fit (one KV shift drops
    a whole chunk), feeds the newly accepted tokens in one batch, then drafts one token per decode.
    The prompt is evaluated once; each accepted token is decoded once; slid-out tokens are never re-read.

    Several drafters can share one context of several sequences (ContextParams.n_seq_max, paged cells), each
    drafting in sequence `seq_id`: a scheduler then decodes all their draft rows of a draft position as one batch
    (propose_steps). Paged cells cannot shift, so such a drafter's window must cover the main context's sequence.
    """

    def __init__(self, ctx: Context, *, p_min: float = 0.0, name: str | None = None,
                 main_n_ctx: int | None = None, keep: int = DEFAULT_KEEP, discard: float = DEFAULT_DISCARD,
                 seq_id: int = 0, translator: Translator | None = None):
        """`main_n_ctx`: the positions a sequence of the main context holds; a draft window smaller than that must
        be able to shift. `seq_id`: the sequence of `ctx` this drafter's KV cells are.

        The window is the *requested* draft context (ContextParams.n_ctx; llama.cpp rounds small contexts
        up to 256 cells), unless the real context already holds the whole main context.
        """
        self.ctx = ctx
        self.seq_id = seq_id
        self.p_min = p_min
        self.name = name or ctx.model.name
        size = window_size(ctx, main_n_ctx)
        self.window = Window(size, keep=min(keep, size // 2), discard=discard)
        self.shifts = 0
        """KV shifts done, over all sequences (each drops a chunk of the window)."""
        self.translator = translator
        """Main ids <-> this draft's ids through text, for a draft with another vocabulary; None: the same ids."""
        self._kv: list[int] = []  # tokens held in the draft KV cache, by position
        self._committed = 0       # prefix of _kv known to equal the history (through the window mapping)
        if main_n_ctx is not None and size < main_n_ctx:
            self._require_shift()
        self.ctx.rollback(0, seq_id=seq_id)  # its record starts empty: so does its sequence

    def _own(self, history: Sequence[int]) -> Sequence[int]:
        """The history in this draft's ids. A translation may cut the history's newest text anew (two tokens the
        last step translated may now be one), so only its kept prefix stays known to match the KV cache."""
        if self.translator is None:
            return history
        own = self.translator.to_draft(history)
        self._committed = min(self._committed, self.translator.kept)
        return own

    def _fits(self, history: Sequence[int], k: int) -> bool:
        """Whether a step of k drafts after `history` (this draft's ids) can run: a translated history may hold more
        tokens than the main context's (another tokenizer cuts text finer), and a window that cannot slide then
        stops drafting for the rest of the sequence instead of failing it."""
        return self.translator is None or self.window.overflow(len(history), k) <= 0 or self.ctx.can_shift

    def reset(self, history: Sequence[int] | None = None) -> None:
        if self.translator is not None:
            if history is None:
                self.translator.reset()
            else:
                history = self.translator.to_draft(history)
        if history is not None and self.window.dropped == 0:  # the KV mirrors the history one to one: keep a prefix
            self._committed = 0  # nothing is known to match the new history until _sync compares it
            self._sync(history)
            return
        self._kv.clear()
        self._committed = 0
        self.window.reset()
        self.ctx.rollback(0, seq_id=self.seq_id)

    def _require_shift(self) -> None:
        """Refuse a draft whose KV positions cannot be shifted (no RoPE, or memory that cannot shift)."""
        if not self.ctx.can_shift:
            raise BadInputError(
                f"the draft model {self.name} cannot slide its {self.window.size}-token context window: llama.cpp "
                "cannot shift its KV cache (no RoPE positions, or recurrent memory)",
                "use --ctx-size-draft equal to --ctx-size", param="ctx_size_draft")

    def _sync(self, history: Sequence[int]) -> int:
        """Rewind the draft KV to the longest prefix shared with history; return its length.

        The newest history token is always left to feed, so the next decode has logits to draft from.
        """
        w = self.window
        if w.index(self._committed) > len(history):  # a shorter, unrelated history: start over
            self.reset()
        limit = min(len(self._kv), w.n_positions(len(history)) - 1)
        n = min(self._committed, limit)
        while n < limit and self._kv[n] == history[w.index(n)]:
            n += 1
        if n < len(self._kv):
            self.ctx.rollback(n, seq_id=self.seq_id)
            del self._kv[n:]
        return n

    def _slide(self, drop: int) -> None:
        """Drop the `drop` oldest unpinned history tokens from the window, shifting later cells down."""
        if drop <= 0:
            return
        w = self.window
        held = len(self._kv) - w.keep  # unpinned cells in the KV cache
        cut = min(drop, held)
        if 0 < cut < held:
            self._require_shift()
            self.ctx.shift(w.keep, w.keep + cut, -cut, seq_id=self.seq_id)
            self.shifts += 1
        elif cut > 0:  # every unpinned cell goes: nothing to shift
            self.ctx.rollback(w.keep, seq_id=self.seq_id)
        if cut > 0:
            del self._kv[w.keep:w.keep + cut]
        w.dropped += drop

    def kv_cells(self, n_history: int) -> int:
        """The window's positions for that history: at most the window, however long the history."""
        return min(self.window.n_positions(n_history), self.window.size)

    def prefill(self, history: Sequence[int]) -> None:
        """Evaluate history but its newest token (left for the first draft's decode) in one batch."""
        run(self.prefill_steps(history))

    def prefill_steps(self, history: Sequence[int], limit: int | None = None) -> Steps[None]:
        """prefill() as a Decode to yield (its context and sequence), for the caller to run; with `limit`, only
        the first `limit` tokens it has not read (the rest at later calls or at its next draft)."""
        if len(history) < 2:
            return
        history = self._own(history)
        if not self._fits(history, 1):
            return
        self._sync(history)
        self._slide(self.window.overflow(len(history), 1))
        pending = self.window.view(history, len(self._kv))[:-1][:limit]
        if pending:
            try:
                yield Decode(SeqRows(self.seq_id, pending, len(self._kv), "none"), self.ctx)
            except BaseException:
                self.ctx.rollback(len(self._kv), seq_id=self.seq_id)
                raise
            self._kv.extend(pending)
            self._committed = len(self._kv)

    def propose(self, history: Sequence[int], max_tokens: int, sp: SamplingParams,
                rng: np.random.Generator, p_min: float | None = None,
                processors: Processors = NONE) -> DraftProposal:
        return run(self.propose_steps(history, max_tokens, sp, rng, p_min, processors))

    def propose_steps(self, history: Sequence[int], max_tokens: int, sp: SamplingParams,
                      rng: np.random.Generator, p_min: float | None = None, processors: Processors = NONE, *,
                      alone: bool = False, stop: Callable[[], bool] | None = None,
                      translate: bool = True) -> Steps[DraftProposal]:
        """propose() one draft decode at a time: yields a Decode (this drafter's context and sequence) for each
        decode and gets its logits through send(), so that a scheduler can decode every sequence's draft rows of
        a draft position as one batch. `alone`: ask for each decode in a batch of its own (a draft whose
        probabilities steer the output must not get other logits from other sequences' rows beside it). `stop()`:
        checked before each further decode; when it says so (a cancelled request) the draft ends there, so the
        step does not hold up the others with drafts nobody will read. `translate` False: `history` is already in
        this draft's ids (and so is the proposal)."""
        if translate and self.translator is not None:  # draft in its own ids, greedily, and propose their text in main ids
            if max_tokens <= 0 or not history:
                return EMPTY
            history_own = self._own(history)
            if not self._fits(history_own, max_tokens):
                return EMPTY
            own = yield from self.propose_steps(history_own, max_tokens, GREEDY, rng, p_min,
                                                alone=alone, stop=stop, translate=False)
            return DraftProposal(self.translator.to_main(history, own.tokens, max_tokens))
        p_min = self.p_min if p_min is None else p_min
        max_tokens = min(max_tokens, self.window.max_draft)
        if max_tokens <= 0 or not history:
            return EMPTY
        # 1. Rewind to what the history still agrees with; slide the window if the step would not fit.
        self._sync(history)
        self._slide(self.window.overflow(len(history), max_tokens))
        # 2. Feed the tokens the KV cache lacks (the newest at least) in one decode: the first draft's logits.
        pending = self.window.view(history, len(self._kv))
        try:
            logits = yield from self._decode(pending, alone)
        except EngineError as e:
            self._lost(e)
            return EMPTY
        self._committed = len(self._kv)
        # 3. Draft up to max_tokens tokens, one decode each.
        tokens: list[int] = []
        rows: list[np.ndarray] = []
        for i in range(max_tokens):
            if processors:
                logits = processors.row([*history, *tokens], logits)
                allowed = np.count_nonzero(logits > -np.inf)
                if allowed == 0:
                    break  # every token refused (a finished grammar): nothing to draft
                if allowed == 1 and tokens:
                    break  # the grammar forces this token: the next step proposes it without a draft decode
            if p_min > 0 and top_prob(logits) < p_min:
                break
            if sp.greedy:
                tok = int(logits.argmax())
            else:
                q = probs(logits, sp)
                tok = sample(q, rng.random())
                rows.append(q)
            tokens.append(tok)
            if i + 1 == max_tokens or (stop is not None and stop()):
                break
            try:
                logits = yield from self._decode([tok], alone)
            except EngineError as e:
                self._lost(e)
                break
        return DraftProposal(tokens, np.stack(rows) if rows else None)

    def _lost(self, e: EngineError) -> None:
        """A draft decode failed (a shared draft pool with no page left for this sequence, say): drafts are
        optional, so the step goes on with what was drafted, and the drafter starts over from an empty cache (which
        frees its cells; its next draft catches up on the history)."""
        log.warning("draft model %s, sequence %d: %s; drafting starts over", self.name, self.seq_id, e.cause)
        self.reset()

    def _decode(self, tokens: list[int], alone: bool) -> Steps[np.ndarray]:
        """Ask for `tokens` to be decoded after what the KV cache holds; the last one's logits. On an error (or
        an abort) before the logits come back, forget whatever the decode may have written: the drafter's
        record of its KV cells stays true."""
        try:
            logits = yield Decode(SeqRows(self.seq_id, tokens, len(self._kv), "last"), self.ctx, alone)
        except BaseException:
            self.ctx.rollback(len(self._kv), seq_id=self.seq_id)
            raise
        self._kv.extend(tokens)
        return logits[0]


def window_size(ctx: Context, main_n_ctx: int | None = None) -> int:
    """Cells the draft window may use: the requested context, or all a sequence may hold when it covers the main
    context's sequence (`main_n_ctx`); a sequence of a context of several holds its share (Context.capacity)."""
    if main_n_ctx is not None and ctx.capacity >= main_n_ctx:
        return ctx.capacity
    return min(ctx.params.n_ctx, ctx.capacity)

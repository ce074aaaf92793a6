"""Continuous batching: the steps of several sequences in one main-model decode, their drafts in one draft decode
per draft position.

Each request is a `tandem.spec.generate.sequence` generator bound to one sequence id of the main context: it
drafts, verifies, rolls back and emits on its own, and yields a `Decode` whenever it needs a decode: of the main
model, or of its draft model while it drafts (Decode.ctx; the Runtime's drafters share one draft context of as
many sequences). A sequence runs to its first Decode when it is added. `Scheduler.step()`: while some sequences
wait on a draft decode, it runs those of each draft context together and advances them again (one decode per draft
position for all of them); then it runs the main decodes together, hands each sequence its logits and advances it
to its next Decode (it verifies, emits and starts its next draft), and returns the tokens emitted, so a token
reaches its client as soon as it is verified, not after the next step's decodes. A request that arrives joins at
the next step; one that ends frees its sequence at once, and its KV cells stay for the next request whose prompt
starts the same way (a chat's next turn).

In a shared pool of cells (ContextParams.shared_cells, llama-server's --kv-unified) any sequence may grow to the
whole context while the others leave room: `room()` tells a sequence how far it may grow now, dropping idle
sequences' cached prefixes (least recently used first) before it says no, and a prompt waits for its cells. A
sequence's pages stay in position order, so it grows only into free pages after its last one; when those run out
while free pages lie below, `room_relocated()` tells it how far it could grow if it gave up its cells and decoded
its positions again into the lowest free pages (preemption by recompute, for relocation: sequence() step 2b; its
Done's stats count the relocations).

With the main context's paged cells per sequence (ContextParams.seq_cells) and exact decoding, a sequence's
logits do not depend on the others in its batch, so a request's output does not either (tests/test_scheduler).
Greedy and sample-and-compare output never depend on the draft's logits; a rejection-sampled draft, whose
probabilities do, asks for its draft decodes alone (Decode.alone).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field

import numpy as np

from tandem.engine.llama import Context
from tandem.errors import BadInputError, EngineError, TandemError
from tandem.spec.generate import Done, Steps, Token, common_prefix
from tandem.spec.steps import Decode, decode

Event = Token | Done | TandemError

PAGE = 64
"""KV cells per page (Tandem's llama.cpp patch): a sequence holding positions 0..L-1 takes ceil(L / PAGE) pages."""


@dataclass
class Sequence:
    """One request's state in the scheduler."""

    request_id: str
    """The caller's name for the request."""
    seq_id: int
    """Its sequence in the main context (its KV cells)."""
    steps: Steps
    """The generation itself (tandem.spec.generate.sequence)."""
    pending: Decode | None = None
    """The decode it waits for (Decode.ctx None: the main model's)."""
    logits: np.ndarray | None = None
    """The logits of its last decode, handed over at its next advance."""
    outbox: list[Event] = field(default_factory=list)
    """Tokens, Done or the error it produced since the last step."""
    prompt_len: int = 0
    """Its prompt's tokens: the cells it claims in a shared pool before its first decode."""
    started: bool = False
    """Whether it has asked for a decode (its prompt's cells are then taken)."""


class Scheduler:
    """Runs up to n_seq_max sequences of one main context, one batched main decode per step (and one batched
    decode per draft position of each draft context). Not thread-safe: the engine thread owns it (drain requests
    -> add/abort -> step -> route)."""

    def __init__(self, main: Context, on_evict: Callable[[int], None] | None = None):
        """`on_evict(seq_id)`: an idle sequence's cached prefix was dropped from the main context (to make room in a
        shared pool): drop what else holds it (its drafter's cells in a shared draft pool)."""
        self.main = main
        self._on_evict = on_evict
        self.running: dict[str, Sequence] = {}
        self._free = list(range(max(1, main.params.n_seq_max)))
        self._idle_since = dict.fromkeys(self._free, 0)  # the step each free sequence was last used: LRU eviction
        self._claims: dict[int, int] = {}  # positions each sequence was last given room for (held while it drafts)
        self.steps = 0
        """Steps taken (one batched decode each, plus a decode per prompt admitted)."""
        self.evicted = 0
        """Idle sequences whose cached prefix was dropped to make room in a shared pool."""

    @property
    def capacity(self) -> int:
        """Sequences that can be added now."""
        return len(self._free)

    def add(self, request_id: str, prompt: Seq[int], make: Callable[[int], Steps]) -> int | None:
        """Start a request: `make(seq_id)` builds its sequence() generator (pass it `room_for(seq_id)`). Returns the
        sequence id: the free one whose KV cells hold the longest start of `prompt`, if at least half of what it
        holds is that start (a conversation's next turn); else the free one holding least (so another
        conversation's cache, sharing only a system prompt or template, is not overwritten while an emptier
        sequence is free). None, and nothing started, when running sequences hold the cells the prompt needs in a
        shared pool: add it again after a step."""
        if request_id in self.running:
            raise BadInputError(f"request {request_id} is already running", "use a new request id")
        if not self._free:
            raise EngineError(f"all {self.main.params.n_seq_max} sequences are running", "add it after one ends")
        seq_id = max(self._free, key=lambda s: _slot_fit(self.main.held(s), prompt))
        want = min(len(prompt) + 1, self.main.capacity)
        fits = self.room(seq_id, len(prompt) + 1) >= want  # drops idle prefixes
        if not fits and self.room_relocated(seq_id, len(prompt) + 1) >= want:
            # its cached prefix sits where the rest of the prompt cannot follow it: the prompt goes cold into the
            # lowest free pages instead
            self._evict(seq_id)
            fits = True
        if not fits and self.running:
            return None
        self._free.remove(seq_id)
        self.running[request_id] = seq = Sequence(request_id, seq_id, make(seq_id), prompt_len=len(prompt))
        self._advance(seq)  # to its prompt's decode (or its error, routed at the next step)
        return seq_id

    def abort(self, request_id: str) -> None:
        """Stop a request now: its generator closes (rolling back its step) and its sequence is free."""
        seq = self.running.pop(request_id, None)
        if seq is not None:
            seq.steps.close()
            self._release(seq.seq_id)

    def room_for(self, seq_id: int) -> Callable[[int], int]:
        """room() for one sequence: what its sequence() generator asks each step."""
        return lambda want: self.room(seq_id, want)

    def room_relocated_for(self, seq_id: int) -> Callable[[int], int]:
        """room_relocated() for one sequence: what its sequence() generator asks when room() is too small."""
        return lambda want: self.room_relocated(seq_id, want)

    def room_relocated(self, seq_id: int, want: int) -> int:
        """Positions sequence seq_id could hold if it relocated: dropped its cells and decoded its positions again,
        which then take the lowest free pages, wherever they are (a shared pool; else its capacity). That is every
        free page and its own, less those the other sequences' waiting rows may take; idle sequences' cached
        prefixes are dropped as in room()."""
        return self._room(seq_id, want, relocated=True)

    def room(self, seq_id: int, want: int) -> int:
        """Positions sequence seq_id may hold now: its capacity, or in a shared pool its own pages plus the free pages
        after its last one (its pages stay in position order, tandem.engine.llama.ContextParams.seq_cells), less
        those the other sequences' waiting rows may take. While that is less than `want`, idle sequences' cached
        prefixes are dropped, least recently used first."""
        return self._room(seq_id, want, relocated=False)

    def _room(self, seq_id: int, want: int, *, relocated: bool) -> int:
        """room() where the sequence is (its own pages and the free ones after them), or relocated (all free pages)."""
        cap = self.main.capacity
        if not self.main.shared:
            return cap
        while True:
            own = _pages(self.main.held_length(seq_id))
            taking = sum(self._pages_wanted(s) for s in self.running.values() if s.seq_id != seq_id)
            if relocated:
                room = min(cap, max(0, self._free_pages() + own - taking) * PAGE)
            else:
                room = min(cap, (own + max(0, (self.main.pages_after(seq_id) or 0) - taking)) * PAGE)
            idle = [s for s in self._free if s != seq_id and self.main.held_length(s)]
            if room >= want or not idle:
                self._claims[seq_id] = min(room, want)
                return room
            self._evict(min(idle, key=self._idle_since.__getitem__))

    def _evict(self, seq_id: int) -> None:
        """Drop a free sequence's cached prefix (and, through on_evict, its drafter's cells)."""
        self.main.rollback(0, seq_id=seq_id)
        self.evicted += 1
        if self._on_evict is not None:
            self._on_evict(seq_id)

    def _free_pages(self) -> int:
        """Pages no sequence holds: a sequence holding positions 0..L-1 holds ceil(L / PAGE) of them."""
        held = sum(_pages(self.main.held_length(s)) for s in range(max(1, self.main.params.n_seq_max)))
        return self.main.capacity // PAGE - held

    def _pages_wanted(self, seq: Sequence) -> int:
        """Pages a running sequence will take at its next main decode: for its waiting rows, for the positions it
        was last given room for (while it drafts), or its whole prompt before its first decode."""
        held = _pages(self.main.held_length(seq.seq_id))
        if not seq.started:
            return _pages(seq.prompt_len)
        if seq.pending is not None and seq.pending.ctx is None:
            rows = seq.pending.rows
            return max(0, _pages(rows.pos0 + len(rows.tokens)) - held)
        return max(0, _pages(self._claims.get(seq.seq_id, 0)) - held)

    def _release(self, seq_id: int) -> None:
        self._free.append(seq_id)
        self._idle_since[seq_id] = self.steps

    def step(self) -> dict[str, list[Event]]:
        """One step of every running sequence; what each produced, by request id (Done or an error ends it)."""
        # 1. Draft: while sequences wait on a draft decode, decode each draft context's waiting rows together (one
        # decode per draft position for all of them) and advance those sequences to their next decode.
        while drafting := [s for s in self.running.values() if s.pending is not None and s.pending.ctx is not None]:
            for ctx, group in _by_context(drafting):
                self._decode(ctx, group)
            for seq in drafting:
                if seq.logits is not None:  # (a failed decode already ended it)
                    self._advance(seq)
        # 2. Decode the main model's rows of every sequence together (a long prompt alone: it may exceed a batch).
        self._decode(self.main, [s for s in self.running.values() if s.pending is not None])
        # 3. Advance each sequence to its next decode: it verifies this one, emits, starts its next draft.
        for seq in list(self.running.values()):
            if seq.logits is not None:
                self._advance(seq)
        # 4. Route what each sequence produced (this step's tokens, before the next step drafts); a finished one
        # frees its sequence.
        out = {}
        for seq in list(self.running.values()):
            if seq.outbox:
                out[seq.request_id], seq.outbox = seq.outbox, []
                if isinstance(out[seq.request_id][-1], (Done, TandemError)):
                    del self.running[seq.request_id]
                    self._release(seq.seq_id)
        self.steps += 1
        return out

    def _advance(self, seq: Sequence, error: TandemError | None = None) -> None:
        """Run the sequence until it asks for a decode (or ends), collecting its tokens; with `error`, its decode
        failed: the sequence rolls back, then ends with the error, or goes on (a draft decode: it drafts less)."""
        logits, seq.logits = seq.logits, None
        try:
            ev = seq.steps.throw(error) if error is not None else seq.steps.send(logits)
            while not isinstance(ev, Decode):
                seq.outbox.append(ev)
                ev = seq.steps.send(None)
            seq.pending, seq.started = ev, True
        except StopIteration:
            seq.pending = None
        except TandemError as e:
            seq.pending = None
            seq.outbox.append(e)

    def _decode(self, ctx: Context, seqs: list[Sequence]) -> None:
        """Decode the sequences' pending rows in `ctx` (see _batches), store each one's logits; a failed decode is
        thrown into each of its sequences, which roll back and end with the error (a main decode) or draft less (a
        draft decode: drafts are optional)."""
        for batch in _batches(seqs, ctx.params.n_batch):
            try:
                logits = (ctx.decode_batch([s.pending.rows for s in batch]) if len(batch) > 1
                          else [decode(ctx, batch[0].pending.rows)])
            except TandemError as e:
                for seq in batch:
                    seq.pending = None
                    self._advance(seq, e)
                continue
            for seq, out in zip(batch, logits, strict=True):
                seq.pending, seq.logits = None, out


def _by_context(seqs: list[Sequence]) -> list[tuple[Context, list[Sequence]]]:
    """The sequences grouped by the context their pending decode is for, in order of first appearance."""
    groups: dict[int, tuple[Context, list[Sequence]]] = {}
    for seq in seqs:
        groups.setdefault(id(seq.pending.ctx), (seq.pending.ctx, []))[1].append(seq)
    return list(groups.values())


def _batches(seqs: list[Sequence], n_batch: int) -> list[list[Sequence]]:
    """The sequences in groups to decode together, at most n_batch rows each. A long prompt (over n_batch / 4
    rows: it may take several decodes) and a decode asked for alone (Decode.alone) form groups of their own."""
    alone = [s for s in seqs if s.pending.alone or len(s.pending.rows.tokens) > n_batch // 4]
    batches: list[list[Sequence]] = [[s] for s in alone]
    rows = n_batch  # (starts a new group)
    for seq in (s for s in seqs if s not in alone):
        n = len(seq.pending.rows.tokens)
        if rows + n > n_batch:
            batches.append([])
            rows = 0
        batches[-1].append(seq)
        rows += n
    return batches


def _pages(n: int) -> int:
    """Pages that hold n positions."""
    return -(-n // PAGE)


def _slot_fit(held: Seq[int], prompt: Seq[int]) -> tuple[int, int]:
    """How well a free sequence holding `held` suits `prompt` (larger is better): the tokens it reuses, counted
    only when they are at least half of what it holds; then, the fewer tokens held (and lost), the better."""
    n = common_prefix(held, prompt)
    return (n if 2 * n >= len(held) else 0), -len(held)

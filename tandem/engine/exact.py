"""Does a row's logits depend on how many rows share its llama_decode? Measured once per main model.

Speculative output equals plain output token for token only if a verification batch of k + 1 rows computes
each row exactly as a plain step does. Stock llama.cpp's CPU backend picks its matmul kernel by the number of
rows: one row takes ggml's dot-product path, two or more take llamafile's tinyBLAS (F32 and F16 weights, Q8_0,
and the attention's products for every weight type), repacked Q4_K weights switch kernels at 4 rows and the
tiled K-quant matmul at 8 (Tandem turns it off). Measured on SmolLM2-135M and Qwen2.5-Coder-1.5B
(`tandem bench rows`, docs/benchmarks.md §5): a lone row differs from the same row in a batch by 1.6e-5 (F32)
to 0.44 (Q4_K_M) in a logit, and Q4_K_M batches of 3 rows from batches of 4 by up to 0.6.

Tandem's llama.cpp patch (level 5, tandem.engine.library.exact_kernels) removes both: the repacked Q4_K one-row
kernel adds in the order of the 4-row one, and a switch sends a lone row through tinyBLAS, which adds in the
same order for every row count. An exact main context (ContextParams.exact, the default there) turns the switch
on before each of its decodes: every row count, one included, then gives a row the same logits at no cost.
Where that does not hold (an f32 KV cache, whose lone-row attention keeps ggml's dot product; a stock
library) exact decoding pairs lone rows instead: a lone token is decoded with the token before it.

`probe` checks the loaded model at load: that batches of 2..draft_max + 1 rows agree bit for bit, and that a
lone row agrees with them, and says so when they do not (a weight type or CPU whose kernels still switch).

Several sequences in one batch (`probe_sequences`): what is left is where a sequence's KV cells sit. Attention
sums run over the cells in 16-wide SIMD groups, and llama.cpp's unified cache puts a sequence's cells wherever
cells are free (after or between the other sequences'), which changes the rounding (tiny fixtures: up to 6e-6
on F32, 3e-3 on F16). With Tandem's llama.cpp patch each sequence's cells sit in position order at the same
offsets within 64-cell pages (ContextParams.seq_cells), and its logits are bit for bit those it gets alone
(probed on F32, F16, Q8_0 and Q4_K_M mains and the fixtures).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tandem.engine.llama import Context, ContextParams, Model, SeqRows

PROBE_TEXT = ("The lighthouse keeper climbed the stairs at dusk, counted the ships on the grey water, and wrote "
              "their names in a book that nobody had opened for years.")


@dataclass(frozen=True)
class Invariance:
    """What the probe found on one model and context."""

    multi_row: bool
    """Every batch of 2..max_rows rows gave each of its rows the same logits as 2-row batches (bit for bit)."""
    single_row: bool
    """A lone row did too, at the positions probed (by construction with the one-row switch; without it, where
    it held here it may not hold at other positions, so exact decoding then pairs lone rows)."""
    multi_row_diff: float
    """Largest logit difference between batch sizes of 2 and more (0.0 when multi_row)."""
    single_row_diff: float
    """Largest logit difference between a lone row and the same row in a 2-row batch."""
    max_rows: int
    """Largest batch checked (the longest verification: draft_max + 1)."""

    @property
    def exact(self) -> bool:
        """Speculative output is bit-for-bit plain output (with lone rows paired where single_row is False)."""
        return self.multi_row

    def describe(self) -> str:
        if not self.multi_row:
            return (f"batches of 2-{self.max_rows} rows differ by up to {self.multi_row_diff:.1e} in a logit: "
                    "speculative greedy output can differ from plain output where logits nearly tie")
        if self.single_row:
            return f"every batch of 1-{self.max_rows} rows gives a row the same logits"
        return (f"every batch of 2-{self.max_rows} rows gives a row the same logits (a lone row differs by up to "
                f"{self.single_row_diff:.1e}; exact decoding decodes lone tokens with the token before them)")


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b))) if a.size else 0.0


PREFIX = 64
"""Tokens in the cache before the compared rows. Attention sums over the cached tokens, and with only a few
of them the one-row and multi-row kernels add in the same order: at 20 cached tokens a lone row matched on
Q8_0, at 57 it was 0.95 off (the attention output differs in its last bits, and quantizing the next
layer's input to 8 bits turns that into whole steps)."""


def probe_length(max_rows: int) -> int:
    """Tokens the probe needs for batches of up to max_rows rows."""
    return PREFIX + max_rows + (max_rows % 2)


def probe(ctx: Context, tokens: Sequence[int], max_rows: int = 17) -> Invariance:
    """After a PREFIX-token prompt, decode the next max_rows (+1) tokens in batches of 2 (the reference), then
    as single batches of 3, 4, 5, 8 and max_rows rows and as lone rows, and compare logits. About 18 decodes;
    empties the context before and after (use it before the first generation). `tokens` needs
    probe_length(max_rows) tokens and the context as many cells."""
    n = max_rows + (max_rows % 2)  # 2-row chunks cover it exactly
    if len(tokens) < PREFIX + n or max_rows < 2:
        raise ValueError(f"the probe needs {PREFIX + n} tokens and max_rows >= 2, got {len(tokens)} and {max_rows}")
    p0, toks = PREFIX, list(tokens[PREFIX:PREFIX + n])
    with ctx.pairing(False):  # the probe measures llama.cpp itself
        try:
            ctx.rollback(0)
            ctx.decode(tokens[:p0], 0, logits="none")
            ref = np.concatenate([ctx.decode(toks[s:s + 2], p0 + s, logits="all") for s in range(0, n, 2)])
            multi = 0.0
            for rows in sorted({3, 4, 5, 8, max_rows}):
                if rows <= n:
                    ctx.rollback(p0)
                    multi = max(multi, _max_diff(ctx.decode(toks[:rows], p0, logits="all"), ref[:rows]))
            ctx.rollback(p0)
            single = _max_diff(ctx.decode(toks[:1], p0, logits="all")[0], ref[0])  # a lone row after the prompt
            ctx.rollback(p0)
            ctx.decode(toks[:2], p0, logits="none")
            single = max(single, _max_diff(ctx.decode(toks[2:3], p0 + 2, logits="all")[0], ref[2]))  # after a pair
        finally:
            ctx.rollback(0)
    return Invariance(multi_row=multi == 0.0, single_row=single == 0.0, multi_row_diff=multi,
                      single_row_diff=single, max_rows=max_rows)


def probe_tokens(ctx: Context, n: int) -> list[int]:
    """At least n tokens of ordinary text for the probe (PROBE_TEXT, repeated as needed)."""
    toks = ctx.model.tokenize(PROBE_TEXT, add_special=True, parse_special=False)
    while len(toks) < n:
        toks += ctx.model.tokenize(" " + PROBE_TEXT, add_special=False, parse_special=False)
    return toks


@dataclass(frozen=True)
class SequenceInvariance:
    """What the probe found when sequence 0 shares its batches (and the KV cache) with other sequences."""

    same: bool
    """Sequence 0's logits were bit for bit those it gets alone, in every mixed batch probed."""
    diff: float
    """Largest logit difference from the lone run."""
    n_seqs: int
    """Sequences sharing the batches (sequence 0 included)."""

    def describe(self) -> str:
        if self.same:
            return (f"a sequence's logits do not depend on the {self.n_seqs - 1} others in its batch or on where its "
                    "KV cells sit")
        return (f"a sequence's logits move by up to {self.diff:.1e} when {self.n_seqs - 1} other sequences share its "
                "batches and KV cache (attention sums run over KV cells in SIMD groups, so where the others' cells "
                "sit changes the rounding): greedy output under load can differ where logits nearly tie")


def probe_sequences(ctx: Context, tokens: Sequence[int], n_seqs: int, rows: int = 8) -> SequenceInvariance:
    """Decode a text as sequence 0 alone (a PREFIX-token prompt, then `rows` tokens two at a time, as exact plain
    steps do), then again as sequence n_seqs-1 after sequences 0..n_seqs-2 took cells first (prompts of odd
    lengths) and sharing every batch with rows of theirs (1 to 3 each), and compare its logits. Covers both
    where a sequence's cells sit and who shares its batch. Needs n_seq_max >= n_seqs, room for PREFIX + rows
    positions per sequence, and len(tokens) >= probe_length(rows); leaves every probed sequence empty."""
    n = rows + (rows % 2)
    if len(tokens) < PREFIX + n or n_seqs < 2:
        raise ValueError(f"the probe needs {PREFIX + n} tokens and n_seqs >= 2, got {len(tokens)} and {n_seqs}")
    probed, others = n_seqs - 1, range(n_seqs - 1)
    toks = list(tokens[PREFIX:PREFIX + n])
    try:
        for s in range(n_seqs):
            ctx.rollback(0, seq_id=s)
        ctx.decode(tokens[:PREFIX], 0, logits="none")
        ref = np.concatenate([ctx.decode(toks[i:i + 2], PREFIX + i, logits="all") for i in range(0, n, 2)])
        ctx.rollback(0)
        held = {s: 3 + 5 * s for s in others}  # odd lengths: llama.cpp alone would put the probed cells off-group
        ctx.decode_batch([SeqRows(s, tokens[:held[s]], 0, "none") for s in others])
        ctx.decode_batch([SeqRows(s, tokens[held[s]:held[s] + 2], held[s], "last") for s in others] +
                         [SeqRows(probed, tokens[:PREFIX], 0, "none")])
        for s in others:
            held[s] += 2
        got = []
        for step, i in enumerate(range(0, n, 2)):
            mixed = []
            for s in others:
                k = 1 + (step + s) % 3
                mixed.append(SeqRows(s, tokens[held[s]:held[s] + k], held[s], "all"))
                held[s] += k
            mixed.append(SeqRows(probed, toks[i:i + 2], PREFIX + i, "all"))
            got.append(ctx.decode_batch(mixed)[-1])
        diff = _max_diff(np.concatenate(got), ref)
    finally:
        for s in range(n_seqs):
            ctx.rollback(0, seq_id=s)
    return SequenceInvariance(same=diff == 0.0, diff=diff, n_seqs=n_seqs)


SEQUENCE_PROBE = 4
"""Sequences the load-time cross-sequence probe decodes together."""


def probe_model_sequences(model: Model, params: ContextParams, n_seqs: int = SEQUENCE_PROBE) -> SequenceInvariance:
    """probe_sequences on a small context of its own (n_seqs sequences with paged cells where the library is
    patched, else wherever llama.cpp puts them), created with `params`' threads and cache types and freed after:
    what batching several requests would do to each one's logits with this model and library."""
    per_seq = 128
    ctx = Context(model, ContextParams(n_ctx=per_seq * n_seqs, n_batch=per_seq, n_threads=params.n_threads,
                                       type_k=params.type_k, type_v=params.type_v, n_seq_max=n_seqs,
                                       seq_cells=True))
    try:
        return probe_sequences(ctx, probe_tokens(ctx, probe_length(8)), n_seqs)
    finally:
        ctx.close()

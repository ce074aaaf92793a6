"""Exact decoding (tandem.engine.exact, ContextParams.exact) on the tiny fixtures: a token's logits do not
depend on the batch it was decoded in, so speculative output is plain output bit for bit."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest

from tandem.config import ModelOptions, SpecOptions
from tandem.engine import exact
from tandem.engine.library import exact_kernels, patch_level
from tandem.engine.llama import Context, ContextParams, Model, SeqRows
from tandem.errors import EngineError
from tandem.runtime import Runtime
from tandem.spec.drafters import ModelDrafter
from tandem.spec.generate import GenParams, Token, generate
from tandem.spec.ngram import NgramDrafter
from tandem.testing.tiny import build_tiny_model
from test_ngram import LOOPY

EXACT = ContextParams(n_ctx=512, n_batch=128, n_threads=2, exact=True)  # an f32 cache: lone rows paired
LOOSE = ContextParams(n_ctx=512, n_batch=128, n_threads=2)
PROMPTS = ["The capital of France is", "def fizzbuzz(n):", "Once upon a time", "SELECT * FROM users WHERE",
           "Dear Sir or Madam,", "In 1492, Columbus"]


@pytest.fixture(scope="module", params=["main", "main_f16"])
def model(tiny, request):
    return Model(tiny[request.param], repack=False)


def one_by_one_and_batched(ctx: Context, toks: list[int], n_prompt: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of toks[n_prompt:] decoded one token at a time (plain steps), then all in one batch (a
    verification), after the same prompt."""
    ctx.rollback(0)
    ctx.decode(toks[:n_prompt], 0, logits="none")
    plain = np.stack([ctx.decode([t], n_prompt + i, logits="all")[0] for i, t in enumerate(toks[n_prompt:])])
    ctx.rollback(n_prompt)
    batch = ctx.decode(toks[n_prompt:], n_prompt, logits="all")
    return plain, batch


def test_without_exact_a_lone_row_differs_from_the_same_row_in_a_batch(model):
    """What exact mode is for: llama.cpp's one-row kernels round differently (if this ever passes with
    equality, the exact tests below prove nothing and need a fixture where it fails)."""
    toks = exact.probe_tokens(Context(model, LOOSE), 90)
    plain, batch = one_by_one_and_batched(Context(model, LOOSE), toks[:90], 70)
    assert not np.array_equal(plain, batch)
    assert np.abs(plain - batch).max() < 0.1  # rounding, not a bug


def test_exact_plain_steps_give_a_verification_batchs_logits_bit_for_bit(model):
    ctx = Context(model, EXACT)
    toks = exact.probe_tokens(ctx, 90)
    plain, batch = one_by_one_and_batched(ctx, toks[:90], 70)
    assert np.array_equal(plain, batch)


def test_exact_rollback_leaves_the_cache_bit_for_bit_as_if_rejected_tokens_were_never_decoded(model):
    ctx = Context(model, EXACT)
    prompt = model.tokenize("The quick brown fox jumps over the lazy dog.")
    accepted, rejected, nxt = [101, 202], [303, 404, 505], 606
    ctx.decode(prompt, 0)
    ctx.decode([*accepted, *rejected], len(prompt), logits="all")  # a verification batch
    ctx.rollback(len(prompt) + len(accepted))                     # reject the last three
    after = ctx.decode([nxt], len(prompt) + len(accepted))[0]
    fresh = Context(model, EXACT)
    fresh.decode([*prompt, *accepted], 0, logits="none")
    assert np.array_equal(after, fresh.decode([nxt], len(prompt) + len(accepted))[0])


def test_a_one_token_prompt_and_a_lone_last_chunk_stay_exact(model):
    """The two ways a lone row could still be decoded: a prompt of one token (its cell is decoded again with
    the next token, in plain and speculative steps alike) and a long input whose last n_batch chunk would
    hold one token."""
    small = ContextParams(n_ctx=512, n_batch=8, n_threads=2, exact=True)
    ctx = Context(model, small)
    toks = exact.probe_tokens(ctx, 17)[:17]
    chunked = ctx.decode(toks, 0, logits="all")  # 17 = 8 + 8 + 1: decoded as 8 + 7 + 2
    assert ctx.decode_calls == 3 and ctx.tokens_processed == 17
    ctx.rollback(0)
    ctx.decode(toks[:1], 0, logits="all")  # a one-token prompt
    rest = np.stack([ctx.decode([t], i + 1, logits="all")[0] for i, t in enumerate(toks[1:])])
    ctx.rollback(0)
    ctx.decode(toks[:1], 0, logits="all")
    batched_rest = ctx.decode(toks[1:], 1, logits="all")  # a verification right after a one-token prompt
    assert np.array_equal(rest, batched_rest)
    assert np.array_equal(rest, chunked[1:])


def test_exact_decoding_refuses_a_position_it_cannot_pair(model):
    ctx = Context(model, EXACT)
    ctx.decode(model.tokenize("Hello there"), 0)
    with pytest.raises(EngineError, match="roll back"):
        ctx.decode([42], 10)


def speculative_matches_plain(main: Context, drafter: ModelDrafter, prompts: list[str], gp: GenParams) -> int:
    """Generate each prompt without and with the drafter and assert the same tokens and, at every position whose
    logits chose a token, the same logits bit for bit (plain steps and verification batches of every length the
    drafts give). Returns the tokens drafted."""
    seen: dict[bool, dict[int, tuple[int, np.ndarray]]] = {False: {}, True: {}}
    decode = main.decode
    use = False

    def recording(tokens, pos0, *, seq_id=0, logits="last"):
        out = decode(tokens, pos0, seq_id=seq_id, logits=logits)
        if logits == "all":  # the last decode of a position is the one the output kept
            for i, row in enumerate(out):
                seen[use][pos0 + i] = (tokens[i], row.copy())
        return out

    main.decode = recording
    drafted = 0
    try:
        for text in prompts:
            prompt = main.model.tokenize(text)
            runs = {}
            for use in (False, True):
                seen[use].clear()
                events = list(generate(main, prompt, gp, drafter if use else None))
                runs[use] = [e.id for e in events if isinstance(e, Token)]
                drafted += events[-1].stats.drafted if use else 0
            assert runs[True] == runs[False], text
            # every position after the prompt whose logits chose a token, decoded from the same token in both runs
            common = [p for p in seen[False] if p in seen[True] and seen[False][p][0] == seen[True][p][0]]
            assert len(common) >= len(runs[False]) - 2
            assert all(np.array_equal(seen[False][p][1], seen[True][p][1]) for p in common), text
    finally:
        main.decode = decode
    return drafted


@pytest.mark.parametrize("draft", ["draft_close", "draft_small"])
def test_exact_speculative_greedy_equals_plain_greedy_logits_and_tokens(tiny, draft):
    """The invariant behind the mission's 'output does not change when a draft is on', at the logits: every
    position's logits are the same bits with and without the draft, so the tokens are too."""
    main = Context(Model(tiny["main"], repack=False), EXACT)
    drafter = ModelDrafter(Context(Model(tiny[draft]), LOOSE))
    gp = GenParams(max_tokens=48, draft_max=6, draft_policy="fixed")
    assert speculative_matches_plain(main, drafter, PROMPTS, gp) > 100  # the draft really drafted


def test_the_probe_finds_every_batch_size_alike_on_the_fixture(model):
    ctx = Context(model, EXACT)
    inv = exact.probe(ctx, exact.probe_tokens(ctx, exact.probe_length(17)), max_rows=17)
    assert inv.multi_row and inv.exact and inv.multi_row_diff == 0.0
    assert not inv.single_row and 0 < inv.single_row_diff < 1e-3  # F32/F16 weights: tinyBLAS vs ggml's dot
    assert ctx.pos_max() == -1 and ctx.pairs  # leaves the context empty and pairing on
    assert "decodes lone tokens with the token before them" in inv.describe()


class _BatchDependent:
    """A context whose rows change with the batch size (a backend that switches kernels at 8 rows)."""

    pairs = False

    def __init__(self) -> None:
        self.n = 0

    def rollback(self, pos: int) -> None:
        self.n = pos

    def pairing(self, on: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def decode(self, tokens, pos0, *, logits="all"):
        rows = np.arange(pos0, pos0 + len(tokens), dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
        self.n = pos0 + len(tokens)
        return rows + (1e-3 if len(tokens) >= 8 else 0.0) if logits != "none" else rows[:0]


def test_the_probe_reports_batch_sizes_that_disagree():
    inv = exact.probe(_BatchDependent(), list(range(exact.probe_length(17))), max_rows=17)
    assert not inv.multi_row and not inv.exact and inv.multi_row_diff == pytest.approx(1e-3, rel=1e-2)
    assert "can differ from plain output" in inv.describe()


def test_runtime_is_exact_by_default_and_pairs_lone_rows_only_where_kernels_cannot(tiny):
    main, draft = str(tiny["main"]), str(tiny["draft_close"])
    rt = Runtime(ModelOptions(model=main, draft=draft, ctx_size=256), announce=lambda s: None)  # the default
    if exact_kernels():  # Tandem's patch: a lone row takes a batch's kernels, at no cost
        assert rt.main.params.exact and rt.main.one_row and not rt.main.pairs and rt.exact
        assert rt.invariance_report()["regime"] == "kernels" and rt.invariance_report()["lone_row"] is True
    else:  # a stock library: exactness would cost pairing, so the default decodes lone rows alone
        assert not rt.main.params.exact and not rt.exact and rt.invariance_report()["regime"] == "none"
    assert not rt.drafter.ctx.params.exact and not rt.drafter.ctx.one_row  # the draft only proposes
    # the per-call override (the bench's llama.cpp baseline): llama.cpp's own lone rows during the call only
    events = rt.generate(rt.prompt(text="Hi", raw=True), GenParams(max_tokens=4), use_draft=False, exact=False)
    assert isinstance(next(events), Token) and not rt.main.one_row and not rt.main.pairs
    assert list(events) and rt.main.one_row == exact_kernels() and not rt.main.pairs
    # --exact with an f32 cache, whose lone-row attention has no batch kernel: lone rows are paired
    paired = Runtime(ModelOptions(model=main, draft=draft, ctx_size=256, exact=True, cache_type_k="f32",
                                  cache_type_v="f32"), announce=lambda s: None)
    assert paired.main.pairs and not paired.main.one_row and paired.exact
    assert paired.invariance_report()["regime"] == "paired" and "--exact" in paired.exact_regime()[1]
    # --no-exact: llama.cpp's own one-row kernels; the probe still runs and says this is not bit-exact
    loose = Runtime(ModelOptions(model=main, draft="none", ctx_size=256, exact=False), announce=lambda s: None)
    assert not loose.main.params.exact and not loose.main.pairs and not loose.main.one_row
    assert loose.invariance is not None and not loose.invariance.single_row and not loose.exact
    assert loose.invariance_report()["lone_row"] is False and loose.invariance_report()["patch_level"] >= 1
    assert loose.exact_regime() == ("none", "--no-exact: lone rows take llama.cpp's own one-row kernels, which "
                                            "round differently")
    ngram = Runtime(ModelOptions(model=main, draft="none", ctx_size=256, exact=True),
                    spec=SpecOptions(spec_type="ngram"), announce=lambda s: None)
    assert ngram.exact  # n-gram drafting speculates without a draft model


# -- spare-row guesses ----------------------------------------------------------------------------------

def guessing_runs(ctx: Context, prompts: list[str], gp: GenParams) -> list[tuple[list, list, object]]:
    """(tokens with guesses, tokens without, stats with guesses) per prompt, plain greedy steps."""
    out = []
    for text in prompts:
        prompt = ctx.model.tokenize(text)
        runs = {}
        for on in (True, False):
            runs[on] = list(generate(ctx, prompt, dataclasses.replace(gp, spare_guess=on)))
        out.append(([e for e in runs[True] if isinstance(e, Token)], [e for e in runs[False] if isinstance(e, Token)],
                    runs[True][-1].stats))
    return out


@pytest.fixture(scope="module")
def loopy(tiny) -> Model:
    """A fixture whose greedy output loops (the standard ones never repeat a 2-gram: nothing to guess)."""
    path = tiny["main"].parent / f"{LOOPY.name}-{LOOPY.digest()}.gguf"
    if not path.is_file():
        build_tiny_model(path, LOOPY)
    return Model(path, repack=False)


def test_spare_row_guesses_change_no_token_and_give_free_ones(loopy):
    """Exact mode's plain step decodes two rows; with the second an n-gram guess instead of the previous token
    again, the output is the same and right guesses add tokens at no extra decode."""
    right = guessed = 0
    ctx = Context(loopy, EXACT)
    for with_guess, without, stats in guessing_runs(ctx, PROMPTS, GenParams(max_tokens=40)):
        assert [t.id for t in with_guess] == [t.id for t in without]
        assert sum(t.source == "guess" for t in with_guess) == stats.guesses_accepted
        assert stats.drafted == 0 and stats.identity_holds() and stats.draft_steps == 0
        right += stats.guesses_accepted
        guessed += stats.guessed
        # a step gives 1 token + its right guess (the first token comes from the prompt; max_tokens may cut
        # the last step's second token)
        n = len(with_guess) - 1 - stats.guesses_accepted
        assert stats.plain_steps in (n, n + 1)
    print(f"guesses: {right} of {guessed} right")
    assert 0 < right < guessed  # some guesses were right and some wrong: both paths ran


def test_no_guesses_without_exact_mode(loopy):
    """Lone rows cost one row: a guess would cost a second one, so a non-exact context never guesses."""
    ctx = Context(loopy, LOOSE)
    for with_guess, without, stats in guessing_runs(ctx, PROMPTS[:3], GenParams(max_tokens=40)):
        assert stats.guessed == 0 and all(t.source == "main" for t in with_guess)
        ids = [t.id for t in with_guess]  # it loops: in exact mode these steps would have guessed
        assert any(NgramDrafter().propose(ids[:i], 1).tokens for i in range(1, len(ids)))


def _after_other_sequence(model: Model, toks: list[int], other_cells: int) -> np.ndarray:
    """Sequence 0's exact plain steps (two rows each) after a 64-token prompt, decoded after sequence 1 took
    the first `other_cells` KV cells."""
    ctx = Context(model, dataclasses.replace(EXACT, n_seq_max=2))
    if other_cells:
        ctx.decode_batch([SeqRows(1, toks[:other_cells], 0, "none")])
    ctx.decode(toks[:64], 0, logits="none")
    return np.concatenate([ctx.decode(toks[64 + i:66 + i], 64 + i, logits="all") for i in range(0, 8, 2)])


def test_where_a_sequences_cells_sit_is_what_moves_its_logits(model):
    """What probe_sequences measures: attention sums run over KV cells in 16-wide SIMD groups, so another
    sequence's cells before this one's change its rounding unless they fill whole groups."""
    toks = exact.probe_tokens(Context(model, EXACT), 80)
    alone = _after_other_sequence(model, toks, 0)
    assert np.array_equal(_after_other_sequence(model, toks, 16), alone)
    shifted = _after_other_sequence(model, toks, 5)
    assert not np.array_equal(shifted, alone) and np.abs(shifted - alone).max() < 0.1


def test_the_library_carries_tandems_llama_cpp_patch():
    """The Makefile builds llama-cpp-python with patches/llama-cpp-python.patch; a stock build fails here."""
    assert patch_level() >= 1


@pytest.mark.parametrize("n_seqs", [2, 4])
def test_with_paged_cells_a_sequences_logits_do_not_depend_on_the_others_bit_for_bit(model, n_seqs):
    found = {}
    for fixed in (False, True):
        ctx = Context(model, dataclasses.replace(EXACT, n_seq_max=4, seq_cells=fixed))
        found[fixed] = exact.probe_sequences(ctx, exact.probe_tokens(ctx, exact.probe_length(8)), n_seqs)
        assert found[fixed].n_seqs == n_seqs and found[fixed].same == (found[fixed].diff == 0.0)
        assert all(ctx.pos_max(s) == -1 for s in range(4))  # the probe leaves the cache empty
    # llama.cpp alone puts the probed sequence's cells after the others', off the 16-cell groups: the probe sees it
    assert not found[False].same and 0 < found[False].diff < 0.1
    assert found[True].same, found[True].describe()
    assert "do not depend" in found[True].describe()


def test_paged_cells_hold_each_sequences_share_and_refuse_more(tiny):
    m = Model(tiny["main"], repack=False)
    ctx = Context(m, dataclasses.replace(EXACT, n_ctx=512, n_batch=256, n_seq_max=4, seq_cells=True))
    assert ctx.seq_capacity == 128
    toks = exact.probe_tokens(ctx, 200)
    ctx.decode_batch([SeqRows(3, toks[:127], 0, "none"), SeqRows(0, toks[:5], 0, "none")])
    with pytest.raises(EngineError, match="sequence 3 would pass the 128 positions"):
        ctx.decode_batch([SeqRows(3, toks[127:129], 127)])
    ctx.rollback(100, seq_id=3)  # rolled back cells are free again at the same places
    ctx.decode_batch([SeqRows(3, toks[100:128], 100, "none"), SeqRows(0, toks[5:7], 5)])
    assert (ctx.pos_max(0), ctx.pos_max(3)) == (6, 127)
    with pytest.raises(EngineError, match="cannot shift"):
        ctx.shift(10, 20, -10, seq_id=3)


def test_paged_cells_keep_a_growing_sequence_exact_among_others_that_grow_roll_back_and_restart(model):
    """A sequence that grows over several 64-cell pages while others take the pages between its own and start over
    (freeing pages below its last one) gets the logits it gets alone, bit for bit: its pages stay in position order
    at the same offsets (a freed lower page taken for its next positions changes its sums)."""
    params = dataclasses.replace(EXACT, n_ctx=1024, n_batch=128, n_seq_max=4, seq_cells=True)
    ctx = Context(model, params)
    assert ctx.seq_capacity == 256
    toks = exact.probe_tokens(ctx, 260)
    chunks = [(i, i + 20) for i in range(0, 240, 20)]
    alone = np.concatenate([ctx.decode(toks[a:b], a, logits="all") for a, b in chunks])
    ctx.rollback(0)
    held = {1: 0, 2: 0, 3: 0}
    got = []
    for step, (a, b) in enumerate(chunks):
        for s, every in ((1, 2), (3, 3)):  # these start over now and then, freeing their pages
            if step % every == every - 1:
                held[s] = 0
                ctx.rollback(0, seq_id=s)
        rows = [SeqRows(0, toks[a:b], a, "all")]  # sequence 0 takes its new pages first
        for s, k in ((1, 30), (2, 15), (3, 40)):
            k = min(k, 250 - held[s])
            rows.append(SeqRows(s, toks[held[s]:held[s] + k], held[s], "last"))
            held[s] += k
        got.append(ctx.decode_batch(rows)[0])
    assert np.array_equal(np.concatenate(got), alone)


def test_attention_spans_the_batchs_own_sequences_and_their_logits_stay_exact(model):
    """With paged cells a batch attends only from the first to the last cell its own sequences hold (patch level 4):
    sequences idle below or above it cost nothing. Each batch below gets the logits its sequence gets alone, bit for
    bit: one high in the pool, one lower, both together, and two batches of the same shape whose spans start at
    different cells (a reused compute graph would read the other span's cells)."""
    params = dataclasses.replace(EXACT, n_ctx=2048, n_batch=128, n_seq_max=4, seq_cells=True, shared_cells=True)
    ctx = Context(model, params)
    toks = exact.probe_tokens(ctx, 260)

    def alone(prompt: int, chunks: list[tuple[int, int]]) -> list[np.ndarray]:
        ctx.decode(toks[:prompt], 0, logits="none")
        out = [ctx.decode(toks[a:b], a, logits="all") for a, b in chunks]
        ctx.rollback(0)
        return out

    mine, theirs = [(40, 42), (42, 44), (44, 47), (47, 49)], [(200, 202)]
    ref0, ref2 = alone(40, mine), alone(200, theirs)
    ctx.decode(toks[:200], 0, seq_id=1, logits="none")  # pages 0-3, idle from now on
    ctx.decode(toks[:200], 0, seq_id=2, logits="none")  # pages 4-7: cells from 256
    ctx.decode(toks[:40], 0, seq_id=0, logits="none")   # page 8: cells from 512
    (a, b), (c, d) = mine[0], theirs[0]
    got = [ctx.decode_batch([SeqRows(0, toks[a:b], a, "all")])[0]]      # span 512-767
    their = ctx.decode_batch([SeqRows(2, toks[c:d], c, "all")])[0]      # the same shape, span 256-511
    (a, b) = mine[1]
    got.append(ctx.decode_batch([SeqRows(0, toks[a:b], a, "all")])[0])  # span 512-767 again
    (a, b) = mine[2]
    got.append(ctx.decode_batch([SeqRows(0, toks[a:b], a, "all"), SeqRows(1, toks[200:203], 200, "all")])[0])
    ctx.rollback(0, seq_id=1)  # pages below sequence 0's free again
    (a, b) = mine[3]
    got.append(ctx.decode_batch([SeqRows(0, toks[a:b], a, "all")])[0])
    assert np.array_equal(their, ref2[0])
    for i, (g, r) in enumerate(zip(got, ref0)):
        assert np.array_equal(g, r), (i, float(np.abs(g - r).max()))

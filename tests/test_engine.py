"""The llama.cpp wrapper on the tiny fixtures: decode, rollback, vocabulary facts, compatibility."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.engine.llama import Context, ContextParams, Model, SeqRows
from tandem.engine.vocab import check_pairing, incompatibility
from tandem.errors import EngineError, IncompatibleDraftError, ModelNotFoundError, NotGGUFError

PARAMS = ContextParams(n_ctx=512, n_batch=64, n_threads=2)


@pytest.fixture(scope="module")
def main_model(tiny):
    return Model(tiny["main"])


def test_rollback_leaves_cache_as_if_rejected_tokens_were_never_decoded(main_model):
    m = main_model
    prompt = m.tokenize("The quick brown fox jumps over the lazy dog.")
    accepted, rejected, nxt = [101, 202], [303, 404, 505], 606
    ctx = Context(m, PARAMS)
    ctx.decode(prompt, 0)
    ctx.decode([*accepted, *rejected], len(prompt), logits="all")   # a verification batch
    ctx.rollback(len(prompt) + len(accepted))                      # reject the last three
    assert ctx.pos_max() == len(prompt) + len(accepted) - 1
    after = ctx.decode([nxt], len(prompt) + len(accepted))[0]

    fresh = Context(m, PARAMS)
    fresh.decode([*prompt, *accepted], 0, logits="none")
    expected = fresh.decode([nxt], len(prompt) + len(accepted))[0]
    assert np.max(np.abs(after - expected)) <= 1e-4

    # The comparison is meaningful: keeping the rejected tokens changes the logits.
    stale = Context(m, PARAMS)
    stale.decode([*prompt, *accepted, *rejected], 0, logits="none")
    wrong = stale.decode([nxt], len(prompt) + len(accepted) + len(rejected))[0]
    assert np.max(np.abs(wrong - expected)) > 1e-2


def test_batched_logits_match_sequential(main_model):
    m = main_model
    toks = m.tokenize("Once upon a time there was")
    batch = Context(m, PARAMS).decode(toks, 0, logits="all")
    seq_ctx = Context(m, PARAMS)
    seq = np.stack([seq_ctx.decode([t], i)[0] for i, t in enumerate(toks)])
    assert np.max(np.abs(batch - seq)) <= 1e-3
    assert (batch.argmax(1) == seq.argmax(1)).all()


def test_decode_splits_long_inputs_and_counts_tokens(main_model):
    ctx = Context(main_model, ContextParams(n_ctx=512, n_batch=16, n_threads=2))
    toks = main_model.tokenize("word " * 40)
    out = ctx.decode(toks, 0, logits=[0, len(toks) - 1])
    assert out.shape == (2, main_model.n_vocab)
    assert ctx.tokens_processed == len(toks) and ctx.decode_calls == -(-len(toks) // 16)


def test_tokenize_roundtrip_and_pieces(main_model):
    text = "Hello, wörld! 🙂"
    toks = main_model.tokenize(text, add_special=False)
    assert main_model.detokenize(toks) == text
    assert main_model.is_eog(main_model.eos)


def test_compatible_pair_passes_and_different_vocab_is_named(tiny, main_model):
    main = main_model.vocab_info()
    assert incompatibility(main, Model(tiny["draft_close"]).vocab_info()) is None
    with pytest.raises(IncompatibleDraftError) as e:
        check_pairing(main, Model(tiny["different_vocab"]).vocab_info())
    msg = e.value.message
    assert "vocabulary type differs" in msg and "'wpm'" in msg and "no shared text encoding" in msg
    assert "tandem models" in e.value.fix and e.value.http_status == 422


def test_missing_and_non_gguf_files_are_typed_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        Model(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(NotGGUFError, match="not a GGUF"):
        Model(bad)


# -- several sequences in one batch (Context.decode_batch) ---------------------------------------------------

MULTI = ContextParams(n_ctx=1024, n_batch=128, n_threads=2, n_seq_max=4)
TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b",
         "Once upon a time, in a kingdom by the sea, there lived", "SELECT name FROM users"]


def _steps(n_seqs: int) -> list[list[int]]:
    """Rows per sequence per step: different numbers, so sequences grow at different rates."""
    return [[1 + (step + s) % 3 for s in range(n_seqs)] for step in range(5)]


def _continuation(m: Model, s: int) -> list[int]:
    return m.tokenize(f" and then {s} more words follow here, one after another, until the end", add_special=False)


@pytest.mark.parametrize("n_seqs", [2, 4])
def test_a_batch_of_sequences_gives_each_the_logits_it_gets_alone(main_model, n_seqs):
    m = main_model
    prompts = [m.tokenize(t) for t in TEXTS[:n_seqs]]
    conts = [_continuation(m, s) for s in range(n_seqs)]
    steps = _steps(n_seqs)
    ctx = Context(m, MULTI)
    batched = [[out] for out in ctx.decode_batch([SeqRows(s, p, 0, "last") for s, p in enumerate(prompts)])]
    held = [0] * n_seqs
    for rows in steps:
        parts = [SeqRows(s, conts[s][held[s]:held[s] + k], len(prompts[s]) + held[s], "all")
                 for s, k in enumerate(rows)]
        for s, out in enumerate(ctx.decode_batch(parts)):
            batched[s].append(out)
        held = [h + k for h, k in zip(held, rows)]
    assert ctx.decode_calls == 1 + len(steps)  # one llama_decode per step for every sequence
    for s in range(n_seqs):
        assert ctx.pos_max(s) == len(prompts[s]) + held[s] - 1
        alone = Context(m, PARAMS)  # the same rows, decoded with no other sequence
        want = [alone.decode(prompts[s], 0)]
        done = 0
        for rows in steps:
            want.append(alone.decode(conts[s][done:done + rows[s]], len(prompts[s]) + done, logits="all"))
            done += rows[s]
        got, want = np.concatenate(batched[s]), np.concatenate(want)
        assert got.shape == want.shape == (1 + done, m.n_vocab)
        assert np.max(np.abs(got - want)) <= 1e-3  # rounding only (see test_exact: where cells sit)
        assert (got.argmax(1) == want.argmax(1)).all()


def test_rolling_back_one_sequence_leaves_the_others_alone(main_model):
    m = main_model
    a, b = m.tokenize(TEXTS[0]), m.tokenize(TEXTS[1])
    ctx = Context(m, MULTI)
    ctx.decode_batch([SeqRows(0, a, 0, "none"), SeqRows(1, b, 0, "none")])
    # both verify drafts in one batch; sequence 1 keeps one of its three, sequence 0 all of its two
    ctx.decode_batch([SeqRows(0, [11, 12], len(a), "all"), SeqRows(1, [21, 22, 23], len(b), "all")])
    ctx.rollback(len(b) + 1, seq_id=1)
    assert (ctx.pos_max(0), ctx.pos_max(1)) == (len(a) + 1, len(b))
    nxt = ctx.decode_batch([SeqRows(0, [13], len(a) + 2), SeqRows(1, [24], len(b) + 1)])

    fresh = Context(m, PARAMS)
    fresh.decode([*a, 11, 12], 0, logits="none")
    want0 = fresh.decode([13], len(a) + 2)
    fresh.rollback(0)
    fresh.decode([*b, 21], 0, logits="none")
    want1 = fresh.decode([24], len(b) + 1)
    stale = Context(m, PARAMS)  # what keeping the rejected drafts would give: the comparison can fail
    stale.decode([*b, 21, 22, 23], 0, logits="none")
    wrong1 = stale.decode([24], len(b) + 3)
    assert np.max(np.abs(nxt[0] - want0)) <= 1e-3 and np.max(np.abs(nxt[1] - want1)) <= 1e-3
    assert np.max(np.abs(wrong1 - want1)) > 1e-2


def test_a_bad_batch_is_refused_with_its_cause(main_model):
    ctx = Context(main_model, ContextParams(n_ctx=256, n_batch=8, n_threads=2, n_seq_max=2))
    with pytest.raises(EngineError, match="each at most once"):
        ctx.decode_batch([SeqRows(0, [1], 0), SeqRows(0, [2], 1)])
    with pytest.raises(EngineError, match="below 2"):
        ctx.decode_batch([SeqRows(2, [1], 0)])
    with pytest.raises(EngineError, match="exceeds n_batch 8"):
        ctx.decode_batch([SeqRows(0, [1] * 5, 0), SeqRows(1, [1] * 4, 0)])
    assert ctx.pos_max(0) == ctx.pos_max(1) == -1  # nothing was decoded


def test_exact_mode_asks_a_second_row_for_a_lone_output_and_returns_only_the_asked(tiny):
    m = Model(tiny["main"], repack=False)
    ctx = Context(m, ContextParams(n_ctx=512, n_batch=64, n_threads=2, n_seq_max=2, exact=True))
    a, b = m.tokenize(TEXTS[0]), m.tokenize(TEXTS[2])
    ctx.decode_batch([SeqRows(0, a, 0, "none"), SeqRows(1, b, 0, "none")])
    out = ctx.decode_batch([SeqRows(0, [5], len(a), "none"), SeqRows(1, [7], len(b), "last")])
    assert out[0].shape == (0, m.n_vocab) and out[1].shape == (1, m.n_vocab)
    assert ctx.decode_calls == 2  # two lone rows of two sequences: one decode, no pairing needed
    # a lone row of one sequence is decoded with the row before it (the cell is rewritten, the count grows)
    before = ctx.tokens_processed
    ctx.decode_batch([SeqRows(0, [6], len(a) + 1, "last")])
    assert ctx.tokens_processed - before == 2 and ctx.pos_max(0) == len(a) + 1

"""The llama.cpp wrapper on the tiny fixtures: decode, rollback, vocabulary facts, compatibility."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.engine.llama import Context, ContextParams, Model
from tandem.engine.vocab import check_compatible, incompatibility
from tandem.errors import IncompatibleDraftError, ModelNotFoundError, NotGGUFError

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
        check_compatible(main, Model(tiny["different_vocab"]).vocab_info())
    msg = e.value.message
    assert "token 1000" in msg and "<diff_1000>" in msg and "tandem models" in msg
    assert e.value.http_status == 422


def test_missing_and_non_gguf_files_are_typed_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        Model(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(NotGGUFError, match="not a GGUF"):
        Model(bad)

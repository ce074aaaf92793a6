"""Exactness at no cost (Tandem's llama.cpp patch, parts 2 and 7): with an exact main context on a patched library a
lone row takes a batch's kernels, so every row count, one included, gives a row the same logits bit for bit, per
weight type of the files users run (a tiny fixture quantized as they are, repacked as llama.cpp repacks it)."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.engine import exact
from tandem.engine.library import exact_kernels
from tandem.engine.llama import Context, ContextParams, Model
from tandem.models.defaults import derive
from tandem.spec.drafters import ModelDrafter
from tandem.spec.generate import GenParams
from tandem.testing.tiny import TinySpec, build_tiny_model
from test_exact import speculative_matches_plain

pytestmark = pytest.mark.skipif(not exact_kernels(), reason="needs Tandem's llama.cpp patch, level 5")

WIDE = TinySpec(seed=7, n_embd=256, n_ff=512, name="tiny-wide")
"""K-quant blocks hold 256 values, so Q4_K and Q6_K (and their repacked layout) need rows at least that long."""

TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")


def params(*, exact_: bool) -> ContextParams:
    return ContextParams(n_ctx=256, n_batch=64, n_threads=2, type_k="f16", type_v="f16", exact=exact_)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Model]:
    root = tmp_path_factory.mktemp("wide")
    base = build_tiny_model(root / "wide-f32.gguf", WIDE)
    paths = {t: base if t == "f32" else derive(base, root / f"wide-{t}.gguf", t) for t in TYPES}
    return {t: Model(p, repack=True) for t, p in paths.items()}


def plain_and_batched(ctx: Context, toks: list[int], n_prompt: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of toks[n_prompt:] decoded one token at a time (plain steps), then all in one batch."""
    ctx.rollback(0)
    ctx.decode(toks[:n_prompt], 0, logits="none")
    plain = np.stack([ctx.decode([t], n_prompt + i, logits="all")[0] for i, t in enumerate(toks[n_prompt:])])
    ctx.rollback(n_prompt)
    batch = ctx.decode(toks[n_prompt:], n_prompt, logits="all")
    ctx.rollback(0)
    return plain, batch


@pytest.mark.parametrize("kind", TYPES)
def test_every_row_count_one_included_gives_a_row_the_same_logits(wide, kind):
    ctx = Context(wide[kind], params(exact_=True))
    assert ctx.one_row and not ctx.pairs  # exact without pairing: a lone row costs a lone row
    inv = exact.probe(ctx, exact.probe_tokens(ctx, exact.probe_length(17)), max_rows=17)
    assert inv.multi_row and inv.single_row, (inv.multi_row_diff, inv.single_row_diff)
    plain, batch = plain_and_batched(ctx, exact.probe_tokens(ctx, 200)[:200], 40)  # 160 positions
    assert np.array_equal(plain, batch)


def test_without_the_switch_lone_rows_round_their_own_way(wide):
    """What the switch is for: F32 and F16 weights (and every type's attention over an f16 cache) take other kernels
    for one row. On the quantized fixtures the difference rounds away in the 8-bit activations at these positions;
    on Qwen2.5-Coder-1.5B Q4_K_M it reaches 0.44 in a logit (`tandem bench rows`)."""
    diffs = {}
    for kind in TYPES:
        ctx = Context(wide[kind], params(exact_=False))
        assert not ctx.one_row and not ctx.pairs
        plain, batch = plain_and_batched(ctx, exact.probe_tokens(ctx, 90)[:90], 70)
        diffs[kind] = float(np.abs(plain - batch).max())
    assert diffs["f32"] > 0 and diffs["f16"] > 0, diffs


def test_a_drafts_lone_rows_between_the_mains_do_not_change_the_mains_output(wide):
    """The switch is process-wide and set before every decode: on for the exact main, off for its draft. Greedy
    output with the draft equals output without it, token for token and logits bit for bit."""
    main = Context(wide["q4_k_m"], params(exact_=True))
    drafter = ModelDrafter(Context(wide["q8_0"], params(exact_=False)))
    assert not drafter.ctx.one_row
    gp = GenParams(max_tokens=32, draft_max=5, draft_policy="fixed")
    assert speculative_matches_plain(main, drafter, ["The capital of France is", "def fizzbuzz(n):",
                                                     "Once upon a time"], gp) > 30

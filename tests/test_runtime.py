"""Runtime pieces not covered elsewhere: the cost calibrations the adaptive policy starts from, and the
load-time check of whether the draft can pay."""

from __future__ import annotations

import dataclasses

from tandem.config import ModelOptions, SpecOptions
from tandem.engine.llama import Context, ContextParams, Model
from tandem.runtime import CALIBRATION_SIZES, Runtime, calibrate_draft, calibrate_lone, calibrate_verify
from tandem.spec.generate import Done, GenParams, Token


def test_calibration_times_every_size_and_leaves_the_context_empty(tiny):
    ctx = Context(Model(tiny["main"]), ContextParams(n_ctx=256))
    ctx.decode([1, 2, 3], 0)  # whatever was there before is dropped first
    costs = calibrate_verify(ctx, 1)
    assert sorted(costs) == list(CALIBRATION_SIZES) and all(t > 0 for t in costs.values())
    assert ctx.pos_max() == -1


def test_a_new_drafters_cost_model_starts_from_the_calibrated_verify_costs(tiny):
    rt = Runtime(ModelOptions(model=str(tiny["main"]), draft=str(tiny["draft_same"]), ctx_size=256),
                 spec=SpecOptions(), announce=lambda _s: None)
    cost = rt.cost(rt.drafter)
    assert cost.verify.known and cost.draft.known  # both measured before the first draft
    for n in CALIBRATION_SIZES:
        assert cost.verify(n) == rt._verify_costs[n]  # trusted: the measured value, not a fitted line
    assert rt.cost(rt.ngram) is not cost and rt.cost(rt.ngram).verify(1) == cost.verify(1)  # measured once


def test_draft_calibration_times_one_two_and_a_batch_and_leaves_the_context_empty(tiny):
    ctx = Context(Model(tiny["draft_same"]), ContextParams(n_ctx=256))
    ctx.decode([1, 2, 3], 0)
    costs = calibrate_draft(ctx, 1)
    assert sorted(costs) == ["batch", "one", "two"] and all(t > 0 for t in costs.values())
    assert ctx.pos_max() == -1


def test_a_new_draft_models_cost_model_holds_its_calibrated_draft_and_catch_up_costs(tiny):
    rt = Runtime(ModelOptions(model=str(tiny["main"]), draft=str(tiny["draft_same"]), ctx_size=256),
                 spec=SpecOptions(), announce=lambda _s: None)
    cost = rt.cost(rt.drafter)
    assert cost.ready and 0 < cost.draft(1) < cost.draft(8)
    assert cost._catch_up is not None and 0 < cost.catch_up < cost.draft(1)  # batched: cheaper per token
    assert rt.drafter._kv == [] and rt.drafter.ctx.pos_max() == -1  # the drafter starts clean
    assert not rt.cost(rt.ngram).draft.known  # the n-gram drafter is not a model: learnt online


def _draft_tokens_at(rt: Runtime, prompt: list[int], gp: GenParams) -> tuple[int, int]:
    """Tokens the draft model had processed when the first token came out, and when the second did."""
    rt.cost(rt.drafter)  # calibrate first: its decodes are not the catch-up
    before = rt.drafter.ctx.tokens_processed
    events = rt.generate(prompt, gp)
    first = next(ev for ev in events if isinstance(ev, Token))
    at_first = rt.drafter.ctx.tokens_processed - before
    next(ev for ev in events if isinstance(ev, Token))
    at_second = rt.drafter.ctx.tokens_processed - before
    list(events)
    assert first.source == "main"
    return at_first, at_second


def test_the_draft_catches_up_on_the_prompt_right_after_the_first_token_when_it_will_draft(tiny):
    spec = SpecOptions(pause_slow_draft=False)  # the same-size tiny draft cannot pay: it would be paused
    rt = Runtime(ModelOptions(model=str(tiny["main"]), draft=str(tiny["draft_same"]), ctx_size=256),
                 spec=spec, announce=lambda _s: None)
    prompt = rt.prompt(text="The capital of France is", raw=True)
    # A fixed policy always drafts at the first step: the draft reads the prompt once the first token is out
    # (a quantized draft reads a prompt slower than the main model), before the first draft.
    at_first, at_second = _draft_tokens_at(rt, prompt, GenParams(max_tokens=8, draft_policy="fixed"))
    assert at_first == 0 and at_second >= len(prompt)
    # An adaptive policy that will not draft at once (here: a draft measured as too slow to pay) pays no
    # catch-up up front.
    rt2 = Runtime(ModelOptions(model=str(tiny["main"]), draft=str(tiny["draft_same"]), ctx_size=256),
                  spec=spec, announce=lambda _s: None)
    cost = rt2.cost(rt2.drafter)
    for _ in range(4 * cost.draft.trusted):
        cost.observe_draft(1, 10.0)
        cost.observe_draft(8, 80.0)
    assert _draft_tokens_at(rt2, prompt, GenParams(max_tokens=8)) == (0, 0)


def test_a_draft_model_is_calibrated_once_for_all_its_cost_models(tiny):
    """The model part of --spec-type both keeps its own cost model, but not its own calibration decodes."""
    rt = Runtime(ModelOptions(model=str(tiny["main"]), draft=str(tiny["draft_same"]), ctx_size=256),
                 spec=SpecOptions(), announce=lambda _s: None)
    alone = rt.cost(rt.drafter)
    before = rt.drafter.ctx.tokens_processed
    part = rt.cost(rt.drafter, f"ngram+{rt.drafter.name}/{rt.drafter.name}")
    assert part is not alone and rt.drafter.ctx.tokens_processed == before
    assert part.draft(1) == alone.draft(1) and part.catch_up == alone.catch_up


def test_lone_row_timing_leaves_exact_pairing_on_and_the_context_empty(tiny):
    ctx = Context(Model(tiny["main"], repack=False), ContextParams(n_ctx=256, exact=True))
    ctx.decode([1, 2, 3], 0)
    assert calibrate_lone(ctx, 1) > 0
    assert ctx.pairs and ctx.pos_max() == -1
    ctx.decode([5], 0)  # exact-mode tracking starts afresh: a one-token prompt, then a lone token, pair fine
    ctx.decode([6], 1)
    assert ctx.pos_max() == 1
    assert calibrate_lone(ctx, 1, offset=256) is None  # no room after the offset


def test_the_draft_payoff_is_measured_at_load_whenever_a_draft_model_is_loaded(tiny):
    for exact_mode in (True, None):
        rt = Runtime(ModelOptions(model=str(tiny["main"]), draft=str(tiny["draft_close"]), ctx_size=256,
                                  exact=exact_mode), spec=SpecOptions(), announce=lambda _s: None)
        assert rt.payoff is not None and rt.payoff > 0
        assert rt.main.pos_max() == -1 and rt._verify_costs and rt.drafter.name in rt._draft_costs  # calibrated once
    plain = Runtime(ModelOptions(model=str(tiny["main"]), draft="none", ctx_size=256), announce=lambda _s: None)
    assert plain.payoff is None and plain.draft_paused is None


def _texts(rt: Runtime, **kw) -> tuple[list[int], int]:
    ids, drafted = [], 0
    for ev in rt.generate(rt.prompt(text="Once upon a time"), GenParams(max_tokens=24, draft_policy="fixed"), **kw):
        if isinstance(ev, Done):
            drafted = ev.stats.drafted
        else:
            ids.append(ev.id)
    return ids, drafted


def test_a_draft_that_cannot_pay_decodes_as_draft_none_by_default_and_a_request_may_name_it(tiny):
    opts = ModelOptions(model=str(tiny["main"]), draft=str(tiny["draft_heavy"]), ctx_size=256)
    for _ in range(3):  # the payoff is timed: a load under a passing CPU spike may time the main model slow
        rt = Runtime(opts, spec=SpecOptions(draft_policy="fixed"), announce=lambda _s: None)
        if rt.payoff < 1:
            break
    assert rt.payoff < 1 and "decode as --draft none does" in rt.draft_paused  # several times the main's cost
    plain = Runtime(dataclasses.replace(opts, draft="none"), announce=lambda _s: None)
    ids, drafted = _texts(rt)
    assert (ids, drafted) == (_texts(plain)[0], 0)  # what --draft none gives, token for token
    assert rt.draft_name.startswith("tiny-draft-heavy") and rt.invariance_report()["lone_row"] is not None
    assert _texts(rt, model=rt.drafter)[1] > 0  # named (draft_model), it drafts
    for kept in (dataclasses.replace(opts, exact=True), opts):
        spec = SpecOptions(draft_policy="fixed", pause_slow_draft=kept is not opts)
        on = Runtime(kept, spec=spec, announce=lambda _s: None)
        assert on.draft_paused is None and _texts(on)[1] > 0  # --exact, or --no-pause-slow-draft: drafts as asked

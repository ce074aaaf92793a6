"""Runtime pieces not covered elsewhere: the verification-cost calibration the adaptive policy starts from."""

from __future__ import annotations

from tandem.config import ModelOptions, SpecOptions
from tandem.engine.llama import Context, ContextParams, Model
from tandem.runtime import CALIBRATION_SIZES, Runtime, calibrate_verify


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
    assert cost.verify.known and not cost.draft.known  # verification measured, drafting still to learn
    for n in CALIBRATION_SIZES:
        assert cost.verify(n) == rt._verify_costs[n]  # trusted: the measured value, not a fitted line
    assert rt.cost(rt.ngram) is not cost and rt.cost(rt.ngram).verify(1) == cost.verify(1)  # measured once

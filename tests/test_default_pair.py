"""The embedded default pair (real SmolLM2 weights): speculative greedy output equals plain greedy output."""

from __future__ import annotations

import pytest

from tandem.config import ModelOptions, SpecOptions
from tandem.prompts import dev_prompts
from tandem.runtime import Runtime
from tandem.spec.generate import Done, GenParams, Token


@pytest.fixture(scope="module")
def rt():
    # --exact: the guarantee. (In the default regime a verification batch rounds a token unlike a lone row, so
    # which positions the adaptive policy verified, a matter of timing, can flip a near tie.)
    return Runtime(ModelOptions(ctx_size=1024, exact=True), spec=SpecOptions(pause_slow_draft=False),
                   announce=lambda s: None)


def test_default_pair_greedy_equals_plain_on_dev_prompts(rt):
    prompts = dev_prompts()
    assert len(prompts) == 10
    drafted = accepted = 0
    for text in prompts:
        tokens = rt.prompt(text=text)
        runs = {}
        for use_draft in (False, True):
            events = list(rt.generate(tokens, GenParams(max_tokens=64), use_draft=use_draft))
            assert isinstance(events[-1], Done) and events[-1].stats.identity_holds()
            runs[use_draft] = [e.id for e in events if isinstance(e, Token)]
            drafted += events[-1].stats.drafted
            accepted += events[-1].stats.accepted
        assert runs[True] == runs[False], f"diverged on {text!r}"
    assert accepted / drafted > 0.8  # the pair really speculates

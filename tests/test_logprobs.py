"""Log probabilities on the real engine: the main model's processed distribution at every emitted position, the
same with a draft as without one, and none computed when not asked for."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.engine.llama import Context, ContextParams, Model
from tandem.errors import BadInputError
from tandem.spec.drafters import ModelDrafter
from tandem.spec.generate import Done, GenParams, Token, generate
from tandem.spec.logprobs import FLOOR, log_softmax, top_tokens
from tandem.spec.ngram import NgramDrafter
from tandem.spec.penalties import penalty_processors
from tandem.spec.processors import Processors
from tandem.spec.sampling import SamplingParams

PARAMS = ContextParams(n_ctx=512, n_batch=128, n_threads=2, exact=True)
PROMPT = "Once upon a time"
N = 20


@pytest.fixture(scope="module")
def main(tiny):
    return Context(Model(tiny["main"]), PARAMS)


def run(main, gp, drafter=None, prompt=PROMPT) -> list[Token]:
    events = list(generate(main, main.model.tokenize(prompt), gp, drafter))
    assert isinstance(events[-1], Done)
    return [e for e in events if isinstance(e, Token)]


def test_top_tokens_sorted_with_ties_by_id_and_without_impossible_tokens():
    lp = np.array([-1.0, -0.5, -np.inf, -0.5, -3.0])
    assert top_tokens(lp, 3).tolist() == [1, 3, 0]
    assert top_tokens(lp, 10).tolist() == [1, 3, 0, 4]  # -inf (a masked token) is never listed
    assert top_tokens(lp, 0).tolist() == []
    assert np.exp(log_softmax(np.array([0.0, np.log(3.0)]))).tolist() == pytest.approx([0.25, 0.75])


def test_off_by_default_and_range_checked(main):
    assert all(t.logprob is None for t in run(main, GenParams(max_tokens=3)))
    with pytest.raises(BadInputError) as e:
        GenParams(logprobs=21)
    assert e.value.param == "logprobs"


def test_greedy_token_is_the_most_likely_and_the_list_is_sorted(main):
    toks = run(main, GenParams(max_tokens=N, logprobs=5))
    for t in toks:
        lp = t.logprob
        assert lp is not None and len(lp.top) == 5
        assert lp.top[0].token == t.id and lp.top[0].logprob == lp.chosen.logprob
        values = [e.logprob for e in lp.top]
        assert values == sorted(values, reverse=True) and values[0] <= 0.0
        assert np.exp(values).sum() <= 1.0 + 1e-9
        assert lp.chosen.bytes == main.model.piece(t.id)


@pytest.mark.parametrize("draft", ["draft_same", "draft_close", "ngram"])
def test_logprobs_with_a_draft_equal_those_without(tiny, main, draft):
    draft_params = ContextParams(n_ctx=512, n_batch=128, n_threads=2)
    drafter = NgramDrafter() if draft == "ngram" else ModelDrafter(Context(Model(tiny[draft]), draft_params))
    for sp in (SamplingParams(), SamplingParams(temperature=0.9, seed=11)):
        gp = GenParams(max_tokens=N, sampling=sp, logprobs=3, draft_max=4, draft_policy="fixed",
                       processors=Processors(penalty_processors(frequency_penalty=0.5)))
        plain = run(main, gp, prompt="1, 2, 3, 4, 1, 2, 3, 4,")  # repeats: the n-gram drafter finds matches
        spec = run(main, gp, drafter, prompt="1, 2, 3, 4, 1, 2, 3, 4,")
        assert [t.id for t in spec] == [t.id for t in plain]
        for a, b in zip(plain, spec):
            assert b.logprob.chosen.logprob == pytest.approx(a.logprob.chosen.logprob, abs=1e-5)
            assert [e.token for e in b.logprob.top] == [e.token for e in a.logprob.top]
            assert [e.logprob for e in b.logprob.top] == pytest.approx([e.logprob for e in a.logprob.top], abs=1e-5)
        if draft != "ngram" and sp.greedy:
            assert any(t.source == "draft" for t in spec)  # drafted positions report the main model's values


def test_logprobs_are_of_the_processed_row_before_sampling_filters(main):
    """A +100 bias makes its token certain (logprob 0); temperature and top-k do not change what is reported."""
    forced = run(main, GenParams(max_tokens=1))[0].id + 1
    gp = GenParams(max_tokens=3, logprobs=2, processors=Processors(penalty_processors(logit_bias={str(forced): 100})))
    for t in run(main, gp):
        assert t.id == forced and t.logprob.chosen.logprob == pytest.approx(0.0, abs=1e-6)
        assert t.logprob.top[1].logprob < -50
    greedy = run(main, GenParams(max_tokens=1, logprobs=4))[0].logprob
    sampled = run(main, GenParams(max_tokens=1, logprobs=4,
                                  sampling=SamplingParams(temperature=0.3, top_k=2, seed=5)))[0].logprob
    assert sampled.top == greedy.top
    assert FLOOR < min(e.logprob for e in greedy.top)

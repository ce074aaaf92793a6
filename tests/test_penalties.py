"""Penalties and logit_bias: their formulas on a row, their checks, and losslessness under speculation on the real
engine (greedy and seeded, model and n-gram drafts): every verified row counts the draft tokens before it."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.engine.llama import Context, ContextParams, Model
from tandem.errors import BadInputError
from tandem.spec.drafters import ModelDrafter
from tandem.spec.generate import Done, GenParams, Token, generate
from tandem.spec.ngram import NgramDrafter
from tandem.spec.penalties import LogitBias, Penalties, penalty_processors
from tandem.spec.processors import Processors
from tandem.spec.sampling import SamplingParams

# Exact mode: a row's logits do not depend on its batch, so plain and speculative output are equal bit for bit
# (the tiny models' near-tied logits would otherwise let a batch's rounding flip a token).
PARAMS = ContextParams(n_ctx=512, n_batch=128, n_threads=2, exact=True)
PROMPT = "Once upon a time"
N = 20


@pytest.fixture(scope="module")
def main(tiny):
    return Context(Model(tiny["main"]), PARAMS)


@pytest.fixture(scope="module")
def drafters(tiny):
    out = {k: ModelDrafter(Context(Model(tiny[k]), ContextParams(n_ctx=512, n_batch=128, n_threads=2)))
           for k in ("draft_same", "draft_close")}
    out["ngram"] = NgramDrafter()
    return out


def run(main, prompt, gp, drafter=None):
    events = list(generate(main, prompt, gp, drafter))
    assert isinstance(events[-1], Done) and events[-1].stats.identity_holds()
    return [e.id for e in events if isinstance(e, Token)], events[-1].stats


# -- the formulas ----------------------------------------------------------------------------------------------
def test_presence_and_frequency_count_the_output_only():
    pen = Penalties(presence=0.5, frequency=0.25).for_prompt([7, 7], 10)
    row = pen([7, 7, 1, 1, 2], np.zeros(10, dtype=np.float32))
    assert row[1] == pytest.approx(-(2 * 0.25 + 0.5)) and row[2] == pytest.approx(-(0.25 + 0.5))
    assert row[7] == 0 and row[0] == 0  # 7 is in the prompt only


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits_in_the_window():
    pen = Penalties(repeat=2.0, repeat_last_n=3).for_prompt([1, 2], 6)
    row = pen([1, 2, 3, 4], np.array([4.0, 4.0, -4.0, 4.0, -1.0, 4.0], dtype=np.float32))
    # window: the last 3 tokens (2, 3, 4), the prompt's 2 included; 1 is out of it
    assert row.tolist() == [4.0, 4.0, -8.0, 2.0, -2.0, 4.0]
    whole = Penalties(repeat=2.0, repeat_last_n=-1).for_prompt([1, 2], 6)([1, 2], np.full(6, 4.0, dtype=np.float32))
    assert whole.tolist() == [4.0, 2.0, 2.0, 4.0, 4.0, 4.0]


def test_bias_is_added_and_off_settings_cost_nothing():
    row = LogitBias.parse({"3": -100, "1": 2.5})([0], np.zeros(5, dtype=np.float32))
    assert row.tolist() == [0.0, 2.5, 0.0, -100.0, 0.0]
    assert penalty_processors() == ()  # no processors: rows untouched, nothing computed
    assert penalty_processors(repeat_penalty=1.5, repeat_last_n=0) == ()


@pytest.mark.parametrize("kwargs, param", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"repeat_penalty": 0.0}, "repeat_penalty"),
    ({"repeat_last_n": -2}, "repeat_last_n"),
    ({"logit_bias": {"x1": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"1": 100.5}}, "logit_bias"),
    ({"logit_bias": {"1": True}}, "logit_bias"),
])
def test_out_of_range_settings_name_their_field(kwargs, param):
    with pytest.raises(BadInputError) as e:
        penalty_processors(**kwargs)
    assert e.value.param == param and e.value.fix


def test_a_bias_outside_the_vocabulary_is_refused_before_decoding(main):
    gp = GenParams(max_tokens=4, processors=Processors(penalty_processors(logit_bias={str(main.model.n_vocab): 1})))
    with pytest.raises(BadInputError) as e:
        run(main, main.model.tokenize(PROMPT), gp)
    assert e.value.param == "logit_bias" and str(main.model.n_vocab) in e.value.cause


# -- on the engine -----------------------------------------------------------------------------------------------
CONFIGS = {
    "presence": {"presence_penalty": 1.5},
    "frequency": {"frequency_penalty": 0.8},
    "repeat": {"repeat_penalty": 1.6, "repeat_last_n": 16},
    "bias": "the plain output's tokens 1-3 at -100, 5 others at +3",
}
MODES = {"greedy": SamplingParams(), "seeded": SamplingParams(temperature=0.9, seed=7)}


def _settings(name: str, plain: list[int]) -> dict:
    if name == "bias":
        return {"logit_bias": {**{str(t): 3.0 for t in range(100, 105)}, **{str(t): -100.0 for t in plain[1:4]}}}
    return CONFIGS[name]


@pytest.fixture(scope="module")
def plain_runs(main):
    """Plain outputs by (setting, mode), shared by the drafters' tests: {(name, mode): (settings, tokens)}, and
    (None, mode): the output without any setting."""
    cache: dict = {}

    def get(name: str | None, mode: str):
        if (name, mode) not in cache:
            prompt = main.model.tokenize(PROMPT)
            if name is None:
                cache[name, mode] = ({}, run(main, prompt, GenParams(max_tokens=N, sampling=MODES[mode]))[0])
            else:
                settings = _settings(name, get(None, mode)[1])
                cache[name, mode] = (settings, run(main, prompt, _gp(settings, mode))[0])
        return cache[name, mode]
    return get


def _gp(settings: dict, mode: str) -> GenParams:
    return GenParams(max_tokens=N, sampling=MODES[mode], draft_max=4, draft_policy="fixed",
                     processors=Processors(penalty_processors(**settings)))


@pytest.mark.parametrize("draft", ["draft_same", "draft_close", "ngram"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_speculative_output_equals_plain_output_under_each_setting(main, drafters, plain_runs, name, draft):
    prompt = main.model.tokenize(PROMPT)
    for mode in MODES:
        settings, plain = plain_runs(name, mode)
        spec, stats = run(main, prompt, _gp(settings, mode), drafters[draft])
        assert spec == plain, (name, mode)
        assert plain != plain_runs(None, mode)[1], (name, mode)  # the setting is applied
        if draft == "draft_same" and mode == "greedy":  # the draft's rows are processed too: all accepted
            assert stats.accepted > 0 and stats.acceptance_rate == 1.0, (name, mode)
        if draft == "draft_close" and mode == "greedy":
            assert stats.accepted > 0, name


def test_penalties_discourage_repeats(main):
    prompt = main.model.tokenize(PROMPT)
    plain, _ = run(main, prompt, GenParams(max_tokens=48))
    gp = GenParams(max_tokens=48, processors=Processors(penalty_processors(presence_penalty=2.0)))
    penalised, _ = run(main, prompt, gp)
    assert len(set(penalised)) > len(set(plain))


def test_bias_minus_100_keeps_a_token_out_and_plus_100_forces_it(main, drafters):
    prompt = main.model.tokenize(PROMPT)
    plain, _ = run(main, prompt, GenParams(max_tokens=N))
    banned = plain[0]
    for drafter in (None, drafters["draft_close"]):
        gp = GenParams(max_tokens=N, draft_max=4, processors=Processors(penalty_processors(
            logit_bias={str(banned): -100})))
        out, _ = run(main, prompt, gp, drafter)
        assert banned not in out and out != plain
        forced = plain[5]
        seeded = SamplingParams(temperature=1.0, seed=3)
        gp = GenParams(max_tokens=N, draft_max=4, sampling=seeded,
                       processors=Processors(penalty_processors(logit_bias={str(forced): 100})))
        out, _ = run(main, prompt, gp, drafter)
        assert out == [forced] * N

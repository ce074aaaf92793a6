"""The decode loop on the real engine with the tiny fixtures: losslessness and the stats identity."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from tandem.engine.llama import Context, ContextParams, Model
from tandem.errors import ContextOverflowError
from tandem.prompts import dev_prompts
from tandem.spec.drafters import ModelDrafter
from tandem.spec import generate as generate_module
from tandem.spec.costs import CostModel
from tandem.spec.generate import Done, GenParams, Token, _Speculator, generate
from tandem.spec.ngram import NgramDrafter
from tandem.spec.sampling import SamplingParams
from tandem.spec.steps import run as run_steps
from tandem.spec.verify import EMPTY, DraftProposal

EXTRA = ["The capital of France is", "def fizzbuzz(n):", "Once upon a time", "SELECT * FROM", "1, 2, 3, 4,",
         "Dear Sir or Madam,", "import numpy as np", "The weather today", "In 1492, Columbus",
         "<html><body>"]
PROMPTS = dev_prompts() + EXTRA
PARAMS = ContextParams(n_ctx=512, n_batch=128, n_threads=2)


@pytest.fixture(scope="module")
def main(tiny):
    return Context(Model(tiny["main"]), PARAMS)


@pytest.fixture(scope="module")
def drafters(tiny):
    return {k: ModelDrafter(Context(Model(tiny[k]), PARAMS)) for k in ("draft_same", "draft_close", "draft_small")}


def run(main, prompt_text, gp, drafter=None):
    prompt = main.model.tokenize(prompt_text)
    events = list(generate(main, prompt, gp, drafter))
    done = events[-1]
    assert isinstance(done, Done)
    toks = [e for e in events[:-1] if isinstance(e, Token)]
    assert done.stats.identity_holds(), done.stats
    return toks, done


def ids(toks):
    return [t.id for t in toks]


def test_fixture_output_is_diverse(main):
    """Equivalence tests only mean something if the model does not repeat one token."""
    toks, _ = run(main, PROMPTS[0], GenParams(max_tokens=64))
    assert len(set(ids(toks))) > 20


@pytest.mark.parametrize("draft", ["draft_close", "draft_small"])
def test_speculative_greedy_equals_plain_greedy(main, drafters, draft):
    gp = GenParams(max_tokens=64, draft_max=6)
    total_accepted = total_rejected = 0
    assert len(PROMPTS) >= 20
    for text in PROMPTS:
        plain, plain_done = run(main, text, gp)
        spec, done = run(main, text, gp, drafters[draft])
        assert ids(spec) == ids(plain), f"diverged on {text!r}"
        assert "".join(t.text for t in spec) + done.tail == "".join(t.text for t in plain) + plain_done.tail
        assert sum(t.source == "draft" for t in spec) == done.stats.accepted
        total_accepted += done.stats.accepted
        total_rejected += done.stats.rejected
    assert total_rejected > 0  # rollback was exercised
    if draft == "draft_close":
        assert total_accepted > 0


def test_draft_equal_to_main_is_always_accepted(main, drafters):
    for text in PROMPTS[:5]:
        _, done = run(main, text, GenParams(max_tokens=64, draft_max=4), drafters["draft_same"])
        assert done.stats.drafted > 0
        assert done.stats.acceptance_rate == 1.0


def test_draft_processes_each_token_about_once(main, drafters):
    d = drafters["draft_close"]
    before = d.ctx.tokens_processed
    toks, done = run(main, PROMPTS[1], GenParams(max_tokens=64, draft_max=6), d)
    s = done.stats
    used = d.ctx.tokens_processed - before
    assert used <= s.prompt_tokens + s.generated_tokens + s.rejected


def test_sampling_is_reproducible_with_a_seed(main, drafters):
    gp = GenParams(max_tokens=32, sampling=SamplingParams(temperature=0.8, seed=42))
    a, _ = run(main, PROMPTS[2], gp, drafters["draft_close"])
    b, _ = run(main, PROMPTS[2], gp, drafters["draft_close"])
    c, _ = run(main, PROMPTS[2], GenParams(max_tokens=32, sampling=SamplingParams(temperature=0.8, seed=43)),
               drafters["draft_close"])
    assert ids(a) == ids(b) and ids(a) != ids(c)


def test_t1_token_frequencies_agree_with_and_without_draft(main, drafters):
    """At T = 1 the draft must not change the distribution of what is generated (positions 2 and 3)."""
    n = 1500
    sp = dict(temperature=1.0, top_k=6)
    prompt = main.model.tokenize("The capital of France is")
    counts: dict[str, list[dict[int, int]]] = {}
    accepted = rejected = 0
    for arm, drafter in (("plain", None), ("draft", drafters["draft_close"])):
        pos = [{}, {}]
        for seed in range(n):
            gp = GenParams(max_tokens=3, draft_max=3, sampling=SamplingParams(seed=seed, **sp),
                           seed_matches_plain=False)  # rejection sampling, seeded for a reproducible test
            ev = list(generate(main, prompt, gp, drafter))
            toks = [e.id for e in ev if isinstance(e, Token)]
            for j in (0, 1):
                pos[j][toks[j + 1]] = pos[j].get(toks[j + 1], 0) + 1
            if drafter is not None:
                accepted += ev[-1].stats.accepted
                rejected += ev[-1].stats.rejected
        counts[arm] = pos
    assert accepted > n // 4 and rejected > n // 20  # both branches of rejection sampling ran
    for j in (0, 1):
        keys = sorted(set(counts["plain"][j]) | set(counts["draft"][j]))
        a = np.array([counts["plain"][j].get(k, 0) for k in keys]) / n
        b = np.array([counts["draft"][j].get(k, 0) for k in keys]) / n
        pooled = (a + b) / 2
        bound = 0.5 * 4 * np.sqrt(2 * pooled * (1 - pooled) / n).sum()  # 4 sigma per cell, two samples
        assert 0.5 * np.abs(a - b).sum() < bound


def test_stop_conditions(main, drafters):
    d = drafters["draft_close"]
    toks, done = run(main, PROMPTS[0], GenParams(max_tokens=5), d)
    assert len(toks) == 5 and done.stats.stop_reason == "length"
    full, _ = run(main, PROMPTS[0], GenParams(max_tokens=40))
    text = "".join(t.text for t in full)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    first = text.index(stop)
    toks, done = run(main, PROMPTS[0], GenParams(max_tokens=40, stop=(stop,)), d)
    assert done.stats.stop_reason == "stop"
    assert "".join(t.text for t in toks) + done.tail == text[:first]


def test_context_full_stops_cleanly(tiny):
    small = Context(Model(tiny["main"]), ContextParams(n_ctx=32, n_batch=32, n_threads=2))
    drafter = ModelDrafter(Context(Model(tiny["draft_close"]), ContextParams(n_ctx=32, n_batch=32, n_threads=2)))
    toks, done = run(small, "Once upon a time", GenParams(max_tokens=2000), drafter)
    assert done.stats.stop_reason == "context"
    assert done.stats.prompt_tokens + len(toks) == small.n_ctx + 1  # the last token is emitted, not decoded


def test_prompt_longer_than_context_is_refused(tiny):
    small = Context(Model(tiny["main"]), ContextParams(n_ctx=32, n_batch=32, n_threads=2))
    with pytest.raises(ContextOverflowError, match=f"context holds {small.n_ctx}") as e:
        list(generate(small, list(range(100, 100 + small.n_ctx + 5)), GenParams()))
    assert "--ctx-size" in e.value.message


class CatchUpStub:
    """A drafter on a fake clock: 1 ms per token it has not seen (its catch-up), 0.5 ms per drafted token."""

    name = "stub"

    def __init__(self, clock: list[float]):
        self.clock, self.seen = clock, 0

    def reset(self, history=None) -> None:
        self.seen = 0

    def prefill(self, history) -> None:
        self.seen = len(history) - 1

    def kv_cells(self, n_history: int) -> int:
        return 0

    def propose(self, history, max_tokens, sp, rng, p_min=None, processors=None) -> DraftProposal:
        self.clock[0] += 0.001 * (len(history) - self.seen) + 0.0005 * max_tokens
        self.seen = len(history)
        return DraftProposal([7] * max_tokens)


def test_a_drafts_catch_up_after_plain_steps_does_not_count_as_a_slow_draft(monkeypatch):
    """The catch-up is measured apart from the draft cost: counted as a slow draft, it made drafting look like a
    loss, and a full-context draft stopped drafting for good."""
    clock = [0.0]
    monkeypatch.setattr(generate_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    cost = CostModel()
    for k in range(1, 9):
        for _ in range(3):
            cost.observe_draft(k, 0.0005 * k)
            cost.observe_verify(k + 1, 0.020)
    for _ in range(3):
        cost.observe_verify(1, 0.020)
    for _ in range(30):
        for i in range(8):
            cost.observe_accept(True)
    spec = _Speculator(CatchUpStub(clock), GenParams(draft_max=8), cost)
    rng = np.random.default_rng(0)
    history: list[int] = [1]
    for _ in range(10):
        history += [2] * 300  # 300 tokens decoded in plain steps, unseen by the drafter
        assert run_steps(spec.propose(history, 0, rng)) is EMPTY  # a plain step
        spec.verified(0, 0, 0.020)
        proposal = run_steps(spec.propose(history, 8, rng))  # (its drafter decodes nothing: no decodes to run)
        assert len(proposal.tokens) == 8
        spec.verified(8, 8, 0.020)
    assert cost.draft(8) == pytest.approx(0.004, rel=0.05)
    assert cost.catch_up == pytest.approx(0.001, rel=0.05)


# -- prefix reuse (the previous turn of a chat) ------------------------------------------------------------

def _ids(events) -> tuple[list[int], Done]:
    events = list(events)
    return [e.id for e in events if isinstance(e, Token)], events[-1]


def test_a_chats_next_turn_reuses_the_cached_prefix_and_gives_a_cold_runs_output_bit_for_bit(tiny):
    exact_params = ContextParams(n_ctx=1024, n_batch=128, n_threads=2, exact=True)
    main_model, draft_model = Model(tiny["main"], repack=False), Model(tiny["draft_close"])
    warm = Context(main_model, exact_params)
    drafter = ModelDrafter(Context(draft_model, PARAMS))
    gp = GenParams(max_tokens=20, draft_policy="fixed", draft_max=4)
    turn1 = main_model.tokenize("User: Tell me about the sea.\nAssistant:")
    out1, done1 = _ids(generate(warm, turn1, gp, drafter))
    assert done1.stats.cached_tokens == 0 and out1
    turn2 = [*turn1, *out1, *main_model.tokenize("\nUser: And the mountains?\nAssistant:", add_special=False)]
    out2, done2 = _ids(generate(warm, turn2, gp, drafter))
    # the KV held turn 1's prompt and all its output but the newest token
    assert done2.stats.cached_tokens == len(turn1) + len(out1) - 1
    assert drafter.ctx.pos_max() >= len(turn1)  # the draft kept its prefix too
    cold = Context(main_model, exact_params)
    cold_out, cold_done = _ids(generate(cold, turn2, gp, ModelDrafter(Context(draft_model, PARAMS))))
    assert cold_done.stats.cached_tokens == 0 and out2 == cold_out
    # cache_prompt=False decodes the whole prompt again; an unrelated prompt shares nothing
    again, done3 = _ids(generate(warm, turn2, dataclasses.replace(gp, cache_prompt=False), drafter))
    assert done3.stats.cached_tokens == 0 and again == cold_out
    other = main_model.tokenize("SELECT * FROM users")
    assert _ids(generate(warm, other, gp, drafter))[1].stats.cached_tokens <= 1  # at most the BOS token


@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_with_a_seed_the_draft_does_not_change_the_text(tiny, kind):
    """Seeded sampling: each position samples the main model's token with the uniform plain decoding uses there,
    so the same seed gives the same text with a draft as without (exact mode: the same logits too)."""
    exact_params = ContextParams(n_ctx=512, n_batch=128, n_threads=2, exact=True)
    main_model = Model(tiny["main"], repack=False)
    drafted = 0
    for seed, text in enumerate(PROMPTS[:4]):
        gp = GenParams(max_tokens=30, sampling=SamplingParams(temperature=0.9, seed=seed), draft_max=4,
                       draft_policy="fixed")  # draft at every step, whatever it costs here
        prompt = main_model.tokenize(text)
        plain, _ = _ids(generate(Context(main_model, exact_params), prompt, gp))
        drafter = (ModelDrafter(Context(Model(tiny["draft_same"]), PARAMS)) if kind == "model" else NgramDrafter())
        spec, done = _ids(generate(Context(main_model, exact_params), prompt, gp, drafter))
        assert spec == plain, text
        assert done.stats.identity_holds()
        drafted += done.stats.accepted
    assert drafted > 0 or kind == "ngram"  # the draft equal to the main model: its samples are accepted often


def test_a_seeded_request_drafts_adaptively_unless_it_uses_rejection_sampling():
    """Sample and compare draws one uniform per emitted token whatever the draft length, so timing may steer it;
    rejection sampling draws per draft token, so a seed needs a fixed length there to repeat its text."""
    from tandem.spec.policy import AdaptivePolicy, FixedPolicy
    sp = SamplingParams(temperature=0.8, seed=1)
    compare = _Speculator(NgramDrafter(), GenParams(sampling=sp), CostModel())
    rejection = _Speculator(NgramDrafter(), GenParams(sampling=sp, seed_matches_plain=False), CostModel())
    assert isinstance(compare.policy, AdaptivePolicy) and isinstance(rejection.policy, FixedPolicy)

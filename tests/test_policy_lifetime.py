"""The draft policy over a server's lifetime, on the real engine with the tiny main model: requests one after
another share their drafter's cost model (as a Runtime's do), and what one request went through must not stop
the next from drafting.

The drafter is scripted (it proposes the main model's own greedy continuation, wrong where the test says) and the
clock is frozen, so the costs the policy prices are the seeded ones (those of the default pair on 2 cores: an F32
main, a Q4_1 draft) and every run is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest

from tandem.engine.llama import Context, ContextParams, Model
from tandem.prompts import dev_prompts
from tandem.spec import generate as generate_module
from tandem.spec.costs import CostModel
from tandem.spec.generate import Done, GenParams, generate
from tandem.spec.policy import DEFAULTS
from tandem.spec.sampling import SamplingParams
from tandem.spec.verify import DraftProposal

PARAMS = ContextParams(n_ctx=512, n_batch=128, n_threads=2)


@pytest.fixture(scope="module")
def main(tiny):
    return Context(Model(tiny["main"]), PARAMS)


@pytest.fixture
def frozen_clock(monkeypatch):
    """Wall-clock timings observe nothing: the seeded costs stay what the policy prices."""
    monkeypatch.setattr(generate_module, "time", SimpleNamespace(perf_counter=lambda: 0.0))


def default_pair_costs() -> CostModel:
    """Costs measured on the default pair (2 cores): a main row 24 ms and 1.2 ms per extra row, a draft token
    12 ms, its batched catch-up 5 ms a token."""
    cost = CostModel()
    for _ in range(cost.verify.trusted):
        for n in range(1, 18):
            cost.observe_verify(n, 0.024 + 0.0012 * (n - 1))
            cost.observe_draft(n, 0.012 * n)
    cost.observe_catch_up(100, 0.5)
    return cost


class ScriptedDrafter:
    """Proposes the main model's greedy continuation of the prompt (computed in advance), with a wrong token at
    each output position where `wrong(position)` says so."""

    name = "scripted"

    def __init__(self, prompt: list[int], plain: list[int], wrong: Callable[[int], bool], n_vocab: int):
        self.prompt, self.plain, self.wrong, self.n_vocab = prompt, plain, wrong, n_vocab

    def reset(self, history=None) -> None:
        pass

    def prefill(self, history) -> None:
        pass

    def kv_cells(self, n_history: int) -> int:
        return 0

    def propose(self, history, max_tokens, sp, rng, p_min=None, processors=None) -> DraftProposal:
        start = len(history) - len(self.prompt)
        out = []
        for i in range(start, min(start + max_tokens, len(self.plain))):
            out.append((self.plain[i] + 1) % self.n_vocab if self.wrong(i) else self.plain[i])
        return DraftProposal(out)


def request(main: Context, cost: CostModel, text: str, max_tokens: int, wrong: Callable[[int], bool]):
    """One greedy request with the scripted drafter on `cost`: its stats (and the output equals plain decoding)."""
    prompt = main.model.tokenize(text)
    gp = GenParams(max_tokens=max_tokens, draft_max=8)
    plain = [e.id for e in generate(main, prompt, gp) if not isinstance(e, Done)]
    drafter = ScriptedDrafter(prompt, plain, wrong, main.model.n_vocab)
    events = list(generate(main, prompt, gp, drafter, costs=lambda _d, _k: cost))
    assert [e.id for e in events[:-1]] == plain
    stats = events[-1].stats
    assert stats.identity_holds()
    return stats


def mostly_right(i: int) -> bool:
    """Wrong at one output position in ten: about the default pair's acceptance on the bench prompts."""
    return i % 10 == 7


def always(_i: int) -> bool:
    return True


def test_a_short_request_with_a_rejected_draft_does_not_stop_the_next_requests_from_drafting(main, frozen_clock):
    """The issue's sequence: "hi" (one draft, rejected), then ordinary requests on the same server. Each drafts as
    much and accepts as much as it does on a fresh server (the old policy drafted nothing after "hi": the probes
    that could correct it were spaced by the catch-up on a growing backlog)."""
    texts = [p for p in dev_prompts()][:4]
    fresh = [request(main, default_pair_costs(), t, 120, mostly_right) for t in texts]
    cost = default_pair_costs()
    hi = request(main, cost, "hi", 16, always)
    assert hi.drafted >= 1 and hi.accepted == 0
    for t, alone in zip(texts, fresh):
        later = request(main, cost, t, 120, mostly_right)
        assert alone.draft_steps > 0
        assert later.draft_steps >= 0.9 * alone.draft_steps and later.accepted >= 0.9 * alone.accepted, \
            (t, later, alone)


def test_requests_after_a_stretch_of_always_wrong_drafts_draft_as_on_a_fresh_server(main, frozen_clock):
    texts = [p for p in dev_prompts()][:3]
    fresh = [request(main, default_pair_costs(), t, 120, mostly_right) for t in texts]
    cost = default_pair_costs()
    request(main, cost, texts[0], 60, mostly_right)
    for t in texts:  # the pathological stretch
        bad = request(main, cost, t, 120, always)
        assert bad.accepted == 0 and bad.plain_steps > 4 * bad.draft_steps  # a draft that fails is dropped
    for t, alone in zip(texts, fresh):
        later = request(main, cost, t, 120, mostly_right)
        assert later.draft_steps >= 0.9 * alone.draft_steps and later.accepted >= 0.9 * alone.accepted, \
            (t, later, alone)


def test_within_a_request_drafting_resumes_once_its_own_failures_fade(main, frozen_clock):
    """A drafter that does well on other requests, wrong for a request's first 60 output tokens, then right: the
    sequence stops drafting, its failures fade towards the drafter's long-run record, and it drafts again within
    max_streak plain steps, however long its plain streak (the drafter's backlog) has grown."""
    cost = default_pair_costs()
    for text in dev_prompts()[1:3]:
        request(main, cost, text, 120, mostly_right)
    stats = request(main, cost, dev_prompts()[0], 200, lambda i: i < 60)
    assert stats.plain_steps > 10  # it did stop
    assert stats.accepted >= 200 - 60 - DEFAULTS.max_streak - 16  # (the last plain steps, a ramp 1, 2, 4, 8)


def test_a_sequence_whose_drafts_fail_does_not_pay_a_catch_up_per_probe(main, frozen_clock):
    """Every draft wrong: after its opening probe the sequence decodes plain, and the drafter reads almost nothing
    more (a probe after each plain streak would read the whole streak: 15% of plain decoding on the default pair)."""
    stats = request(main, default_pair_costs(), dev_prompts()[0], 200, always)
    assert stats.draft_steps <= 3 and stats.plain_steps >= 190


def test_hot_requests_learn_their_own_acceptance_and_do_not_resume_on_greedy_successes(main, frozen_clock):
    """Greedy requests draft well; a request at temperature 2 (scripted here as always wrong) learns from its own
    regime's record, so after a first hot request the next ones barely draft, while greedy requests still do."""
    cost = default_pair_costs()
    texts = dev_prompts()[:3]
    for t in texts:
        request(main, cost, t, 120, mostly_right)
    hot = [hot_request(main, cost, t, 200) for t in texts]
    assert hot[-1].draft_steps <= 2 and sum(s.accepted for s in hot) == 0
    assert cost.long_run("hot")[1] > 0 and cost.long_run("greedy")[0] / cost.long_run("greedy")[1] > 0.7
    assert request(main, cost, texts[0], 120, mostly_right).accepted >= 80


def hot_request(main: Context, cost: CostModel, text: str, max_tokens: int):
    """A seeded request at temperature 2 whose drafts are all wrong (the scripted drafter proposes a token the
    main model cannot have sampled: its samples are not known in advance)."""
    prompt = main.model.tokenize(text)
    gp = GenParams(max_tokens=max_tokens, draft_max=8, sampling=SamplingParams(temperature=2.0, seed=3))
    drafter = ScriptedDrafter(prompt, [0] * max_tokens, always, main.model.n_vocab)  # proposes token 1
    events = list(generate(main, prompt, gp, drafter, costs=lambda _d, _k: cost))
    stats = events[-1].stats
    assert stats.identity_holds()
    return stats


def test_a_regime_whose_record_is_all_failures_skips_opening_probes_but_not_for_good(main, frozen_clock):
    """Hot requests fail request after request: once the record is strong, a new hot request does not pay the
    prompt's catch-up for an opening probe, but one request in max_skipped_openings + 1 still probes (the record
    cannot lock the regime out)."""
    cost = default_pair_costs()
    text = dev_prompts()[0]
    drafted = [hot_request(main, cost, text, 120).draft_steps for _ in range(16)]
    assert drafted[0] >= 1 and drafted.count(0) >= 6, drafted  # opening probes mostly stopped...
    gaps = [len(run) for run in "".join("x" if d else "." for d in drafted).split("x")]
    assert max(gaps) <= DEFAULTS.max_skipped_openings  # ...but never for more than that many requests

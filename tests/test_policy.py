"""The adaptive draft policy and its cost model, on hand-built costs and simulated acceptance (no model)."""

from __future__ import annotations

import random

import pytest

from tandem.errors import BadInputError
from tandem.spec.generate import GenParams
from tandem.spec.costs import CostModel
from tandem.spec.policy import AdaptivePolicy, FixedPolicy, make_policy

PLAIN = 1 / 44
"""Seconds of one F16 single-token decode of SmolLM2-135M on the 2-core CI machine (issue 5)."""


def verify_seconds(batch: int) -> float:
    """Measured F16 verify cost, linear between batch 1 (44 tok/s), 4 (126 tok/s) and 8 (225 tok/s)."""
    points = [(1, 1 / 44), (4, 4 / 126), (8, 8 / 225), (64, 8 / 225 + 56 * 0.001)]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if batch <= x1:
            return y0 + (y1 - y0) * (batch - x0) / (x1 - x0)
    raise ValueError(batch)


def warm_cost(draft_per_token: float) -> CostModel:
    """A cost model that has seen drafts and verifications of every size."""
    cost = CostModel()
    for _ in range(5):
        for n in range(1, 10):
            cost.observe_draft(n, n * draft_per_token)
            cost.observe_verify(n, verify_seconds(n))
    return cost


def simulate(policy, acceptance, draft_per_token: float, *, tokens: int = 400, seed: int = 0,
             draft_max: int = 8, cost: CostModel | None = None) -> tuple[float, list[int]]:
    """Run `policy` against Bernoulli acceptance; returns (tokens per simulated second, k per step).

    With `cost`, the simulated timings are fed to it as generate() does (drafts only after a drafting step)."""
    rng = random.Random(seed)
    t = 0.0
    done = 0
    ks: list[int] = []
    while done < tokens:
        k = policy.choose(draft_max)
        accepted = 0
        while accepted < k and rng.random() < acceptance(done):
            accepted += 1
        policy.observe(k, accepted)
        if hasattr(policy, "cost"):  # as generate's speculator records every step
            policy.cost.observe_verified(k, accepted)
        if cost is not None:
            if k and ks and ks[-1]:
                cost.observe_draft(k, k * draft_per_token)
            cost.observe_verify(k + 1, verify_seconds(k + 1))
        t += k * draft_per_token + verify_seconds(k + 1)
        done += accepted + 1
        ks.append(k)
    return done / t, ks


def test_expensive_draft_and_low_acceptance_choose_no_draft():
    cost = warm_cost(1 / 72)
    policy = AdaptivePolicy(cost, 8)
    rate, ks = simulate(policy, lambda _: 0.2, 1 / 72)
    late = ks[50:]
    assert sum(k > 0 for k in late) <= len(late) * 0.05  # only the odd probe
    assert max(late) <= 1  # probes are small
    assert rate >= 0.97 / PLAIN  # never more than a few percent slower than no speculation


def test_high_acceptance_drafts_long():
    cost = warm_cost(1 / 2000)
    policy = AdaptivePolicy(cost, 8)
    rate, ks = simulate(policy, lambda _: 0.95, 1 / 2000)
    assert sum(ks[20:]) / len(ks[20:]) >= 3
    fixed, _ = simulate(FixedPolicy(8), lambda _: 0.95, 1 / 2000)
    assert rate >= 0.85 * fixed and rate >= 2.5 / PLAIN


def test_adaptive_is_never_much_slower_than_plain_nor_than_the_best_fixed_length():
    for per_token in (1 / 72, 1 / 400, 1e-5):
        for acc in (0.0, 0.5, 0.9):
            plain, _ = simulate(FixedPolicy(0), lambda _: acc, per_token)
            best = max(simulate(FixedPolicy(k), lambda _: acc, per_token)[0] for k in (1, 2, 4, 8))
            cost = CostModel()
            simulate(AdaptivePolicy(cost, 8), lambda _: acc, per_token, seed=1, cost=cost)  # an earlier request
            rate, _ = simulate(AdaptivePolicy(cost, 8), lambda _: acc, per_token, cost=cost)
            assert rate >= 0.97 * plain, (per_token, acc)
            assert rate >= 0.85 * max(best, plain), (per_token, acc)


def test_probes_recover_when_acceptance_rises():
    cost = warm_cost(1 / 72)
    policy = AdaptivePolicy(cost, 8)
    _, ks = simulate(policy, lambda done: 0.0 if done < 300 else 1.0, 1 / 72, tokens=900)
    switch = next(i for i, _ in enumerate(ks) if sum(1 + (k > 0) for k in ks[:i]) >= 300)  # about step 300
    before, after = ks[:switch], ks[switch:]
    assert 0 < sum(k > 0 for k in before[30:]) <= 10  # it kept probing, rarely
    recovered = next(i for i in range(len(after)) if all(k > 0 for k in after[i:i + 10]))
    assert recovered <= 200
    assert max(after) == 8


def test_cold_start_drafts_to_measure_costs():
    policy = AdaptivePolicy(CostModel(), 8)
    assert policy.choose(8) == 1


def test_draft_min_and_max_k_are_respected():
    policy = AdaptivePolicy(warm_cost(1e-5), 8, draft_min=3)
    for _ in range(50):
        policy.observe(policy.choose(8), 8)
    assert policy.choose(8) >= 3
    assert policy.choose(2) == 0  # nothing between draft_min and max_k
    assert AdaptivePolicy(warm_cost(1e-5), 8).choose(0) == 0


def test_declined_tokens_count_as_not_accepted():
    policy = AdaptivePolicy(warm_cost(1e-5), 4)
    for _ in range(30):
        policy.choose(4)
        policy.observe(0, 0)  # e.g. no n-gram match: nothing offered
        policy.cost.observe_verified(1, 0)  # (generate's speculator records the declined token likewise)
    assert policy.acceptance()[0] < 0.15


def test_fixed_policy_returns_draft_max():
    p = FixedPolicy(6)
    assert p.choose(6) == 6 and p.choose(3) == 3
    p.observe(6, 0)
    assert p.choose(6) == 6
    assert isinstance(make_policy("fixed", CostModel(), 6), FixedPolicy)
    with pytest.raises(ValueError):
        make_policy("greedy", CostModel(), 6)


def test_draft_policy_is_validated():
    assert GenParams().draft_policy == "adaptive"
    with pytest.raises(BadInputError) as e:
        GenParams(draft_policy="sometimes")
    assert e.value.param == "draft_policy"


def test_a_new_sequence_starts_from_the_drafters_long_run_acceptance():
    cost = warm_cost(1 / 200)  # a cheap draft: long drafts pay when acceptance is high
    fresh_first = AdaptivePolicy(cost, 8).choose(8)
    simulate(AdaptivePolicy(cost, 8), lambda _: 0.98, 1 / 200, seed=3)  # an earlier request, high acceptance
    warm_first = AdaptivePolicy(cost, 8).choose(8)
    assert fresh_first <= 2 and warm_first >= 6  # no ramp from the 0.5 prior for the next request
    for seed in range(10):  # then the drafter fails, request after request
        simulate(AdaptivePolicy(cost, 8), lambda _: 0.0, 1 / 200, seed=4 + seed, tokens=200)
    assert AdaptivePolicy(cost, 8).choose(8) < warm_first  # the next request starts more cautious
    _, ks = simulate(AdaptivePolicy(cost, 8), lambda _: 0.0, 1 / 200, seed=20, tokens=60)
    assert sum(k > 0 for k in ks) <= 3  # and stops within a step or two when its drafts fail too


def test_probes_are_never_too_short_to_show_that_drafting_pays():
    """F16 main + Q4_1 draft: a 1-token probe cannot pay even when accepted, so probing starts at 2 tokens,
    and a new drafter whose drafts all fail costs little while it probes."""
    cost = warm_cost(1 / 60)
    policy = AdaptivePolicy(cost, 8)
    shortest = policy._probe_length(1, 8)
    assert shortest is not None and shortest > 1 and policy.best(1, [1.0]) == 0
    rate, ks = simulate(policy, lambda _: 0.0, 1 / 60, tokens=300)
    assert min(k for k in ks if k > 0) >= shortest
    assert rate > 0.9 / verify_seconds(1)


def simulate_batch(policies, acceptance: float, draft_per_token: float, *, steps: int = 400,
                   seed: int = 0) -> tuple[float, float]:
    """`len(policies)` sequences decoded together, as a Scheduler does: each one's drafting runs in turn (it stalls
    the step) and all rows go into one verification decode. Returns (tokens per simulated second, mean k)."""
    rng = random.Random(seed)
    t, done, drafted = 0.0, 0, 0
    for _ in range(steps):
        ks = [p.choose(8, load=len(policies)) for p in policies]
        for p, k in zip(policies, ks):
            accepted = 0
            while accepted < k and rng.random() < acceptance:
                accepted += 1
            p.observe(k, accepted)
            if hasattr(p, "cost"):
                p.cost.observe_verified(k, accepted)
            done += accepted + 1
        drafted += sum(ks)
        t += sum(ks) * draft_per_token + verify_seconds(sum(ks) + len(ks))
    return done / t, drafted / steps / len(policies)


@pytest.mark.parametrize("load", [2, 4])
def test_under_load_a_draft_that_stalls_the_batch_is_not_used(load):
    """A draft token costing 0.4 of a lone main row pays alone at high acceptance, but in a batch of sequences its
    serial drafting stalls every sequence and costs more than the rows it saves."""
    per_token, acc = 0.4 * PLAIN, 0.8
    alone, k_alone = simulate_batch([AdaptivePolicy(warm_cost(per_token), 8)], acc, per_token)
    assert alone > 1.03 / PLAIN and k_alone > 1  # it pays alone
    plain, _ = simulate_batch([FixedPolicy(0) for _ in range(load)], acc, per_token)
    cost = warm_cost(per_token)
    rate, k = simulate_batch([AdaptivePolicy(cost, 8) for _ in range(load)], acc, per_token)
    assert rate >= 0.97 * plain
    assert k < 0.2  # only probes
    unaware, _ = simulate_batch([_LoadBlind(cost) for _ in range(load)], acc, per_token)
    assert unaware < 0.97 * plain  # pricing each sequence as if alone would have lost throughput


class _LoadBlind(AdaptivePolicy):
    """The policy as if every step were its sequence's alone."""

    def __init__(self, cost):
        super().__init__(cost, 8)

    def choose(self, max_k, backlog=0, load=1, remaining=None):
        return super().choose(max_k, backlog, 1, remaining)


def test_under_load_a_cheap_accurate_draft_still_pays():
    """An n-gram-like draft (almost free) with high acceptance: extra verification rows are still worth it."""
    per_token, acc = 1e-5, 0.9
    plain, _ = simulate_batch([FixedPolicy(0) for _ in range(4)], acc, per_token)
    rate, k = simulate_batch([AdaptivePolicy(warm_cost(per_token), 8) for _ in range(4)], acc, per_token)
    assert rate >= 1.3 * plain and k >= 2


# -- exploration that cannot starve: the policy over a server's lifetime ------------------------------------

def test_failed_probes_back_off_but_never_past_the_bound():
    """An always-wrong draft: probes spread out as they fail, and the spacing stops at max_streak, so a drafter
    that starts paying again is noticed within that many plain steps."""
    policy = AdaptivePolicy(warm_cost(1 / 72), 8)
    _, ks = simulate(policy, lambda _: 0.0, 1 / 72, tokens=1500)
    probes = [i for i, k in enumerate(ks) if k > 0]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps[0] < gaps[-1] <= policy.c.max_streak + 1
    assert max(gaps) <= policy.c.max_streak + 1


def test_one_unlucky_request_does_not_decide_the_next_requests_first_steps():
    """The issue's sequence: a short first request whose one draft is rejected, then ordinary requests. Each of
    those drafts as a request on a fresh cost model does (the old policy drafted nothing for the rest of the
    server's life)."""
    def request(cost, acc, tokens, seed):
        return simulate(AdaptivePolicy(cost, 8), lambda _: acc, 1 / 150, tokens=tokens, seed=seed, cost=cost)[1]

    fresh = [request(warm_cost(1 / 150), 0.8, 120, seed) for seed in range(4)]
    cost = warm_cost(1 / 150)
    request(cost, 0.0, 8, 99)  # "hi": one draft, rejected
    lifetime = [request(cost, 0.8, 120, seed) for seed in range(4)]
    for ks_fresh, ks_life in zip(fresh, lifetime):
        assert ks_life[0] > 0  # it opens with a draft or probe
        drafted_fresh = sum(k > 0 for k in ks_fresh) / len(ks_fresh)
        drafted_life = sum(k > 0 for k in ks_life) / len(ks_life)
        assert drafted_life >= 0.9 * drafted_fresh


def test_a_pathological_stretch_does_not_lower_what_later_requests_draft():
    """Ten requests whose drafts are always wrong, then ordinary ones: the drafter's shared record remembers the
    failures, but each new sequence still opens with a probe, and its own successes take over within a few steps."""
    cost = warm_cost(1 / 72)
    fresh = simulate(AdaptivePolicy(warm_cost(1 / 72), 8), lambda _: 0.85, 1 / 72, tokens=200, seed=7)[0]
    for seed in range(10):
        simulate(AdaptivePolicy(cost, 8), lambda _: 0.0, 1 / 72, tokens=100, seed=seed, cost=cost)
    after = simulate(AdaptivePolicy(cost, 8), lambda _: 0.85, 1 / 72, tokens=200, seed=7, cost=cost)[0]
    assert after >= 0.9 * fresh


def test_a_draft_that_really_stopped_paying_is_still_dropped():
    """Drafting paid, then every draft decode became ten times as slow (another process on the cores): the
    measured cost leaves no paying length, and the sequence stops drafting but for rare bounded probes."""
    cost = warm_cost(1 / 400)
    policy = AdaptivePolicy(cost, 8)
    ks = []
    for i in range(400):
        k = policy.choose(8)
        policy.observe(k, k)  # every token accepted
        if k and i >= 100:
            cost.observe_draft(k, 10 * k / 72)
        ks.append(k)
    assert sum(k > 0 for k in ks[:100]) >= 95
    assert sum(k > 0 for k in ks[200:]) <= 200 / policy.c.max_streak + 1


def test_a_probe_whose_catch_up_the_rest_of_the_request_cannot_pay_back_waits():
    """A 3,000-token prompt costs the drafter seconds to read; 160 tokens cannot pay that back, 20,000 can."""
    cost = warm_cost(1 / 72)
    cost.observe_catch_up(100, 100 * 0.3 / 72)  # a batched catch-up: 0.3 of a draft decode per token
    policy = AdaptivePolicy(cost, 8)
    assert not policy.expects_draft(8, backlog=3000, remaining=160)
    assert all(policy.choose(8, backlog=3000 + i, remaining=160 - i) == 0 for i in range(150))
    assert policy.expects_draft(8, backlog=3000, remaining=20000)
    assert AdaptivePolicy(cost, 8).choose(8, backlog=30, remaining=160) > 0  # a short prompt: open with a probe


def test_the_cost_model_reports_what_the_policy_believes():
    cost = warm_cost(1 / 72)
    policy = AdaptivePolicy(cost, 8)
    for _ in range(100):
        k = policy.choose(8)
        policy.observe(k, 0)
        cost.observe_verified(k, 0)  # (as generate's speculator records every step)
        cost.observe_choice(k)
    snap = cost.snapshot()
    assert snap["acceptance"] == {"greedy": 0.0} and snap["acceptance_weight"]["greedy"] > 0
    assert snap["verify_seconds"][1] == pytest.approx(verify_seconds(1), rel=0.01)
    assert snap["draft_seconds"][1] > 0 and snap["catch_up_seconds_per_token"] > 0
    assert snap["plain_steps"] > snap["draft_steps"] > 0
    assert 0 <= snap["plain_steps_since_draft"] <= AdaptivePolicy(cost, 8).c.max_streak

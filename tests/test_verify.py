"""Verification maths on hand-built distributions (pure: no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tandem.spec.sampling import SamplingParams, probs, sample
from tandem.spec.verify import DraftProposal, uniforms_needed, verify

GREEDY = SamplingParams()
T1 = SamplingParams(temperature=1.0)


def logits_for(p: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(p, 1e-30)).astype(np.float32)


def tv(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(a - b).sum())


def tv_bound(p: np.ndarray, n: int, sigmas: float = 4.0) -> float:
    """A bound on TV(empirical, p) for n samples: `sigmas` standard deviations in every cell."""
    return 0.5 * sigmas * float(np.sqrt(p * (1 - p) / n).sum())


# -- greedy ---------------------------------------------------------------------------------------
def onehot_rows(tokens: list[int], v: int = 10) -> np.ndarray:
    x = np.zeros((len(tokens), v), dtype=np.float32)
    x[np.arange(len(tokens)), tokens] = 5.0
    return x


@pytest.mark.parametrize("draft, target, accepted, nxt, bonus", [
    ([1, 2, 3], [1, 2, 3, 4], 3, 4, True),     # all accepted: bonus token
    ([1, 2, 3], [1, 7, 3, 4], 1, 7, False),    # second rejected: recovered token 7
    ([1, 2, 3], [9, 2, 3, 4], 0, 9, False),    # first rejected
    ([], [5], 0, 5, True),                     # no draft: a plain step
])
def test_greedy_accepts_matching_prefix(draft, target, accepted, nxt, bonus):
    r = verify(DraftProposal(draft), onehot_rows(target), GREEDY, np.zeros(0))
    assert (r.accepted, r.next_token, r.bonus) == (accepted, nxt, bonus)
    assert r.tokens(DraftProposal(draft)) == [*draft[:accepted], nxt]


# -- rejection sampling: the output distribution is the target's ---------------------------------
P0 = np.array([0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.01, 0.01])
Q0 = np.array([0.05, 0.05, 0.10, 0.40, 0.20, 0.10, 0.05, 0.05])
P1 = np.array([0.05, 0.05, 0.05, 0.05, 0.10, 0.10, 0.20, 0.40])
Q1 = np.array([0.30, 0.10, 0.10, 0.10, 0.10, 0.10, 0.10, 0.10])


def run_steps(n: int, with_q: bool, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """Simulate n verification steps of a 2-token draft; return counts of the 1st token, and of the 2nd
    token in steps whose first draft token was accepted."""
    rng = np.random.default_rng(seed)
    target = np.stack([logits_for(P0), logits_for(P1), logits_for(P0)])
    first, second = np.zeros(8), np.zeros(8)
    for _ in range(n):
        x0, x1 = sample(Q0, rng.random()), sample(Q1, rng.random())
        prop = DraftProposal([x0, x1], np.stack([Q0, Q1]) if with_q else None)
        r = verify(prop, target, T1, rng.random(uniforms_needed(2)))
        out = r.tokens(prop)
        first[out[0]] += 1
        if r.accepted >= 1:
            second[out[1]] += 1
    return first, second


@pytest.mark.parametrize("with_q", [True, False], ids=["rejection-sampling", "sample-and-compare"])
def test_output_matches_target_distribution(with_q):
    assert tv(P0, Q0) > 0.3 and tv(P1, Q1) > 0.3  # the draft is far from the target
    n = 100_000
    first, second = run_steps(n, with_q)
    assert tv(first / n, P0) < tv_bound(P0, n)
    m = int(second.sum())
    assert m > 10_000
    assert tv(second / m, P1) < tv_bound(P1, m)


def test_the_test_can_fail():
    """Accepting every draft token (a classic bug) is caught by the same bound."""
    n = 20_000
    rng = np.random.default_rng(0)
    firsts = np.bincount([sample(Q0, rng.random()) for _ in range(n)], minlength=8)
    assert tv(firsts / n, P0) > 10 * tv_bound(P0, n)


def test_rejection_sampling_acceptance_rate_is_overlap():
    """Acceptance probability of one draft token is sum(min(p, q)) = 1 - TV(p, q)."""
    n = 50_000
    rng = np.random.default_rng(7)
    target = np.stack([logits_for(P0), logits_for(P0)])
    acc = 0
    for _ in range(n):
        x = sample(Q0, rng.random())
        acc += verify(DraftProposal([x], Q0[None]), target, T1, rng.random(3)).accepted
    expected = float(np.minimum(P0, Q0).sum())
    assert abs(acc / n - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_verify_is_deterministic_given_uniforms():
    rng = np.random.default_rng(3)
    target = np.stack([logits_for(P0), logits_for(P1), logits_for(P0)])
    u = rng.random(uniforms_needed(2))
    prop = DraftProposal([3, 7], np.stack([Q0, Q1]))
    assert verify(prop, target, T1, u) == verify(prop, target, T1, u.copy())


# -- sampling filters -----------------------------------------------------------------------------
def test_filters_apply_in_order():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    assert np.count_nonzero(probs(logits, SamplingParams(temperature=1, top_k=2))) == 2
    p = probs(logits, SamplingParams(temperature=1, top_p=0.8))
    assert np.count_nonzero(p) == 3 and math.isclose(p.sum(), 1.0)
    assert np.count_nonzero(probs(logits, SamplingParams(temperature=1, min_p=0.3))) == 3
    cold = probs(logits, SamplingParams(temperature=0.1))
    assert cold[0] > 0.99


def test_sample_is_inverse_cdf():
    p = np.array([0.25, 0.5, 0.25])
    assert [sample(p, u) for u in (0.0, 0.24, 0.26, 0.74, 0.76, 0.999999)] == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": -1}, {"top_p": 0}, {"top_p": 1.5},
                                    {"min_p": 2}])
def test_bad_sampling_params_are_refused(kwargs):
    from tandem.errors import BadInputError

    with pytest.raises(BadInputError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == next(iter(kwargs)) and e.value.fix

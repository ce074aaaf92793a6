"""The cost model: seconds by decode size (SizeCost) and by how full the KV cache is (KvCost). Pure maths."""

from __future__ import annotations

import pytest

from tandem.spec.costs import KV_BUCKET, KV_LINEAR, CostModel, KvCost, SizeCost, kv_bucket
from tandem.spec.policy import AdaptivePolicy


def test_size_cost_fits_a_line_and_trusts_well_measured_sizes():
    c = SizeCost(fixed_share=0.9)
    for _ in range(4):
        for n in (1, 3, 5):
            c.observe(n, 0.02 + 0.002 * n)
    a, b = c.line()
    assert a == pytest.approx(0.02, rel=1e-6) and b == pytest.approx(0.002, rel=1e-6)
    assert c(9) == pytest.approx(0.038)  # unobserved: from the line
    c.observe(2, 0.5)
    assert c(2) == pytest.approx(c.line()[0] + 2 * c.line()[1])  # one observation is not trusted yet


def test_size_cost_is_robust_to_one_outlier():
    c = SizeCost(fixed_share=0.9)
    for _ in range(10):
        c.observe(1, 0.02)
    c.observe(1, 2.0)  # the process was preempted for two seconds
    assert c(1) < 0.02 * 1.25


def test_size_cost_with_one_size_uses_the_fixed_share():
    verify = SizeCost(fixed_share=0.9)
    verify.observe(1, 0.02)
    assert verify(1) == pytest.approx(0.02) and verify(5) == pytest.approx(0.018 + 5 * 0.002)
    draft = SizeCost(fixed_share=0.0)
    draft.observe(2, 0.02)
    assert draft(4) == pytest.approx(0.04)


def test_kv_buckets_follow_llama_cpps_256_cell_padding_then_grow_geometrically():
    assert kv_bucket(0) == kv_bucket(1) == kv_bucket(256) == 0
    assert kv_bucket(257) == 1 and kv_bucket(512) == 1 and kv_bucket(513) == 2
    assert kv_bucket(KV_LINEAR) == KV_LINEAR // KV_BUCKET - 1
    big = [kv_bucket(n) for n in (5000, 8192, 16384, 131072)]
    assert big == sorted(set(big)) and big[-1] < 80  # a 128k context needs a few dozen buckets, not 512


def f32_verify(size: int, pos: int) -> float:
    """F32 SmolLM2-135M main on 2 cores (issue 6 measurements): 25.6 ms for 1 token and 82.9 ms for 17 at KV
    position 200; 35.4 and 164 ms at 2,000."""
    grow = pos / 1800
    return 0.0221 + 0.0035 * size + grow * (0.0063 + 0.0045 * size) if pos > 200 else 0.0221 + 0.0035 * size


def test_costs_learnt_at_long_context_leave_short_context_estimates_alone():
    c = KvCost(fixed_share=0.9)
    for pos in (100, 2000):
        c.at = pos
        for _ in range(5):
            for n in (1, 9, 17):
                c.observe(n, f32_verify(n, pos))
    c.at = 100
    assert c(17) == pytest.approx(f32_verify(17, 100))
    c.at = 2000
    assert c(17) == pytest.approx(f32_verify(17, 2000))


def test_a_new_bucket_starts_from_its_neighbour_scaled_by_what_it_measures():
    c = KvCost(fixed_share=0.9)
    for _ in range(5):
        for n in (1, 9, 17):
            c.observe(n, f32_verify(n, 100))
    c.at = 1000  # every step drafts there: only 17-token verifications are measured
    for _ in range(20):
        c.observe(17, 1.5 * f32_verify(17, 100))
    assert c(17) == pytest.approx(1.5 * f32_verify(17, 100), rel=1e-3)
    assert c(1) == pytest.approx(1.5 * f32_verify(1, 100), rel=0.02)  # scaled, not the stale short-context cost
    c.at = 3000  # never reached: the nearest measured bucket answers
    assert c(1) == pytest.approx(1.5 * f32_verify(1, 100), rel=0.02)
    assert KvCost(fixed_share=0.9)(1) == 0.0


def test_locate_sets_where_the_main_model_and_the_draft_are():
    cost = CostModel()
    cost.locate(2000, 100)
    cost.observe_verify(17, 0.164)
    cost.observe_draft(16, 0.160)
    assert cost.verify.at == 2000 and cost.draft.at == 100
    assert cost.verify.buckets() == [kv_bucket(2017)] and cost.draft.buckets() == [kv_bucket(116)]


def test_long_context_costs_do_not_stop_drafting_in_the_next_short_request():
    """A full-context draft slows down at long context (Q4_1: 10 ms a token at 200, 20 ms at 2,000; here 30 ms,
    so that drafting does not pay there). Learnt without the position, the long-context costs made the next
    request start with no draft length that pays, and the policy never drafted again (issue 6 bench)."""
    cost = CostModel()
    draft = {200: 0.010, 2000: 0.030}
    for pos in (200, 2000):
        cost.locate(pos, pos)
        for _ in range(5):
            for k in range(1, 17):
                cost.observe_draft(k, k * draft[pos])
                cost.observe_verify(k + 1, f32_verify(k + 1, pos))
            cost.observe_verify(1, f32_verify(1, pos))
    for _ in range(50):  # high acceptance history
        for i in range(16):
            cost.observe_accept(True)
    policy = AdaptivePolicy(cost, 16)
    cost.locate(2000, 2000)
    assert policy.best(16) == 0
    cost.locate(200, 200)
    assert policy.best(16) >= 4

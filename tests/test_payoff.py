"""The load-time check of whether a draft can pay at all (tandem.spec.payoff): the pure maths."""

from __future__ import annotations

import pytest

from tandem.spec.payoff import best_case_speedup

# Costs Runtime timed at load on the 2-core machine (2026-12-01), seconds: verification by batch size, a draft
# token (the packaged Q4_1), and a lone-row plain main token.
F32_VERIFY = {1: 0.0409, 2: 0.0389, 3: 0.0399, 5: 0.0461, 9: 0.0611, 17: 0.0857}
Q8_0_VERIFY = {1: 0.0234, 2: 0.0231, 3: 0.0314, 5: 0.0383, 9: 0.0496, 17: 0.0773}


def test_the_default_pair_can_pay():
    ratio, k = best_case_speedup(F32_VERIFY, 0.0129, 0.0301, 16)
    assert k == 16 and ratio == pytest.approx(17 / (16 * 0.0129 + 0.0857) * 0.0301)
    assert ratio > 1.5


def test_a_draft_as_dear_as_a_main_token_cannot():
    ratio, k = best_case_speedup(Q8_0_VERIFY, 0.0143, 0.0137, 16)
    assert ratio < 0.8 and k == 16  # what the load-time warning reports (measured: 0.64x at real acceptance)


def test_only_measured_lengths_within_draft_max_count():
    assert best_case_speedup(F32_VERIFY, 0.0129, 0.0301, 4)[1] == 4   # 5 rows: the longest allowed
    assert best_case_speedup(F32_VERIFY, 0.0129, 0.0301, 3)[1] == 2   # 4 rows were not measured
    assert best_case_speedup({1: 0.04}, 0.01, 0.03, 8) == (0.0, 0)      # no verification batch measured
    assert best_case_speedup(F32_VERIFY, 0.0129, 0.0301, 0) == (0.0, 0)

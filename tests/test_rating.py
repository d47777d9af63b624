"""Rating: hand-computed tables for the usual schemes, and properties over all rates."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prepaid.rating import (
    Rate,
    affordable_blocks,
    billed_seconds,
    block_cost,
    blocks_for,
    cost,
    covered_seconds,
    max_call_seconds,
)

# 0.0123/min = 12,300 micro-units a minute
R60 = Rate("353", "Ireland", 12_300, 0, 60, 60)
R30_6 = Rate("3538", "Ireland mobile", 50_000, 10_000, 30, 6)
R1 = Rate("44", "UK", 20_000, 0, 1, 1)


@pytest.mark.parametrize(("rate", "duration", "billed", "micros"), [
    (R60, 0, 0, 0),
    (R60, 1, 60, 12_300),
    (R60, 59, 60, 12_300),
    (R60, 60, 60, 12_300),  # exactly one increment, not two
    (R60, 61, 120, 24_600),
    (R60, 3600, 3600, 738_000),
    (R30_6, 1, 30, 10_000 + 25_000),
    (R30_6, 30, 30, 35_000),
    (R30_6, 31, 36, 10_000 + 30_000),
    (R30_6, 36, 36, 40_000),
    (R30_6, 37, 42, 10_000 + 35_000),
    (R30_6, 60, 60, 10_000 + 50_000),
    (R1, 1, 1, 334),  # 20,000/60 = 333.33.. rounded up once
    (R1, 3, 3, 1_000),
    (R1, 61, 61, 20_334),
    (R1, 3600, 3600, 1_200_000),
])
def test_hand_computed_costs(rate: Rate, duration: int, billed: int, micros: int) -> None:
    assert billed_seconds(rate, duration) == billed
    assert cost(rate, duration) == micros


def test_minimum_duration_stretches_the_first_block() -> None:
    rate = Rate("9", "premium", 60_000, 0, 30, 6, minimum=45)
    assert rate.first_block == 48  # 30 + 3 x 6 covers 45
    assert billed_seconds(rate, 1) == 48
    assert billed_seconds(rate, 49) == 54
    assert cost(rate, 10) == 48_000


rates = st.builds(
    Rate, prefix=st.just("1"), name=st.just("x"),
    per_minute=st.integers(0, 10_000_000), connect_fee=st.integers(0, 1_000_000),
    initial=st.integers(1, 120), increment=st.integers(1, 120), minimum=st.integers(0, 300))


@given(rates, st.integers(0, 20_000), st.integers(0, 20_000))
def test_cost_is_monotonic_in_duration(rate: Rate, a: int, b: int) -> None:
    lo, hi = sorted((a, b))
    assert cost(rate, lo) <= cost(rate, hi)
    assert billed_seconds(rate, lo) <= billed_seconds(rate, hi)


@given(rates, st.integers(1, 20_000))
def test_billed_is_at_least_duration_and_on_a_block_boundary(rate: Rate, d: int) -> None:
    billed = billed_seconds(rate, d)
    assert billed >= d
    assert billed == covered_seconds(rate, blocks_for(rate, d))
    # a call that lasts exactly a boundary is billed to that boundary, not the next
    assert billed_seconds(rate, billed) == billed


@given(rates, st.integers(1, 200))
def test_blocks_paid_one_by_one_add_up_to_the_cost(rate: Rate, n: int) -> None:
    assert sum(block_cost(rate, i) for i in range(1, n + 1)) == cost(
        rate, covered_seconds(rate, n))
    assert all(block_cost(rate, i) >= 0 for i in range(1, n + 1))


@given(rates, st.integers(0, 50_000_000), st.integers(1, 14_400))
def test_affordable_blocks_is_the_most_that_fits(rate: Rate, available: int, cap: int) -> None:
    n = affordable_blocks(rate, available, cap)
    assert cost(rate, covered_seconds(rate, n)) <= available
    if covered_seconds(rate, n) < cap:
        assert cost(rate, covered_seconds(rate, n + 1)) > available
    assert max_call_seconds(rate, available, cap) <= cap


def test_max_call_seconds_examples() -> None:
    assert max_call_seconds(R60, 12_299, 3600) == 0
    assert max_call_seconds(R60, 12_300, 3600) == 60
    assert max_call_seconds(R60, 24_599, 3600) == 60
    assert max_call_seconds(R60, 10_000_000, 3600) == 3600
    assert max_call_seconds(R1, 1_000, 3600) == 3

"""Tests of metrix_s2s.backoff: full-jitter backoff and Retry-After as a capped floor."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from metrix_s2s.backoff import compute_backoff, retry_delay

BASE = 2.0
MAX = 120.0


def always(value: float) -> Callable[[], float]:
    return lambda: value


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [
        (1, 2.0),
        (2, 4.0),
        (3, 8.0),
        (4, 16.0),
        (5, 32.0),
        (6, 64.0),
        (7, 120.0),
        (8, 120.0),
        (9, 120.0),
        (10, 120.0),
    ],
    ids=str,
)
def test_the_ceiling_doubles_from_the_base_up_to_the_maximum(attempt: int, ceiling: float) -> None:
    assert compute_backoff(attempt, base_s=BASE, max_s=MAX, rand=always(1.0)) == ceiling


@pytest.mark.parametrize("attempt", [1, 2, 7, 100])
def test_a_zero_draw_gives_no_wait(attempt: int) -> None:
    assert compute_backoff(attempt, base_s=BASE, max_s=MAX, rand=always(0.0)) == 0.0


@pytest.mark.parametrize(
    ("attempt", "draw", "expected"),
    [
        pytest.param(1, 0.5, 1.0, id="half-of-2"),
        pytest.param(4, 0.25, 4.0, id="quarter-of-16"),
        pytest.param(20, 0.5, 60.0, id="half-of-max"),
    ],
)
def test_the_wait_is_the_draw_times_the_ceiling(attempt: int, draw: float, expected: float) -> None:
    assert compute_backoff(attempt, base_s=BASE, max_s=MAX, rand=always(draw)) == expected


@pytest.mark.parametrize(
    "attempt",
    [
        pytest.param(64, id="64"),
        pytest.param(1025, id="1025"),
        pytest.param(10**6, id="a-million"),
        pytest.param(10**100, id="googol"),
    ],
)
def test_huge_attempt_numbers_do_not_overflow(attempt: int) -> None:
    delay = compute_backoff(attempt, base_s=BASE, max_s=MAX, rand=always(1.0))

    assert delay == MAX
    assert math.isfinite(delay)


@pytest.mark.parametrize("attempt", [0, -1, -100])
def test_attempt_numbers_below_one_use_the_base(attempt: int) -> None:
    assert compute_backoff(attempt, base_s=BASE, max_s=MAX, rand=always(1.0)) == BASE


def test_the_default_draw_stays_within_the_ceiling() -> None:
    delays = [compute_backoff(3, base_s=BASE, max_s=MAX) for _ in range(200)]

    assert all(0.0 <= delay <= 8.0 for delay in delays)
    assert len(set(delays)) > 1


# -- retry_delay -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "retry_after", "draw", "expected"),
    [
        pytest.param(1, 7.0, 0.0, 7.0, id="floor-over-a-zero-draw"),
        pytest.param(5, 30.0, 0.5, 30.0, id="floor-over-a-smaller-backoff"),
        pytest.param(1, 0.0, 0.0, 0.0, id="zero-retry-after"),
        pytest.param(1, 500.0, 0.0, 120.0, id="capped-at-the-maximum"),
        pytest.param(1, 1e12, 1.0, 120.0, id="absurd-value-capped"),
        pytest.param(1, math.inf, 0.0, 120.0, id="infinity-capped"),
        pytest.param(3, 1.0, 1.0, 8.0, id="ignored-below-the-backoff"),
        pytest.param(7, 60.0, 1.0, 120.0, id="ignored-below-the-max-backoff"),
        pytest.param(3, None, 1.0, 8.0, id="none-gives-the-backoff"),
        pytest.param(3, None, 0.0, 0.0, id="none-with-zero-draw"),
    ],
)
def test_retry_after_is_a_capped_floor(
    attempt: int, retry_after: float | None, draw: float, expected: float
) -> None:
    delay = retry_delay(
        attempt,
        retry_after,
        base_s=BASE,
        max_s=MAX,
        retry_after_max_s=120.0,
        rand=always(draw),
    )

    assert delay == expected


@pytest.mark.parametrize(
    ("retry_after_max", "expected"),
    [
        pytest.param(10.0, 10.0, id="cap-10"),
        pytest.param(300.0, 300.0, id="cap-above-the-backoff-max"),
        pytest.param(0.0, 0.0, id="cap-0-ignores-the-header"),
    ],
)
def test_the_retry_after_cap_is_its_own_setting(retry_after_max: float, expected: float) -> None:
    delay = retry_delay(
        1, 3600.0, base_s=BASE, max_s=MAX, retry_after_max_s=retry_after_max, rand=always(0.0)
    )

    assert delay == expected

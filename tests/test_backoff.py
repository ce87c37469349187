"""Backoff: the delay sequence, its ceiling, reset, and what it refuses."""

from __future__ import annotations

import pytest

from sessionsync.daemon.backoff import Backoff


def test_delays_double_from_low_and_stop_at_high() -> None:
    backoff = Backoff(1.0, 30.0)
    assert [backoff.next() for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_reset_starts_again_from_low() -> None:
    backoff = Backoff(0.5, 30.0)
    backoff.next(), backoff.next(), backoff.next()
    backoff.reset()
    assert [backoff.next() for _ in range(3)] == [0.5, 1.0, 2.0]


def test_reset_before_any_failure_changes_nothing() -> None:
    backoff = Backoff(5.0, 300.0)
    backoff.reset()
    assert backoff.next() == 5.0


def test_a_ceiling_that_is_not_a_power_of_two_away_is_reached_exactly() -> None:
    backoff = Backoff(5.0, 12.0)
    assert [backoff.next() for _ in range(4)] == [5.0, 10.0, 12.0, 12.0]


def test_equal_low_and_high_is_a_constant_delay() -> None:
    backoff = Backoff(2.0, 2.0)
    assert [backoff.next() for _ in range(3)] == [2.0, 2.0, 2.0]


@pytest.mark.parametrize(("low", "high"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_a_zero_negative_or_inverted_range_is_refused(low: float, high: float) -> None:
    with pytest.raises(ValueError, match="0 < low <= high"):
        Backoff(low, high)

"""Waiting for a condition, never for time: poll until true, with a deadline.

`wait_for` fails the test (AssertionError, naming the last value) at the deadline; `poll` returns
None there instead, for a caller that reports a timeout its own way (the chaos run records it and
goes on, the live bench prints it as a figure).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_INTERVAL_S = 0.02


class TimedOut(AssertionError):
    """A condition still false at its deadline."""


def wait_for(condition: Callable[[], T], timeout: float = 10.0, interval: float = DEFAULT_INTERVAL_S) -> T:
    """Call `condition` until it returns something truthy and return that. It is called at least
    once, and once more at the deadline; an exception it raises ends the wait at once."""
    met, last = _poll(condition, timeout, interval)
    if not met:
        raise TimedOut(f"condition not met within {timeout:g} s (last value: {last!r})")
    return last


def poll(condition: Callable[[], T], timeout: float, interval: float = DEFAULT_INTERVAL_S) -> T | None:
    """`wait_for`, returning None at the deadline instead of failing."""
    met, last = _poll(condition, timeout, interval)
    return last if met else None


def _poll(condition: Callable[[], T], timeout: float, interval: float) -> tuple[bool, T]:
    deadline = time.monotonic() + timeout
    while True:
        last = condition()
        if last:
            return True, last
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False, last
        time.sleep(min(interval, remaining))

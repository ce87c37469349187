"""Retry delays that double while failures repeat: one helper for every loop that waits out an outage.

Pure: it never sleeps and never reads a clock. The caller waits (on its stop event, so that a
shutdown is not held up by a long delay) and says when an attempt succeeded.
"""

from __future__ import annotations


class Backoff:
    """Delays from `low` doubling up to `high`: `next()` gives the delay before the next attempt,
    `reset()` (after a success) starts again from `low`."""

    def __init__(self, low: float, high: float) -> None:
        if not 0 < low <= high:
            raise ValueError(f"backoff needs 0 < low <= high, not low={low} and high={high}")
        self.low = low
        self.high = high
        self._next = low

    def next(self) -> float:
        """The delay to wait now; the one after it is twice as long, up to `high`."""
        delay = self._next
        self._next = min(self.high, delay * 2)
        return delay

    def reset(self) -> None:
        self._next = self.low

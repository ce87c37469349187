"""Progress of long work: a bar on a terminal (tqdm), or a log line every few seconds (the daemon).

Both take `(done, total)` sessions. tqdm costs about 60 ms to import, so it is imported only when
the output is a terminal: a command in a script or a pipe pays nothing and prints nothing extra.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

from loguru import logger

LOG_EVERY_S = 5.0

ProgressFn = Callable[[int, int], None]


@contextmanager
def terminal_progress(stream: IO[str], what: str = "sessions") -> Iterator[ProgressFn | None]:
    """A callback drawing a bar (done / total, rate, ETA) on `stream`, or None when it is not a
    terminal. The bar is cleared when the block ends, leaving the line to the summary."""
    if not stream.isatty():
        yield None
        return
    from tqdm import tqdm

    # A terminal that reports no size (a bare pseudo-terminal) would get a bar 0 columns wide.
    columns = shutil.get_terminal_size().columns
    bar = tqdm(total=0, unit=f" {what}", file=stream, leave=False, ncols=columns)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
        bar.refresh()  # the last count is drawn even when it came within tqdm's refresh interval
    finally:
        bar.close()


class LogProgress:
    """Logs `label: done/total sessions (pct), rate, ETA` every `every_s` once the work has lasted
    that long: a short pass logs nothing but its summary."""

    def __init__(self, label: str, every_s: float = LOG_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self._label = label
        self._every_s = every_s
        self._clock = clock
        self._started = clock()
        self._last = self._started

    def __call__(self, done: int, total: int) -> None:
        now = self._clock()
        if now - self._last < self._every_s:
            return
        self._last = now
        rate = done / max(now - self._started, 1e-9)
        left = (total - done) / rate if rate > 0 else 0.0
        logger.info(
            "{}: {}/{} sessions ({:.0f} %), {:.0f}/s, about {:.0f} s left",
            self._label,
            done,
            total,
            100 * done / total if total else 100,
            rate,
            left,
        )

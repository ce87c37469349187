"""Signals that arrive before the daemon is up, kept for it instead of killing it.

`systemctl reload` right after a start sends SIGHUP while the daemon is still importing its
libraries or waiting for the database; Python's default action would end it without a word. So
`sessionsync run` installs these handlers first thing, and the service replays what came: a
reload is applied once it is up, a stop request stops it as soon as it can.
"""

from __future__ import annotations

import signal
from types import FrameType

CAUGHT = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


class EarlySignals:
    """Records which of SIGHUP, SIGTERM and SIGINT arrived since `install()`."""

    def __init__(self) -> None:
        self.received: set[int] = set()

    def install(self) -> EarlySignals:
        for sig in CAUGHT:
            signal.signal(sig, self._record)
        return self

    def _record(self, sig: int, _frame: FrameType | None) -> None:
        self.received.add(sig)

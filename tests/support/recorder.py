"""What a watcher reports, collected for watcher tests: waits on a Condition, never for time."""

from __future__ import annotations

import threading
from collections.abc import Callable

from sessionsync.models.keys import SessionKey


class Recorder:
    """Collects what the watcher reports; `wait` blocks until a condition holds or fails at a deadline."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.keys: list[SessionKey] = []
        self.resyncs: list[tuple[str, str]] = []

    def on_key(self, key: SessionKey) -> None:
        with self.cond:
            self.keys.append(key)
            self.cond.notify_all()

    def on_resync(self, project: str, reason: str) -> None:
        with self.cond:
            self.resyncs.append((project, reason))
            self.cond.notify_all()

    def wait(self, condition: Callable[[], bool], timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(condition, timeout)

    def expect_keys(self, *keys: SessionKey) -> None:
        assert self.wait(lambda: set(keys) <= set(self.keys)), f"missing {set(keys) - set(self.keys)}"

    def expect_resync(self, project: str, reason: str, count: int = 1) -> None:
        assert self.wait(lambda: self.resyncs.count((project, reason)) >= count), (
            f"no {count} x {reason!r} for {project}; got {self.resyncs}"
        )

    def clear(self) -> None:
        with self.cond:
            self.keys.clear()
            self.resyncs.clear()

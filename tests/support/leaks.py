"""Leaked database connections: every pool connection checked out while a test ran must be back in
its pool when the test (and its fixtures) are done, and returned by whoever took it, not by the
garbage collector.

This is what `engine.pool.checkedout() == 0` checks, kept per connection, for every pool in the
process, from SQLAlchemy's pool events. Asking the pools afterwards would miss most leaks: tests
and the store dispose of their engines (a disposed pool is replaced, and the old one counts its
missing connections as zero), readers use NullPool (which does not count), and a connection left
open in a local variable goes back to its pool, by the garbage collector, the moment the test's
frame is gone (SQLAlchemy resets it there, without a word on a synchronous driver).
"""

from __future__ import annotations

import sys
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from sqlalchemy import event
from sqlalchemy.pool import Pool

_REPO = Path(__file__).resolve().parents[2]
_OURS = tuple(str(_REPO / top) for top in ("tests", "daemon", "models", "bench"))
_SUPPORT = str(Path(__file__).resolve().parent)
_FRAMES = 6  # of our own code, innermost first, to say where a connection was taken


@dataclass
class _Checkout:
    fairy: weakref.ref[Any]  # what the pool handed out; dead once it was garbage collected
    where: list[str]
    thread: str


@dataclass
class Leaks:
    """What a test left behind: connections still out, and connections the garbage collector returned."""

    out: list[_Checkout] = field(default_factory=list)
    collected: list[_Checkout] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.out or self.collected)

    def message(self) -> str:
        lines = [
            f"leaked database connection(s): {len(self.out)} still checked out after the test, "
            f"{len(self.collected)} never closed (returned to the pool by the garbage collector)"
        ]
        for label, found in (("still checked out", self.out), ("never closed", self.collected)):
            for checkout in found:
                lines.append(f"  {label}, taken in thread {checkout.thread!r} at:")
                lines.extend(f"    {frame}" for frame in checkout.where or ["(no frame of this repository)"])
        return "\n".join(lines)


class ConnectionLedger:
    """Listens to every pool's checkouts and checkins (all pools: the listeners are on the Pool
    class) while entered; `begin()` and `end()` bracket one test. Thread-safe: worker threads
    check connections out too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._out: dict[int, _Checkout] = {}  # by id() of the connection record, while checked out
        self._collected: list[_Checkout] = []
        self._counting = False

    def __enter__(self) -> ConnectionLedger:
        event.listen(Pool, "checkout", self._on_checkout)
        event.listen(Pool, "checkin", self._on_checkin)
        event.listen(Pool, "detach", self._on_detach)  # no longer the pool's, so never checked in
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _exc: BaseException | None, _tb: TracebackType | None
    ) -> None:
        event.remove(Pool, "checkout", self._on_checkout)
        event.remove(Pool, "checkin", self._on_checkin)
        event.remove(Pool, "detach", self._on_detach)

    def begin(self) -> None:
        """Start one test's count: what earlier tests left is not this one's."""
        with self._lock:
            self._out.clear()
            self._collected.clear()
            self._counting = True

    def end(self) -> Leaks:
        """Stop counting and say what the test left behind."""
        with self._lock:
            self._counting = False
            leaks = Leaks(list(self._out.values()), list(self._collected))
            self._out.clear()
            self._collected.clear()
        return leaks

    def _on_checkout(self, _dbapi: Any, record: Any, fairy: Any) -> None:
        if not self._counting:
            return
        checkout = _Checkout(weakref.ref(fairy), _where(sys._getframe(1)), threading.current_thread().name)
        with self._lock:
            if self._counting:
                self._out[id(record)] = checkout

    def _on_checkin(self, _dbapi: Any, record: Any) -> None:
        with self._lock:
            checkout = self._out.pop(id(record), None)
            # On a close() the connection handed out is alive here; when the garbage collector
            # returns it, it is gone already.
            if checkout is not None and checkout.fairy() is None:
                self._collected.append(checkout)

    def _on_detach(self, _dbapi: Any, record: Any) -> None:
        with self._lock:
            self._out.pop(id(record), None)


def _where(frame: FrameType | None) -> list[str]:
    """The innermost frames of this repository's code (this module's aside) that led here."""
    found: list[str] = []
    while frame is not None and len(found) < _FRAMES:
        path = frame.f_code.co_filename
        if path.startswith(_OURS) and not path.startswith(_SUPPORT + "/leaks"):
            found.append(f"{path.removeprefix(str(_REPO) + '/')}:{frame.f_lineno} in {frame.f_code.co_name}")
        frame = frame.f_back
    return found

"""The work queue and the worker threads that drain it into the store.

The queue holds dirty session keys, each at most once, so its size is bounded by the number of
sessions however fast events come. A key taken by a worker (or claimed by a reconcile) is in
flight: nobody else may take it until it is done, and if it turns dirty meanwhile it is queued
again afterwards. So one session is never written by two threads at once, and since the file is
read when the key is processed, the newest content wins.

While the database is unreachable, taken keys go back to the queue and the workers back off;
one line is logged when the outage starts and one when it ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from sessionsync.daemon.backoff import Backoff
from sessionsync.daemon.results import BatchResult
from sessionsync.daemon.store import is_transient
from sessionsync.models.keys import SessionKey

BatchFn = Callable[[Sequence[SessionKey]], BatchResult]


class WorkQueue:
    """Dirty keys, each pending at most once, in arrival order; plus the in-flight set."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: dict[SessionKey, None] = {}  # insertion-ordered set
        self._in_flight: set[SessionKey] = set()
        self._again: set[SessionKey] = set()  # dirtied while in flight
        self._paused = False
        self._closed = False

    def submit(self, keys: Iterable[SessionKey]) -> None:
        with self._cond:
            for key in keys:
                if key in self._in_flight:
                    self._again.add(key)
                else:
                    self._pending[key] = None
            self._cond.notify_all()

    def take(self, limit: int, timeout: float | None = None) -> list[SessionKey]:
        """Up to `limit` keys, marked in flight; [] on timeout, when paused, or once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or (self._pending and not self._paused), timeout)
            if self._closed or self._paused:
                return []
            batch = []
            for key in self._pending:
                batch.append(key)
                if len(batch) >= limit:
                    break
            for key in batch:
                del self._pending[key]
                self._in_flight.add(key)
            return batch

    def done(self, keys: Iterable[SessionKey], retry: bool = False) -> None:
        """Release keys; with retry (or when dirtied meanwhile) they are pending again."""
        with self._cond:
            for key in keys:
                self._in_flight.discard(key)
                if retry or key in self._again:
                    self._again.discard(key)
                    self._pending[key] = None
            self._cond.notify_all()

    @contextmanager
    def claim(self, keys: Sequence[SessionKey]) -> Iterator[None]:
        """Hold these keys for a direct write (a reconcile): waits until none is in flight."""
        wanted = set(keys)
        with self._cond:
            self._cond.wait_for(lambda: self._closed or not (wanted & self._in_flight))
            for key in wanted:
                self._pending.pop(key, None)
            self._in_flight |= wanted
        try:
            yield
        except BaseException:
            self.done(wanted, retry=True)
            raise
        self.done(wanted)

    def pause(self) -> None:
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._pending) + len(self._again)

    def busy(self) -> int:
        with self._cond:
            return len(self._in_flight)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending or in flight (tests, shutdown drain); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._pending or self._in_flight or self._again), timeout)


@dataclass
class DatabaseHealth:
    """Outage bookkeeping: the state changes are logged, never the individual retries."""

    ok: bool = True
    since: float = field(default_factory=time.monotonic)
    last_error: str = ""
    outages: int = 0
    peak_waiting: int = 0
    down_s: float = 0.0  # seconds spent in outages that have ended
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def failed(self, exc: BaseException, waiting: int) -> None:
        with self._lock:
            self.last_error = _short(exc)
            self.peak_waiting = max(self.peak_waiting, waiting)
            if self.ok:
                self.ok, self.since = False, time.monotonic()
                self.outages += 1
                logger.error(
                    "database unavailable: {}; {} session(s) waiting, retrying with backoff",
                    self.last_error,
                    waiting,
                )

    def succeeded(self) -> None:
        with self._lock:
            if not self.ok:
                logger.success(
                    "database back after {:.1f} s; {} session(s) that were waiting are being written",
                    time.monotonic() - self.since,
                    self.peak_waiting,
                )
                self.down_s += time.monotonic() - self.since
                self.ok, self.since, self.peak_waiting = True, time.monotonic(), 0


def _short(exc: BaseException) -> str:
    from sessionsync.daemon.logs import mask_secrets

    orig = getattr(exc, "orig", None) or exc
    return mask_secrets(str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__)


class ReadHealth:
    """Sessions that could not be read for a reason not their own (out of file descriptors...):
    one line when the first is put back, one when the last of them has been read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: set[SessionKey] = set()
        self._since = 0.0

    def update(self, processed: Sequence[SessionKey], retry: Sequence[tuple[SessionKey, str]]) -> None:
        with self._lock:
            was_failing = bool(self._waiting)
            self._waiting.difference_update(processed)
            if retry and not was_failing:
                self._since = time.monotonic()
                logger.warning(
                    "{}; {} session(s) put back and retried with backoff (not recorded as invalid)",
                    retry[0][1],
                    len(retry),
                )
            self._waiting.update(key for key, _ in retry)
            if was_failing and not self._waiting:
                logger.info(
                    "session files can be read again after {:.1f} s; the sessions put back are written",
                    time.monotonic() - self._since,
                )


class Workers:
    """`threads` threads taking up to `batch_size` keys each and writing them in one transaction."""

    def __init__(
        self,
        queue: WorkQueue,
        process: BatchFn,
        publish: Callable[[list[dict[str, Any]]], None],
        threads: int,
        batch_size: int,
        health: DatabaseHealth,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.queue = queue
        self._process = process
        self._publish = publish
        self._batch_size = batch_size
        self.health = health
        self.reads = ReadHealth()
        self._backoff = backoff
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"worker-{i}", daemon=True) for i in range(threads)
        ]
        # Thread ident -> when its current batch began; a batch that never ends is a wedged worker.
        self._busy_since: dict[int, float] = {}
        self.batches = 0
        self.written = 0
        self.failures = 0

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float) -> bool:
        """Let in-flight batches finish (up to timeout), then stop; True if all threads ended.
        Order: stop taking new keys, close the queue so idle workers wake, join."""
        self._stop.set()
        self.queue.close()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def longest_batch_s(self) -> float:
        """How long the oldest batch still being processed has run, in seconds (0.0: none)."""
        # min() over the dict runs in C without releasing the GIL: no lock needed against workers.
        oldest = min(self._busy_since.values(), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    def set_batch_size(self, batch_size: int) -> None:
        self._batch_size = batch_size

    def _run(self) -> None:
        backoff = Backoff(*self._backoff)
        me = threading.get_ident()
        while not self._stop.is_set():
            keys = self.queue.take(self._batch_size, timeout=1.0)
            if not keys:
                continue
            self._busy_since[me] = time.monotonic()
            try:
                result = self._process(keys)
            except Exception as exc:
                del self._busy_since[me]  # before the backoff: waiting out an outage is not a stall
                self.queue.done(keys, retry=True)
                self._failed(exc, keys)
                self._stop.wait(backoff.next())
                continue
            del self._busy_since[me]
            retry = {key for key, _ in result.retry}
            self.queue.done([key for key in keys if key not in retry])
            self.queue.done(retry, retry=True)
            self.reads.update(keys, result.retry)
            self.batches += 1
            self.written += result.written + result.tombstoned
            self.health.succeeded()
            if result.events:
                self._publish(result.events)
            if retry:
                self._stop.wait(backoff.next())
            else:
                backoff.reset()

    def _failed(self, exc: Exception, keys: Sequence[SessionKey]) -> None:
        self.failures += 1
        if is_transient(exc):
            self.health.failed(exc, self.queue.pending() + self.queue.busy())
        else:
            # A bug, not an outage: say so loudly once per batch, keep the keys dirty, back off.
            logger.opt(exception=exc).error("unexpected error syncing {} session(s); will retry", len(keys))

"""Per-key debouncing: a leading edge for an isolated event, then a quiet period after a key's last
event, capped by a ceiling after its first.

Agents rewrite state.json many times a minute, often in bursts; the debouncer turns each burst into
at most two units of work (plus one per ceiling while it lasts). An event of a key that had no
event for the quiet period fires at once (the leading edge: an isolated save is mirrored without
waiting); the events that follow it within the quiet period are debounced on the trailing edge.
`Debouncer` is pure logic on an injected clock (tested without sleeping); `DebounceThread` runs one
and hands due keys to a sink, sleeping while nothing is pending.

A flood (more keys pending at once than one batch of work holds, say a checkout or a script
rewriting hundreds of sessions) is where a per-key quiet period coalesces worst: with hundreds of
keys written in turn, a key's own gaps straddle the quiet period at random and it fires several
times. So while a flood lasts, the quiet period is the whole stream's: a key fires at its ceiling,
or when no key at all has had an event for the quiet period, which ends the flood. Convergence is
unchanged (once the files stop changing, everything fires within the quiet period), and a session
rewritten throughout a flood is written about once per ceiling. A flood has no leading edge: a key
touched during one waits like the others, so a flood costs no more writes than it did.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from loguru import logger

K = TypeVar("K", bound=Hashable)


@dataclass
class _Pending:
    first: float  # time of the first event since the key became pending
    last: float  # time of the latest event
    order: int  # arrival order of the first event: ties between keys go to the older one


class Debouncer(Generic[K]):
    """Per key: an event of a key with no event in the last debounce_s fires at once (leading edge).
    Otherwise the key is pending and fires debounce_s after its last event, but never later than
    max_delay_s after its first pending event (trailing edge). A key is pending at most once.
    Thread-safe.

    With more than `flood_keys` keys waiting on their trailing edge (None: never), a flood begins:
    until the whole stream has been quiet for debounce_s, keys fire only at their ceiling, and no
    key has a leading edge; then every pending key fires."""

    def __init__(
        self,
        debounce_s: float,
        max_delay_s: float,
        clock: Callable[[], float] = time.monotonic,
        flood_keys: int | None = None,
    ) -> None:
        _check_timing(debounce_s, max_delay_s)
        self.clock = clock
        self._debounce_s = debounce_s
        self._max_delay_s = max_delay_s
        self._flood_keys = flood_keys
        self._flood = False
        self._stream_last = 0.0  # time of the latest event of any key
        self.floods = 0  # floods begun so far
        self._lock = threading.Lock()
        self._pending: dict[K, _Pending] = {}
        # One heap entry per pending key, (deadline, order, key). A touch only updates the dict, so
        # an entry's deadline may be early (deadlines only move later while the timing is fixed);
        # an early entry is pushed back with its real deadline when it reaches the top. That keeps
        # touch O(1) for a pending key and O(log n) for a new one, whatever the burst. A flood only
        # moves deadlines later while it lasts; its end makes every pending key due at once.
        self._heap: list[tuple[float, int, K]] = []
        self._order = itertools.count()
        # Keys fired lately, with the time of their last event, in firing order: a key in here with
        # an event younger than debounce_s gets no leading edge. Pruned from the front as they age
        # (firing order is close to last-event order, so what stays behind is short-lived), which
        # bounds it by the keys with events in about the last ceiling.
        self._fired: dict[K, float] = {}
        # Keys due at once (leading edge), in arrival order, until the next pop_due. Apart from
        # _pending so that they neither count towards a flood nor sit in the heap.
        self._ready: dict[K, _Pending] = {}
        self.leading = 0  # keys fired on their leading edge so far

    @property
    def debounce_s(self) -> float:
        return self._debounce_s

    def touch(self, key: K, leading: bool = True) -> None:
        """Record an event for `key` now. With `leading` False the key never fires at once (a key
        handed back for a later look: it waits out the quiet period like a key in a burst)."""
        now = self.clock()
        with self._lock:
            self._end_quiet_flood(now)
            self._stream_last = now
            entry = self._pending.get(key) or self._ready.get(key)
            if entry is not None:
                # A ready key is read after this event anyway: the event only moves its quiet period.
                entry.last = now
                return
            fired = self._fired.pop(key, None)
            entry = _Pending(first=now, last=now, order=next(self._order))
            if leading and not self._flood and (fired is None or now - fired >= self._debounce_s):
                self._ready[key] = entry
                self.leading += 1
                return
            self._pending[key] = entry
            heapq.heappush(self._heap, (self._deadline(entry), entry.order, key))
            if not self._flood and self._flood_keys is not None and len(self._pending) > self._flood_keys:
                self._flood = True
                self.floods += 1

    def pop_due(self) -> list[K]:
        """Remove and return the keys whose deadline has passed, oldest first."""
        now = self.clock()
        due: list[tuple[float, int, K]] = []
        with self._lock:
            self._end_quiet_flood(now)
            for key, entry in self._ready.items():
                self._fired[key] = entry.last
                due.append((entry.first, entry.order, key))
            self._ready.clear()
            while self._heap and self._heap[0][0] <= now:
                _, order, key = heapq.heappop(self._heap)
                entry = self._pending[key]
                deadline = self._deadline(entry)
                if deadline <= now:
                    del self._pending[key]
                    self._fired[key] = entry.last
                    due.append((entry.first, order, key))
                else:
                    heapq.heappush(self._heap, (deadline, order, key))
            self._prune_fired(now)
        due.sort()
        return [key for _, _, key in due]

    def next_deadline(self) -> float | None:
        """The earliest deadline of a pending key, or None when nothing is pending."""
        with self._lock:
            if self._ready:
                return next(iter(self._ready.values())).first  # the oldest ready key: due already
            while self._heap:
                stored, order, key = self._heap[0]
                deadline = self._deadline(self._pending[key])
                if deadline == stored:
                    return min(deadline, self._stream_last + self._debounce_s) if self._flood else deadline
                heapq.heapreplace(self._heap, (deadline, order, key))
            return None

    def flush(self) -> list[K]:
        """Remove and return every pending key, oldest first (shutdown, pause)."""
        with self._lock:
            everything = [*self._pending.items(), *self._ready.items()]
            entries = sorted(everything, key=lambda item: (item[1].first, item[1].order))
            self._pending.clear()
            self._ready.clear()
            self._heap.clear()
            self._flood = False
        return [key for key, _ in entries]

    def set_timing(self, debounce_s: float, max_delay_s: float, flood_keys: int | None = None) -> None:
        """Change the quiet period, the ceiling and the flood size (config reload); pending keys follow
        the new timing."""
        _check_timing(debounce_s, max_delay_s)
        with self._lock:
            self._debounce_s = debounce_s
            self._max_delay_s = max_delay_s
            self._flood_keys = flood_keys
            self._rebuild_heap()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending) + len(self._ready)

    def _prune_fired(self, now: float) -> None:
        horizon = now - self._debounce_s
        fired = self._fired
        while fired:
            key = next(iter(fired))
            if fired[key] > horizon:
                return
            del fired[key]

    def _deadline(self, entry: _Pending) -> float:
        if self._flood:
            return entry.first + self._max_delay_s  # the stream's quiet period is checked apart
        return min(entry.last + self._debounce_s, entry.first + self._max_delay_s)

    def _end_quiet_flood(self, now: float) -> None:
        """End the flood once no key has had an event for the quiet period: every pending key's own
        quiet period has then passed too, so all of them are due."""
        if self._flood and now >= self._stream_last + self._debounce_s:
            self._flood = False
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        # Deadlines may move earlier, which the lazy heap cannot see: rebuild it (O(n), rare).
        self._heap = [(self._deadline(entry), entry.order, key) for key, entry in self._pending.items()]
        heapq.heapify(self._heap)


def _check_timing(debounce_s: float, max_delay_s: float) -> None:
    if debounce_s < 0 or max_delay_s < 0:
        raise ValueError(f"debounce and max delay must be >= 0, not {debounce_s} and {max_delay_s}")


class DebounceThread(Generic[K]):
    """Runs a Debouncer: wakes at the next deadline (or on touch) and hands due keys to `sink`.
    No polling while idle: waits on a Condition with no timeout when nothing is pending."""

    def __init__(
        self, debouncer: Debouncer[K], sink: Callable[[list[K]], None], name: str = "debounce"
    ) -> None:
        self.debouncer = debouncer
        self._sink = sink
        self._name = name
        self._wake = threading.Condition()
        self._stopping = False
        self._flush_on_stop = True
        self._sink_failing = False
        self.delivered = 0  # keys handed to the sink so far
        self._thread: threading.Thread | None = None

    def touch(self, key: K) -> None:
        """Record an event for `key` and wake the thread if the key is new (its deadline may be the
        earliest); a touch of a pending key only moves its deadline later, so it needs no wake-up."""
        with self._wake:
            before = len(self.debouncer)
            self.debouncer.touch(key)
            if len(self.debouncer) != before:
                self._wake.notify()

    def later(self, keys: list[K]) -> None:
        """Have these keys looked at again once the quiet period has passed, never at once (a
        state.json that may be half-written, see daemon/inspection.py). Keys handed here after
        stop() stay with the stopped debouncer: the next start's reconcile looks at them."""
        if not keys:
            return
        with self._wake:
            for key in keys:
                self.debouncer.touch(key, leading=False)
            self._wake.notify()

    def set_timing(self, debounce_s: float, max_delay_s: float, flood_keys: int | None = None) -> None:
        """Change the timing (config reload) and wake the thread, since deadlines may now be earlier."""
        with self._wake:
            self.debouncer.set_timing(debounce_s, max_delay_s, flood_keys)
            self._wake.notify()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self._name} thread already started")
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, flush: bool = True) -> None:
        """Stop the thread; when `flush`, hand every pending key to the sink first (on this thread
        when the debounce thread never ran, so that no key is dropped either way)."""
        with self._wake:
            self._stopping = True
            self._flush_on_stop = flush
            self._wake.notify()
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join()
        elif flush:
            self._deliver(self.debouncer.flush())

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        with self._wake:
            while not self._stopping:
                due = self.debouncer.pop_due()
                if due:
                    # Hand the keys over without the lock, so touches are not blocked by the sink.
                    self._wake.release()
                    try:
                        self._deliver(due)
                    finally:
                        self._wake.acquire()
                    continue
                deadline = self.debouncer.next_deadline()
                timeout = None if deadline is None else max(0.0, deadline - self.debouncer.clock())
                self._wake.wait(timeout)
            flush = self._flush_on_stop
        if flush:
            self._deliver(self.debouncer.flush())

    def _deliver(self, keys: list[K]) -> None:
        if not keys:
            return
        try:
            self._sink(keys)
            self.delivered += len(keys)
        except Exception:
            # The keys stay dirty: back into the debouncer, to be offered again after the quiet period.
            for key in keys:
                self.debouncer.touch(key, leading=False)
            if not self._sink_failing:
                logger.exception(f"{self._name}: handing {len(keys)} keys on failed; they will be retried")
            self._sink_failing = True
            return
        if self._sink_failing:
            logger.info(f"{self._name}: handing keys on works again")
            self._sink_failing = False

"""In-process fan-out of committed change events to subscribers (the control socket's `subscribe`).

Session events carry their `session_events` row id, and subscribers get them strictly in id order
with no gap, so that a client told id N can resume with `since=N` and miss nothing. Ids come from
the database when a batch's events are inserted, but several writers commit in any order (on
PostgreSQL id 10 can commit after id 11), so the hub holds a committed event back until every
lower id is settled. It knows every id there is: one daemon writes each database (instance lock).

A writer takes a `Ticket` before its event INSERT … RETURNING and tells it the ids, then the
outcome. The hub's lock is held only for that bookkeeping, never around SQL or a commit. An
event whose ids became known at "stamp" k may be released once (a) no id below it is still in
flight and (b) every ticket whose ids are unknown was taken after k (its INSERT ran later, so its
ids are higher: sequences and SQLite's AUTOINCREMENT only grow).

Publishing only appends to each subscriber's bounded buffer, so the workers that publish never
wait for a reader; a subscriber that falls a whole buffer behind is cut off (lagged) instead, told
the last id it was given. Live-only events (`project.resynced`, ...) have no id and go out at once.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

EventFilter = Callable[[Mapping[str, Any]], bool]


class Subscription:
    """A bounded buffer; when it is full the subscriber is marked lagged and receives nothing more.

    Made by EventHub.subscribe. `get` is for one consumer thread; the hub appends from any thread.
    `start_id` is the last id released when it subscribed (events after it arrive live);
    `last_id` is the id of the last session event handed out (or `start_id`, or what the consumer
    says it sent before: `sent`).
    """

    def __init__(self, hub: EventHub, maxsize: int, accept: EventFilter | None, start_id: int) -> None:
        self._hub = hub
        self._maxsize = maxsize
        self._accept = accept
        self._buffer: deque[dict[str, Any]] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._lagged = False
        self._closed = False
        self.start_id = start_id
        self.last_id = start_id

    @property
    def lagged(self) -> bool:
        return self._lagged

    def sent(self, event_id: int) -> None:
        """Skip live events up to this id: the consumer has them already (from the database)."""
        self.last_id = max(self.last_id, event_id)

    def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, or None on timeout, once lagged, or once closed."""
        with self._ready:
            while True:
                self._ready.wait_for(self._done_or_ready, timeout)
                if not self._buffer:
                    return None
                event = self._buffer.popleft()
                event_id = event.get("id")
                if event_id is None:
                    break
                if event_id > self.last_id:
                    self.last_id = event_id
                    break
        # Each event dict is shared by every subscriber: hand out a copy to mutate freely.
        return dict(event)

    def close(self) -> None:
        """Stop receiving; a consumer blocked in `get` returns None. Idempotent."""
        with self._ready:
            self._closed = True
            self._buffer.clear()
            self._ready.notify_all()
        self._hub._remove(self)

    def _done_or_ready(self) -> bool:
        return bool(self._buffer) or self._lagged or self._closed

    def _offer(self, events: Sequence[dict[str, Any]]) -> bool:
        """Append events; False when this subscriber is lagged (or closed) and should be dropped."""
        if self._accept is not None:
            events = [e for e in events if self._accept(e)]
        with self._ready:
            if self._lagged or self._closed:
                return False
            if not events:
                return True
            was_empty = not self._buffer
            if len(self._buffer) + len(events) > self._maxsize:
                self._lag()
                return False
            self._buffer.extend(events)
            # Only an empty buffer can have a consumer waiting on it.
            if was_empty:
                self._ready.notify()
            return True

    def drop(self) -> None:
        """Cut the subscriber off as lagged: it resumes with `since`."""
        with self._ready:
            self._lag()

    def _lag(self) -> None:
        # Events it would miss make the rest useless to it (it must resume with `since`), so free
        # the buffer now rather than let a stalled reader hold it. Called holding _ready.
        self._lagged = True
        self._buffer.clear()
        self._ready.notify_all()


class Ticket:
    """One transaction's session events on their way to subscribers (see the module docstring).

    Tell it the ids (`known`) once the INSERT … RETURNING answered, then exactly one of
    `committed`, `rolled_back` or `uncertain` (the commit's outcome is not known: the connection
    broke). `stamp` orders it among the others: when it was taken, then when its ids were known.
    """

    def __init__(self, hub: EventHub, stamp: int, epoch: int) -> None:
        self._hub = hub
        self.stamp = stamp
        self.epoch = epoch  # which database's ids it holds (see EventHub.restart)

    def known(self, ids: Sequence[int]) -> None:
        self._hub._known(self, ids)

    def committed(self, events: Sequence[dict[str, Any]]) -> None:
        """The transaction committed; `events` carry their ids."""
        self._hub._settle(self, events)

    def rolled_back(self) -> None:
        self._hub._settle(self, ())

    def uncertain(self) -> None:
        """The commit may or may not have happened: live subscribers cannot be told which, so
        they are dropped as lagged and resume from the database, which knows."""
        self._hub._settle(self, (), uncertain=True)


class EventHub:
    """Fans committed change events out to subscribers; publish never blocks or waits for anyone.

    All subscribers see the events in the same order (session events in id order): releases
    happen under one short lock, held only for bookkeeping and appending to buffers.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stamps = itertools.count(1)
        self._unknown: dict[Ticket, None] = {}  # tickets whose ids are not known yet, oldest first
        self._in_flight: dict[Ticket, int] = {}  # tickets with known ids -> their lowest id
        self._ready: list[tuple[int, int, dict[str, Any]]] = []  # heap of (id, stamp, event)
        self._released = 0
        self._resumed = False
        self._epoch = 0  # moved on by restart(): tickets of an earlier one release nothing
        # Replaced, never mutated, so a publisher iterates a snapshot without holding _subs_lock.
        self._subs: tuple[Subscription, ...] = ()
        self._subs_lock = threading.Lock()

    @property
    def released(self) -> int:
        """The highest id released to subscribers: every id up to it is committed or void."""
        return self._released

    @property
    def resumed(self) -> bool:
        """Whether the hub knows where the database's ids stand (`resume_after` was called)."""
        return self._resumed

    def resume_after(self, last_id: int) -> None:
        """Start from the database's highest event id (at daemon start, before any write).
        Subscribers that came earlier start there too: nothing was written before it."""
        with self._lock:
            self._released = max(self._released, last_id)
            self._resumed = True
            for sub in self._subs:
                sub.start_id = max(sub.start_id, self._released)
                sub.last_id = max(sub.last_id, self._released)

    def restart(self, last_id: int) -> None:
        """The database's ids begin again (its SQLite file was deleted and rebuilt): every id a
        subscriber holds names an event of a database that is gone. Each is dropped as lagged
        with last_id 0, so it resumes from the new database's first event; events of
        transactions on the old file are never released; the hub continues after `last_id`."""
        with self._lock:
            self._epoch += 1
            self._ready.clear()
            self._released = last_id
            self._resumed = True
            for sub in self._subs:
                sub.start_id = sub.last_id = 0
                sub.drop()
            with self._subs_lock:
                self._subs = ()

    def ticket(self) -> Ticket:
        """Taken before a transaction's event INSERT runs."""
        with self._lock:
            ticket = Ticket(self, next(self._stamps), self._epoch)
            self._unknown[ticket] = None
        return ticket

    def publish(self, event: Mapping[str, Any]) -> None:
        """Queue one live-only (id-less) event for every subscriber, at once."""
        self.publish_many((event,))

    def publish_many(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Queue live-only (id-less) events, in order, for every subscriber."""
        if not events or not self._subs:
            return
        batch = [dict(e) for e in events]
        with self._lock:
            self._offer(batch)

    def subscribe(self, maxsize: int = 10_000, accept: EventFilter | None = None) -> Subscription:
        """A new subscription receiving every event released from now on (that `accept` takes)."""
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        with self._lock:  # so that no release falls between start_id and the first offer
            sub = Subscription(self, maxsize, accept, self._released)
            with self._subs_lock:
                self._subs = (*self._subs, sub)
        return sub

    def subscriber_count(self) -> int:
        """Subscribers still receiving (neither lagged nor closed)."""
        return len(self._subs)

    def _known(self, ticket: Ticket, ids: Sequence[int]) -> None:
        with self._lock:
            ticket.stamp = next(self._stamps)
            del self._unknown[ticket]
            if ids:
                self._in_flight[ticket] = min(ids)

    def _settle(self, ticket: Ticket, events: Sequence[dict[str, Any]], uncertain: bool = False) -> None:
        with self._lock:
            self._unknown.pop(ticket, None)
            self._in_flight.pop(ticket, None)
            if ticket.epoch != self._epoch:
                events = ()  # written to a database file that is gone
            for event in events:
                heapq.heappush(self._ready, (event["id"], ticket.stamp, event))
            if uncertain:
                for sub in self._subs:
                    sub.drop()
                with self._subs_lock:
                    self._subs = ()
            self._release()

    def _release(self) -> None:
        """Offer every committed event that nothing in flight can precede, in id order."""
        lowest_in_flight = min(self._in_flight.values(), default=None)
        oldest_unknown = next(iter(self._unknown), None)
        batch = []
        while self._ready:
            event_id, stamp, event = self._ready[0]
            if lowest_in_flight is not None and event_id > lowest_in_flight:
                break
            if oldest_unknown is not None and stamp > oldest_unknown.stamp:
                break
            heapq.heappop(self._ready)
            batch.append(event)
            self._released = event_id
        if batch:
            self._offer(batch)

    def _offer(self, batch: list[dict[str, Any]]) -> None:
        # Called holding _lock: every subscriber sees the same order.
        dropped = [sub for sub in self._subs if not sub._offer(batch)]
        for sub in dropped:
            self._remove(sub)

    def _remove(self, sub: Subscription) -> None:
        with self._subs_lock:
            self._subs = tuple(s for s in self._subs if s is not sub)

"""In-process fan-out of committed change events to subscribers (the control socket's `subscribe`).

Publishing only appends to each subscriber's bounded buffer, so the workers that publish never
wait for a reader; a subscriber that falls a whole buffer behind is cut off (lagged) instead.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any


class Subscription:
    """A bounded buffer; when it is full the subscriber is marked lagged and receives nothing more.

    Made by EventHub.subscribe. `get` is for one consumer thread; the hub appends from any thread.
    """

    def __init__(self, hub: EventHub, maxsize: int) -> None:
        self._hub = hub
        self._maxsize = maxsize
        self._buffer: deque[dict[str, Any]] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._lagged = False
        self._closed = False

    @property
    def lagged(self) -> bool:
        return self._lagged

    def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, or None on timeout, once lagged, or once closed."""
        with self._ready:
            self._ready.wait_for(self._done_or_ready, timeout)
            if not self._buffer:
                return None
            # Each event dict is shared by every subscriber: hand out a copy to mutate freely.
            return dict(self._buffer.popleft())

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
        with self._ready:
            if self._lagged or self._closed:
                return False
            was_empty = not self._buffer
            if len(self._buffer) + len(events) > self._maxsize:
                # Events it would miss make the rest useless to it (it must resync anyway), so
                # free the buffer now rather than let a stalled reader hold it.
                self._lagged = True
                self._buffer.clear()
                self._ready.notify_all()
                return False
            self._buffer.extend(events)
            # Only an empty buffer can have a consumer waiting on it.
            if was_empty:
                self._ready.notify()
            return True


class EventHub:
    """Fans committed change events out to subscribers; publish never blocks or waits for anyone.

    All subscribers see the events in the same order: publishers take turns on one short lock,
    held only while appending to buffers.
    """

    def __init__(self) -> None:
        self._publish_lock = threading.Lock()
        # Replaced, never mutated, so a publisher iterates a snapshot without holding _subs_lock.
        self._subs: tuple[Subscription, ...] = ()
        self._subs_lock = threading.Lock()

    def publish(self, event: Mapping[str, Any]) -> None:
        """Queue one JSON-able event (with "kind" etc.) for every subscriber."""
        self.publish_many((event,))

    def publish_many(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Queue events, in order, for every subscriber; one lock round per subscriber."""
        if not events or not self._subs:
            return
        batch = [dict(e) for e in events]
        with self._publish_lock:
            dropped = [sub for sub in self._subs if not sub._offer(batch)]
        for sub in dropped:
            self._remove(sub)

    def subscribe(self, maxsize: int = 10_000) -> Subscription:
        """A new subscription receiving every event published from now on."""
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        sub = Subscription(self, maxsize)
        with self._subs_lock:
            self._subs = (*self._subs, sub)
        return sub

    def subscriber_count(self) -> int:
        """Subscribers still receiving (neither lagged nor closed)."""
        return len(self._subs)

    def _remove(self, sub: Subscription) -> None:
        with self._subs_lock:
            self._subs = tuple(s for s in self._subs if s is not sub)

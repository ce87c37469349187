"""EventHub: ordered fan-out, bounded buffers, lag and close, and a publish that never waits."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from sessionsync.daemon.hub import EventHub, Subscription


def _event(n: int) -> dict[str, object]:
    return {"kind": "session.updated", "project": "/p", "slug": f"s{n}", "n": n}


def _drain(sub: Subscription) -> list[dict[str, Any]]:
    events = []
    while (event := sub.get(timeout=0)) is not None:
        events.append(event)
    return events


def test_subscriber_gets_only_events_published_after_subscribing_in_order() -> None:
    hub = EventHub()
    hub.publish(_event(-1))
    sub = hub.subscribe()
    for n in range(5):
        hub.publish(_event(n))
    hub.publish_many([_event(5), _event(6)])
    got = [sub.get(timeout=0) for _ in range(7)]
    assert [e["n"] for e in got if e is not None] == list(range(7))
    assert sub.get(timeout=0) is None


def test_every_subscriber_gets_every_event_and_its_own_copy() -> None:
    hub = EventHub()
    first, second = hub.subscribe(), hub.subscribe()
    hub.publish(_event(1))
    mine = first.get(timeout=0)
    assert mine is not None
    mine["n"] = "changed"
    assert second.get(timeout=0) == _event(1)
    assert hub.subscriber_count() == 2


def test_get_times_out_with_none() -> None:
    sub = EventHub().subscribe()
    started = time.monotonic()
    assert sub.get(timeout=0.05) is None
    assert time.monotonic() - started >= 0.05


def test_blocked_get_returns_none_when_closed() -> None:
    hub = EventHub()
    sub = hub.subscribe()
    results: list[object] = []
    done = threading.Event()

    def consume() -> None:
        results.append(sub.get())
        done.set()

    threading.Thread(target=consume).start()
    sub.close()
    assert done.wait(5)
    assert results == [None]
    assert hub.subscriber_count() == 0
    sub.close()  # idempotent


def test_a_full_buffer_lags_the_subscriber_and_it_receives_nothing_more() -> None:
    hub = EventHub()
    slow, fast = hub.subscribe(maxsize=3), hub.subscribe(maxsize=100)
    for n in range(4):
        hub.publish(_event(n))
    assert slow.lagged
    assert slow.get(timeout=0) is None  # what it held is useless once events were missed
    hub.publish(_event(4))
    assert slow.get(timeout=0) is None
    assert hub.subscriber_count() == 1
    assert not fast.lagged
    assert [fast.get(timeout=0) for _ in range(5)] == [_event(n) for n in range(5)]


def test_a_batch_larger_than_the_buffer_lags_at_once() -> None:
    hub = EventHub()
    sub = hub.subscribe(maxsize=2)
    hub.publish_many([_event(n) for n in range(3)])
    assert sub.lagged


def test_publish_with_a_stalled_subscriber_is_fast() -> None:
    hub = EventHub()
    hub.subscribe()  # never read
    reader = hub.subscribe(maxsize=60_000)
    events = [_event(n) for n in range(50_000)]
    started = time.perf_counter()
    for event in events:
        hub.publish(event)
    elapsed = time.perf_counter() - started
    # About 0.07 s on an idle 2-core machine; the bound leaves room for a loaded test run.
    assert elapsed < 1.0, f"publishing 50,000 events took {elapsed:.3f} s"
    assert hub.subscriber_count() == 1
    assert [reader.get(timeout=0) for _ in range(3)] == events[:3]


def test_concurrent_publishers_give_every_subscriber_the_same_order() -> None:
    hub = EventHub()
    subs = [hub.subscribe(maxsize=20_000) for _ in range(3)]
    go = threading.Barrier(2)

    def publish(tag: str) -> None:
        go.wait()
        for n in range(5_000):
            hub.publish({"kind": tag, "n": n})

    threads = [threading.Thread(target=publish, args=(tag,)) for tag in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    orders = [[(e["kind"], e["n"]) for e in _drain(sub)] for sub in subs]
    assert len(orders[0]) == 10_000
    assert orders[0] == orders[1] == orders[2]


def test_subscribe_rejects_an_empty_buffer() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        EventHub().subscribe(maxsize=0)

"""The debouncer on a scripted clock (no sleeping), and its thread on real time (waiting on events)."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest

from sessionsync.daemon.debounce import Debouncer, DebounceThread


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def at(self, t: float) -> FakeClock:
        self.now = t
        return self


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def warm(d: Debouncer[str], *keys: str) -> None:
    """Touch and fire these keys (their leading edge), so that their next events within the quiet
    period are debounced on the trailing edge."""
    for key in keys:
        d.touch(key)
    assert sorted(d.pop_due()) == sorted(keys)


def test_an_isolated_event_fires_at_once(clock: FakeClock) -> None:
    d: Debouncer[str] = Debouncer(0.2, 2.0, clock)
    d.touch("a")
    assert d.next_deadline() == 0.0
    assert len(d) == 1
    assert d.pop_due() == ["a"]
    assert d.next_deadline() is None
    assert d.leading == 1


def test_a_burst_fires_on_its_leading_and_its_trailing_edge(clock: FakeClock) -> None:
    d: Debouncer[str] = Debouncer(0.2, 2.0, clock)
    fired: list[float] = []
    for step in range(6):  # an event every 50 ms until 0.25
        clock.at(step * 0.05)
        d.touch("a")
        fired += [clock.now for _ in d.pop_due()]
    clock.at(0.449)
    assert d.pop_due() == []
    clock.at(0.45)
    fired += [clock.now for _ in d.pop_due()]
    assert fired == [0.0, pytest.approx(0.45)]
    assert d.leading == 1


def test_a_key_quiet_for_the_quiet_period_has_a_leading_edge_again(clock: FakeClock) -> None:
    d: Debouncer[str] = Debouncer(0.25, 2.0, clock)
    warm(d, "a")
    clock.at(0.125)
    d.touch("a")  # 0.125 s after the last event: trailing
    clock.at(0.25)
    assert d.pop_due() == []
    clock.at(0.375)
    assert d.pop_due() == ["a"]
    clock.at(0.5)
    d.touch("a")  # 0.375 s after its last event (0.125 after it fired): no event for the period
    assert d.pop_due() == ["a"]
    clock.at(0.625)
    d.touch("a")  # 0.125 s after the last event: trailing again
    assert d.pop_due() == []
    assert d.next_deadline() == 0.875
    assert d.leading == 2


def test_quiet_period_restarts_on_each_event(clock: FakeClock) -> None:
    d: Debouncer[str] = Debouncer(0.2, 2.0, clock)
    warm(d, "a")
    clock.at(0.05)
    d.touch("a")
    clock.at(0.15)
    d.touch("a")
    assert d.next_deadline() == pytest.approx(0.35)
    clock.at(0.34)
    assert d.pop_due() == []
    assert len(d) == 1
    clock.at(0.35)
    assert d.pop_due() == ["a"]
    assert len(d) == 0
    assert d.next_deadline() is None


def test_ceiling_fires_under_endless_events(clock: FakeClock) -> None:
    d: Debouncer[str] = Debouncer(0.2, 2.0, clock)
    fired: list[float] = []
    for step in range(30):  # an event every 0.1 s, forever (3 s here)
        clock.at(round(step * 0.1, 10))
        d.touch("a")
        fired += [clock.now for _ in d.pop_due()]
    # The leading edge at 0, then the ceiling 2 s after the first event that followed it.
    assert fired == [0.0, pytest.approx(2.1)]


def test_key_is_pending_at_most_once(clock: FakeClock) -> None:
    d: Debouncer[str] = Debouncer(0.2, 2.0, clock)
    for t in (0.0, 0.05, 0.1):
        clock.at(t)
        d.touch("a")
    assert len(d) == 1
    clock.at(5.0)
    assert d.pop_due() == ["a"]
    assert d.pop_due() == []
    d.touch("a")  # pending again after it fired, quiet since 0.1: its leading edge
    assert d.next_deadline() == pytest.approx(5.0)
    clock.at(5.1)
    assert d.pop_due() == ["a"]
    d.touch("a")  # and again within the quiet period: a new first event, trailing
    assert d.next_deadline() == pytest.approx(5.3)


def test_keys_are_independent_and_come_oldest_first(clock: FakeClock) -> None:
    d: Debouncer[str] = Debouncer(0.2, 2.0, clock)
    warm(d, "a", "b")
    d.touch("a")
    clock.at(0.1)
    d.touch("b")
    clock.at(0.15)
    d.touch("a")  # a now due at 0.35, b at 0.3
    clock.at(0.31)
    assert d.pop_due() == ["b"]
    clock.at(0.36)
    assert d.pop_due() == ["a"]
    # Both due in one call (their leading edge): the key whose first event is older comes first.
    clock.at(1.0)
    d.touch("late")
    clock.at(1.01)
    d.touch("early-deadline-but-newer")
    clock.at(1.1)
    d.touch("late")
    clock.at(5.0)
    assert d.pop_due() == ["late", "early-deadline-but-newer"]


def test_set_timing_moves_pending_deadlines(clock: FakeClock) -> None:
    d: Debouncer[str] = Debouncer(0.2, 2.0, clock)
    warm(d, "a")
    d.touch("a")
    d.set_timing(1.0, 5.0)
    clock.at(0.5)
    assert d.pop_due() == []
    assert d.next_deadline() == pytest.approx(1.0)
    d.set_timing(0.05, 0.1)  # shorter: already due
    assert d.pop_due() == ["a"]
    with pytest.raises(ValueError):
        d.set_timing(-1, 1)


def test_flush_returns_everything_pending(clock: FakeClock) -> None:
    d: Debouncer[str] = Debouncer(0.2, 2.0, clock)
    d.touch("a")
    clock.at(0.1)
    d.touch("b")
    assert d.flush() == ["a", "b"]
    assert len(d) == 0
    assert d.next_deadline() is None
    clock.at(10)
    assert d.pop_due() == []


def test_a_burst_of_many_keys_stays_cheap(clock: FakeClock) -> None:
    d: Debouncer[int] = Debouncer(0.2, 2.0, clock)
    started = time.perf_counter()
    for round_ in range(5):  # 50,000 touches over 10,000 keys
        clock.at(round_ * 0.01)
        for key in range(10_000):
            d.touch(key)
        if round_ == 0:
            assert d.pop_due() == list(range(10_000))  # their leading edge
    clock.at(0.24)
    assert d.pop_due() == []  # every key was touched again at 0.04
    clock.at(0.25)
    assert d.pop_due() == list(range(10_000))
    assert time.perf_counter() - started < 2.0  # O(n) per touch would take minutes


def test_a_flood_waits_for_the_whole_stream_to_go_quiet(clock: FakeClock) -> None:
    d: Debouncer[str] = Debouncer(0.2, 2.0, clock, flood_keys=2)
    warm(d, "a", "b", "c")  # leading edges: due at once, they do not count towards a flood
    assert d.floods == 0
    for key in ("a", "b", "c"):  # a third key waiting: more than flood_keys, a flood
        d.touch(key)
    assert d.floods == 1
    for step in range(1, 11):  # c alone keeps the stream busy until 1.0
        clock.at(step * 0.1)
        assert d.pop_due() == []  # a and b are quiet, but the stream is not
        d.touch("c")
    assert d.next_deadline() == pytest.approx(1.2)
    clock.at(1.19)
    assert d.pop_due() == []
    clock.at(1.2)
    assert d.pop_due() == ["a", "b", "c"]
    # The flood is over: a lone key has its leading edge and its own quiet period again.
    d.touch("a")
    assert d.pop_due() == ["a"]
    clock.at(1.3)
    d.touch("a")  # 0.1 s after its leading edge: trailing
    d.touch("b")  # quiet since 1.0: leading
    assert d.pop_due() == ["b"]
    clock.at(1.49)
    assert d.pop_due() == []
    clock.at(1.5)
    assert d.pop_due() == ["a"]
    assert d.floods == 1


def test_a_flood_keeps_the_ceiling(clock: FakeClock) -> None:
    d: Debouncer[str] = Debouncer(0.2, 2.0, clock, flood_keys=1)
    warm(d, "a", "b")
    d.touch("a")
    d.touch("b")
    fired: dict[str, float] = {}
    for step in range(1, 30):  # b every 0.1 s until 2.9: the stream never goes quiet
        clock.at(round(step * 0.1, 10))
        fired.update((key, clock.now) for key in d.pop_due())
        d.touch("b")
    assert fired == {"a": pytest.approx(2.0), "b": pytest.approx(2.0)}


def test_a_flood_has_no_leading_edge(clock: FakeClock) -> None:
    d: Debouncer[str] = Debouncer(0.2, 2.0, clock, flood_keys=1)
    warm(d, "a", "b")
    d.touch("a")
    d.touch("b")  # two keys waiting: a flood
    assert d.floods == 1
    leading = d.leading
    for step in range(1, 11):  # the stream stays busy until 1.0
        clock.at(step * 0.1)
        d.touch("b")
        if step == 5:
            d.touch("new")  # never seen, quiet: it would have a leading edge outside a flood
        assert d.pop_due() == []
    assert d.leading == leading
    clock.at(1.2)  # the stream's quiet period ends the flood: everything fires
    assert d.pop_due() == ["a", "b", "new"]
    d.touch("c")  # and leading edges are back
    assert d.pop_due() == ["c"]


def test_a_flood_writes_each_session_about_once_per_ceiling(clock: FakeClock) -> None:
    """bench/live.py's burst on the fake clock: 20 shuffled rounds over 500 keys at 4,000 writes/s,
    so a key's own gaps (0 to 250 ms) straddle the 200 ms quiet period at random."""
    rng = random.Random(3)
    rounds = [rng.sample(range(500), 500) for _ in range(20)]

    def fires_per_key(flood_keys: int | None) -> Counter[int]:
        clock = FakeClock()
        d: Debouncer[int] = Debouncer(0.2, 2.0, clock, flood_keys=flood_keys)
        fires: Counter[int] = Counter()
        for n, key in enumerate(k for order in rounds for k in order):
            clock.at(n / 4000)
            fires.update(d.pop_due())
            d.touch(key)
        clock.at(10.0)
        fires.update(d.pop_due())
        return fires

    assert sum(fires_per_key(None).values()) > 1_800  # the quiet period alone: about 4 fires a key
    flood = fires_per_key(256)
    # 2.5 s of writes: the leading edge in the first round (no flood yet, since leading keys do
    # not wait), the ceiling at about 2.1 s, then the stream's quiet period after the last.
    assert set(flood.values()) == {3}


def test_below_the_flood_size_each_key_keeps_its_own_quiet_period(clock: FakeClock) -> None:
    d: Debouncer[str] = Debouncer(0.2, 2.0, clock, flood_keys=2)
    warm(d, "a", "b")
    d.touch("a")
    for step in range(1, 6):
        clock.at(step * 0.1)
        d.touch("b")
        if step == 2:
            assert d.pop_due() == ["a"]
    assert d.floods == 0


def test_thread_hands_due_keys_to_the_sink() -> None:
    received: list[list[str]] = []
    got = threading.Event()

    def sink(keys: list[str]) -> None:
        received.append(keys)
        got.set()

    worker = DebounceThread(Debouncer[str](0.02, 1.0), sink)
    worker.start()
    try:
        worker.touch("a")  # its leading edge
        assert got.wait(5)
        assert received == [["a"]]
        assert worker.is_alive()
        # Pending keys are handed over on stop, without waiting out their quiet period.
        got.clear()
        worker.set_timing(60.0, 120.0)
        worker.touch("a")  # within the (now 60 s) quiet period: trailing, pending
    finally:
        worker.stop(flush=True)
    assert received == [["a"], ["a"]]
    assert not worker.is_alive()


def test_stop_without_flush_drops_pending_keys() -> None:
    received: list[list[str]] = []
    got = threading.Event()

    def sink(keys: list[str]) -> None:
        received.append(keys)
        got.set()

    worker = DebounceThread(Debouncer[str](60.0, 120.0), sink)
    worker.start()
    worker.touch("a")  # its leading edge, handed over at once
    assert got.wait(5)
    worker.touch("a")  # within the quiet period: pending
    worker.stop(flush=False)
    assert received == [["a"]]
    assert len(worker.debouncer) == 1


def test_a_failing_sink_keeps_the_keys() -> None:
    calls: list[list[str]] = []
    delivered = threading.Event()

    def sink(keys: list[str]) -> None:
        calls.append(keys)
        if len(calls) == 1:
            raise RuntimeError("queue closed")
        delivered.set()

    worker = DebounceThread(Debouncer[str](0.01, 1.0), sink)
    worker.start()
    try:
        worker.touch("a")
        assert delivered.wait(5)
    finally:
        worker.stop()
    assert calls == [["a"], ["a"]]

"""ReconcileQueue merging and the Reconciler thread: requests join the waiting job, a hold keeps
jobs queued, a failed job is queued again (merged with newer requests) until it succeeds.

The thread tests wait on events and the job's completion, with a deadline; the backoff is a few
milliseconds, so a retry comes at once."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import exc as sa_exc

from sessionsync.daemon.backoff import Backoff
from sessionsync.daemon.reconcile_queue import ReconcileJob, ReconcileQueue, Reconciler
from sessionsync.daemon.results import ReconcileSummary
from tests.support.waiting import wait_for

NOW = threading.Event()  # never set: with timeout 0, take() answers at once


def take_now(queue: ReconcileQueue) -> ReconcileJob | None:
    return queue.take(NOW, timeout=0)


# -- merging ----------------------------------------------------------------------------------


def test_a_request_is_a_job_of_its_own_when_none_waits() -> None:
    queue = ReconcileQueue()
    job = queue.request({"/a"}, "new project", forget={"/gone"})
    assert (job.projects, job.reason, job.forget) == ({"/a"}, "new project", {"/gone"})
    assert take_now(queue) is job
    assert take_now(queue) is None


def test_requests_while_one_waits_join_it() -> None:
    queue = ReconcileQueue()
    first = queue.request("/a", "inotify queue overflowed")
    second = queue.request({"/b"}, "resync requested", forget={"/b"})
    assert second is first
    assert first.projects == {"/a", "/b"}
    assert first.forget == {"/b"}
    assert first.reason == "inotify queue overflowed, resync requested"


def test_a_reason_already_named_is_not_repeated() -> None:
    queue = ReconcileQueue()
    job = queue.request("/a", "inotify queue overflowed")
    queue.request("/b", "inotify queue overflowed")
    assert job.reason == "inotify queue overflowed"


@pytest.mark.parametrize("order", ["all first", "all second"])
def test_all_projects_absorbs_any_subset(order: str) -> None:
    queue = ReconcileQueue()
    requests: list[set[str] | None] = [None, {"/a"}] if order == "all first" else [{"/a"}, None]
    job = queue.request(requests[0], "one")
    queue.request(requests[1], "two")
    assert job.projects is None


def test_a_job_taken_is_not_merged_into_any_more() -> None:
    queue = ReconcileQueue()
    running = queue.request({"/a"}, "one")
    assert take_now(queue) is running
    later = queue.request({"/b"}, "two")
    assert later is not running
    assert running.projects == {"/a"}


def test_the_callers_set_is_copied_not_kept() -> None:
    queue = ReconcileQueue()
    wanted = {"/a"}
    job = queue.request(wanted, "one")
    queue.request({"/b"}, "two")
    assert wanted == {"/a"}
    assert job.projects == {"/a", "/b"}


def test_nothing_is_taken_while_held_and_a_wake_lets_a_waiter_look_again() -> None:
    held = True
    queue = ReconcileQueue(held=lambda: held)
    job = queue.request(None, "nightly")
    assert take_now(queue) is None
    stop = threading.Event()
    taken: list[ReconcileJob | None] = []
    taker = threading.Thread(target=lambda: taken.append(queue.take(stop, timeout=10.0)))
    taker.start()
    held = False
    queue.wake()
    taker.join(10.0)
    assert taken == [job]


def test_stop_ends_a_waiting_take() -> None:
    queue = ReconcileQueue()
    stop = threading.Event()
    taken: list[ReconcileJob | None] = []
    taker = threading.Thread(target=lambda: taken.append(queue.take(stop, timeout=10.0)))
    taker.start()
    stop.set()
    queue.wake()
    taker.join(10.0)
    assert taken == [None]


# -- the thread -------------------------------------------------------------------------------


def transient() -> Exception:
    return sa_exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


RunFn = Callable[[ReconcileJob], ReconcileSummary]


Started = tuple[ReconcileQueue, Reconciler, list[Exception]]


@pytest.fixture
def start() -> Iterator[Callable[[RunFn], Started]]:
    """Start a Reconciler on a queue of its own; outages are collected. Stopped at the end."""
    stop = threading.Event()
    started: list[Started] = []

    def make(run: RunFn) -> Started:
        queue = ReconcileQueue()
        outages: list[Exception] = []
        reconciler = Reconciler(queue, run, outages.append, stop, Backoff(0.001, 0.002))
        reconciler.start()
        started.append((queue, reconciler, outages))
        return queue, reconciler, outages

    yield make
    stop.set()
    for queue, _, _ in started:
        queue.wake()
    wait_for(lambda: not any(r.is_alive() for _, r, _ in started), timeout=10.0)


def test_a_job_runs_and_its_waiters_get_the_summary(start: Callable[[RunFn], Started]) -> None:
    summary = ReconcileSummary(projects=2)
    seen: list[ReconcileJob] = []

    def run(job: ReconcileJob) -> ReconcileSummary:
        seen.append(job)
        return summary

    queue, reconciler, _ = start(run)
    job = queue.request(None, "start-up")
    assert job.done.wait(10.0)
    assert job.summary is summary
    assert seen == [job]
    assert reconciler.failures == 0


def test_a_transient_failure_is_an_outage_and_the_job_is_retried_merged_with_newer_requests(
    start: Callable[[RunFn], Started],
) -> None:
    release = threading.Event()
    runs: list[set[str] | None] = []

    def run(job: ReconcileJob) -> ReconcileSummary:
        runs.append(None if job.projects is None else set(job.projects))
        if len(runs) == 1:
            release.wait(10.0)  # hold the first attempt while a newer request comes in
            raise transient()
        return ReconcileSummary(projects=len(job.projects or ()))

    queue, reconciler, outages = start(run)
    first = queue.request({"/a"}, "resync requested")
    wait_for(lambda: runs, timeout=10.0)
    newer = queue.request({"/b"}, "new project")
    release.set()
    assert first.done.wait(10.0)
    assert first.summary is None
    assert "connection refused" in first.error
    assert newer.done.wait(10.0)
    assert newer.summary is not None
    assert runs == [{"/a"}, {"/a", "/b"}]
    assert newer.reason == "new project, resync requested"
    assert reconciler.failures == 1
    assert len(outages) == 1


def test_a_bug_is_logged_not_an_outage_and_still_retried(start: Callable[[RunFn], Started]) -> None:
    attempts: list[int] = []

    def run(job: ReconcileJob) -> ReconcileSummary:
        attempts.append(1)
        if len(attempts) < 3:
            raise RuntimeError("a bug")
        return ReconcileSummary()

    queue, reconciler, outages = start(run)
    queue.request(None, "nightly")
    wait_for(lambda: len(attempts) == 3 and reconciler.failures == 2, timeout=10.0)
    assert outages == []

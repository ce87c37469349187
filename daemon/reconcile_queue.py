"""Reconciles asked for (start-up, nightly, overflow, new or vanished project, the control socket),
queued and merged, and the one thread that runs them until each has succeeded.

A request made while another is still waiting joins it, so a burst of overflows or resync
commands costs one pass. A job that fails is owed: after a backoff it is queued again, merged
with whatever was asked for meanwhile.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from loguru import logger

from sessionsync.daemon.backoff import Backoff
from sessionsync.daemon.logs import mask_secrets
from sessionsync.daemon.results import ReconcileSummary
from sessionsync.daemon.store import is_transient

# A failed reconcile is retried after 1 s, doubling up to 30 s while it keeps failing.
RETRY_BACKOFF_S = (1.0, 30.0)
# How long the reconciler sleeps without a wake-up before it looks at its queue again.
IDLE_CHECK_S = 5.0


@dataclass
class ReconcileJob:
    """One queued reconcile: some projects (None: all), why, and a completion for waiters.

    `done` is set once a run ends; `summary` is its result, or None with `error` saying why it failed."""

    projects: set[str] | None
    reason: str
    forget: set[str] = field(default_factory=set)  # vanished projects, dropped once tombstoned
    done: threading.Event = field(default_factory=threading.Event)
    summary: ReconcileSummary | None = None
    error: str = ""
    progress: tuple[int, int] = (0, 0)  # sessions done, of how many, while it runs

    def merge(self, projects: set[str] | None, reason: str, forget: Iterable[str]) -> None:
        """Widen this job to cover another request too; all projects absorbs any subset."""
        self.forget |= set(forget)
        if self.projects is None or projects is None:
            self.projects = None
        else:
            self.projects |= projects
        if reason not in self.reason:
            self.reason = f"{self.reason}, {reason}"


class ReconcileQueue:
    """The job waiting for the reconciler, if any: at most one waits, as later requests merge into
    it. Nothing is taken while `held()` (writes paused); `wake()` after releasing the hold."""

    def __init__(self, held: Callable[[], bool] = lambda: False) -> None:
        self._held = held
        self._cond = threading.Condition()
        self._waiting: ReconcileJob | None = None

    def request(
        self, projects: Iterable[str] | str | None, reason: str, forget: Iterable[str] = ()
    ) -> ReconcileJob:
        """Queue a reconcile of these projects (None: all), merged with the one waiting; its job."""
        wanted = {projects} if isinstance(projects, str) else None if projects is None else set(projects)
        with self._cond:
            if self._waiting is not None:
                self._waiting.merge(wanted, reason, forget)
                return self._waiting
            self._waiting = ReconcileJob(wanted, reason, set(forget))
            self._cond.notify_all()
            return self._waiting

    def take(self, stop: threading.Event, timeout: float) -> ReconcileJob | None:
        """The waiting job, once there is one and nothing holds it; None on stop or timeout."""
        with self._cond:
            self._cond.wait_for(
                lambda: stop.is_set() or (self._waiting is not None and not self._held()), timeout
            )
            if stop.is_set() or self._waiting is None or self._held():
                return None
            job, self._waiting = self._waiting, None
            return job

    def wake(self) -> None:
        """Have a waiting `take` look again (the hold was released, or stop was set)."""
        with self._cond:
            self._cond.notify_all()


class Reconciler:
    """The thread that runs queued jobs with `run`, one at a time, until `stop` is set.

    A failure is counted and kept on the job as its error; a transient one (the database went
    away) goes to `on_outage`, anything else is logged with its traceback. Either way the job is
    queued again after a backoff that grows while failures repeat. `on_done` is told of every job
    that ended, succeeded or not, once its `done` is set."""

    def __init__(
        self,
        queue: ReconcileQueue,
        run: Callable[[ReconcileJob], ReconcileSummary],
        on_outage: Callable[[Exception], None],
        stop: threading.Event,
        backoff: Backoff | None = None,
        on_done: Callable[[ReconcileJob], None] = lambda _job: None,
    ) -> None:
        self._queue = queue
        self._run = run
        self._on_outage = on_outage
        self._on_done = on_done
        self._stop = stop
        self._backoff = backoff or Backoff(*RETRY_BACKOFF_S)
        self._thread = threading.Thread(target=self._loop, name="reconciler", daemon=True)
        self.failures = 0

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self._queue.take(self._stop, IDLE_CHECK_S)
            if job is None:
                continue
            try:
                job.summary = self._run(job)
                self._backoff.reset()
            except Exception as exc:
                self.failures += 1
                job.error = mask_secrets(str(getattr(exc, "orig", None) or exc))
                if is_transient(exc):
                    self._on_outage(exc)
                else:
                    logger.opt(exception=exc).error("reconcile ({}) failed", job.reason)
                job.done.set()
                self._on_done(job)
                # Owed until it succeeds: try again after a pause, merged with anything newer.
                self._stop.wait(self._backoff.next())
                self._queue.request(job.projects, job.reason, job.forget)
            else:
                job.done.set()
                self._on_done(job)

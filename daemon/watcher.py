"""Watch every project's sessions folder with inotify and turn filesystem events into session keys.

One inotify instance (an InotifySource) with one reader thread serves all projects. Every watch is
plain: each sessions folder (never a root or a whole repository), each session folder right inside
it, and the sessions folder's parent, which tells when the sessions folder itself is removed,
replaced or created. A project costs 2 watches plus one per session, whatever lies deeper.
Whatever may have lost events (an inotify queue overflow, the observer dying, a watch that cannot
be added) becomes an `on_resync(project, reason)`, so the caller rescans instead of trusting a
partial picture.

This module is the threads and the observer's lifecycle (start, stop, replacement after an
overflow, restarts with backoff); what events mean is session_paths.py, each project's watch
state is watch_state.py, and everything of watchdog is inotify_source.py.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Protocol

from loguru import logger

from sessionsync.daemon.backoff import Backoff
from sessionsync.daemon.inotify_faults import INOTIFY_SYSCTL_ENV, InotifyFaults
from sessionsync.daemon.inotify_source import LIMIT_ERRNOS, InotifySource
from sessionsync.daemon.session_paths import FsEvent, event_slugs
from sessionsync.daemon.watch_state import (
    LIMITS,
    RESYNC_CREATED,
    RESYNC_FALLBACK,
    RESYNC_OVERFLOW,
    RESYNC_REMOVED,
    RESYNC_REPLACED,
    RESYNC_RESTARTED,
    RESYNC_RESTORED,
    RESYNC_REWATCHED,
    ProjectState,
    ProjectWatches,
    Resync,
    WatchSource,
)
from sessionsync.models.keys import SessionKey

# The names the rest of the daemon, the benchmarks and the tests take from here.
__all__ = [
    "INOTIFY_SYSCTL_ENV",
    "RESYNC_CREATED",
    "RESYNC_FALLBACK",
    "RESYNC_OVERFLOW",
    "RESYNC_REMOVED",
    "RESYNC_REPLACED",
    "RESYNC_RESTARTED",
    "RESYNC_RESTORED",
    "RESYNC_REWATCHED",
    "InotifyFaults",
    "ProjectState",
    "SessionWatcher",
]

assert set(LIMITS) == LIMIT_ERRNOS  # every limit the source reports has its hint


class EventSource(WatchSource, Protocol):
    """An inotify instance with its threads, as the watcher starts, checks and stops it."""

    def start(self) -> None: ...

    def stop(self, timeout: float | None = None) -> None: ...

    def threads_alive(self) -> bool: ...


class SourceFactory(Protocol):
    """Makes an EventSource (InotifySource, or a scripted fake in tests); the callbacks run on its
    threads. Raises OSError (EMFILE) when no inotify instance can be had."""

    def __call__(
        self,
        *,
        on_overflow: Callable[[], None],
        on_death: Callable[[], None],
        on_limit: Callable[[str, int], None],
        on_tree_exit: Callable[[str], None],
        on_parent_change: Callable[[str], None],
        faults: InotifyFaults | None = None,
    ) -> EventSource: ...


class SessionWatcher:
    """One inotify observer (event source) for all projects: per project its sessions folder, the
    session folders in it and its parent are watched, nothing deeper. Translates events into
    SessionKeys."""

    def __init__(
        self,
        on_key: Callable[[SessionKey], None],
        on_resync: Callable[[str, str], None],
        fallback_scan_s: float = 30.0,
        retry_backoff_s: tuple[float, float] = (5.0, 300.0),
        faults: InotifyFaults | None = None,
        source_factory: SourceFactory = InotifySource,
    ) -> None:
        self._on_key = on_key
        self._on_resync = on_resync
        self._faults = faults  # the test seam; None in production
        self._source_factory = source_factory
        self._backoff_min, self._backoff_max = retry_backoff_s
        # Lock order: _lock (project table, calls into the observer) before _signal (the inbox of
        # the maintenance thread). The source's reader thread only ever takes _signal, so it never
        # waits on us while we wait on it (stopping a source joins its thread).
        self._lock = threading.RLock()
        self._signal = threading.Condition(threading.Lock())
        self._observer: EventSource | None = None
        self._table = ProjectWatches(
            ensure_source=self._ensure_observer,
            current_source=lambda: self._observer,
            on_event=self._on_fs_event,
            on_error=self._handler_failed,
            count=self._count,
            read_limit=self._read_sysctl,
            fallback_scan_s=fallback_scan_s,
            retry_backoff_s=retry_backoff_s,
        )
        self._thread: threading.Thread | None = None
        self._stopping = False
        # observer restarts: at once the first time, then backing off while it keeps dying
        self._restart_at: float | None = None
        self._restart_backoff = Backoff(self._backoff_min, self._backoff_max)
        self._last_restart = -float("inf")
        # under _signal: the inbox, the next timer, the counters
        self._checks: set[str] = set()  # projects, or "\0" + watched folder (its watch ended)
        self._limit_hits: dict[str, int] = {}  # watched folder -> errno
        self._overflowed = False
        self._observer_died = False
        self._wake_at: float | None = None
        self._last_handler_error = ""
        self._counts = dict.fromkeys(
            ("overflows", "observer_restarts", "fallbacks", "watch_retries", "events", "handler_errors"), 0
        )

    # --- public API ---

    def start(self) -> None:
        """Start the inotify observer and the maintenance thread (repairs, fallback scans, retries)."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("the session watcher was already started")
            self._ensure_observer()
            self._thread = threading.Thread(target=self._maintain, name="watcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the maintenance thread first (nothing re-arms a watch after that), then the observer."""
        with self._signal:
            self._stopping = True
            self._signal.notify()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            observer, self._observer = self._observer, None
            self._table.forget_watches()
        if observer is not None:
            observer.stop()

    def watch(self, project: str, sessions_dir: str) -> bool:
        """Watch `project`'s sessions folder: True when live; False when the folder is missing (its
        creation is watched for) or in fallback (scanned periodically). No resync is asked for
        here: the caller scans a project it adds."""
        sessions_dir = os.path.abspath(sessions_dir)
        with self._lock:
            if self._thread is None or self._stopping:
                raise RuntimeError("start() the session watcher before watch()")
            state = self._table.add(project, sessions_dir, os.path.realpath(sessions_dir))
            self._reschedule()
            return state == "live"

    def unwatch(self, project: str) -> None:
        with self._lock:
            self._table.remove(project)
            self._reschedule()

    def projects(self) -> dict[str, str]:
        """project -> "live" | "fallback" | "missing"."""
        with self._lock:
            return dict(self._table.states())

    def is_alive(self) -> bool:
        """The maintenance thread runs and so does the observer (its inotify reader thread).
        With no observer at all (inotify instance limit) every project is scanned periodically by
        the maintenance thread, which then counts as alive. Takes no lock: a health check must not
        wait behind a rebuild of the watches."""
        thread, observer = self._thread, self._observer
        return thread is not None and thread.is_alive() and (observer is None or observer.threads_alive())

    def counters(self) -> dict[str, int]:
        """overflows, observer_restarts, fallbacks (entries into fallback), watch_retries, events
        (filesystem events received, kept or not), handler_errors."""
        with self._signal:
            return dict(self._counts)

    # --- called on the source's reader thread: take _signal only ---

    def _on_fs_event(self, project: str, watched_dir: str, change: FsEvent) -> None:
        with self._signal:
            self._counts["events"] += 1
        if change.src == watched_dir:
            # IN_DELETE_SELF or IN_MOVE_SELF of the sessions folder: its watch is checked.
            self._request_check(project)
            return
        for slug in event_slugs(watched_dir, change):
            self._on_key(SessionKey(project, slug))

    def _handler_failed(self, project: str, exc: Exception) -> None:
        # One line per distinct failure, not one per event: a broken on_key would flood the log.
        text = f"{type(exc).__name__}: {exc}"
        with self._signal:
            self._counts["handler_errors"] += 1
            repeated = text == self._last_handler_error
            self._last_handler_error = text
        if not repeated:
            logger.bind(project=project).opt(exception=exc).error("handling a filesystem event failed")

    def _count(self, name: str) -> None:
        with self._signal:
            self._counts[name] += 1

    def _request_check(self, project: str) -> None:
        with self._signal:
            self._checks.add(project)
            self._signal.notify()

    def _limit_hit(self, watched_dir: str, err: int) -> None:
        with self._signal:
            self._limit_hits.setdefault(watched_dir, err)
            self._signal.notify()

    def _tree_exited(self, watched_dir: str) -> None:
        # Mapped to its project by the maintenance thread: the table is under _lock.
        self._request_check("\0" + watched_dir)

    def _on_overflow(self) -> None:
        with self._signal:
            self._overflowed = True
            self._counts["overflows"] += 1
            self._signal.notify()

    def _on_death(self) -> None:
        with self._signal:
            self._observer_died = True
            self._signal.notify()

    # --- the maintenance thread ---

    def _maintain(self) -> None:
        while True:
            with self._signal:
                while not self._stopping and not self._inbox_ready():
                    timeout = None if self._wake_at is None else max(0.0, self._wake_at - time.monotonic())
                    self._signal.wait(timeout)
                if self._stopping:
                    return
                checks, self._checks = self._checks, set()
                limits, self._limit_hits = self._limit_hits, {}
                overflowed, self._overflowed = self._overflowed, False
                died, self._observer_died = self._observer_died, False
            try:
                resyncs = self._work(checks, limits, overflowed=overflowed, died=died)
            except Exception:
                logger.exception("watcher maintenance failed; resyncing every project")
                resyncs = [(name, RESYNC_RESTARTED) for name in self.projects()]
            # Outside every lock: the callback may take its own locks or call back into us.
            for project, reason in resyncs:
                try:
                    self._on_resync(project, reason)
                except Exception:
                    logger.bind(project=project).exception("asking for a resync ({}) failed", reason)

    def _inbox_ready(self) -> bool:
        due = self._wake_at is not None and time.monotonic() >= self._wake_at
        return due or bool(self._checks or self._limit_hits or self._overflowed or self._observer_died)

    def _work(
        self, checks: set[str], limits: dict[str, int], *, overflowed: bool, died: bool
    ) -> list[Resync]:
        resyncs: list[Resync] = []
        now = time.monotonic()
        with self._lock:
            if died and self._restart_at is None:
                self._restart_at = self._plan_restart(now)
            if self._restart_at is not None and now >= self._restart_at:
                self._restart_at = None
                resyncs += self._restart_observer()
            for watched_dir, err in limits.items():
                resyncs += self._table.limit_hit(watched_dir, err)
            for name in checks:
                resyncs += self._table.check(name)
            resyncs += self._table.timers(now)
            if overflowed:
                names = self._table.names()
                logger.warning(
                    "inotify queue overflowed, events were lost: resyncing {} project(s)", len(names)
                )
                self._replace_observer()  # a new instance: its watches are added without events
                resyncs += [(name, RESYNC_OVERFLOW) for name in names]
            self._reschedule()
        return resyncs

    def _reschedule(self) -> None:
        """Tell the maintenance thread when its next timer is due (under _lock)."""
        times = [self._restart_at] if self._restart_at is not None else []
        times += self._table.due()
        with self._signal:
            self._wake_at = min(times) if times else None
            self._signal.notify()

    # --- the observer (under _lock) ---

    def _ensure_observer(self) -> EventSource | None:
        """The observer, created when there is none; None when no inotify instance can be had
        (every project then falls back, and each retry tries again)."""
        if self._observer is not None:
            return self._observer
        try:
            observer = self._source_factory(
                on_overflow=self._on_overflow,
                on_death=self._on_death,
                on_limit=self._limit_hit,
                on_tree_exit=self._tree_exited,
                on_parent_change=self._request_check,
                faults=self._faults,
            )
        except OSError as exc:
            if exc.errno not in LIMITS:
                raise
            return None
        observer.start()
        self._observer = observer
        return observer

    def _plan_restart(self, now: float) -> float:
        """At once, unless the last restart was recent: then back off, so that a bug killing the
        observer again and again does not become a loop of restarts and full rescans."""
        if now - self._last_restart > self._backoff_max:
            self._restart_backoff.reset()
            return now
        return self._last_restart + self._restart_backoff.next()

    def _restart_observer(self) -> list[Resync]:
        self._last_restart = time.monotonic()
        self._count("observer_restarts")
        names = self._table.names()
        logger.error("the inotify observer stopped; restarting it and resyncing {} project(s)", len(names))
        self._replace_observer()
        return [(name, RESYNC_RESTARTED) for name in names]

    def _replace_observer(self) -> None:
        """Stop the observer and watch every project again on a new one (a new inotify instance)."""
        old, self._observer = self._observer, None
        if old is not None:
            try:
                old.stop(timeout=5)
            except Exception:
                logger.exception("stopping the old inotify observer failed")
        # Its watches, parent ones included, went with its inotify instance.
        self._table.rearm_all()

    def _read_sysctl(self, name: str) -> str:
        """The limit's current value, as the hint shows it (the test seam's stand-in, if set)."""
        faults = self._faults
        if faults is not None and name == "fs.inotify.max_user_watches" and faults.user_watches() is not None:
            return str(faults.user_watches())
        return _read_sysctl(name)


def _read_sysctl(name: str) -> str:
    try:
        with open("/proc/sys/" + name.replace(".", "/"), encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return "?"

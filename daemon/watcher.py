"""Watch every project's sessions folder with inotify and turn filesystem events into session keys.

One watchdog observer (one inotify instance) serves all projects: one recursive watch per sessions
folder, never a root or a whole repository, plus one plain watch on its parent folder that tells
when the sessions folder itself is removed, replaced or created. Whatever may have lost events (an
inotify queue overflow, the observer dying, a watch that cannot be added) becomes an
`on_resync(project, reason)`, so the caller rescans instead of trusting a partial picture.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from loguru import logger

from sessionsync.daemon.inotify_source import (
    INOTIFY_SYSCTL_ENV,
    LIMIT_ERRNOS,
    InotifyFaults,
    InotifySource,
    TreeWatch,
)
from sessionsync.daemon.session_paths import FsEvent, event_slugs
from sessionsync.models.keys import SessionKey

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

ProjectState = Literal["live", "fallback", "missing"]

# What the watcher says about each inotify limit, the sysctl that raises it and a value to suggest.
_LIMITS = {
    errno.ENOSPC: ("inotify watch limit reached", "fs.inotify.max_user_watches", 524288),
    errno.EMFILE: ("inotify instance limit reached", "fs.inotify.max_user_instances", 1024),
}
assert set(_LIMITS) == LIMIT_ERRNOS

RESYNC_OVERFLOW = "inotify queue overflowed"
RESYNC_FALLBACK = "periodic scan (no inotify watch)"
RESYNC_REMOVED = "sessions folder removed"
RESYNC_CREATED = "sessions folder created"
RESYNC_REPLACED = "sessions folder replaced"
RESYNC_RESTORED = "inotify watch restored"
RESYNC_RESTARTED = "inotify observer restarted"
RESYNC_REWATCHED = "inotify watch restarted"


def _ident(path: str) -> tuple[int, int] | None:
    """(device, inode) of the folder at `path`, or None when there is no folder there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


# --- the watcher ---------------------------------------------------------------------------------


@dataclass
class _Project:
    project: str
    sessions_dir: str  # as given, absolute
    watched_dir: str  # its real path: what the recursive watch is on
    state: ProjectState = "missing"
    watch: TreeWatch | None = None
    ident: tuple[int, int] | None = None  # (device, inode) of the watched folder
    parent_wd: int | None = None
    parent_ident: tuple[int, int] | None = None
    next_scan: float | None = None  # fallback: when to ask for the next periodic scan
    next_retry: float | None = None  # fallback, or missing unobserved: when to try again
    backoff: float = 0.0
    retries: int = 0


Resync = tuple[str, str]


class SessionWatcher:
    """One inotify observer for all projects; one recursive watch per project on its sessions
    folder (never a root or a whole repository). Translates events into SessionKeys."""

    def __init__(
        self,
        on_key: Callable[[SessionKey], None],
        on_resync: Callable[[str, str], None],
        fallback_scan_s: float = 30.0,
        retry_backoff_s: tuple[float, float] = (5.0, 300.0),
        faults: InotifyFaults | None = None,
    ) -> None:
        self._on_key = on_key
        self._faults = faults  # the test seam; None in production
        self._on_resync = on_resync
        self._fallback_scan_s = fallback_scan_s
        self._backoff_min, self._backoff_max = retry_backoff_s
        # Lock order: _lock (project table, calls into the observer) before _signal (the inbox of
        # the maintenance thread). watchdog's threads only ever take _signal, so they never wait on
        # us while we wait on them (unscheduling a watch joins its emitter thread).
        self._lock = threading.RLock()
        self._signal = threading.Condition(threading.Lock())
        self._projects: dict[str, _Project] = {}
        self._observer: InotifySource | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._hinted: set[int] = set()  # limits whose sysctl hint was logged
        # observer restarts: at once the first time, then backing off while it keeps dying
        self._restart_at: float | None = None
        self._restart_backoff = self._backoff_min
        self._last_restart = -float("inf")
        # under _signal: the inbox, the next timer, the counters
        self._checks: set[str] = set()  # projects, or "\0" + watched folder (emitter ended)
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
            for entry in self._projects.values():
                entry.watch, entry.parent_wd = None, None
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
            entry = self._projects.get(project)
            if entry is not None and entry.sessions_dir == sessions_dir:
                return entry.state == "live"
            if entry is not None:
                self._disarm(entry)
            entry = _Project(project, sessions_dir, os.path.realpath(sessions_dir))
            self._projects[project] = entry
            self._arm(entry)
            say = logger.bind(project=project)
            if entry.state == "live":
                say.debug("watching {}", sessions_dir)
            elif entry.state == "missing":
                say.warning("sessions folder {} does not exist; waiting for it", sessions_dir)
            self._reschedule()
            return entry.state == "live"

    def unwatch(self, project: str) -> None:
        with self._lock:
            entry = self._projects.pop(project, None)
            if entry is not None:
                self._disarm(entry)
                self._reschedule()

    def projects(self) -> dict[str, str]:
        """project -> "live" | "fallback" | "missing"."""
        with self._lock:
            return {name: entry.state for name, entry in self._projects.items()}

    def is_alive(self) -> bool:
        """The maintenance thread runs and so does the observer (dispatcher and inotify reader).
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

    # --- called on watchdog's threads: take _signal only ---

    def _on_fs_event(self, project: str, watched_dir: str, change: FsEvent) -> None:
        with self._signal:
            self._counts["events"] += 1
        if change.src == watched_dir:
            # IN_DELETE_SELF of the sessions folder (its emitter has stopped itself).
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

    def _request_check(self, project: str) -> None:
        with self._signal:
            self._checks.add(project)
            self._signal.notify()

    def _limit_hit(self, watched_dir: str, err: int) -> None:
        with self._signal:
            self._limit_hits.setdefault(watched_dir, err)
            self._signal.notify()

    def _emitter_exited(self, watched_dir: str) -> None:
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
            by_dir = {entry.watched_dir: entry for entry in self._projects.values()}
            for watched_dir, err in limits.items():
                # A session folder created after the watch limit was reached went unwatched.
                entry = by_dir.get(watched_dir)
                if entry is not None and entry.state == "live":
                    self._disarm(entry, keep_parent=True)
                    self._enter_fallback(entry, err)
                    resyncs.append((entry.project, RESYNC_FALLBACK))
            for name in checks:
                entry = by_dir.get(name[1:]) if name.startswith("\0") else self._projects.get(name)
                if entry is not None:
                    resyncs += self._check(entry)
            for entry in self._projects.values():
                resyncs += self._timers(entry, now)
            if overflowed:
                logger.warning(
                    "inotify queue overflowed, events were lost: resyncing {} project(s)", len(self._projects)
                )
                self._replace_observer()  # a new instance: its watches are added without events
                resyncs += [(name, RESYNC_OVERFLOW) for name in self._projects]
            self._reschedule()
        return resyncs

    def _check(self, entry: _Project) -> list[Resync]:
        """Compare a project's watches with its folders on disk and repair them: the sessions folder
        removed, replaced (same name, another inode) or created, its emitter gone, its parent gone."""
        if entry.state == "fallback":
            return []  # its retries follow their own backoff
        if entry.parent_wd is not None and _ident(os.path.dirname(entry.sessions_dir)) != entry.parent_ident:
            self._drop_parent(entry)
        observer = self._observer
        ident = _ident(entry.watched_dir)
        if (
            entry.state == "live"
            and ident == entry.ident
            and observer is not None
            and entry.watch is not None
            and observer.tree_alive(entry.watch)
        ):
            if entry.parent_wd is None:
                # The sessions folder stayed but its parent changed: watch the new parent. Only
                # that: re-arming would end the emitter, whose end asks for a check, and so on.
                with contextlib.suppress(OSError):
                    self._add_parent_watch(observer, entry)
            return []
        before, was = entry.state, entry.ident
        self._disarm(entry, keep_parent=True)
        after = self._arm(entry)
        self._log_change(entry, before)
        if after == "fallback":
            return [(entry.project, RESYNC_FALLBACK)]
        if before == "live" and after == "missing":
            return [(entry.project, RESYNC_REMOVED)]
        if before == "live":
            return [(entry.project, RESYNC_REPLACED if entry.ident != was else RESYNC_REWATCHED)]
        if after == "live":
            return [(entry.project, RESYNC_CREATED)]
        return []

    def _timers(self, entry: _Project, now: float) -> list[Resync]:
        resyncs: list[Resync] = []
        if entry.state == "fallback" and entry.next_scan is not None and now >= entry.next_scan:
            entry.next_scan = now + self._fallback_scan_s
            resyncs.append((entry.project, RESYNC_FALLBACK))
        if entry.next_retry is not None and now >= entry.next_retry:
            before = entry.state
            with self._signal:
                self._counts["watch_retries"] += 1
            entry.retries += 1
            self._disarm(entry, keep_parent=True)
            after = self._arm(entry, backoff=min(entry.backoff * 2, self._backoff_max))
            self._log_change(entry, before)
            if after == "live":
                resyncs.append((entry.project, RESYNC_RESTORED if before == "fallback" else RESYNC_CREATED))
        return resyncs

    def _reschedule(self) -> None:
        """Tell the maintenance thread when its next timer is due (under _lock)."""
        times = [self._restart_at] if self._restart_at is not None else []
        for entry in self._projects.values():
            times += [t for t in (entry.next_scan, entry.next_retry) if t is not None]
        with self._signal:
            self._wake_at = min(times) if times else None
            self._signal.notify()

    # --- arming and disarming one project (under _lock) ---

    def _arm(self, entry: _Project, backoff: float | None = None) -> ProjectState:
        """Watch the parent folder, then the sessions folder; settle and return the project's state."""
        entry.next_retry = None
        observer = self._ensure_observer()
        if observer is None:
            self._enter_fallback(entry, errno.EMFILE, backoff)
            return entry.state
        if entry.parent_wd is None:
            try:
                self._add_parent_watch(observer, entry)
            except OSError as exc:
                if exc.errno in _LIMITS:
                    self._enter_fallback(entry, exc.errno, backoff)
                    return entry.state
                # No parent folder (yet): the sessions folder is missing too, retried below.
        ident = _ident(entry.watched_dir)
        if ident is None:
            self._enter_missing(entry, backoff)
            return entry.state
        project, watched_dir = entry.project, entry.watched_dir
        try:
            entry.watch = observer.watch_tree(
                watched_dir,
                on_event=lambda change: self._on_fs_event(project, watched_dir, change),
                on_error=lambda exc: self._handler_failed(project, exc),
            )
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                self._enter_missing(entry, backoff)
            else:
                self._enter_fallback(entry, exc.errno or 0, backoff, exc)
            return entry.state
        err = entry.watch.partial
        if err is not None:
            # The sessions folder is watched but some session folders below it are not: such a
            # partial watch would miss those sessions silently, so the whole project falls back.
            self._disarm(entry, keep_parent=True)
            self._enter_fallback(entry, err, backoff)
            return entry.state
        entry.state, entry.ident, entry.next_scan = "live", ident, None
        return entry.state

    def _add_parent_watch(self, observer: InotifySource, entry: _Project) -> None:
        parent, name = os.path.dirname(entry.sessions_dir), os.path.basename(entry.sessions_dir)
        # While the parent is missing too (a branch without agents/ checked out), the nearest folder
        # of the project that exists is watched for the missing one's return, alone (never
        # recursively); without it the retry backoff, up to 5 minutes, decided when it was seen.
        # _check moves the watch down again as the folders come back (the idents differ).
        while parent.startswith(entry.project + os.sep) and _ident(parent) is None:
            parent, name = os.path.dirname(parent), os.path.basename(parent)
        ident = _ident(parent)
        wd = observer.watch_parent(parent, entry.project, name)
        if wd is None:
            return  # EACCES: nothing is watched
        entry.parent_wd, entry.parent_ident = wd, ident

    def _drop_parent(self, entry: _Project) -> None:
        wd, entry.parent_wd, entry.parent_ident = entry.parent_wd, None, None
        observer = self._observer
        if wd is not None and observer is not None:
            observer.drop_parent(wd, entry.project)

    def _disarm(self, entry: _Project, *, keep_parent: bool = False) -> None:
        observer = self._observer
        watch, entry.watch = entry.watch, None
        if observer is not None and watch is not None:
            observer.unwatch_tree(watch)
        if not keep_parent:
            self._drop_parent(entry)

    def _enter_missing(self, entry: _Project, backoff: float | None) -> None:
        entry.state, entry.ident, entry.next_scan = "missing", None, None
        # The parent watch reports the folder's creation. Without one (the parent is missing
        # too), or when the sessions folder is a symlink whose target may come back, look again.
        if entry.parent_wd is None or entry.watched_dir != entry.sessions_dir:
            entry.backoff = self._backoff_min if backoff is None else backoff
            entry.next_retry = time.monotonic() + entry.backoff

    def _enter_fallback(
        self, entry: _Project, err: int, backoff: float | None = None, exc: OSError | None = None
    ) -> None:
        now = time.monotonic()
        if entry.state != "fallback":
            with self._signal:
                self._counts["fallbacks"] += 1
            self._log_fallback(entry, err, exc)
            entry.next_scan, entry.retries = now + self._fallback_scan_s, 0
        entry.state, entry.ident = "fallback", None
        entry.backoff = self._backoff_min if backoff is None else backoff
        entry.next_retry = now + entry.backoff

    def _log_fallback(self, entry: _Project, err: int, exc: OSError | None) -> None:
        say = logger.bind(project=entry.project)
        if err not in _LIMITS:
            reason = exc.strerror if exc is not None else os.strerror(err)
            say.warning(
                "cannot watch {}: {}; scanning it every {} s instead",
                entry.sessions_dir,
                reason,
                self._fallback_scan_s,
            )
            return
        what, sysctl, suggested = _LIMITS[err]
        if err in self._hinted:
            say.warning("{}; scanning {} every {} s instead", what, entry.sessions_dir, self._fallback_scan_s)
            return
        self._hinted.add(err)
        say.warning(
            "cannot watch {}: {} ({} = {}); scanning it every {} s instead. "
            "Raise the limit: sudo sysctl {}={} (persist it in /etc/sysctl.d/)",
            entry.sessions_dir,
            what,
            sysctl,
            self._read_sysctl(sysctl),
            self._fallback_scan_s,
            sysctl,
            suggested,
        )

    def _log_change(self, entry: _Project, before: ProjectState) -> None:
        """One line when a project's watch changes state (entering fallback is logged where it starts)."""
        if entry.state == before:
            return
        say = logger.bind(project=entry.project)
        if entry.state == "live" and before == "fallback":
            say.info("inotify watch on {} restored after {} retries", entry.sessions_dir, entry.retries)
        elif entry.state == "live":
            say.info("sessions folder {} appeared; watching it", entry.sessions_dir)
        elif entry.state == "missing":
            say.warning("sessions folder {} is gone; waiting for it to come back", entry.sessions_dir)

    # --- the observer ---

    def _ensure_observer(self) -> InotifySource | None:
        """The observer, created when there is none; None when no inotify instance can be had
        (every project then falls back, and each retry tries again)."""
        if self._observer is not None:
            return self._observer
        try:
            observer = InotifySource(
                on_overflow=self._on_overflow,
                on_death=self._on_death,
                on_limit=self._limit_hit,
                on_tree_exit=self._emitter_exited,
                on_parent_change=self._request_check,
                faults=self._faults,
            )
        except OSError as exc:
            if exc.errno not in _LIMITS:
                raise
            return None
        observer.start()
        self._observer = observer
        return observer

    def _plan_restart(self, now: float) -> float:
        """At once, unless the last restart was recent: then back off, so that a bug killing the
        observer again and again does not become a loop of restarts and full rescans."""
        if now - self._last_restart > self._backoff_max:
            self._restart_backoff = self._backoff_min
            return now
        at = self._last_restart + self._restart_backoff
        self._restart_backoff = min(self._restart_backoff * 2, self._backoff_max)
        return at

    def _restart_observer(self) -> list[Resync]:
        self._last_restart = time.monotonic()
        with self._signal:
            self._counts["observer_restarts"] += 1
        logger.error(
            "the inotify observer stopped; restarting it and resyncing {} project(s)", len(self._projects)
        )
        self._replace_observer()
        return [(name, RESYNC_RESTARTED) for name in self._projects]

    def _replace_observer(self) -> None:
        """Stop the observer and watch every project again on a new one (a new inotify instance)."""
        old, self._observer = self._observer, None
        if old is not None:
            try:
                old.stop(timeout=5)
            except Exception:
                logger.exception("stopping the old inotify observer failed")
        # Its watches, parent ones included, went with its inotify instance.
        for entry in self._projects.values():
            entry.watch, entry.parent_wd, entry.parent_ident = None, None, None
            before = entry.state
            self._arm(entry)
            self._log_change(entry, before)

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

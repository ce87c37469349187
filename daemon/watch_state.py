"""Each project's watch as a small state machine: live (its sessions folder is watched), missing
(the folder is not there: its parent is watched for it, or it is looked for again with backoff) or
fallback (it cannot be watched: scanned periodically and retried with backoff).

Plain code over a WatchSource (the inotify adapter, or a scripted fake in tests), with the clock
and the folder identities injected, so that every transition is tested without sleeping.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from loguru import logger

from sessionsync.daemon.backoff import Backoff
from sessionsync.daemon.session_paths import FsEvent

ProjectState = Literal["live", "fallback", "missing"]
Resync = tuple[str, str]  # (project, reason)
Ident = tuple[int, int]  # (device, inode) of a folder

# What is said about each inotify limit, the sysctl that raises it and a value to suggest.
LIMITS = {
    errno.ENOSPC: ("inotify watch limit reached", "fs.inotify.max_user_watches", 524288),
    errno.EMFILE: ("inotify instance limit reached", "fs.inotify.max_user_instances", 1024),
}

RESYNC_OVERFLOW = "inotify queue overflowed"
RESYNC_FALLBACK = "periodic scan (no inotify watch)"
RESYNC_REMOVED = "sessions folder removed"
RESYNC_CREATED = "sessions folder created"
RESYNC_REPLACED = "sessions folder replaced"
RESYNC_RESTORED = "inotify watch restored"
RESYNC_RESTARTED = "inotify observer restarted"
RESYNC_REWATCHED = "inotify watch restarted"


class Tree(Protocol):
    """The watches of one sessions folder (on it and on each session folder in it, nothing
    deeper), as a WatchSource returns them."""

    @property
    def partial(self) -> int | None:
        """The limit error (errno) met watching its session folders while it was set up, if any."""
        ...


class WatchSource(Protocol):
    """What the state machine needs of an inotify instance; see InotifySource for the real one.
    Each call may raise OSError as inotify would."""

    def watch_tree(
        self, path: str, on_event: Callable[[FsEvent], None], on_error: Callable[[Exception], None]
    ) -> Tree: ...

    def tree_alive(self, tree: Tree) -> bool: ...  # its watch still delivers events

    def unwatch_tree(self, tree: Tree) -> None: ...

    def watch_parent(self, path: str, project: str, name: str) -> int | None: ...

    def drop_parent(self, wd: int, project: str) -> None: ...


def folder_ident(path: str) -> Ident | None:
    """(device, inode) of the folder at `path`, or None when there is no folder there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


@dataclass
class _Project:
    project: str
    sessions_dir: str  # as given, absolute
    watched_dir: str  # its real path: what is watched
    retry: Backoff  # delays between attempts to watch it, growing while they keep failing
    state: ProjectState = "missing"
    watch: Tree | None = None
    ident: Ident | None = None  # (device, inode) of the watched folder
    parent_wd: int | None = None
    parent_ident: Ident | None = None
    next_scan: float | None = None  # fallback: when to ask for the next periodic scan
    next_retry: float | None = None  # fallback, or missing unobserved: when to try again
    retries: int = 0


class ProjectWatches:
    """Every project's watch state and its repairs. Not thread-safe: the watcher calls it under its
    lock, from its own threads. Each method returns the resyncs it asks for (lost events), for the
    caller to hand on outside its locks.

    `ensure_source()` gives the inotify instance, created if need be (None: none can be had, every
    project falls back); `current_source()` the one there is, if any. `on_event(project,
    watched_dir, event)` and `on_error(project, exc)` receive a live project's events (on the
    source's thread). `count(name)` bumps a counter; `read_limit(sysctl)` the value the hint shows.
    """

    def __init__(
        self,
        *,
        ensure_source: Callable[[], WatchSource | None],
        current_source: Callable[[], WatchSource | None],
        on_event: Callable[[str, str, FsEvent], None],
        on_error: Callable[[str, Exception], None],
        count: Callable[[str], None],
        read_limit: Callable[[str], str],
        fallback_scan_s: float,
        retry_backoff_s: tuple[float, float],
        clock: Callable[[], float] = time.monotonic,
        ident: Callable[[str], Ident | None] = folder_ident,
    ) -> None:
        self._ensure_source = ensure_source
        self._current_source = current_source
        self._on_event = on_event
        self._on_error = on_error
        self._count = count
        self._read_limit = read_limit
        self.fallback_scan_s = fallback_scan_s
        self._backoff_min, self._backoff_max = retry_backoff_s
        self._clock = clock
        self._ident = ident
        self._projects: dict[str, _Project] = {}
        self._hinted: set[int] = set()  # limits whose sysctl hint was logged

    # --- the table ---

    def add(self, project: str, sessions_dir: str, watched_dir: str) -> ProjectState:
        """Watch `project` (again, if its sessions folder changed); its state."""
        entry = self._projects.get(project)
        if entry is not None and entry.sessions_dir == sessions_dir:
            return entry.state
        if entry is not None:
            self._disarm(entry)
        entry = _Project(project, sessions_dir, watched_dir, Backoff(self._backoff_min, self._backoff_max))
        self._projects[project] = entry
        self._arm(entry)
        say = logger.bind(project=project)
        if entry.state == "live":
            say.debug("watching {}", sessions_dir)
        elif entry.state == "missing":
            say.warning("sessions folder {} does not exist; waiting for it", sessions_dir)
        return entry.state

    def remove(self, project: str) -> None:
        entry = self._projects.pop(project, None)
        if entry is not None:
            self._disarm(entry)

    def states(self) -> dict[str, ProjectState]:
        return {name: entry.state for name, entry in self._projects.items()}

    def names(self) -> list[str]:
        return list(self._projects)

    def due(self) -> list[float]:
        """When each pending timer (fallback scan, retry) is due."""
        return [t for e in self._projects.values() for t in (e.next_scan, e.next_retry) if t is not None]

    # --- what happened ---

    def limit_hit(self, watched_dir: str, err: int) -> list[Resync]:
        """A folder below `watched_dir` could not be watched (`err`: ENOSPC, EMFILE)."""
        for entry in self._projects.values():
            # A session folder created after the watch limit was reached went unwatched.
            if entry.watched_dir == watched_dir and entry.state == "live":
                self._disarm(entry, keep_parent=True)
                self._enter_fallback(entry, err)
                return [(entry.project, RESYNC_FALLBACK)]
        return []

    def check(self, name: str) -> list[Resync]:
        """Something happened to a project's sessions folder or parent: `name` is the project, or
        "\\0" + the watched folder whose watch ended by itself."""
        if name.startswith("\0"):
            entry = next((e for e in self._projects.values() if e.watched_dir == name[1:]), None)
        else:
            entry = self._projects.get(name)
        return self._check(entry) if entry is not None else []

    def timers(self, now: float) -> list[Resync]:
        """Run every timer due at `now`: fallback scans and watch retries."""
        resyncs: list[Resync] = []
        for entry in self._projects.values():
            resyncs += self._timers(entry, now)
        return resyncs

    def rearm_all(self) -> None:
        """Watch every project again: the source was replaced, its watches went with it."""
        for entry in self._projects.values():
            entry.watch, entry.parent_wd, entry.parent_ident = None, None, None
            before = entry.state
            self._arm(entry)
            self._log_change(entry, before)

    def forget_watches(self) -> None:
        """The source is being stopped, and its watches with it."""
        for entry in self._projects.values():
            entry.watch, entry.parent_wd = None, None

    # --- transitions ---

    def _check(self, entry: _Project) -> list[Resync]:
        """Compare a project's watches with its folders on disk and repair them: the sessions folder
        removed, replaced (same name, another inode) or created, its watch ended, its parent gone."""
        if entry.state == "fallback":
            return []  # its retries follow their own backoff
        if (
            entry.parent_wd is not None
            and self._ident(os.path.dirname(entry.sessions_dir)) != entry.parent_ident
        ):
            self._drop_parent(entry)
        source = self._current_source()
        ident = self._ident(entry.watched_dir)
        if (
            entry.state == "live"
            and ident == entry.ident
            and source is not None
            and entry.watch is not None
            and source.tree_alive(entry.watch)
        ):
            if entry.parent_wd is None:
                # The sessions folder stayed but its parent changed: watch the new parent. Only
                # that: re-arming would end its watch, whose end asks for a check, and so on.
                with contextlib.suppress(OSError):
                    self._add_parent_watch(source, entry)
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
            entry.next_scan = now + self.fallback_scan_s
            resyncs.append((entry.project, RESYNC_FALLBACK))
        if entry.next_retry is not None and now >= entry.next_retry:
            before = entry.state
            self._count("watch_retries")
            entry.retries += 1
            self._disarm(entry, keep_parent=True)
            after = self._arm(entry, retrying=True)
            self._log_change(entry, before)
            if after == "live":
                resyncs.append((entry.project, RESYNC_RESTORED if before == "fallback" else RESYNC_CREATED))
        return resyncs

    def _arm(self, entry: _Project, retrying: bool = False) -> ProjectState:
        """Watch the parent folder, then the sessions folder; settle and return the project's state.
        `retrying`: a timer's retry, which waits longer than the last if it fails again."""
        entry.next_retry = None
        source = self._ensure_source()
        if source is None:
            self._enter_fallback(entry, errno.EMFILE, retrying)
            return entry.state
        if entry.parent_wd is None:
            try:
                self._add_parent_watch(source, entry)
            except OSError as exc:
                if exc.errno in LIMITS:
                    self._enter_fallback(entry, exc.errno, retrying)
                    return entry.state
                # No parent folder (yet): the sessions folder is missing too, retried below.
        ident = self._ident(entry.watched_dir)
        if ident is None:
            self._enter_missing(entry, retrying)
            return entry.state
        project, watched_dir = entry.project, entry.watched_dir
        try:
            entry.watch = source.watch_tree(
                watched_dir,
                on_event=lambda change: self._on_event(project, watched_dir, change),
                on_error=lambda exc: self._on_error(project, exc),
            )
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                self._enter_missing(entry, retrying)
            else:
                self._enter_fallback(entry, exc.errno or 0, retrying, exc)
            return entry.state
        err = entry.watch.partial
        if err is not None:
            # The sessions folder is watched but some session folders below it are not: such a
            # partial watch would miss those sessions silently, so the whole project falls back.
            self._disarm(entry, keep_parent=True)
            self._enter_fallback(entry, err, retrying)
            return entry.state
        entry.state, entry.ident, entry.next_scan = "live", ident, None
        return entry.state

    def _add_parent_watch(self, source: WatchSource, entry: _Project) -> None:
        # While the parent is missing too (a branch without agents/ checked out), the nearest folder
        # of the project that exists is watched for the missing one's return, alone (never
        # recursively); without it the retry backoff, up to 5 minutes, decided when it was seen.
        # _check moves the watch down again as the folders come back (the idents differ).
        below = os.path.dirname(entry.sessions_dir)
        for _ in range(below.count(os.sep) + 1):  # at most once per folder on the way down
            parent, name = below, os.path.basename(entry.sessions_dir)
            while parent.startswith(entry.project + os.sep) and self._ident(parent) is None:
                parent, name = os.path.dirname(parent), os.path.basename(parent)
            ident = self._ident(parent)
            wd = source.watch_parent(parent, entry.project, name)
            if wd is None:
                return  # EACCES: nothing is watched
            entry.parent_wd, entry.parent_ident = wd, ident
            # The folder waited for came back before its parent's watch was in place, so no event
            # will tell: watch further down. (The sessions folder itself, _arm looks for next.)
            if parent == below or self._ident(os.path.join(parent, name)) is None:
                return
            self._drop_parent(entry)

    def _drop_parent(self, entry: _Project) -> None:
        wd, entry.parent_wd, entry.parent_ident = entry.parent_wd, None, None
        source = self._current_source()
        if wd is not None and source is not None:
            source.drop_parent(wd, entry.project)

    def _disarm(self, entry: _Project, *, keep_parent: bool = False) -> None:
        source = self._current_source()
        watch, entry.watch = entry.watch, None
        if source is not None and watch is not None:
            source.unwatch_tree(watch)
        if not keep_parent:
            self._drop_parent(entry)

    def _enter_missing(self, entry: _Project, retrying: bool) -> None:
        entry.state, entry.ident, entry.next_scan = "missing", None, None
        # The parent watch reports the folder's creation. Without one (the parent is missing
        # too), or when the sessions folder is a symlink whose target may come back, look again.
        if entry.parent_wd is None or entry.watched_dir != entry.sessions_dir:
            entry.next_retry = self._clock() + self._retry_delay(entry, retrying)

    def _enter_fallback(
        self, entry: _Project, err: int, retrying: bool = False, exc: OSError | None = None
    ) -> None:
        now = self._clock()
        if entry.state != "fallback":
            self._count("fallbacks")
            self._log_fallback(entry, err, exc)
            entry.next_scan, entry.retries = now + self.fallback_scan_s, 0
        entry.state, entry.ident = "fallback", None
        entry.next_retry = now + self._retry_delay(entry, retrying)

    @staticmethod
    def _retry_delay(entry: _Project, retrying: bool) -> float:
        # A project that has just gone missing or fallen back starts again from the shortest delay.
        if not retrying:
            entry.retry.reset()
        return entry.retry.next()

    # --- the story, in the log ---

    def _log_fallback(self, entry: _Project, err: int, exc: OSError | None) -> None:
        say = logger.bind(project=entry.project)
        if err not in LIMITS:
            reason = exc.strerror if exc is not None else os.strerror(err)
            say.warning(
                "cannot watch {}: {}; scanning it every {} s instead",
                entry.sessions_dir,
                reason,
                self.fallback_scan_s,
            )
            return
        what, sysctl, suggested = LIMITS[err]
        if err in self._hinted:
            say.warning("{}; scanning {} every {} s instead", what, entry.sessions_dir, self.fallback_scan_s)
            return
        self._hinted.add(err)
        say.warning(
            "cannot watch {}: {} ({} = {}); scanning it every {} s instead. "
            "Raise the limit: sudo sysctl {}={} (persist it in /etc/sysctl.d/)",
            entry.sessions_dir,
            what,
            sysctl,
            self._read_limit(sysctl),
            self.fallback_scan_s,
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

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
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

from loguru import logger
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
    FileSystemMovedEvent,
)
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup
from watchdog.observers.inotify_c import (
    DEFAULT_EVENT_BUFFER_SIZE,
    CallbackId,
    InotifyConstants,
    InotifyEvent,
    InotifyFD,
    Mask,
    WatchCallback,
    WatchDescriptor,
)
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
from watchdog.utils.delayed_queue import DelayedQueue

from sessionsync.daemon.session_paths import EventKind, FsEvent, event_slugs
from sessionsync.models.keys import SessionKey

if TYPE_CHECKING:
    from watchdog.observers.api import EventQueue

ProjectState = Literal["live", "fallback", "missing"]

# Explicit filter: with watchdog's default mask (IN_OPEN, IN_CLOSE_NOWRITE, IN_MODIFY, ...) its own
# start-up walk over a few thousand session folders floods the kernel queue, the overflow makes it
# rebuild (walk again), and no event is ever delivered. This set gives IN_CREATE, IN_DELETE,
# IN_MOVED_FROM/TO and IN_CLOSE_WRITE (plus IN_DELETE_SELF, always): the walk itself raises none.
# Unpaired moves arrive as created (moved in) and deleted (moved out). IN_MODIFY is left out on
# purpose: a writer's close (IN_CLOSE_WRITE) or rename says the content is complete.
EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileMovedEvent,
    DirMovedEvent,
    FileClosedEvent,
]

# The parent of a sessions folder is watched alone (not recursively) for its children coming and
# going, and for itself being deleted or moved.
_PARENT_MASK = Mask(
    InotifyConstants.IN_CREATE
    | InotifyConstants.IN_DELETE
    | InotifyConstants.IN_MOVED_FROM
    | InotifyConstants.IN_MOVED_TO
    | InotifyConstants.IN_DELETE_SELF
    | InotifyConstants.IN_MOVE_SELF
    | InotifyConstants.IN_ONLYDIR
    | InotifyConstants.IN_DONT_FOLLOW
)

_LIMITS = {
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

# Test seam (see InotifyFaults): a folder standing in for /proc/sys/fs/inotify, for a daemon subprocess.
INOTIFY_SYSCTL_ENV = "SESSIONSYNC_TEST_INOTIFY_SYSCTL_DIR"

T = TypeVar("T")

# `mkdir -p a/b/c` in a session: watchdog's walk of the new `a` watches b and c, then the queued
# IN_CREATE of b and c add them again, which is harmless (same watch) but warned about on stderr,
# once per folder. Only that warning, raised from this module's calls, is silenced.
warnings.filterwarnings(
    "ignore",
    message=r"Callback with id '\d+' already exists for watch",
    category=RuntimeWarning,
    module=r"sessionsync\.daemon\.watcher",
)


def _fs_event(event: FileSystemEvent) -> FsEvent:
    """The watchdog event reduced to what session_paths needs."""
    kind: EventKind = "other"
    if isinstance(event, FileCreatedEvent | DirCreatedEvent):
        kind = "created"
    elif isinstance(event, FileDeletedEvent | DirDeletedEvent):
        kind = "deleted"
    elif isinstance(event, FileSystemMovedEvent):
        kind = "moved"
    elif isinstance(event, FileClosedEvent):
        kind = "closed"
    dest = event.dest_path if isinstance(event, FileSystemMovedEvent) else ""
    return FsEvent(kind, os.fsdecode(event.src_path), os.fsdecode(dest), event.is_directory)


def _ident(path: str) -> tuple[int, int] | None:
    """(device, inode) of the folder at `path`, or None when there is no folder there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


@dataclass
class InotifyFaults:
    """Test seam: the kernel's inotify limits, lowered for this process only, so that tests reach
    queue overflow and ENOSPC without changing the machine's sysctls under every other process.

    `max_queued_events`: a read from an inotify instance that returns more events than this means a
    queue of that size would have overflowed: the rest are dropped and IN_Q_OVERFLOW (wd -1) takes
    their place, as the kernel delivers it. Read when an instance is created, like the sysctl.
    `max_user_watches`: adding a watch while this process holds that many fails with ENOSPC. Read at
    each watch added, like the sysctl. `fail_watch(path)`: called before each watch is added; it may
    raise OSError. `sysctl_dir`: a folder whose files `max_queued_events` and `max_user_watches`, when
    present, give those two values instead (re-read each time, so a test can lower and restore them
    while a daemon runs); `from_env` takes it from $SESSIONSYNC_TEST_INOTIFY_SYSCTL_DIR.
    """

    max_queued_events: int | None = None
    max_user_watches: int | None = None
    fail_watch: Callable[[str], None] | None = None
    sysctl_dir: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> InotifyFaults | None:
        folder = env.get(INOTIFY_SYSCTL_ENV, "")
        return cls(sysctl_dir=folder) if folder else None

    def queued_events(self) -> int | None:
        return self._value("max_queued_events", self.max_queued_events)

    def user_watches(self) -> int | None:
        return self._value("max_user_watches", self.max_user_watches)

    def before_watch(self, path: bytes) -> None:
        """Raise what the kernel (or the test) would for adding a watch on `path` now."""
        if self.fail_watch is not None:
            self.fail_watch(os.fsdecode(path))
        limit = self.user_watches()
        if limit is not None and _watches_held() >= limit:
            raise OSError(errno.ENOSPC, "inotify watch limit reached")

    def _value(self, name: str, given: int | None) -> int | None:
        if self.sysctl_dir is None:
            return given
        try:
            with open(os.path.join(self.sysctl_dir, name), encoding="ascii") as f:
                text = f.read().strip()
        except FileNotFoundError:
            return given
        return int(text) if text else given


def _watches_held() -> int:
    """inotify watches this process holds, counted by the kernel (one `inotify wd:` line each in
    the fdinfo of every inotify descriptor), as the limit counts them."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
                count += f.read().count("inotify wd:")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor, or another thread's)
    return count


# --- watchdog, adapted -------------------------------------------------------------------------
# Small subclasses of watchdog's inotify classes, for four things its public surface does not give:
# a hook on queue overflow, a signal when one of its threads ends, the watch-limit errors it
# swallows below the root of a recursive watch, and prompt delivery of a rename.


class _PromptDelayedQueue(DelayedQueue[T]):
    """watchdog holds an IN_MOVED_FROM up to 0.5 s to pair it with its IN_MOVED_TO, but its `get`
    sleeps the whole 0.5 s when it meets the held event first, even if the pair arrives a moment
    later: an atomic replace (temp + rename) is then seen late and so is every event behind it.
    This `get` waits on the condition instead, and `remove` (the pairing) wakes it."""

    def get(self) -> T | None:
        with self._not_empty:
            while True:
                if self._closed:
                    return None
                if not self._queue:
                    self._not_empty.wait()
                    continue
                head, inserted, delayed = self._queue[0]
                left = inserted + self.delay - time.monotonic() if delayed else 0.0
                if left > 0:
                    self._not_empty.wait(left)
                    continue
                self._queue.popleft()
                return head

    def remove(self, predicate: Callable[[T], bool]) -> T | None:
        item = super().remove(predicate)
        if item is not None:
            with self._not_empty:
                self._not_empty.notify_all()
        return item


class _PromptMoveGrouper(InotifyMoveEventGrouper):
    def __init__(self) -> None:
        super().__init__()
        self._queue = _PromptDelayedQueue(self.delay)


@dataclass
class _WatchGroup(InotifyWatchGroup):
    """One recursive watch tree; reports the watch-limit errors watchdog swallows below the root
    (a sessions folder watched only in part would silently miss sessions)."""

    on_limit: Callable[[int], None] | None = None
    _move_event_grouper: InotifyMoveEventGrouper = field(default_factory=_PromptMoveGrouper, init=False)

    def _add_callback(self, path: bytes) -> None:
        try:
            wd = self._inotify_fd.add_callback(path, self.event_mask, self._callback, self._id)
        except OSError as exc:
            if exc.errno in _LIMITS and self.on_limit is not None:
                self.on_limit(exc.errno)
            if path == self.path:
                raise
            return
        if wd == -1:
            # watchdog lets EACCES through as watch descriptor -1: nothing is watched there.
            if path == self.path:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
            return
        self._active_callbacks_by_path[path] = wd
        self._active_callbacks_by_watch[wd] = path

    def _remove_watch_internally(self, wd: WatchDescriptor) -> None:
        # A session folder moved to another project keeps its watch (same inode), then shared with
        # that project's group, while this one still maps it to the old path; once that name is
        # reused and removed, watchdog's version raises KeyError here and kills the reader thread.
        path = self._active_callbacks_by_watch.pop(wd, None)
        if path is not None and self._active_callbacks_by_path.get(path) == wd:
            del self._active_callbacks_by_path[path]


class _Emitter(InotifyEmitter):
    """watchdog's inotify emitter with our watch group, and a signal when its thread ends."""

    def __init__(
        self,
        event_queue: EventQueue,
        watch: ObservedWatch,
        *,
        timeout: float,
        event_filter: list[type[FileSystemEvent]] | None = None,
        inotify_fd: InotifyFD | None = None,
        on_limit: Callable[[str, int], None],
        on_exit: Callable[[str], None],
    ) -> None:
        super().__init__(
            event_queue, watch, timeout=timeout, event_filter=event_filter, inotify_fd=inotify_fd
        )
        self._on_limit = on_limit
        self._on_exit = on_exit

    def on_thread_start(self) -> None:
        path = self.watch.path

        def limit(err: int) -> None:
            self._on_limit(path, err)

        self._inotify = _WatchGroup(
            self._inotify_fd,
            os.fsencode(path),
            is_recursive=self.watch.is_recursive,
            event_mask=self.get_event_mask_from_filter(),
            follow_symlink=self.watch.follow_symlink,
            on_limit=limit,
        )

    def run(self) -> None:
        try:
            super().run()
        except Exception:
            logger.exception("inotify emitter for {} failed", self.watch.path)
        finally:
            self._on_exit(self.watch.path)


class _InotifyFD(InotifyFD):
    """The inotify instance: reports each queue overflow (the watcher then replaces the instance)
    and its own unexpected end; applies the test seam's limits (InotifyFaults), if any."""

    def __init__(
        self, on_overflow: Callable[[], None], on_death: Callable[[], None], faults: InotifyFaults | None
    ) -> None:
        super().__init__()
        self._on_overflow = on_overflow
        self._on_death = on_death
        self._faults = faults
        self._queue_size = faults.queued_events() if faults is not None else None

    def add_callback(
        self, path: bytes, mask: Mask, callback: WatchCallback, id_: CallbackId
    ) -> WatchDescriptor:
        if self._faults is not None:
            self._faults.before_watch(path)
        return super().add_callback(path, mask, callback, id_)

    def read_events(self, *, event_buffer_size: int = DEFAULT_EVENT_BUFFER_SIZE) -> list[InotifyEvent]:
        events = super().read_events(event_buffer_size=event_buffer_size)
        size = self._queue_size
        if size is None or len(events) <= size:
            return events
        # More events in one read than a queue of `size` holds: the kernel would have kept the first
        # ones and queued one IN_Q_OVERFLOW (wd -1) in place of the rest.
        overflow = InotifyEvent(WatchDescriptor(-1), InotifyConstants.IN_Q_OVERFLOW, 0, b"")
        return [*events[:size], overflow]

    def handle_event(self, event: InotifyEvent) -> None:
        if event.is_queue_overflow:
            # Not watchdog's rebuild in place: every watch it removes queues an IN_IGNORED, so a tree
            # of more folders than the queue holds overflows again at once, forever.
            self._on_overflow()
            return
        super().handle_event(event)

    def run(self) -> None:
        try:
            super().run()
        except Exception:
            logger.exception("inotify reader thread failed")
        finally:
            if not self.stopped_event.is_set():
                self._on_death()


class _Observer(BaseObserver):
    """An inotify observer on an inotify instance of its own, which reports its thread's end."""

    def __init__(
        self,
        *,
        on_overflow: Callable[[], None],
        on_death: Callable[[], None],
        on_limit: Callable[[str, int], None],
        on_emitter_exit: Callable[[str], None],
        faults: InotifyFaults | None,
    ) -> None:
        self.fd = _InotifyFD(on_overflow, on_death, faults)
        self.fd.start()
        super().__init__(_Emitter, inotify_fd=self.fd, on_limit=on_limit, on_exit=on_emitter_exit)
        self._on_death = on_death

    def emitter_alive(self, watch: ObservedWatch) -> bool:
        return any(emitter.watch == watch and emitter.is_alive() for emitter in self.emitters)

    def threads_alive(self) -> bool:
        return self.is_alive() and self.fd.is_alive()

    def run(self) -> None:
        try:
            super().run()
        except Exception:
            logger.exception("inotify event dispatcher failed")
        finally:
            if not self.stopped_event.is_set():
                self._on_death()

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self.fd.stop()
        self.fd.join()


class _ParentWatches:
    """The watches on the parents of sessions folders (a watchdog WatchCallback): any event about
    the sessions folder's name, or the parent itself going, asks for a check of that project."""

    def __init__(self, on_change: Callable[[str], None]) -> None:
        self._on_change = on_change
        self._lock = threading.Lock()
        self._by_wd: dict[int, dict[str, bytes]] = {}  # wd -> project -> name of its sessions folder

    @property
    def id(self) -> CallbackId:
        return CallbackId(id(self))

    def add(self, wd: int, project: str, name: str) -> None:
        with self._lock:
            self._by_wd.setdefault(wd, {})[project] = os.fsencode(name)

    def discard(self, wd: int, project: str) -> bool:
        """Forget `project` on `wd`; True when no project is left on it (the watch can go)."""
        with self._lock:
            projects = self._by_wd.get(wd, {})
            projects.pop(project, None)
            if projects:
                return False
            self._by_wd.pop(wd, None)
            return True

    def on_event(self, event: InotifyEvent) -> None:
        itself = event.is_delete_self or event.is_move_self
        with self._lock:
            names = dict(self._by_wd.get(event.wd, {}))
        for project, name in names.items():
            if itself or event.name == name:
                self._on_change(project)

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        with self._lock:
            projects = list(self._by_wd.pop(wd, {}))
        for project in projects:
            self._on_change(project)

    def on_queue_overflow(self) -> None:
        """Overflow is reported by the inotify instance itself (`_InotifyFD`), once for all."""


# --- the watcher ---------------------------------------------------------------------------------


@dataclass
class _Project:
    project: str
    sessions_dir: str  # as given, absolute
    watched_dir: str  # its real path: what the recursive watch is on
    state: ProjectState = "missing"
    watch: ObservedWatch | None = None
    ident: tuple[int, int] | None = None  # (device, inode) of the watched folder
    parent_wd: int | None = None
    parent_ident: tuple[int, int] | None = None
    next_scan: float | None = None  # fallback: when to ask for the next periodic scan
    next_retry: float | None = None  # fallback, or missing unobserved: when to try again
    backoff: float = 0.0
    retries: int = 0


class _Handler(FileSystemEventHandler):
    """Translates one project's watchdog events into keys. Runs on watchdog's dispatcher thread,
    where an exception would end the thread silently: it catches everything."""

    def __init__(self, watcher: SessionWatcher, project: str, watched_dir: str) -> None:
        self._watcher = watcher
        self._project = project
        self._dir = watched_dir

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._watcher._on_fs_event(self._project, self._dir, event)
        except Exception as exc:
            self._watcher._handler_failed(self._project, exc)


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
        self._observer: _Observer | None = None
        self._parents = _ParentWatches(self._request_check)
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
        self._arming_limits: dict[str, int] = {}  # the same, read by _arm
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
            observer.join()

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

    def _on_fs_event(self, project: str, watched_dir: str, event: FileSystemEvent) -> None:
        with self._signal:
            self._counts["events"] += 1
        change = _fs_event(event)
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
            # Also kept apart for _arm, which runs the schedule that raised it on its own thread:
            # the maintenance thread may have emptied the inbox before _arm looks.
            self._arming_limits.setdefault(watched_dir, err)
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
            and observer.emitter_alive(entry.watch)
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
        handler = _Handler(self, entry.project, entry.watched_dir)
        with self._signal:
            self._arming_limits.pop(entry.watched_dir, None)
        try:
            entry.watch = observer.schedule(
                handler, entry.watched_dir, recursive=True, event_filter=EVENT_FILTER
            )
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                self._enter_missing(entry, backoff)
            else:
                self._enter_fallback(entry, exc.errno or 0, backoff, exc)
            return entry.state
        with self._signal:
            err = self._arming_limits.pop(entry.watched_dir, None)
        if err is not None:
            # The sessions folder is watched but some session folders below it are not: such a
            # partial watch would miss those sessions silently, so the whole project falls back.
            self._disarm(entry, keep_parent=True)
            self._enter_fallback(entry, err, backoff)
            return entry.state
        entry.state, entry.ident, entry.next_scan = "live", ident, None
        return entry.state

    def _add_parent_watch(self, observer: _Observer, entry: _Project) -> None:
        parent, name = os.path.dirname(entry.sessions_dir), os.path.basename(entry.sessions_dir)
        # While the parent is missing too (a branch without agents/ checked out), the nearest folder
        # of the project that exists is watched for the missing one's return, alone (never
        # recursively); without it the retry backoff, up to 5 minutes, decided when it was seen.
        # _check moves the watch down again as the folders come back (the idents differ).
        while parent.startswith(entry.project + os.sep) and _ident(parent) is None:
            parent, name = os.path.dirname(parent), os.path.basename(parent)
        ident = _ident(parent)
        path = os.fsencode(parent)
        wd = observer.fd.add_callback(path, _PARENT_MASK, self._parents, self._parents.id)
        if wd == -1:
            return  # EACCES, let through by watchdog: nothing is watched
        self._parents.add(wd, entry.project, name)
        entry.parent_wd, entry.parent_ident = wd, ident

    def _drop_parent(self, entry: _Project) -> None:
        wd, entry.parent_wd, entry.parent_ident = entry.parent_wd, None, None
        observer = self._observer
        if wd is not None and self._parents.discard(wd, entry.project) and observer is not None:
            observer.fd.remove_callbacks([(WatchDescriptor(wd), self._parents.id)])

    def _disarm(self, entry: _Project, *, keep_parent: bool = False) -> None:
        observer = self._observer
        watch, entry.watch = entry.watch, None
        if observer is not None and watch is not None:
            # A watch whose emitter ended by itself (its folder deleted) is still registered.
            with contextlib.suppress(KeyError):
                observer.unschedule(watch)
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

    def _ensure_observer(self) -> _Observer | None:
        """The observer, created when there is none; None when no inotify instance can be had
        (every project then falls back, and each retry tries again)."""
        if self._observer is not None:
            return self._observer
        try:
            observer = _Observer(
                on_overflow=self._on_overflow,
                on_death=self._on_death,
                on_limit=self._limit_hit,
                on_emitter_exit=self._emitter_exited,
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
                old.stop()
                old.join(timeout=5)
            except Exception:
                logger.exception("stopping the old inotify observer failed")
        # Its watches, parent ones included, went with its inotify instance.
        self._parents = _ParentWatches(self._request_check)
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

"""One inotify instance as a source of session-folder events, built on watchdog's inotify observer.

This is the one module that reaches below watchdog's public API (pinned in pyproject.toml), for
what the public surface does not give: a hook on queue overflow, a signal when one of its threads
ends, the watch-limit errors it swallows below the root of a recursive watch, prompt delivery of
a rename, plain watches on parent folders, and the hooks of the test seam (inotify_faults.py).
Every private member it overrides or touches is named in WATCHDOG_PRIVATE_MEMBERS, which
tests/test_inotify_source.py checks against the installed watchdog.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

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
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper, PathedInotifyEvent

from sessionsync.daemon.inotify_faults import InotifyFaults
from sessionsync.daemon.session_paths import EventKind, FsEvent

if TYPE_CHECKING:
    from watchdog.observers.api import EventQueue
    from watchdog.observers.inotify_move_event_grouper import GroupedInotifyEvent

# What this module uses of watchdog below its public API, by class: overridden or touched. A rename
# upstream would silently turn an override into dead code, so the test named above fails instead.
WATCHDOG_PRIVATE_MEMBERS: dict[type, tuple[str, ...]] = {
    InotifyEmitter: ("_inotify",),  # set by on_thread_start: our watch group in place of watchdog's
    InotifyWatchGroup: (
        "_move_event_grouper",  # field: our prompt grouper in place of watchdog's
        "_remove_watch_internally",  # overridden: tolerant of a watch shared after a move
        "_active_callbacks_by_watch",  # read and updated by that override
        "_active_callbacks_by_path",
    ),
}

# The errors inotify reports for its limits: watches (fs.inotify.max_user_watches) and instances.
LIMIT_ERRNOS = frozenset({errno.ENOSPC, errno.EMFILE})

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

T = TypeVar("T")

# `mkdir -p a/b/c` in a session: watchdog's walk of the new `a` watches b and c, then the queued
# IN_CREATE of b and c add them again, which is harmless (same watch) but warned about on stderr,
# once per folder. Only that warning, raised from this module's calls, is silenced.
warnings.filterwarnings(
    "ignore",
    message=r"Callback with id '\d+' already exists for watch",
    category=RuntimeWarning,
    module=r"sessionsync\.daemon\.inotify_source",
)


# --- prompt renames ------------------------------------------------------------------------------


class PromptDelayedQueue(Generic[T]):
    """A queue whose delayed items (an IN_MOVED_FROM waiting for its IN_MOVED_TO) are held up to
    `delay` seconds. watchdog's own DelayedQueue sleeps the whole delay when it meets a held item
    first, even if the pair arrives a moment later: an atomic replace (temp + rename) is then seen
    late and so is every event behind it. Here `get` waits on the condition, and `remove` (the
    pairing) wakes it. Our own class, not a subclass: it depends on none of watchdog's internals."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._not_empty = threading.Condition(threading.Lock())
        self._items: deque[tuple[T, float, bool]] = deque()
        self._closed = False

    def put(self, item: T, *, delay: bool = False) -> None:
        with self._not_empty:
            self._items.append((item, time.monotonic(), delay))
            self._not_empty.notify_all()

    def get(self) -> T | None:
        """The next item once its hold is over; None once closed."""
        with self._not_empty:
            while True:
                if self._closed:
                    return None
                if not self._items:
                    self._not_empty.wait()
                    continue
                head, inserted, delayed = self._items[0]
                left = inserted + self.delay - time.monotonic() if delayed else 0.0
                if left > 0:
                    self._not_empty.wait(left)
                    continue
                self._items.popleft()
                return head

    def find(self, predicate: Callable[[T], bool]) -> T | None:
        with self._not_empty:
            return next((item for item, _, _ in self._items if predicate(item)), None)

    def remove(self, predicate: Callable[[T], bool]) -> T | None:
        with self._not_empty:
            for i, (item, _, _) in enumerate(self._items):
                if predicate(item):
                    del self._items[i]
                    self._not_empty.notify_all()
                    return item
        return None

    def clear(self) -> None:
        with self._not_empty:
            self._items.clear()

    def close(self) -> None:
        with self._not_empty:
            self._closed = True
            self._not_empty.notify_all()


class _PromptMoveGrouper(InotifyMoveEventGrouper):
    """watchdog's move grouper (pairs IN_MOVED_FROM with IN_MOVED_TO by cookie) on a
    PromptDelayedQueue. Every public method is ours, so nothing of the base's state is used (its
    __init__ is not called); a test checks that no public method of the base is left inherited."""

    def __init__(self) -> None:
        self._events: PromptDelayedQueue[GroupedInotifyEvent] = PromptDelayedQueue(self.delay)

    def read_event(self) -> GroupedInotifyEvent | None:
        return self._events.get()

    def put_event(self, event: PathedInotifyEvent) -> None:
        # Only an unpaired move's source waits, for its destination.
        grouped: GroupedInotifyEvent = event
        if event.ev.is_moved_to:
            source = self._events.remove(self._moved_from(event.ev.cookie))
            if isinstance(source, PathedInotifyEvent):
                grouped = (source, event)
        self._events.put(grouped, delay=event.ev.is_moved_from)

    def get_queued_moved_from_event(self, cookie: int) -> PathedInotifyEvent | None:
        found = self._events.find(self._moved_from(cookie))
        return found if isinstance(found, PathedInotifyEvent) else None

    def discard_pending_events(self) -> None:
        self._events.clear()

    def close(self) -> None:
        self._events.close()

    @staticmethod
    def _moved_from(cookie: int) -> Callable[[GroupedInotifyEvent], bool]:
        def matches(event: GroupedInotifyEvent) -> bool:
            return (
                isinstance(event, PathedInotifyEvent) and event.ev.is_moved_from and event.ev.cookie == cookie
            )

        return matches


# --- watchdog, adapted ---------------------------------------------------------------------------


@dataclass
class _WatchGroup(InotifyWatchGroup):
    """One recursive watch tree, with prompt renames and a tolerant watch removal."""

    _move_event_grouper: InotifyMoveEventGrouper = field(default_factory=_PromptMoveGrouper, init=False)

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
        inotify_fd: InotifyFD,
        on_exit: Callable[[str], None],
    ) -> None:
        super().__init__(
            event_queue, watch, timeout=timeout, event_filter=event_filter, inotify_fd=inotify_fd
        )
        self._fd = inotify_fd
        self._on_exit = on_exit

    def on_thread_start(self) -> None:
        self._inotify = _WatchGroup(
            self._fd,
            os.fsencode(self.watch.path),
            is_recursive=self.watch.is_recursive,
            event_mask=self.get_event_mask_from_filter(),
            follow_symlink=self.watch.follow_symlink,
        )

    def run(self) -> None:
        try:
            super().run()
        except Exception:
            logger.exception("inotify emitter for {} failed", self.watch.path)
        finally:
            self._on_exit(self.watch.path)


class _InotifyFD(InotifyFD):
    """The inotify instance: reports each queue overflow (the watcher then replaces the instance),
    its own unexpected end, and each watch-limit error of a watch tree, even where watchdog swallows
    it below the tree's root (a sessions folder watched only in part would silently miss sessions);
    applies the test seam's limits, if any. Only public methods are overridden."""

    def __init__(
        self,
        *,
        on_overflow: Callable[[], None],
        on_death: Callable[[], None],
        on_limit: Callable[[str, int], None],
        faults: InotifyFaults | None,
    ) -> None:
        super().__init__()
        self._on_overflow = on_overflow
        self._on_death = on_death
        self._on_limit = on_limit
        self._faults = faults
        self._queue_size = faults.queued_events() if faults is not None else None

    def add_callback(
        self, path: bytes, mask: Mask, callback: WatchCallback, id_: CallbackId
    ) -> WatchDescriptor:
        try:
            if self._faults is not None:
                self._faults.before_watch(path)
            wd = super().add_callback(path, mask, callback, id_)
        except OSError as exc:
            # Reported whatever the path; the watch group re-raises it only for its root.
            if exc.errno in LIMIT_ERRNOS and isinstance(callback, InotifyWatchGroup):
                self._on_limit(os.fsdecode(callback.path), exc.errno)
            raise
        if wd == -1:
            # watchdog lets EACCES through as watch descriptor -1: nothing is watched there. A
            # session folder made while the sessions folder could not be read is one: reported as
            # a limit is, so that the project falls back rather than miss that session silently.
            if isinstance(callback, InotifyWatchGroup):
                self._on_limit(os.fsdecode(callback.path), errno.EACCES)
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return wd

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
    """watchdog's observer (the dispatcher thread) on our emitters, which reports its thread's end
    and stops its inotify instance with it."""

    def __init__(
        self, fd: _InotifyFD, *, on_death: Callable[[], None], on_tree_exit: Callable[[str], None]
    ) -> None:
        super().__init__(_Emitter, inotify_fd=fd, on_exit=on_tree_exit)
        self.fd = fd
        self._on_death = on_death

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


class _Handler(FileSystemEventHandler):
    """Hands one watch tree's events on as FsEvents. Runs on watchdog's dispatcher thread, where an
    exception would end the thread silently: it catches everything."""

    def __init__(self, on_event: Callable[[FsEvent], None], on_error: Callable[[Exception], None]) -> None:
        self._on_event = on_event
        self._on_error = on_error

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._on_event(fs_event(event))
        except Exception as exc:
            self._on_error(exc)


def fs_event(event: FileSystemEvent) -> FsEvent:
    """A watchdog event reduced to what session_paths needs."""
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


# --- the source ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeWatch:
    """A recursive watch on one sessions folder. `partial` is the limit error (errno) met below its
    root while it was set up: some session folders are not watched."""

    path: str
    watch: ObservedWatch
    partial: int | None = None


class InotifySource:
    """One inotify instance, its reader, emitter and dispatcher threads; recursive watches on
    sessions folders and plain ones on their parents. The callbacks run on watchdog's threads.

    `on_overflow()`: events were lost. `on_death()`: a thread ended by itself. `on_limit(path,
    errno)`: a folder below the watched `path` could not be watched. `on_tree_exit(path)`: the
    watch on `path` ended by itself (its folder deleted). `on_parent_change(project)`: something
    happened to `project`'s sessions folder's name or to its parent folder.
    Raises OSError (EMFILE) when no inotify instance can be had.
    """

    def __init__(
        self,
        *,
        on_overflow: Callable[[], None],
        on_death: Callable[[], None],
        on_limit: Callable[[str, int], None],
        on_tree_exit: Callable[[str], None],
        on_parent_change: Callable[[str], None],
        faults: InotifyFaults | None = None,
    ) -> None:
        self._on_limit = on_limit
        # Limit errors met while a tree is being set up, read back by watch_tree: they come from the
        # thread that calls schedule(), before it returns.
        self._arming: dict[str, int] = {}
        self._arming_lock = threading.Lock()
        fd = _InotifyFD(on_overflow=on_overflow, on_death=on_death, on_limit=self._limit, faults=faults)
        fd.start()
        self.observer = _Observer(fd, on_death=on_death, on_tree_exit=on_tree_exit)
        self._parents = _ParentWatches(on_parent_change)

    def start(self) -> None:
        self.observer.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the threads (the inotify instance and every watch with them) and wait for them."""
        self.observer.stop()
        self.observer.join(timeout)

    def threads_alive(self) -> bool:
        """The dispatcher and the reader threads both run."""
        return self.observer.is_alive() and self.observer.fd.is_alive()

    def watch_tree(
        self, path: str, on_event: Callable[[FsEvent], None], on_error: Callable[[Exception], None]
    ) -> TreeWatch:
        """Watch the folder `path` and everything below it; events go to `on_event` on the dispatcher
        thread (and whatever it raises to `on_error`). Raises OSError when `path` cannot be watched."""
        with self._arming_lock:
            self._arming.pop(path, None)
        watch = self.observer.schedule(
            _Handler(on_event, on_error), path, recursive=True, event_filter=EVENT_FILTER
        )
        with self._arming_lock:
            partial = self._arming.pop(path, None)
        return TreeWatch(path, watch, partial)

    def tree_alive(self, tree: object) -> bool:
        assert isinstance(tree, TreeWatch), tree  # only ever one of ours
        return any(emitter.watch == tree.watch and emitter.is_alive() for emitter in self.observer.emitters)

    def unwatch_tree(self, tree: object) -> None:
        assert isinstance(tree, TreeWatch), tree
        # A watch whose emitter ended by itself (its folder deleted) is still registered.
        with contextlib.suppress(KeyError):
            self.observer.unschedule(tree.watch)

    def watch_parent(self, path: str, project: str, name: str) -> int | None:
        """Watch the folder `path` alone for its child `name` (the sessions folder, or the folder on
        the way to it) coming and going, and for itself going; its watch descriptor, or None when
        it may not be read (EACCES). Raises OSError when it cannot be watched."""
        try:
            wd = self.observer.fd.add_callback(
                os.fsencode(path), _PARENT_MASK, self._parents, self._parents.id
            )
        except PermissionError:
            return None
        self._parents.add(wd, project, name)
        return int(wd)

    def drop_parent(self, wd: int, project: str) -> None:
        if self._parents.discard(wd, project):
            self.observer.fd.remove_callbacks([(WatchDescriptor(wd), self._parents.id)])

    def _limit(self, path: str, err: int) -> None:
        with self._arming_lock:
            self._arming.setdefault(path, err)
        self._on_limit(path, err)

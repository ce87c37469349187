"""One inotify instance as a source of session-folder events, on watchdog's inotify instance class.

This is the one module that reaches below watchdog's public API (pinned in pyproject.toml). It uses
watchdog's `InotifyFD` (the instance, its reader thread, the event parsing) but none of its observer,
emitters or recursive watch groups: those cost a thread per watched folder tree and a watch, with
about 550 bytes of bookkeeping, per folder at any depth. Here every watch is plain (not recursive):
the sessions folder, each folder right inside it (a session) and the sessions folder's parent, so a
project costs 2 watches plus one per session, whatever lies deeper, and all projects share the one
reader thread. Events are read and handled on that thread, as soon as each read returns. Every
private member touched is named in WATCHDOG_PRIVATE_MEMBERS, which tests/test_inotify_source.py
checks against the installed watchdog.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from loguru import logger
from watchdog.observers.inotify_c import (
    DEFAULT_EVENT_BUFFER_SIZE,
    InotifyConstants,
    InotifyEvent,
    InotifyFD,
    Mask,
    WatchDescriptor,
    inotify_add_watch,
    inotify_rm_watch,
)

from sessionsync.daemon.inotify_faults import InotifyFaults
from sessionsync.daemon.session_paths import EventKind, FsEvent

# What this module uses of watchdog below its public API, by class. A rename upstream would turn a
# use into an AttributeError on the reader thread, so the test named above fails first instead.
WATCHDOG_PRIVATE_MEMBERS: dict[type, tuple[str, ...]] = {
    InotifyFD: (
        "_inotify_fd",  # the descriptor our watches are added to and removed from
        "_lock",  # held while doing so: the reader closes the descriptor under it
        "_closed",  # read under it (a closed descriptor's number may be another file's by now); ends run()
        "_raise_error",  # errno of a failed inotify_add_watch as the OSError watchdog raises
    ),
}

# The errors inotify reports for its limits: watches (fs.inotify.max_user_watches) and instances.
LIMIT_ERRNOS = frozenset({errno.ENOSPC, errno.EMFILE})

# One mask for every watch, so that a folder watched in two roles (two projects nested in each
# other) keeps all the events both need: inotify keeps one mask per watched folder. IN_CREATE,
# IN_DELETE and IN_MOVED_FROM/TO tell session folders and files coming and going; IN_CLOSE_WRITE
# a file written (IN_MODIFY is left out on purpose: a writer's close, or a rename, says the content
# is complete); IN_DELETE_SELF / IN_MOVE_SELF a watched folder going. Links are never followed.
_MASK = Mask(
    InotifyConstants.IN_CREATE
    | InotifyConstants.IN_DELETE
    | InotifyConstants.IN_MOVED_FROM
    | InotifyConstants.IN_MOVED_TO
    | InotifyConstants.IN_CLOSE_WRITE
    | InotifyConstants.IN_DELETE_SELF
    | InotifyConstants.IN_MOVE_SELF
    | InotifyConstants.IN_ONLYDIR
    | InotifyConstants.IN_DONT_FOLLOW
)


class _Owner(Protocol):
    """Whoever holds a watch: told each of its events, and when the kernel ended it. Both run on the
    reader thread, where an exception would end the thread: they catch everything."""

    def on_event(self, event: InotifyEvent, name: str) -> None: ...

    def on_gone(self, wd: int, name: str) -> None: ...


# Who holds a watch and as what: (owner, name), name "" for the owner's own folder. Most watches
# have one holder, stored as the bare pair; a folder watched by two owners holds a list.
_Holder = tuple[_Owner, str]


class _InotifyFD(InotifyFD):
    """The inotify instance with its own table of watches (watch descriptor -> holders), lighter
    than watchdog's per-watch objects; reports each queue overflow (the watcher then replaces the
    instance) and its own unexpected end; applies the test seam's limits, if any. Only public
    methods are overridden."""

    def __init__(
        self, *, on_overflow: Callable[[], None], on_death: Callable[[], None], faults: InotifyFaults | None
    ) -> None:
        super().__init__()
        self._on_overflow = on_overflow
        self._on_death = on_death
        self._faults = faults
        self._queue_size = faults.queued_events() if faults is not None else None
        self._holders: dict[int, _Holder | list[_Holder]] = {}  # under self._lock

    def add_watch(self, path: str, owner: _Owner, name: str) -> int:
        """Watch the folder `path` for `owner` (as `name`); its watch descriptor, shared with any
        other holder of that folder. Raises OSError as inotify does (PermissionError for EACCES)."""
        encoded = os.fsencode(path)
        if self._faults is not None:
            self._faults.before_watch(encoded)
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "the inotify instance is closed", path)
            wd = int(inotify_add_watch(self._inotify_fd, encoded, _MASK))
            if wd == -1:
                InotifyFD._raise_error()  # raises, except for EACCES
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
            held = self._holders.get(wd)
            if held is None:
                self._holders[wd] = (owner, name)
            elif isinstance(held, tuple):
                if held[0] is not owner:
                    self._holders[wd] = [held, (owner, name)]
                else:
                    self._holders[wd] = (owner, name)
            else:
                held[:] = [h for h in held if h[0] is not owner] + [(owner, name)]
        return wd

    def remove_watch(self, wd: int, owner: _Owner) -> None:
        """`owner` no longer holds watch `wd`; the watch goes with its last holder."""
        with self._lock:
            held = self._holders.get(wd)
            if held is None:
                return
            left = [h for h in ([held] if isinstance(held, tuple) else held) if h[0] is not owner]
            if left:
                self._holders[wd] = left[0] if len(left) == 1 else left
                return
            del self._holders[wd]
            if not self._closed:
                # EINVAL: the kernel ended it already (its IN_IGNORED is on its way).
                inotify_rm_watch(self._inotify_fd, WatchDescriptor(wd))

    def watch_count(self) -> int:
        with self._lock:
            return len(self._holders)

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
            self._on_overflow()
            return
        with self._lock:
            held = self._holders.pop(event.wd, None) if event.is_ignored else self._holders.get(event.wd)
        if held is None:
            return  # a watch removed meanwhile
        # Outside the lock: a holder adds and removes watches as it handles its events.
        for owner, name in [held] if isinstance(held, tuple) else list(held):
            if event.is_ignored:
                owner.on_gone(event.wd, name)
            else:
                owner.on_event(event, name)

    def run(self) -> None:
        # Events are read and handled on this one thread. watchdog's own run() (7.1.1) hands each
        # read to a second, dispatcher thread, and when two reads come less than 1 ms apart it polls
        # up to 1 ms more for the rest of a burst: an atomic save's rename follows its temporary
        # file's events by less than that, so every save waited that millisecond and the hop.
        try:
            while self.should_keep_running() and not self._closed:
                for event in self.read_events():
                    self.handle_event(event)
        except Exception:
            logger.exception("inotify reader thread failed")
        finally:
            if not self.stopped_event.is_set():
                self._on_death()


def _kind(event: InotifyEvent) -> EventKind:
    if event.is_create or event.is_moved_to:
        return "created"  # a move is seen as its two halves, each on its own folder's watch
    if event.is_delete or event.is_moved_from:
        return "deleted"
    return "closed" if event.is_close_write else "other"


class SessionsWatch:
    """One sessions folder's watches: a plain one on the folder and one on each folder right inside
    it (each a session, links not followed); nothing deeper. Hands its events on as FsEvents (to
    `on_event`, or what that raises to `on_error`), adds and drops session folders' watches as they
    come and go, reports a limit met doing so (`on_limit(path, errno)`) and the end of its own watch
    (`on_exit(path)`). `partial` is the limit error met while it was set up: some session folders
    are not watched."""

    def __init__(
        self,
        fd: _InotifyFD,
        path: str,
        *,
        on_event: Callable[[FsEvent], None],
        on_error: Callable[[Exception], None],
        on_limit: Callable[[str, int], None],
        on_exit: Callable[[str], None],
    ) -> None:
        self.path = path
        self.partial: int | None = None
        self.alive = False
        self._fd = fd
        self._on_event, self._on_error = on_event, on_error
        self._on_limit, self._on_exit = on_limit, on_exit
        self._lock = threading.Lock()  # before the instance's lock, never after it
        self._wd: int | None = None
        self._children: dict[str, int] = {}  # session folder name -> its watch descriptor
        self._closed = False

    def arm(self) -> None:
        """Watch the folder, then each folder in it: one created meanwhile is seen by both, and
        added once. Raises OSError when the sessions folder itself cannot be watched."""
        with self._lock:
            self._wd = self._fd.add_watch(self.path, self, "")
            self.alive = True
        with os.scandir(self.path) as entries:
            names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        for name in names:
            err = self._add_child(name)
            if err is not None:
                self.partial = err
                return

    def disarm(self) -> None:
        with self._lock:
            self._closed, self.alive = True, False
            wds, self._children = list(self._children.values()), {}
            if self._wd is not None:
                wds.append(self._wd)
            self._wd = None
        for wd in wds:
            self._fd.remove_watch(wd, self)

    def watch_count(self) -> int:
        with self._lock:
            return len(self._children) + (self._wd is not None)

    def _add_child(self, name: str) -> int | None:
        """Watch the session folder `name`; the error when it could not be (a limit, or EACCES),
        else None. A folder that cannot be read is one: made while the sessions folder itself
        could not be read (chmod 000), it would stay unwatched once that is undone, and its writes
        would be missed silently; reported as a limit is, the project falls back to scanning and
        its retries watch it again."""
        with self._lock:
            if self._closed or name in self._children:
                return None
            try:
                self._children[name] = self._fd.add_watch(os.path.join(self.path, name), self, name)
            except OSError as exc:
                if exc.errno in LIMIT_ERRNOS or exc.errno == errno.EACCES:
                    return exc.errno
                # Gone again, or not a folder (a link): no session folder to watch.
        return None

    def _drop_child(self, name: str) -> None:
        with self._lock:
            wd = self._children.pop(name, None)
        if wd is not None:
            self._fd.remove_watch(wd, self)

    # --- on the reader thread ---

    def on_event(self, event: InotifyEvent, name: str) -> None:
        try:
            change = self._translate(event, name)
            if change is not None:
                self._on_event(change)
        except Exception as exc:
            self._on_error(exc)

    def _translate(self, event: InotifyEvent, name: str) -> FsEvent | None:
        is_dir = bool(event.mask & InotifyConstants.IN_ISDIR)
        if event.is_delete_self or event.is_move_self:
            # The sessions folder itself going is the watcher's to check; a session folder going is
            # told by the sessions folder's own watch.
            return FsEvent("deleted", self.path, is_directory=True) if not name else None
        if name:
            return FsEvent(_kind(event), os.path.join(self.path, name, os.fsdecode(event.name)), "", is_dir)
        child = os.fsdecode(event.name)
        kind = _kind(event)
        if is_dir and kind == "created":
            # Watched before the key is handed on: whatever is written in it from now on is seen,
            # and what was written before is read by the sync the key starts.
            err = self._add_child(child)
            if err is not None:
                self._on_limit(self.path, err)
        elif is_dir and kind == "deleted":
            self._drop_child(child)
        return FsEvent(kind, os.path.join(self.path, child), "", is_dir)

    def on_gone(self, wd: int, name: str) -> None:
        try:
            with self._lock:
                if name:
                    if self._children.get(name) == wd:
                        del self._children[name]
                    return
                ended = not self._closed and self._wd == wd
                if ended:
                    self.alive, self._wd = False, None
            if ended:
                self._on_exit(self.path)
        except Exception as exc:
            self._on_error(exc)


@dataclass
class _ParentWatches:
    """The watches on the parents of sessions folders, one owner for all: any event about the
    sessions folder's name, or the parent itself going, asks for a check of that project."""

    on_change: Callable[[str], None]
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _by_wd: dict[int, dict[str, bytes]] = field(default_factory=dict)  # wd -> project -> child name

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

    def on_event(self, event: InotifyEvent, name: str) -> None:
        itself = event.is_delete_self or event.is_move_self
        with self._lock:
            names = dict(self._by_wd.get(event.wd, {}))
        for project, child in names.items():
            if itself or event.name == child:
                self._changed(project)

    def on_gone(self, wd: int, name: str) -> None:
        with self._lock:
            projects = list(self._by_wd.pop(wd, {}))
        for project in projects:
            self._changed(project)

    def _changed(self, project: str) -> None:
        try:
            self.on_change(project)
        except Exception:
            logger.bind(project=project).exception("asking for a check of the sessions folder failed")


# --- the source ----------------------------------------------------------------------------------


class InotifySource:
    """One inotify instance and its one reader thread, whatever the number of projects: plain
    watches on sessions folders, on the session folders in them and on their parents. The
    callbacks run on the reader thread.

    `on_overflow()`: events were lost. `on_death()`: the thread ended by itself. `on_limit(path,
    errno)`: a session folder in the watched `path` could not be watched. `on_tree_exit(path)`: the
    watch on the sessions folder `path` ended by itself (its folder deleted).
    `on_parent_change(project)`: something happened to `project`'s sessions folder's name or to its
    parent folder. Raises OSError (EMFILE) when no inotify instance can be had.
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
        self._on_tree_exit = on_tree_exit
        self.fd = _InotifyFD(on_overflow=on_overflow, on_death=on_death, faults=faults)
        self._parents = _ParentWatches(on_parent_change)

    def start(self) -> None:
        self.fd.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the reader thread (the inotify instance and every watch with it) and wait for it."""
        self.fd.stop()
        if self.fd.is_alive():
            self.fd.join(timeout)

    def threads_alive(self) -> bool:
        return self.fd.is_alive()

    def watch_count(self) -> int:
        """Watches held (a folder watched in two roles counts once, as the kernel counts it)."""
        return self.fd.watch_count()

    def watch_tree(
        self, path: str, on_event: Callable[[FsEvent], None], on_error: Callable[[Exception], None]
    ) -> SessionsWatch:
        """Watch the sessions folder `path` and each session folder in it; events go to `on_event`
        on the reader thread (and whatever it raises to `on_error`). Raises OSError when `path`
        cannot be watched."""
        tree = SessionsWatch(
            self.fd,
            path,
            on_event=on_event,
            on_error=on_error,
            on_limit=self._on_limit,
            on_exit=self._on_tree_exit,
        )
        try:
            tree.arm()
        except OSError:
            tree.disarm()
            raise
        return tree

    def tree_alive(self, tree: object) -> bool:
        assert isinstance(tree, SessionsWatch), tree  # only ever one of ours
        return tree.alive and self.fd.is_alive()

    def unwatch_tree(self, tree: object) -> None:
        assert isinstance(tree, SessionsWatch), tree
        tree.disarm()

    def watch_parent(self, path: str, project: str, name: str) -> int | None:
        """Watch the folder `path` alone for its child `name` (the sessions folder, or the folder on
        the way to it) coming and going, and for itself going; its watch descriptor, or None when
        it may not be read (EACCES). Raises OSError when it cannot be watched."""
        try:
            wd = self.fd.add_watch(path, self._parents, "")
        except PermissionError:
            return None
        self._parents.add(wd, project, name)
        return wd

    def drop_parent(self, wd: int, project: str) -> None:
        if self._parents.discard(wd, project):
            self.fd.remove_watch(wd, self._parents)

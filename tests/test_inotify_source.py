"""The contract between daemon/inotify_source.py and the installed watchdog.

The adapter overrides watchdog methods and touches a few private members. A rename upstream would
not raise anything: the override would silently become dead code (a lost overflow hook, a reader
thread killed by KeyError). These tests fail instead, naming what moved, and what it should be.
"""

from __future__ import annotations

import dataclasses
import inspect
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import watchdog.version
from watchdog.observers.api import BaseObserver, EventQueue, ObservedWatch
from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyConstants, InotifyFD, WatchCallback
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

from sessionsync.daemon import inotify_source as adapter

UPGRADE = "watchdog {} changed what daemon/inotify_source.py relies on: {}. Adapt the adapter, then the pin."


def _fail(problem: str) -> None:
    pytest.fail(UPGRADE.format(watchdog.version.VERSION_STRING, problem), pytrace=False)


def _params(func: Callable[..., Any]) -> list[tuple[str, Any]]:
    return [(p.name, p.kind) for p in inspect.signature(func).parameters.values()]


# (our class, its watchdog base, method): our override must match the base's parameters exactly, or
# watchdog's calls would miss it or break on it.
OVERRIDES = [
    (adapter._InotifyFD, InotifyFD, "add_callback"),
    (adapter._InotifyFD, InotifyFD, "read_events"),
    (adapter._InotifyFD, InotifyFD, "handle_event"),
    (adapter._InotifyFD, InotifyFD, "run"),
    (adapter._Emitter, InotifyEmitter, "on_thread_start"),
    (adapter._Emitter, InotifyEmitter, "run"),
    (adapter._Observer, BaseObserver, "run"),
    (adapter._Observer, BaseObserver, "on_thread_stop"),
    (adapter._WatchGroup, InotifyWatchGroup, "_remove_watch_internally"),
    (adapter._PromptMoveGrouper, InotifyMoveEventGrouper, "read_event"),
    (adapter._PromptMoveGrouper, InotifyMoveEventGrouper, "put_event"),
    (adapter._PromptMoveGrouper, InotifyMoveEventGrouper, "get_queued_moved_from_event"),
    (adapter._PromptMoveGrouper, InotifyMoveEventGrouper, "discard_pending_events"),
    (adapter._PromptMoveGrouper, InotifyMoveEventGrouper, "close"),
]


@pytest.mark.parametrize(("ours", "base", "name"), OVERRIDES, ids=lambda x: getattr(x, "__name__", x))
def test_every_override_still_overrides_a_method_of_that_signature(ours: type, base: type, name: str) -> None:
    upstream = getattr(base, name, None)
    if upstream is None:
        _fail(f"{base.__name__}.{name} is gone, so {ours.__name__}.{name} is never called")
    assert name in vars(ours), f"{ours.__name__} no longer defines {name}"
    if _params(vars(ours)[name]) != _params(upstream):
        _fail(
            f"{base.__name__}.{name} now takes {inspect.signature(upstream)}; "
            f"{ours.__name__}.{name} takes {inspect.signature(vars(ours)[name])}"
        )


def test_the_private_members_used_still_exist(tmp_path: Path) -> None:
    fd = InotifyFD()  # a real, unstarted instance: the emitter's attributes are set in __init__
    try:
        emitter = InotifyEmitter(EventQueue(), ObservedWatch(tmp_path, recursive=True), inotify_fd=fd)
        group_fields = {f.name for f in dataclasses.fields(InotifyWatchGroup)}
        for cls, names in adapter.WATCHDOG_PRIVATE_MEMBERS.items():
            for name in names:
                here = (
                    name in group_fields or hasattr(cls, name)
                    if cls is InotifyWatchGroup
                    else hasattr(emitter, name)
                )
                if not here:
                    _fail(f"{cls.__name__}.{name} is gone")
    finally:
        fd.close()


@pytest.mark.parametrize(
    ("method", "member"),
    [
        # Our watch group replaces watchdog's only if the emitter reads it from `_inotify` ...
        (InotifyEmitter.queue_events, "self._inotify"),
        # ... our grouper is used only if the group reads events from `_move_event_grouper` ...
        (InotifyWatchGroup.read_event, "self._move_event_grouper"),
        # ... and a deleted watch goes through our tolerant `_remove_watch_internally`.
        (InotifyWatchGroup.on_watch_deleted, "self._remove_watch_internally"),
        # The seam's queue and watch limits and the limit reports sit on these two paths.
        (InotifyWatchGroup._add_callback, "self._inotify_fd.add_callback("),
        (InotifyFD.run, "self.read_events("),
    ],
    ids=lambda x: getattr(x, "__qualname__", x),
)
def test_watchdog_still_goes_through_what_is_overridden(method: Callable[..., Any], member: str) -> None:
    if member not in inspect.getsource(method):
        _fail(f"{method.__qualname__} no longer uses {member}, so the override behind it is dead code")


def test_no_public_method_of_the_move_grouper_is_left_inherited() -> None:
    # _PromptMoveGrouper never runs the base's __init__: a method it inherits would use state that
    # does not exist. A method new upstream must be written in it too.
    public = {
        name
        for name, member in inspect.getmembers(InotifyMoveEventGrouper, inspect.isfunction)
        if not name.startswith("_")
    }
    missing = sorted(name for name in public if name not in vars(adapter._PromptMoveGrouper))
    if missing:
        _fail(f"InotifyMoveEventGrouper has public methods the prompt grouper lacks: {missing}")


def test_the_parent_watches_answer_every_watch_callback() -> None:
    wanted = {name for name in vars(WatchCallback) if not name.startswith("_")}
    missing = sorted(name for name in wanted if not hasattr(adapter._ParentWatches, name))
    if missing:
        _fail(f"WatchCallback now also calls {missing}, which _ParentWatches lacks")


def test_a_queue_overflow_reaches_handle_event(monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel reports an overflow with watch descriptor -1; watchdog before 7.1 dropped every such
    # event in read_events, so the watcher never learnt that events were lost.
    overflow = struct.pack("iIII", -1, InotifyConstants.IN_Q_OVERFLOW, 0, 0)
    monkeypatch.setattr(InotifyFD, "_read_event_buffer", lambda self, size: overflow)
    fd = InotifyFD()
    try:
        events = fd.read_events()
    finally:
        fd.close()
    if not any(event.is_queue_overflow for event in events):
        _fail("InotifyFD.read_events drops IN_Q_OVERFLOW")


def test_the_pin_matches_the_version_tested() -> None:
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert '"watchdog>=7.1,<7.2"' in pyproject
    assert watchdog.version.VERSION_INFO[:2] == (7, 1), watchdog.version.VERSION_STRING

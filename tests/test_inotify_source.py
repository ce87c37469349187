"""The contract between daemon/inotify_source.py and the installed watchdog, and the adapter's own
table of watches on a real inotify instance.

The adapter overrides methods of watchdog's InotifyFD and touches a few of its private members. A
rename upstream would not raise anything at import: an override would silently become dead code (a
lost overflow hook), a member an AttributeError on the reader thread. These tests fail instead,
naming what moved.
"""

from __future__ import annotations

import errno
import inspect
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import watchdog.version
from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent, InotifyFD

from sessionsync.daemon import inotify_source as adapter
from sessionsync.daemon.inotify_faults import InotifyFaults, watches_held

UPGRADE = "watchdog {} changed what daemon/inotify_source.py relies on: {}. Adapt the adapter, then the pin."


def _fail(problem: str) -> None:
    pytest.fail(UPGRADE.format(watchdog.version.VERSION_STRING, problem), pytrace=False)


def _params(func: Callable[..., Any]) -> list[tuple[str, Any]]:
    return [(p.name, p.kind) for p in inspect.signature(func).parameters.values()]


# (our class, its watchdog base, method): our override must match the base's parameters exactly, or
# watchdog's calls would miss it or break on it.
OVERRIDES = [
    (adapter._InotifyFD, InotifyFD, "read_events"),
    (adapter._InotifyFD, InotifyFD, "handle_event"),
    (adapter._InotifyFD, InotifyFD, "run"),
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


def test_the_private_members_used_still_exist() -> None:
    fd = InotifyFD()  # a real, unstarted instance: its attributes are set in __init__
    try:
        for cls, names in adapter.WATCHDOG_PRIVATE_MEMBERS.items():
            for name in names:
                if not hasattr(fd, name):
                    _fail(f"{cls.__name__}.{name} is gone")
    finally:
        fd.close()


@pytest.mark.parametrize(
    ("method", "member"),
    [
        # Our run() reads through read_events, which reads what _read_event_buffer returns (the
        # overflow test below feeds it there), and stops once the thread is told to or the
        # descriptor is closed, as watchdog's own run() does.
        (InotifyFD.read_events, "self._read_event_buffer("),
        (InotifyFD.run, "self.should_keep_running() and not self._closed"),
        # The descriptor is closed only under the lock, and once `_closed` is set: adding a watch
        # under that lock, after checking the flag, never reaches a descriptor closed meanwhile.
        (InotifyFD._read_event_buffer, "self._close_resources()"),
        (InotifyFD._read_event_buffer, "if self._closed:"),
        (InotifyFD.close, "self._closed = True"),
    ],
    ids=lambda x: getattr(x, "__qualname__", x),
)
def test_watchdog_still_goes_through_what_is_relied_on(method: Callable[..., Any], member: str) -> None:
    if member not in inspect.getsource(method):
        _fail(f"{method.__qualname__} no longer uses {member}, which the adapter relies on")


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


# --- the adapter's watch table on a real instance ---------------------------------------------------


class Owner:
    def __init__(self) -> None:
        self.events: list[tuple[InotifyEvent, str]] = []
        self.gone: list[tuple[int, str]] = []

    def on_event(self, event: InotifyEvent, name: str) -> None:
        self.events.append((event, name))

    def on_gone(self, wd: int, name: str) -> None:
        self.gone.append((wd, name))


@pytest.fixture
def fd() -> Any:
    made = adapter._InotifyFD(on_overflow=lambda: None, on_death=lambda: None, faults=InotifyFaults())
    made.start()  # its reader thread closes the descriptor when stopped
    yield made
    made.stop()
    made.join(5)


def test_a_folder_held_by_two_owners_is_one_watch_until_both_let_go(fd: Any, tmp_path: Path) -> None:
    held = watches_held()
    one, two = Owner(), Owner()
    wd = fd.add_watch(str(tmp_path), one, "")
    assert fd.add_watch(str(tmp_path), two, "s1") == wd
    assert fd.add_watch(str(tmp_path), one, "") == wd  # again: still one holder
    assert watches_held() == held + 1
    fd.remove_watch(wd, one)
    assert watches_held() == held + 1
    fd.handle_event(InotifyEvent(wd, InotifyConstants.IN_CREATE, 0, b"x"))
    assert [name for _, name in two.events] == ["s1"] and one.events == []
    fd.remove_watch(wd, two)
    assert watches_held() == held
    assert fd.watch_count() == 0


def test_an_ended_watch_tells_each_holder(fd: Any, tmp_path: Path) -> None:
    one, two = Owner(), Owner()
    wd = fd.add_watch(str(tmp_path), one, "")
    fd.add_watch(str(tmp_path), two, "s1")
    fd.handle_event(InotifyEvent(wd, InotifyConstants.IN_IGNORED, 0, b""))
    assert (one.gone, two.gone) == ([(wd, "")], [(wd, "s1")])
    assert fd.watch_count() == 0


def test_what_cannot_be_watched_raises_as_inotify_does(fd: Any, tmp_path: Path) -> None:
    owner = Owner()
    with pytest.raises(FileNotFoundError):
        fd.add_watch(str(tmp_path / "missing"), owner, "")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        fd.add_watch(str(tmp_path / "file"), owner, "")
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(NotADirectoryError):  # a link is not followed
        fd.add_watch(str(tmp_path / "link"), owner, "")
    fd._faults.max_user_watches = watches_held()
    with pytest.raises(OSError) as raised:
        fd.add_watch(str(tmp_path), owner, "")
    assert raised.value.errno == errno.ENOSPC
    assert fd.watch_count() == 0

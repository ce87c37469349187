"""Each project's watch state machine, and the watcher around it, on a scripted fake event source:
no inotify, no real folders, no sleeping. The clock is a number the test moves, folders are a dict
of (device, inode), and the fake source fails, half-watches or dies when the script says so.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from loguru import logger

from sessionsync.daemon.inotify_faults import InotifyFaults
from sessionsync.daemon.session_paths import FsEvent
from sessionsync.daemon.watch_state import (
    RESYNC_CREATED,
    RESYNC_FALLBACK,
    RESYNC_OVERFLOW,
    RESYNC_REMOVED,
    RESYNC_REPLACED,
    RESYNC_RESTARTED,
    RESYNC_RESTORED,
    RESYNC_REWATCHED,
    Ident,
    ProjectWatches,
    Tree,
)
from sessionsync.daemon.watcher import EventSource, SessionWatcher
from sessionsync.models.keys import SessionKey
from tests.support.recorder import Recorder

P = "/code/app"
AGENTS = P + "/agents"
SESSIONS = AGENTS + "/sessions"


class Folders:
    """The folders that exist, each with its (device, inode); a new folder gets a new inode."""

    def __init__(self, *paths: str) -> None:
        self._inodes = itertools.count(100)
        self.dirs: dict[str, Ident] = {}
        for path in paths:
            self.mkdir(path)

    def ident(self, path: str) -> Ident | None:
        return self.dirs.get(path)

    def mkdir(self, path: str) -> None:
        self.dirs[path] = (1, next(self._inodes))

    def rmtree(self, path: str) -> None:
        self.dirs = {p: i for p, i in self.dirs.items() if p != path and not p.startswith(path + "/")}


@dataclass
class FakeTree:
    path: str
    on_event: Callable[[FsEvent], None]
    on_error: Callable[[Exception], None]
    partial: int | None = None
    alive: bool = True


class FakeSource:
    """A WatchSource (and EventSource) that does what `fail` and `partial` say, and lets the test
    fire events, an overflow, a death or a watch's end, as InotifySource's threads would."""

    def __init__(
        self,
        folders: Folders,
        *,
        on_overflow: Callable[[], None] = lambda: None,
        on_death: Callable[[], None] = lambda: None,
        on_limit: Callable[[str, int], None] = lambda path, err: None,
        on_tree_exit: Callable[[str], None] = lambda path: None,
        on_parent_change: Callable[[str], None] = lambda project: None,
    ) -> None:
        self.folders = folders
        self.on_overflow, self.on_death, self.on_tree_exit = on_overflow, on_death, on_tree_exit
        self.on_limit, self.on_parent_change = on_limit, on_parent_change
        self.fail: dict[str, int] = {}  # path -> errno its watch fails with
        self.partial: dict[str, int] = {}  # path -> errno met below it while it is set up
        self.trees: dict[str, FakeTree] = {}
        self.parents: dict[int, tuple[str, str, str]] = {}  # wd -> (folder, project, name)
        self._wds = itertools.count(1)
        self.running = False

    def _may_watch(self, path: str) -> None:
        if path in self.fail:
            raise OSError(self.fail[path], os.strerror(self.fail[path]), path)
        if self.folders.ident(path) is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)

    def watch_tree(
        self, path: str, on_event: Callable[[FsEvent], None], on_error: Callable[[Exception], None]
    ) -> Tree:
        self._may_watch(path)
        tree = FakeTree(path, on_event, on_error, self.partial.get(path))
        self.trees[path] = tree
        return tree

    def tree_alive(self, tree: Tree) -> bool:
        return isinstance(tree, FakeTree) and tree.alive and self.trees.get(tree.path) is tree

    def unwatch_tree(self, tree: Tree) -> None:
        assert isinstance(tree, FakeTree)
        if self.trees.get(tree.path) is tree:
            del self.trees[tree.path]

    def watch_parent(self, path: str, project: str, name: str) -> int | None:
        self._may_watch(path)
        wd = next(self._wds)
        self.parents[wd] = (path, project, name)
        return wd

    def drop_parent(self, wd: int, project: str) -> None:
        self.parents.pop(wd, None)

    def parent_folders(self) -> list[str]:
        return sorted(folder for folder, _, _ in self.parents.values())

    # EventSource
    def start(self) -> None:
        self.running = True

    def stop(self, timeout: float | None = None) -> None:
        self.running = False

    def threads_alive(self) -> bool:
        return self.running

    # the script
    def emit(self, event: FsEvent) -> None:
        tree = next(t for path, t in self.trees.items() if event.src.startswith(path))
        tree.on_event(event)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Table:
    watches: ProjectWatches
    source: FakeSource
    folders: Folders
    clock: Clock
    counts: Counter[str]
    events: list[tuple[str, str, FsEvent]]

    def timers_at(self, now: float) -> list[tuple[str, str]]:
        self.clock.now = now
        return self.watches.timers(now)


@pytest.fixture
def lines() -> Iterator[list[str]]:
    got: list[str] = []
    sink = logger.add(lambda m: got.append(str(m).rstrip("\n")), format="{message}", level="DEBUG")
    yield got
    logger.remove(sink)


def make_table(*folders: str, no_source: bool = False) -> Table:
    fs = Folders(*folders)
    source = FakeSource(fs)
    clock = Clock()
    counts: Counter[str] = Counter()
    events: list[tuple[str, str, FsEvent]] = []
    watches = ProjectWatches(
        ensure_source=lambda: None if no_source else source,
        current_source=lambda: None if no_source else source,
        on_event=lambda project, watched, event: events.append((project, watched, event)),
        on_error=lambda project, exc: None,
        count=lambda name: counts.update([name]),
        read_limit=lambda sysctl: "8192",
        fallback_scan_s=10.0,
        retry_backoff_s=(1.0, 8.0),
        clock=clock,
        ident=fs.ident,
    )
    return Table(watches, source, fs, clock, counts, events)


def test_a_sessions_folder_that_is_there_is_live_with_its_parent_watched() -> None:
    t = make_table(P, AGENTS, SESSIONS)
    assert t.watches.add(P, SESSIONS, SESSIONS) == "live"
    assert list(t.source.trees) == [SESSIONS]
    assert list(t.source.parents.values()) == [(AGENTS, P, "sessions")]
    assert t.watches.due() == []  # nothing to poll: inotify does the waiting
    t.source.emit(FsEvent("closed", SESSIONS + "/s1/state.json"))
    assert t.events == [(P, SESSIONS, FsEvent("closed", SESSIONS + "/s1/state.json"))]
    # Asked again with the same folder: nothing changes.
    assert t.watches.add(P, SESSIONS, SESSIONS) == "live"
    assert list(t.source.parents) == [1]


def test_a_missing_sessions_folder_waits_on_its_parents_watch_and_polls_nothing() -> None:
    t = make_table(P, AGENTS)
    assert t.watches.add(P, SESSIONS, SESSIONS) == "missing"
    assert t.watches.due() == []
    t.folders.mkdir(SESSIONS)
    assert t.watches.check(P) == [(P, RESYNC_CREATED)]  # the parent watch saw it
    assert t.watches.states() == {P: "live"}


def test_with_agents_missing_too_the_project_folder_is_watched_and_the_watch_moves_down() -> None:
    t = make_table(P)
    assert t.watches.add(P, SESSIONS, SESSIONS) == "missing"
    assert t.source.parent_folders() == [P]
    t.folders.mkdir(AGENTS)
    assert t.watches.check(P) == []  # still missing, now watched from agents/
    assert t.source.parent_folders() == [AGENTS]
    t.folders.mkdir(SESSIONS)
    assert t.watches.check(P) == [(P, RESYNC_CREATED)]
    assert t.watches.due() == []


def test_a_folder_back_before_its_parents_watch_is_in_place_moves_the_watch_down() -> None:
    # agents/ comes back between the look that found it missing and the watch for its return on the
    # project folder: no event will tell, so the watch must go to agents/ at once.
    t = make_table(P)
    watch_parent = t.source.watch_parent

    def agents_back_meanwhile(path: str, project: str, name: str) -> int | None:
        if name == "agents":
            t.folders.mkdir(AGENTS)
        return watch_parent(path, project, name)

    t.source.watch_parent = agents_back_meanwhile  # type: ignore[method-assign]
    assert t.watches.add(P, SESSIONS, SESSIONS) == "missing"
    assert t.source.parent_folders() == [AGENTS]
    t.folders.mkdir(SESSIONS)
    assert t.watches.check(P) == [(P, RESYNC_CREATED)]


def test_without_any_folder_to_watch_it_is_looked_for_with_backoff() -> None:
    t = make_table()
    assert t.watches.add(P, SESSIONS, SESSIONS) == "missing"
    due = []
    for _ in range(5):
        [at] = t.watches.due()
        due.append(at)
        assert t.timers_at(at) == []
    assert due == [1.0, 3.0, 7.0, 15.0, 23.0]  # doubling up to 8 s
    assert t.counts["watch_retries"] == 5
    for folder in (P, AGENTS, SESSIONS):
        t.folders.mkdir(folder)
    assert t.timers_at(t.watches.due()[0]) == [(P, RESYNC_CREATED)]
    assert t.watches.due() == []


def test_out_of_watches_it_is_scanned_and_retried_until_the_watch_is_restored(lines: list[str]) -> None:
    t = make_table(P, AGENTS, SESSIONS)
    t.source.fail[SESSIONS] = errno.ENOSPC
    assert t.watches.add(P, SESSIONS, SESSIONS) == "fallback"
    assert t.counts["fallbacks"] == 1
    assert sorted(t.watches.due()) == [1.0, 10.0]  # the first retry, the first scan
    resyncs = [r for at in (1.0, 3.0, 7.0, 10.0) for r in t.timers_at(at)]
    assert resyncs == [(P, RESYNC_FALLBACK)]  # the scan; the three retries failed quietly
    assert t.counts["watch_retries"] == 3
    assert sorted(t.watches.due()) == [15.0, 20.0]
    del t.source.fail[SESSIONS]
    assert t.timers_at(15.0) == [(P, RESYNC_RESTORED)]
    assert t.watches.states() == {P: "live"}
    assert t.watches.due() == []
    assert t.counts == Counter(fallbacks=1, watch_retries=4)
    assert "inotify watch on /code/app/agents/sessions restored after 4 retries" in lines


def test_the_sysctl_hint_is_given_once_per_limit(lines: list[str]) -> None:
    t = make_table()
    for name in ("a", "b"):
        sessions = f"/code/{name}/agents/sessions"
        for folder in (f"/code/{name}", f"/code/{name}/agents", sessions):
            t.folders.mkdir(folder)
        t.source.fail[sessions] = errno.ENOSPC
        assert t.watches.add(f"/code/{name}", sessions, sessions) == "fallback"
    hints = [line for line in lines if "sudo sysctl fs.inotify.max_user_watches=524288" in line]
    assert len(hints) == 1
    assert "(fs.inotify.max_user_watches = 8192)" in hints[0]
    assert "inotify watch limit reached; scanning /code/b/agents/sessions every 10.0 s instead" in lines


def test_a_watch_limit_met_below_the_root_falls_back_rather_than_half_watch() -> None:
    t = make_table(P, AGENTS, SESSIONS)
    t.source.partial[SESSIONS] = errno.ENOSPC
    assert t.watches.add(P, SESSIONS, SESSIONS) == "fallback"
    assert t.source.trees == {}  # the partial watch was taken down again
    assert t.source.parent_folders() == [AGENTS]  # the parent's kept


def test_a_live_project_whose_new_session_cannot_be_watched_falls_back() -> None:
    t = make_table(P, AGENTS, SESSIONS)
    t.watches.add(P, SESSIONS, SESSIONS)
    assert t.watches.limit_hit("/elsewhere", errno.ENOSPC) == []
    assert t.watches.limit_hit(SESSIONS, errno.ENOSPC) == [(P, RESYNC_FALLBACK)]
    assert t.watches.states() == {P: "fallback"}
    assert t.source.trees == {}
    # A second report of the same kind changes nothing more.
    assert t.watches.limit_hit(SESSIONS, errno.ENOSPC) == []


def test_without_an_inotify_instance_every_project_falls_back(lines: list[str]) -> None:
    t = make_table(P, AGENTS, SESSIONS, no_source=True)
    assert t.watches.add(P, SESSIONS, SESSIONS) == "fallback"
    assert any("sudo sysctl fs.inotify.max_user_instances=1024" in line for line in lines)


def test_another_error_falls_back_naming_it(lines: list[str]) -> None:
    t = make_table(P, AGENTS, SESSIONS)
    t.source.fail[SESSIONS] = errno.EACCES
    assert t.watches.add(P, SESSIONS, SESSIONS) == "fallback"
    assert (
        "cannot watch /code/app/agents/sessions: Permission denied; scanning it every 10.0 s instead" in lines
    )


def test_checks_repair_a_removed_replaced_or_dead_watch() -> None:
    t = make_table(P, AGENTS, SESSIONS)
    t.watches.add(P, SESSIONS, SESSIONS)
    assert t.watches.check(P) == []  # nothing changed
    t.source.trees[SESSIONS].alive = False  # its watch ended by itself
    assert t.watches.check("\0" + SESSIONS) == [(P, RESYNC_REWATCHED)]
    t.folders.rmtree(SESSIONS)
    t.folders.mkdir(SESSIONS)  # same name, another inode
    assert t.watches.check(P) == [(P, RESYNC_REPLACED)]
    t.folders.rmtree(SESSIONS)
    assert t.watches.check(P) == [(P, RESYNC_REMOVED)]
    assert t.watches.states() == {P: "missing"}
    assert t.watches.check("unknown") == []


def test_a_linked_sessions_folder_whose_target_is_gone_is_looked_for() -> None:
    t = make_table(P, AGENTS)
    target = "/elsewhere/sessions"
    assert t.watches.add(P, SESSIONS, target) == "missing"
    # The parent watch would not see the target come back: retried.
    assert t.watches.due() == [1.0]
    t.folders.mkdir(target)
    assert t.timers_at(1.0) == [(P, RESYNC_CREATED)]
    assert list(t.source.trees) == [target]


def test_rearm_watches_everything_again_on_a_new_source() -> None:
    t = make_table(P, AGENTS, SESSIONS)
    t.watches.add(P, SESSIONS, SESSIONS)
    t.source.trees.clear()
    t.source.parents.clear()
    t.watches.rearm_all()
    assert list(t.source.trees) == [SESSIONS]
    assert t.source.parent_folders() == [AGENTS]
    t.watches.remove(P)
    assert t.source.trees == {}
    assert t.source.parents == {}
    assert t.watches.states() == {}


# --- the watcher on the fake source, as watchfiles tests its watcher --------------------------------


@pytest.fixture
def scripted(tmp_path: Any) -> Iterator[tuple[SessionWatcher, Recorder, list[FakeSource]]]:
    """A started SessionWatcher whose inotify instances are FakeSources on real folders."""
    from sessionsync.daemon.watch_state import folder_ident

    real = Folders()
    real.ident = folder_ident  # type: ignore[method-assign]
    made: list[FakeSource] = []

    def factory(*, faults: InotifyFaults | None = None, **callbacks: Any) -> EventSource:
        made.append(FakeSource(real, **callbacks))
        return made[-1]

    rec = Recorder()
    w = SessionWatcher(rec.on_key, rec.on_resync, source_factory=factory)
    w.start()
    yield w, rec, made
    w.stop()
    assert not w.is_alive()


def test_the_watcher_turns_scripted_events_into_keys_and_lost_events_into_resyncs(
    scripted: tuple[SessionWatcher, Recorder, list[FakeSource]], tmp_path: Any
) -> None:
    w, rec, made = scripted
    project = str(tmp_path)
    sessions = tmp_path / "agents" / "sessions"
    sessions.mkdir(parents=True)
    assert w.watch(project, str(sessions))
    first = made[0]
    # Keys arrive on the source's thread, here the test's: at once.
    first.emit(FsEvent("moved", f"{sessions}/a/state.json.tmp", f"{sessions}/a/state.json"))
    first.emit(FsEvent("created", f"{sessions}/b", is_directory=True))
    first.emit(FsEvent("closed", f"{sessions}/b/research/notes.md"))
    assert rec.keys == [SessionKey(project, "a"), SessionKey(project, "b")]
    assert w.counters()["events"] == 3
    # An overflow: a new instance, with the project watched on it, and a resync.
    first.on_overflow()
    rec.expect_resync(project, RESYNC_OVERFLOW)
    assert len(made) == 2
    assert not first.running
    assert list(made[1].trees) == [str(sessions)]
    # A thread dies: restarted at once the first time, everything resynced.
    made[1].on_death()
    rec.expect_resync(project, RESYNC_RESTARTED)
    assert len(made) == 3
    assert w.counters()["observer_restarts"] == 1
    assert w.is_alive()
    # A handler that raises is counted, and the watcher goes on.
    made[2].trees[str(sessions)].on_error(RuntimeError("boom"))
    assert w.counters()["handler_errors"] == 1

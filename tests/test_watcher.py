"""The session watcher on real inotify: events become session keys, lost events become resyncs.

Waits are for conditions (a Condition with a deadline), never for time. Absence of a key is shown
with a sentinel: events of one project arrive in order, so once a later write's key is in, an
earlier event that would have produced a key has produced it. Queue overflow and the watch limit
are reached through the watcher's seam (InotifyFaults), or a user namespace of the test's own;
lowering the machine's sysctl instead is for tests marked `sysctl` only.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from loguru import logger

from sessionsync.daemon.inotify_faults import InotifyFaults, watches_held
from sessionsync.daemon.inotify_source import InotifySource
from sessionsync.daemon.watcher import SessionWatcher
from sessionsync.models.keys import SessionKey
from tests.support.inotify_limits import Sysctl, user_namespaces_usable
from tests.support.oracle import converged
from tests.support.recorder import Recorder
from tests.support.runner import Daemon
from tests.support.sessions import fixture_doc, remove_session, write_state
from tests.support.waiting import wait_for

TIMEOUT = 5.0


class Project:
    def __init__(self, root: Path) -> None:
        self.path = root
        self.name = str(root)
        self.sessions = root / "agents" / "sessions"
        self.sessions.mkdir(parents=True)

    def key(self, slug: str) -> SessionKey:
        return SessionKey(self.name, slug)

    def write(self, slug: str, text: str = "{}", *, atomic: bool = True) -> None:
        folder = self.sessions / slug
        folder.mkdir(exist_ok=True)
        if atomic:
            tmp = folder / "state.json.tmp"
            tmp.write_text(text)
            os.replace(tmp, folder / "state.json")
        else:
            (folder / "state.json").write_text(text)


def sentinel(rec: Recorder, project: Project) -> list[SessionKey]:
    """The keys that came before a fresh write to a sentinel session (which is awaited)."""
    slug = f"zz-sentinel-{len(rec.keys)}"
    project.write(slug)
    rec.expect_keys(project.key(slug))
    with rec.cond:
        return rec.keys[: rec.keys.index(project.key(slug))]


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def faults() -> InotifyFaults:
    """The seam every watcher of the test is made with; set its fields to inject faults."""
    return InotifyFaults()


@pytest.fixture
def make_watcher(rec: Recorder, faults: InotifyFaults) -> Iterator[Callable[[], SessionWatcher]]:
    made: list[SessionWatcher] = []

    def make() -> SessionWatcher:
        w = SessionWatcher(
            rec.on_key, rec.on_resync, fallback_scan_s=0.05, retry_backoff_s=(0.05, 0.2), faults=faults
        )
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()
        assert not w.is_alive()


@pytest.fixture
def watcher(make_watcher: Callable[[], SessionWatcher]) -> SessionWatcher:
    w = make_watcher()
    w.start()
    return w


@pytest.fixture
def proj(tmp_path: Path, watcher: SessionWatcher) -> Project:
    p = Project(tmp_path / "proj")
    (p.sessions / "a").mkdir()
    (p.sessions / "a" / "state.json").write_text("{}")
    assert watcher.watch(p.name, str(p.sessions))
    return p


def test_state_json_written_in_place_replaced_and_deleted(rec: Recorder, proj: Project) -> None:
    proj.write("a", '{"n": 1}', atomic=False)
    rec.expect_keys(proj.key("a"))
    rec.clear()
    proj.write("a", '{"n": 2}', atomic=True)
    rec.expect_keys(proj.key("a"))
    rec.clear()
    (proj.sessions / "a" / "state.json").unlink()
    rec.expect_keys(proj.key("a"))


def test_session_folders_created_renamed_moved_and_deleted(
    rec: Recorder, proj: Project, tmp_path: Path
) -> None:
    (proj.sessions / "b").mkdir()
    rec.expect_keys(proj.key("b"))
    rec.clear()
    (proj.sessions / "b").rename(proj.sessions / "c")
    rec.expect_keys(proj.key("b"), proj.key("c"))
    rec.clear()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "d").mkdir()
    (outside / "d" / "state.json").write_text("{}")
    (outside / "d").rename(proj.sessions / "d")  # moved in
    rec.expect_keys(proj.key("d"))
    rec.clear()
    (proj.sessions / "d").rename(outside / "d2")  # moved out
    rec.expect_keys(proj.key("d"))
    rec.clear()
    shutil.rmtree(proj.sessions / "c")
    rec.expect_keys(proj.key("c"))
    # Events inside a renamed folder are reported under its new name.
    rec.clear()
    (proj.sessions / "a").rename(proj.sessions / "a2")
    rec.expect_keys(proj.key("a"), proj.key("a2"))
    proj.write("a2", '{"n": 3}', atomic=False)
    rec.clear()
    proj.write("a2", '{"n": 4}', atomic=False)
    rec.expect_keys(proj.key("a2"))


def test_spec_and_plan_appearing_and_vanishing(rec: Recorder, proj: Project) -> None:
    for name in ("spec.md", "plan.json"):
        (proj.sessions / "a" / name).write_text("x")
        rec.expect_keys(proj.key("a"))
        rec.clear()
        (proj.sessions / "a" / name).unlink()
        rec.expect_keys(proj.key("a"))
        rec.clear()


def test_deep_files_other_names_and_hidden_slugs_are_ignored(rec: Recorder, proj: Project) -> None:
    a = proj.sessions / "a"
    (a / "research").mkdir()
    (a / "research" / "notes.md").write_text("x")
    (a / "debug" / "deeper").mkdir(parents=True)
    (a / "debug" / "deeper" / "state.json").write_text("{}")
    (a / "plan.md").write_text("x")
    (a / "context").mkdir()
    (proj.sessions / ".trash").mkdir()
    (proj.sessions / ".trash" / "state.json").write_text("{}")
    (proj.sessions / "README.md").write_text("x")
    shutil.rmtree(a / "research")
    assert sentinel(rec, proj) == []


def test_sessions_folder_deleted_and_recreated(rec: Recorder, watcher: SessionWatcher, proj: Project) -> None:
    shutil.rmtree(proj.sessions)
    rec.expect_resync(proj.name, "sessions folder removed")
    assert watcher.projects() == {proj.name: "missing"}
    proj.sessions.mkdir()
    rec.expect_resync(proj.name, "sessions folder created")
    assert watcher.projects() == {proj.name: "live"}
    rec.clear()
    proj.write("new")
    rec.expect_keys(proj.key("new"))


def test_sessions_folder_moved_away_and_replaced(
    rec: Recorder, watcher: SessionWatcher, proj: Project
) -> None:
    aside = proj.sessions.with_name("sessions.old")
    proj.sessions.rename(aside)
    rec.expect_resync(proj.name, "sessions folder removed")
    rec.clear()
    # The folder that moved away is not this project's sessions folder anymore.
    (aside / "a" / "state.json").write_text('{"n": 1}')
    proj.sessions.mkdir()
    rec.expect_resync(proj.name, "sessions folder created")
    assert proj.key("a") not in sentinel(rec, proj)
    # Swapped for another folder under the same name: the watch follows the name.
    other = proj.sessions.with_name("sessions.new")
    (other / "b").mkdir(parents=True)
    rec.clear()
    shutil.rmtree(proj.sessions)
    rec.expect_resync(proj.name, "sessions folder removed")
    proj.sessions.mkdir()
    rec.expect_resync(proj.name, "sessions folder created")
    os.rename(other, proj.sessions)  # over the empty folder, as `mv -T` would
    rec.expect_resync(proj.name, "sessions folder replaced")
    assert watcher.projects() == {proj.name: "live"}
    rec.clear()
    proj.write("b")
    rec.expect_keys(proj.key("b"))


def test_missing_sessions_folder_is_watched_for(
    rec: Recorder, watcher: SessionWatcher, tmp_path: Path
) -> None:
    # The parent exists: its watch reports the creation.
    with_parent = tmp_path / "p1"
    (with_parent / "agents").mkdir(parents=True)
    assert not watcher.watch(str(with_parent), str(with_parent / "agents" / "sessions"))
    # Not even the parent: retried with backoff.
    bare = tmp_path / "p2"
    bare.mkdir()
    assert not watcher.watch(str(bare), str(bare / "agents" / "sessions"))
    assert watcher.projects() == {str(with_parent): "missing", str(bare): "missing"}
    (with_parent / "agents" / "sessions").mkdir()
    (bare / "agents" / "sessions").mkdir(parents=True)
    rec.expect_resync(str(with_parent), "sessions folder created")
    rec.expect_resync(str(bare), "sessions folder created")
    assert watcher.projects() == {str(with_parent): "live", str(bare): "live"}
    (bare / "agents" / "sessions" / "s").mkdir()
    rec.expect_keys(SessionKey(str(bare), "s"))


def test_unwatch_stops_the_keys(
    rec: Recorder, watcher: SessionWatcher, proj: Project, tmp_path: Path
) -> None:
    other = Project(tmp_path / "other")
    assert watcher.watch(other.name, str(other.sessions))
    watcher.unwatch(proj.name)
    assert watcher.projects() == {other.name: "live"}
    proj.write("a")
    other.write("x")
    assert {key.project for key in sentinel(rec, other)} == {other.name}


def test_a_failing_handler_does_not_kill_the_observer(rec: Recorder, tmp_path: Path) -> None:
    failures: list[SessionKey] = []

    def on_key(key: SessionKey) -> None:
        if not failures:
            failures.append(key)
            raise RuntimeError("boom")
        rec.on_key(key)

    w = SessionWatcher(on_key, rec.on_resync)
    w.start()
    try:
        p = Project(tmp_path / "p")
        assert w.watch(p.name, str(p.sessions))
        p.write("first")
        p.write("second")
        rec.expect_keys(p.key("second"))
        assert failures == [p.key("first")]
        assert w.is_alive()
        assert w.counters()["handler_errors"] == 1
    finally:
        w.stop()


def test_a_dead_observer_is_restarted_and_everything_resynced(
    rec: Recorder, watcher: SessionWatcher, proj: Project
) -> None:
    # Fault injection: the reader thread's next read raises, once the event written here wakes it.
    source = watcher._observer
    assert isinstance(source, InotifySource)

    def broken(**kwargs: object) -> list[object]:
        raise RuntimeError("injected: the inotify reader fails")

    source.fd.read_events = broken  # type: ignore[method-assign,assignment]
    proj.write("wake")
    rec.expect_resync(proj.name, "inotify observer restarted")
    assert watcher.counters()["observer_restarts"] == 1
    assert watcher._observer is not source
    assert watcher.is_alive()
    rec.clear()
    proj.write("after")
    rec.expect_keys(proj.key("after"))


@pytest.mark.parametrize("queue", ["seam", pytest.param("sysctl", marks=pytest.mark.sysctl)])
def test_queue_overflow_resyncs_every_project(
    make_watcher: Callable[[], SessionWatcher],
    rec: Recorder,
    faults: InotifyFaults,
    tmp_path: Path,
    queue: str,
) -> None:
    one, two = Project(tmp_path / "one"), Project(tmp_path / "two")
    (one.sessions / "burst").mkdir()
    w = make_watcher()
    # A tiny queue for this watcher's first inotify instance only: the value is read when an
    # instance is created, so it is restored as soon as the watcher has started, and the instance
    # that replaces the overflowed one has the machine's queue.
    if queue == "seam":
        faults.max_queued_events = 16
        w.start()
        faults.max_queued_events = None
    else:
        with Sysctl("fs.inotify.max_queued_events") as knob:
            knob.set("16")
            w.start()
    assert w.watch(one.name, str(one.sessions))
    assert w.watch(two.name, str(two.sessions))
    deadline = time.monotonic() + 10
    n = 0
    while not rec.wait(lambda: len(rec.resyncs) >= 2, timeout=0.2):
        assert time.monotonic() < deadline, "no overflow"
        for _ in range(300):  # 600 events at once, against a queue of 16
            (one.sessions / "burst" / f"f{n}").write_text("")
            n += 1
    rec.expect_resync(one.name, "inotify queue overflowed")
    rec.expect_resync(two.name, "inotify queue overflowed")
    assert w.counters()["overflows"] >= 1
    # Events flow again. A second overflow still queued in the old instance may replace it once
    # more, and a write in that window is covered by the resync that follows instead of a key:
    # write again until one is seen as a key (a resync for `two` alone would not prove recovery).
    deadline = time.monotonic() + 10
    for attempt in range(20):
        assert time.monotonic() < deadline, f"no key after recovery; got {rec.resyncs}"
        rec.clear()
        two.write(f"after-{attempt}")
        key = two.key(f"after-{attempt}")
        rec.wait(lambda k=key: k in rec.keys or (two.name, "inotify queue overflowed") in rec.resyncs)
        if key in rec.keys:
            break
    else:
        raise AssertionError(f"no key after recovery in 20 writes; got {rec.resyncs}")


def test_watch_limit_falls_back_to_periodic_scans_and_retries(
    faults: InotifyFaults, rec: Recorder, watcher: SessionWatcher, proj: Project, tmp_path: Path
) -> None:
    blocked = {str(tmp_path / "b"), str(tmp_path / "c"), str(proj.sessions / "late")}

    def fault(path: str) -> None:
        if any(path == b or path.startswith(b + "/") for b in blocked):
            raise OSError(errno.ENOSPC, "inotify watch limit reached")

    faults.fail_watch = fault
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), format="{message}", level="WARNING")
    try:
        b, c = Project(tmp_path / "b"), Project(tmp_path / "c")
        assert not watcher.watch(b.name, str(b.sessions))
        assert not watcher.watch(c.name, str(c.sessions))
        assert watcher.projects() == {proj.name: "live", b.name: "fallback", c.name: "fallback"}
        rec.expect_resync(b.name, "periodic scan (no inotify watch)", count=2)
        # The other projects stay live.
        proj.write("a")
        rec.expect_keys(proj.key("a"))
        # A session folder that cannot be watched later puts its project in fallback too.
        (proj.sessions / "late").mkdir()
        rec.expect_resync(proj.name, "periodic scan (no inotify watch)")
        assert watcher.projects()[proj.name] == "fallback"
        blocked.clear()
        for p in (b, c, proj):
            rec.expect_resync(p.name, "inotify watch restored")
        assert set(watcher.projects().values()) == {"live"}
        rec.clear()
        b.write("x")
        proj.write("y")
        rec.expect_keys(b.key("x"), proj.key("y"))
    finally:
        logger.remove(sink)
    hints = [line for line in lines if "sudo sysctl fs.inotify.max_user_watches=" in line]
    assert len(hints) == 1, lines
    counters = watcher.counters()
    assert counters["fallbacks"] == 3
    assert counters["watch_retries"] >= 3


def test_watches_beyond_the_seams_limit_fail_like_the_kernels(
    faults: InotifyFaults, rec: Recorder, watcher: SessionWatcher, tmp_path: Path
) -> None:
    # The seam counts this process's watches as the kernel does, so the limit is set from what the
    # process holds now: room for one project (its parent folder, sessions folder and one session).
    first, second = Project(tmp_path / "first"), Project(tmp_path / "second")
    for p in (first, second):
        (p.sessions / "s0").mkdir()
    held = watches_held()
    faults.max_user_watches = held + 3
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), format="{message}", level="WARNING")
    try:
        assert watcher.watch(first.name, str(first.sessions))
        assert watches_held() == held + 3
        assert not watcher.watch(second.name, str(second.sessions))
        assert watcher.projects() == {first.name: "live", second.name: "fallback"}
        rec.expect_resync(second.name, "periodic scan (no inotify watch)")
        faults.max_user_watches = None  # raised again: the next retry watches it
        rec.expect_resync(second.name, "inotify watch restored")
        rec.clear()
        second.write("s0")
        rec.expect_keys(second.key("s0"))
    finally:
        logger.remove(sink)
    hints = [line for line in lines if "sudo sysctl fs.inotify.max_user_watches=" in line]
    assert len(hints) == 1, lines
    assert f"(fs.inotify.max_user_watches = {held + 3})" in hints[0]


REAL_LIMIT_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, threading, tempfile
    from pathlib import Path
    from sessionsync.daemon.watcher import SessionWatcher

    knob = Path("/proc/sys/user/max_inotify_watches")
    root = Path(tempfile.mkdtemp())
    small, big = root / "small" / "agents" / "sessions", root / "big" / "agents" / "sessions"
    for folder, n in ((small, 2), (big, 20)):
        for i in range(n):
            (folder / f"s{i}").mkdir(parents=True)
    cond = threading.Condition()
    keys, resyncs = [], []

    def on_key(key):
        with cond:
            keys.append(list(key)); cond.notify_all()

    def on_resync(project, reason):
        with cond:
            resyncs.append([project, reason]); cond.notify_all()

    def wait(pred):
        with cond:
            assert cond.wait_for(pred, 5), (keys, resyncs)

    # small: its parent, the sessions folder and 2 sessions; big gets its parent and a few more.
    knob.write_text("8")
    w = SessionWatcher(on_key, on_resync, fallback_scan_s=0.05, retry_backoff_s=(0.05, 0.2))
    w.start()
    out = {"small": w.watch("small", str(small)), "big": w.watch("big", str(big))}
    out["states"] = w.projects()
    wait(lambda: ["big", "periodic scan (no inotify watch)"] in resyncs)
    (small / "s0" / "state.json").write_text("{}")
    wait(lambda: ["small", "s0"] in keys)
    knob.write_text("1000")
    wait(lambda: ["big", "inotify watch restored"] in resyncs)
    (big / "s7" / "state.json").write_text("{}")
    wait(lambda: ["big", "s7"] in keys)
    out["states_after"] = w.projects()
    out["counters"] = w.counters()
    w.stop()
    print(json.dumps(out))
    """
)


def test_real_watch_limit_in_a_user_namespace(tmp_path: Path) -> None:
    # A new user namespace has its own inotify watch limit (/proc/sys/user/max_inotify_watches),
    # so a real ENOSPC is had without lowering the machine's limit under other processes.
    why_not = user_namespaces_usable()
    if why_not:
        pytest.skip(why_not)
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", sys.executable, "-c", REAL_LIMIT_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["small"] is True
    assert out["big"] is False
    assert out["states"] == {"small": "live", "big": "fallback"}
    assert out["states_after"] == {"small": "live", "big": "live"}
    assert out["counters"]["fallbacks"] == 1
    assert result.stderr.count("sudo sysctl fs.inotify.max_user_watches=524288") == 1


@pytest.fixture
def fast_tmp(tmp_path: Path) -> Iterator[Path]:
    """A folder on tmpfs when there is one: building thousands of folders on a busy disk takes
    seconds, and inotify behaves the same on both."""
    if not os.path.isdir("/dev/shm"):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="sessionsync-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_thousands_of_sessions_start_quickly_and_events_flow(
    rec: Recorder, watcher: SessionWatcher, fast_tmp: Path
) -> None:
    p = Project(fast_tmp / "big")
    for i in range(3000):
        folder = p.sessions / f"s{i:04d}"
        (folder / "research").mkdir(parents=True)
        (folder / "state.json").write_text("{}")
    started = time.monotonic()
    assert watcher.watch(p.name, str(p.sessions))
    took = time.monotonic() - started
    p.write("s1234", '{"n": 1}', atomic=False)
    rec.expect_keys(p.key("s1234"))
    assert took < 5.0, f"watching 3000 sessions took {took:.2f} s"
    assert watcher.counters()["overflows"] == 0


def _daemon_watches(pid: int) -> int:
    """inotify watches a process holds: one `inotify wd:` line each in its inotify fdinfo."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
                count += Path(f"/proc/{pid}/fdinfo/{fd}").read_text().count("inotify wd:")
        except OSError:
            continue  # closed meanwhile
    return count


def test_the_daemon_holds_two_watches_per_project_and_one_per_session_whatever_lies_deeper(
    tmp_path: Path, db_url: str
) -> None:
    projects = [tmp_path / "one", tmp_path / "two"]
    for n, project in enumerate(projects):
        for i in range(3):
            write_state(project, f"s{i}", fixture_doc("v2-spec"))
        deep = project / "agents" / "sessions" / "s0"
        for a in range(6 + n):  # research/ 3 levels deep, a few hundred folders
            for b in range(6):
                for c in range(6):
                    (deep / "research" / f"a{a}" / f"b{b}" / f"c{c}").mkdir(parents=True)
        (deep / "debug" / "deeper").mkdir(parents=True)
        (deep / "context").mkdir()
    with Daemon(tmp_path, db_url, projects=projects, debounce_ms=20) as daemon:
        daemon.wait_started()
        base = len(projects) * 2 + 6
        assert _daemon_watches(daemon.pid) == base
        # A session folder created, then one removed: one watch more, then one fewer.
        write_state(projects[1], "new", fixture_doc("v2-build"))
        wait_for(lambda: _daemon_watches(daemon.pid) == base + 1, timeout=TIMEOUT)
        remove_session(projects[0], "s0")  # the deep one
        wait_for(lambda: _daemon_watches(daemon.pid) == base, timeout=TIMEOUT)
        # Deeper folders still cost nothing, and their files stay out of the mirror.
        (projects[1] / "agents" / "sessions" / "s1" / "research" / "x" / "y").mkdir(parents=True)
        (projects[1] / "agents" / "sessions" / "s1" / "spec.md").write_text("# spec")
        wait_for(lambda: converged(db_url, projects), timeout=TIMEOUT)
        assert _daemon_watches(daemon.pid) == base


def test_watches_follow_session_folders_renamed_moved_out_and_linked(
    rec: Recorder, proj: Project, tmp_path: Path
) -> None:
    # proj holds its parent, its sessions folder and session a: 3 watches, counted by the kernel.
    held = watches_held()
    (proj.sessions / "a").rename(proj.sessions / "b")
    rec.expect_keys(proj.key("a"), proj.key("b"))
    wait_for(lambda: watches_held() == held)  # the same folder, watched under its new name
    proj.write("b", '{"n": 1}', atomic=False)
    rec.clear()
    proj.write("b", '{"n": 2}', atomic=False)
    rec.expect_keys(proj.key("b"))
    outside = tmp_path / "outside"
    outside.mkdir()
    (proj.sessions / "b").rename(outside / "b")
    rec.expect_keys(proj.key("b"))
    # Moved out: its watch goes with it (taken off by the reader thread, after the event came).
    wait_for(lambda: watches_held() == held - 1)
    rec.clear()
    (outside / "b" / "state.json").write_text('{"n": 3}')
    os.symlink(outside / "b", proj.sessions / "linked")  # a link: a session, but not followed
    (proj.sessions / "c" / "research" / "deep").mkdir(parents=True)
    rec.expect_keys(proj.key("linked"), proj.key("c"))
    wait_for(lambda: watches_held() == held)  # c, and nothing for the link or c/research
    assert proj.key("b") not in sentinel(rec, proj)  # what is written outside is not this project's


def test_one_reader_thread_serves_every_project(
    rec: Recorder, watcher: SessionWatcher, tmp_path: Path
) -> None:
    first = Project(tmp_path / "p0")
    assert watcher.watch(first.name, str(first.sessions))
    threads = threading.active_count()
    others = [Project(tmp_path / f"p{n}") for n in range(1, 30)]
    for p in others:
        assert watcher.watch(p.name, str(p.sessions))
    assert threading.active_count() == threads
    others[-1].write("s")
    rec.expect_keys(others[-1].key("s"))

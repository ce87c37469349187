"""Regression tests for daemon bugs the chaos run (bench/chaos/) found, one test per bug, each
named after what it caught. Each builds the smallest scene that showed the bug, on real inotify,
files and databases.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sessionsync.daemon.watcher import RESYNC_CREATED, RESYNC_REMOVED, RESYNC_RESTARTED, SessionWatcher
from sessionsync.models.keys import SessionKey
from tests.support.oracle import converged
from tests.support.recorder import Recorder
from tests.support.runner import Daemon
from tests.support.sessions import write_state
from tests.support.snapshot import rows
from tests.support.waiting import wait_for

TIMEOUT = 5.0


@pytest.fixture
def watcher() -> Iterator[Callable[..., SessionWatcher]]:
    made: list[SessionWatcher] = []

    def make(seen: Recorder, **options: Any) -> SessionWatcher:
        w = SessionWatcher(seen.on_key, seen.on_resync, **options)
        w.start()
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()


def _sessions(project: Path) -> Path:
    folder = project / "agents" / "sessions"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _touch_state(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state.json").write_text("{}")


def test_session_moved_to_another_project_then_its_old_name_reused_keeps_the_watcher_alive(
    tmp_path: Path, watcher: Callable[..., SessionWatcher]
) -> None:
    # A session folder moved between projects keeps its inotify watch (same inode), now shared by
    # both projects' watch groups; the old group still maps it to the old path. Once that name was
    # reused and removed, removing the moved folder made watchdog's bookkeeping raise KeyError on
    # the inotify reader thread: the observer died, was restarted, and every project was rescanned.
    a, b = (tmp_path / "a").resolve(), (tmp_path / "b").resolve()
    a_sessions, b_sessions = _sessions(a), _sessions(b)
    _touch_state(a_sessions / "s1")
    seen = Recorder()
    w = watcher(seen)
    assert w.watch(str(a), str(a_sessions))
    assert w.watch(str(b), str(b_sessions))

    (a_sessions / "s1").rename(b_sessions / "s1")
    seen.expect_keys(SessionKey(str(b), "s1"))
    _touch_state(a_sessions / "s1")  # the old name again: a new folder, a new watch
    (a_sessions / "marker-1").mkdir()
    seen.expect_keys(SessionKey(str(a), "marker-1"))
    shutil.rmtree(a_sessions / "s1")
    shutil.rmtree(b_sessions / "s1")  # the moved folder's watch goes: the crash was here

    # Both projects still deliver events, from the same observer (no restart, no rescan).
    _touch_state(a_sessions / "after")
    _touch_state(b_sessions / "after")
    seen.expect_keys(SessionKey(str(a), "after"))
    seen.expect_keys(SessionKey(str(b), "after"))
    assert w.counters()["observer_restarts"] == 0
    assert [r for r in seen.resyncs if r[1] == RESYNC_RESTARTED] == []
    assert w.is_alive()


def test_session_folder_made_a_symlink_while_running_gets_an_invalid_row_then_a_tombstone(
    tmp_path: Path, project: Path
) -> None:
    # inotify reports a symbolic link as a file, and the watcher dropped files standing right in
    # the sessions folder: a linked session folder got no row (the contract: invalid, links are not
    # followed) and, once mirrored by a reconcile, its removal left the row live.
    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    sessions = project / "agents" / "sessions"
    write_state(project, "real", {"topic": "real"})
    with Daemon(tmp_path, url, projects=[project], debounce_ms=20, max_delay_ms=200) as daemon:
        daemon.wait_started()
        os.symlink(sessions / "real", sessions / "linked")
        os.symlink("/etc", sessions / "outside")
        wait_for(lambda: converged(url, [project]), timeout=TIMEOUT)
        linked = rows(url)[(str(project), "linked")]
        assert linked["invalid"]
        assert "symbolic link" in linked["sync_error"]
        (sessions / "linked").unlink()
        (sessions / "outside").unlink()
        wait_for(lambda: converged(url, [project]), timeout=TIMEOUT)
        assert rows(url)[(str(project), "outside")]["deleted_at"] is not None


def test_sessions_folder_back_after_its_parent_was_removed_is_watched_at_once(
    tmp_path: Path, watcher: Callable[..., SessionWatcher]
) -> None:
    # A branch without agents/ checked out removes the sessions folder and its parent: nothing was
    # left to report their return, and the watcher looked again on its retry backoff, which grows to
    # 5 minutes. Here the backoff starts at a minute, so only an inotify event can make the deadline.
    project = (tmp_path / "p").resolve()
    sessions = _sessions(project)
    seen = Recorder()
    w = watcher(seen, retry_backoff_s=(60.0, 300.0))
    assert w.watch(str(project), str(sessions))
    shutil.rmtree(project / "agents")
    seen.expect_resync(str(project), RESYNC_REMOVED)
    sessions.mkdir(parents=True)  # the branch with agents/ is back
    seen.expect_resync(str(project), RESYNC_CREATED)
    _touch_state(sessions / "s2")
    seen.expect_keys(SessionKey(str(project), "s2"))
    assert w.projects() == {str(project): "live"}


def test_project_gone_while_the_daemon_was_down_has_its_sessions_tombstoned_at_start(
    tmp_path: Path,
) -> None:
    # Only the projects found at start-up were reconciled: one mirrored by an earlier run whose
    # folder (or sessions folder) went away while the daemon was down kept its rows live forever.
    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    root = (tmp_path / "code").resolve()
    stays, goes = root / "stays", root / "goes"
    for project in (stays, goes):
        write_state(project, "s1", {"topic": project.name})
    with Daemon(tmp_path, url, roots=[root], debounce_ms=20, max_delay_ms=200) as daemon:
        daemon.wait_started()
        wait_for(lambda: converged(url, [stays, goes]), timeout=TIMEOUT)
        assert daemon.stop() == 0
        shutil.rmtree(goes)
        daemon.start()
        daemon.wait_started()
        wait_for(lambda: converged(url, [stays, goes]), timeout=TIMEOUT)
        assert rows(url)[(str(goes), "s1")]["deleted_at"] is not None

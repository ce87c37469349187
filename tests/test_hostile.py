"""Hostile and unlucky input, each reproduced for real: what it must not do to the other
sessions, to the logs, or to the database."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sessionsync.daemon.testing_hooks import FALLBACK_SCAN_ENV
from tests.support.newuser import NewUser
from tests.support.sessions import fixture_doc, write_state

SESSIONSYNC = Path(sys.executable).parent / "sessionsync"


def _reconcile(tmp_path: Path, project: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "c.toml"
    config.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "s.db"}"\n[watch]\nprojects = ["{project}"]\nroots = []\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONSYNC_")}
    return subprocess.run(
        [str(SESSIONSYNC), "reconcile", "--config", str(config)],
        env={**env, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("kind", ["fifo", "folder", "link", "linked-session"])
def test_a_special_state_json_is_reported_once_not_on_every_pass(tmp_path: Path, kind: str) -> None:
    project = tmp_path / "proj"
    write_state(project, "fine", fixture_doc("v2-spec"))
    folder = project / "agents" / "sessions" / "odd"
    if kind == "linked-session":
        folder.symlink_to(project / "agents" / "sessions" / "fine")
    else:
        folder.mkdir()
        state = folder / "state.json"
        if kind == "fifo":
            os.mkfifo(state)
        elif kind == "folder":
            state.mkdir()
        else:
            state.symlink_to(project / "agents" / "sessions" / "fine" / "state.json")
    first = _reconcile(tmp_path, project)
    assert first.returncode == 0, first.stderr
    assert ", 2 written, 0 unchanged, 1 invalid" in first.stdout
    assert first.stderr.count("[") == 1, first.stderr  # one warning line, naming the session
    for _ in range(2):
        again = _reconcile(tmp_path, project)
        assert again.returncode == 0, again.stderr
        assert ", 0 written, 2 unchanged, 0 invalid" in again.stdout
        assert again.stderr == ""
    with sqlite3.connect(tmp_path / "s.db") as conn:
        kinds = conn.execute(
            "SELECT e.kind FROM session_events e JOIN sessions s ON s.id = e.session_id WHERE s.slug = 'odd'"
        ).fetchall()
    assert sorted(k for (k,) in kinds) == ["created", "invalid"]


def test_a_restore_says_what_changed_while_the_session_was_gone(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    build = {**fixture_doc("v2-build"), "current_phase": "build", "status": "active"}
    write_state(project, "back", build)
    assert _reconcile(tmp_path, project).returncode == 0
    shutil.rmtree(project / "agents" / "sessions" / "back")
    assert _reconcile(tmp_path, project).returncode == 0
    write_state(project, "back", {**build, "current_phase": "docs", "status": "paused"})
    assert _reconcile(tmp_path, project).returncode == 0
    with sqlite3.connect(tmp_path / "s.db") as conn:
        events = conn.execute("SELECT kind, from_value, to_value FROM session_events ORDER BY id").fetchall()
    assert events == [
        ("created", None, "build"),
        ("deleted", None, None),
        ("restored", "build", "docs"),
        ("phase_changed", "build", "docs"),
        ("status_changed", "active", "paused"),
    ]


def test_a_folder_name_that_is_not_utf8_stops_nothing(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    write_state(project, "fine", fixture_doc("v2-spec"))
    poison = os.path.join(os.fsencode(project / "agents" / "sessions"), b"caf\xe9")
    os.mkdir(poison)
    Path(os.fsdecode(poison), "state.json").write_text("{}")
    for _ in range(2):
        out = _reconcile(tmp_path, project)
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr
        assert "1 skipped (folder name not UTF-8)" in out.stdout
    assert "session folder name is not valid UTF-8: not mirrored" in _reconcile(tmp_path, project).stderr
    with sqlite3.connect(tmp_path / "s.db") as conn:
        assert conn.execute("SELECT slug FROM sessions").fetchall() == [("fine",)]


def test_a_poison_folder_name_under_a_running_daemon_stops_no_other_session(user: NewUser) -> None:
    from tests.support.waiting import wait_for

    one, two = user.project("one"), user.project("two")
    daemon = user.daemon()
    poison = os.path.join(os.fsencode(one / "agents" / "sessions"), b"caf\xe9")
    os.mkdir(poison)
    Path(os.fsdecode(poison), "state.json").write_text("{}")
    write_state(one, "beside", fixture_doc("v2-spec"))
    write_state(two, "elsewhere", fixture_doc("v2-spec"))
    wait_for(lambda: {"beside", "elsewhere"} <= set(user.rows()), timeout=10)
    assert user.run("resync", "--all", "--wait").returncode == 0
    # The warning about it is in `status`, and the name survives the control protocol.
    status = user.run("status", "--json")
    assert status.returncode == 0, status.stderr
    sessions = [e["session"] for e in json.loads(status.stdout)["recent_errors"]]
    assert os.fsdecode(poison) in sessions
    synced = user.run("sync", os.fsdecode(poison), errors="surrogateescape")
    assert "Traceback" not in synced.stderr, synced.stderr
    assert synced.returncode in (0, 1), synced.stderr
    code, output = user.stop(daemon)
    assert code == 0
    assert "Traceback" not in output
    assert output.count("session folder name is not valid UTF-8") == 1, output


NOBODY = 65534


@pytest.fixture
def unprivileged_tmp() -> Iterator[Path]:
    """A folder owned by an unprivileged uid (no user account needed), for what root would not
    notice: permission bits are no obstacle to root."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv(1) to run a command as another uid")
    folder = Path(tempfile.mkdtemp(prefix="ss-nobody-", dir="/tmp"))
    os.chown(folder, NOBODY, NOBODY)
    try:
        yield folder
    finally:
        for root, dirs, _files in os.walk(folder):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)  # the test's chmod 000, undone
        shutil.rmtree(folder)


def _as_nobody(*argv: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SESSIONSYNC_", "XDG_"))}
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
        env={**env, "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_unreadable_sessions_folder_skips_its_project_and_reconciles_the_others(
    unprivileged_tmp: Path,
) -> None:
    a, b = unprivileged_tmp / "a", unprivileged_tmp / "b"
    config = unprivileged_tmp / "c.toml"
    database = unprivileged_tmp / "s.db"
    config.write_text(
        f'[database]\nurl = "sqlite:///{database}"\n[watch]\nprojects = ["{a}", "{b}"]\nroots = []\n'
    )
    reconcile = [str(SESSIONSYNC), "reconcile", "--config", str(config)]
    make = _as_nobody(sys.executable, "-c", _WRITE_SESSIONS.format(a=a, b=b), home=unprivileged_tmp)
    assert make.returncode == 0, make.stderr
    assert _as_nobody(*reconcile, home=unprivileged_tmp).returncode == 0

    (a / "agents" / "sessions").chmod(0o000)
    edited = _as_nobody(sys.executable, "-c", _EDIT_B.format(b=b), home=unprivileged_tmp)
    assert edited.returncode == 0, edited.stderr
    out = _as_nobody(*reconcile, home=unprivileged_tmp)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert "1 written" in out.stdout and "1 project(s) skipped (unreadable)" in out.stdout, out.stdout
    (warning,) = out.stderr.splitlines()
    assert f"cannot list {a}/agents/sessions: Permission denied; skipping this project" in warning
    with sqlite3.connect(database) as conn:
        rows = dict(conn.execute("SELECT slug, title || coalesce(deleted_at, '') FROM sessions").fetchall())
    assert rows == {"in-a": "first", "in-b": "edited"}  # A's row kept, not tombstoned


def test_a_sessions_folder_unreadable_under_a_running_daemon_keeps_its_rows_until_readable(
    unprivileged_tmp: Path,
) -> None:
    """Changes made while the daemon may not search the sessions folder (sessions edited, made,
    removed) mark no session invalid; the project is skipped with one line, and once readable
    again (a chmod: no inotify event) it converges, the session folders made meanwhile watched."""
    from tests.support.oracle import converged
    from tests.support.runner import Daemon
    from tests.support.waiting import wait_for

    project = unprivileged_tmp / "proj"
    for slug in ("edited", "removed", "kept"):
        write_state(project, slug, {**fixture_doc("v2-spec"), "topic": slug})
    url = f"sqlite:///{unprivileged_tmp / 's.db'}"
    sessions = project / "agents" / "sessions"
    with Daemon(
        unprivileged_tmp, url, projects=[project], uid=NOBODY, debounce_ms=20, discover_interval_s=1
    ) as daemon:
        daemon.wait_started()
        wait_for(lambda: converged(url, [project]), timeout=10)
        sessions.chmod(0o000)
        write_state(project, "edited", {**fixture_doc("v2-spec"), "topic": "edited again"})
        write_state(project, "made", {**fixture_doc("v2-spec"), "topic": "made"})
        shutil.rmtree(sessions / "removed")
        wait_for(lambda: daemon.log_count("skipping this project (its rows are kept)") == 1, timeout=10)
        with sqlite3.connect(unprivileged_tmp / "s.db") as conn:
            rows = conn.execute(
                "SELECT slug, title, invalid, deleted_at FROM sessions ORDER BY slug"
            ).fetchall()
        assert rows == [
            ("edited", "edited", 0, None),
            ("kept", "kept", 0, None),
            ("removed", "removed", 0, None),
        ]
        sessions.chmod(0o755)
        wait_for(lambda: converged(url, [project]), timeout=10)
        # inotify watches nothing it may not read: the folder made meanwhile is watched only now.
        made = (sessions / "made").stat().st_ino
        wait_for(lambda: made in _watched_inodes(daemon.pid), timeout=10)
        write_state(project, "made", {**fixture_doc("v2-spec"), "topic": "made, then edited"})
        wait_for(lambda: converged(url, [project]), timeout=10)
        assert daemon.stop() == 0
    log = daemon.log()
    assert "Traceback" not in log
    assert "state.json is invalid" not in log, log
    assert log.count("skipping this project (its rows are kept)") == 1, log
    assert log.count("can be read again") == 1, log


def test_a_session_folder_made_while_the_sessions_folder_is_unreadable_is_not_missed(
    unprivileged_tmp: Path,
) -> None:
    """inotify cannot watch a folder made where the daemon may not search: the project falls back
    to scanning (one line), so that session's later writes are mirrored, and then it is watched."""
    from tests.support.oracle import converged
    from tests.support.runner import Daemon
    from tests.support.waiting import wait_for

    project = unprivileged_tmp / "proj"
    write_state(project, "old", fixture_doc("v2-spec"))
    url = f"sqlite:///{unprivileged_tmp / 's.db'}"
    sessions = project / "agents" / "sessions"
    env = {FALLBACK_SCAN_ENV: "0.5"}
    with Daemon(unprivileged_tmp, url, projects=[project], uid=NOBODY, env=env, debounce_ms=20) as daemon:
        daemon.wait_started()
        sessions.chmod(0o000)
        (sessions / "made").mkdir()
        wait_for(
            lambda: daemon.log_count("agents/sessions: Permission denied; scanning it every") == 1, timeout=10
        )
        sessions.chmod(0o755)
        write_state(project, "made", {**fixture_doc("v2-spec"), "topic": "first"})
        wait_for(lambda: converged(url, [project]), timeout=10)
        write_state(project, "made", {**fixture_doc("v2-spec"), "topic": "then"})
        wait_for(lambda: converged(url, [project]), timeout=10)
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.log()


def _watched_inodes(pid: int) -> set[int]:
    """The inodes process `pid` has inotify watches on (its /proc fdinfo)."""
    inodes = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            for line in info.read_text().splitlines():
                if line.startswith("inotify wd:"):
                    inodes.add(int(line.split(" ino:")[1].split()[0], 16))
    return inodes


_WRITE_SESSIONS = """
import json, pathlib
for project, slug in (("{a}", "in-a"), ("{b}", "in-b")):
    folder = pathlib.Path(project, "agents", "sessions", slug)
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({{"topic": "first", "phase_history": {{}}}}))
"""
_EDIT_B = """
import json, pathlib
pathlib.Path("{b}", "agents", "sessions", "in-b", "state.json").write_text(
    json.dumps({{"topic": "edited", "phase_history": {{}}}})
)
"""


def _catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler installed for `sig` (SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_sighup_in_the_first_moment_is_kept_for_later(user: NewUser) -> None:
    from tests.support.waiting import wait_for

    user.project()
    daemon = user.start([str(SESSIONSYNC), "run"])
    # As soon as our handler is in (before the config or the daemon's imports), as
    # `systemctl reload` right after a start would.
    wait_for(lambda: _catches(daemon.pid, signal.SIGHUP), timeout=10, interval=0.001)
    daemon.send_signal(signal.SIGHUP)
    user.wait_answering(daemon)
    assert user.run("status").returncode == 0
    code, output = user.stop(daemon)
    assert code == 0, output
    assert "reload requested during start-up: applied once started" in output
    assert "configuration reloaded from built-in defaults" in output


def test_status_answers_while_the_database_is_out_of_reach(user: NewUser) -> None:
    from tests.support.waiting import wait_for

    user.project()
    env = {"SESSIONSYNC_DATABASE__URL": "postgresql+psycopg://nobody:sekrit@127.0.0.1:1/x"}
    daemon = user.start([str(SESSIONSYNC), "run"], env=env)
    status = user.wait_answering(daemon, running=False)
    assert status["state"] == "starting: waiting for the database"
    assert status["database_ok"] is False or status["database"]["last_error"] is None
    wait_for(lambda: user.run("status", "--json", env=env).stdout.count('"database_ok": false'), timeout=10)
    shown = user.run("status", env=env)
    assert shown.returncode == 0
    assert "(starting: waiting for the database)" in shown.stdout.splitlines()[0]
    assert "sekrit" not in shown.stdout
    code, output = user.stop(daemon)
    assert code == 0, output
    assert "sekrit" not in output

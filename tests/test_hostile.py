"""Hostile and unlucky input, each reproduced for real: what it must not do to the other
sessions, to the logs, or to the database."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import fixture_doc, write_state

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


def test_a_poison_folder_name_under_a_running_daemon_stops_no_other_session(tmp_path: Path) -> None:
    from tests.conftest import wait_for
    from tests.test_front_door import NewUser

    user = NewUser(tmp_path)
    try:
        one, two = user.project("one"), user.project("two")
        daemon = user.daemon()
        poison = os.path.join(os.fsencode(one / "agents" / "sessions"), b"caf\xe9")
        os.mkdir(poison)
        Path(os.fsdecode(poison), "state.json").write_text("{}")
        write_state(one, "beside", fixture_doc("v2-spec"))
        write_state(two, "elsewhere", fixture_doc("v2-spec"))
        wait_for(lambda: {"beside", "elsewhere"} <= set(user.rows()), timeout=10)
        assert user.run("resync", "--all", "--wait").returncode == 0
        code, output = user.stop(daemon)
        assert code == 0
        assert "Traceback" not in output
        assert output.count("session folder name is not valid UTF-8") == 1, output
    finally:
        user.close()

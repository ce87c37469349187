"""`sessionsync doctor`, the way a person runs it: the real CLI in subprocesses, a fresh HOME and
XDG_RUNTIME_DIR (tests/test_front_door.py's NewUser), a real daemon started as the README does.
Each check is made to fail on purpose and its line and the exit code asserted; doctor itself must
change nothing (no database file created, no mode tightened, no migration).
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import stat
import subprocess
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from sessionsync.daemon.control.client import request
from sessionsync.daemon.doctor import (
    Finding,
    Report,
    raise_commands,
    reconcile_finding,
    suggested_limit,
)
from sessionsync.daemon.inotify_faults import INOTIFY_SYSCTL_ENV
from tests.conftest import require_postgres
from tests.support.databases import postgres_schema
from tests.support.newuser import SESSIONSYNC, NewUser
from tests.support.sessions import fixture_doc, write_state
from tests.support.waiting import wait_for

CHECKS = [
    "config",
    "database",
    "schema",
    "db-files",
    "socket",
    "daemon",
    "projects",
    "inotify",
    "reconcile",
    "sessions",
    "unit",
]
LINE = re.compile(r"(OK|WARN|FAIL) +(\S+) +(.*)")


class Doctor:
    """One run of `sessionsync doctor` and one of `doctor --json`, side by side."""

    def __init__(self, user: NewUser, *args: str, env: dict[str, str] | None = None) -> None:
        text = user.run("doctor", *args, env=env or {})
        as_json = user.run("doctor", "--json", *args, env=env or {})
        assert text.stderr == as_json.stderr == "", text.stderr + as_json.stderr
        assert text.returncode == as_json.returncode, (text.stdout, as_json.stdout)
        self.code = text.returncode
        self.text = text.stdout
        self.report: dict[str, Any] = json.loads(as_json.stdout)
        self.checks = {c["check"]: c for c in self.report["checks"]}
        # Every problem says what to do; a check that is fine has nothing to add.
        for check in self.report["checks"]:
            assert (check["hint"] is None) == (check["status"] == "OK"), check

    def status(self, check: str) -> str:
        return str(self.checks[check]["status"])

    def failing(self) -> dict[str, str]:
        return {c["check"]: c["status"] for c in self.report["checks"] if c["status"] != "OK"}

    def line(self, check: str) -> str:
        """The check's first text line and its continuation, joined as one (wrapping undone)."""
        lines = self.text.splitlines()
        start = next(i for i, line in enumerate(lines) if (m := LINE.fullmatch(line)) and m[2] == check)
        rest = []
        for line in lines[start + 1 :]:
            if not line.startswith(" " * 17) or line.lstrip().startswith("->"):
                break
            rest.append(line.strip())
        return " ".join([lines[start], *rest])


def _ready(user: NewUser, slug: str = "first") -> tuple[Path, Any]:
    """A project with one session, a daemon started as the README does, its start-up reconcile done."""
    project = user.project()
    write_state(project, slug, fixture_doc("v2-spec"))
    daemon = user.daemon()
    wait_for(lambda: slug in user.rows(), timeout=10)
    wait_for(lambda: request(user.socket, {"cmd": "status"})["last_reconcile_at"], timeout=10)
    return project, daemon


def _install_unit(user: NewUser) -> None:
    assert user.run("install-unit", "--user").returncode == 0
    if shutil.which("systemctl"):
        # Enabling only links files, which systemctl does without a user manager too.
        subprocess.run(
            ["systemctl", "--user", "enable", "sessionsync"], env=user.env, capture_output=True, check=False
        )


def _seam(tmp_path: Path, **limits: int) -> dict[str, str]:
    folder = tmp_path / "sysctl"
    folder.mkdir(exist_ok=True)
    for name, value in limits.items():
        (folder / name).write_text(f"{value}\n")
    return {INOTIFY_SYSCTL_ENV: str(folder)}


def _tree(path: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mode for p in [path, *path.rglob("*")]} if path.exists() else {}


# -- all OK ------------------------------------------------------------------------------------


def test_all_ok_against_a_daemon_started_as_the_readme_does(user: NewUser) -> None:
    _install_unit(user)
    _ready(user)
    doctor = Doctor(user)
    assert (doctor.code, doctor.failing()) == (0, {}), doctor.text
    assert list(doctor.checks) == CHECKS
    lines = doctor.text.splitlines()
    assert lines[0].startswith("sessionsync doctor ")
    assert lines[-1] == f"{len(CHECKS)} checks: all OK"
    assert [m[2] for line in lines if (m := LINE.fullmatch(line))] == CHECKS
    # One screen: lines wrap at 100 columns, unless a word (a path in pytest's folders) is longer.
    assert all(len(line) <= 100 or max(map(len, line.split())) > 40 for line in lines), doctor.text
    assert "built-in defaults" in doctor.line("config")
    assert "reachable" in doctor.line("database")
    assert re.search(r"at head, revision \w+", doctor.line("schema"))
    assert "private: sessions.db 600, in a 700 folder" in doctor.line("db-files")
    assert f"{user.socket}: yours, 600 in a 700 folder" in doctor.line("socket")
    assert re.search(r"running: pid \d+, version \S+, up \d+ s", doctor.line("daemon"))
    assert "1 watched (1 live)" in doctor.line("projects")
    assert "1 mirrored, none invalid" in doctor.line("sessions")
    assert "runs this install" in doctor.line("unit")


def test_json_is_one_object_with_a_status_and_every_check(user: NewUser) -> None:
    _ready(user)
    doctor = Doctor(user)
    assert set(doctor.report) == {"status", "version", "checks"}
    statuses = [c["status"] for c in doctor.report["checks"]]
    worst = "FAIL" if "FAIL" in statuses else "WARN" if "WARN" in statuses else "OK"
    assert doctor.report["status"] == worst
    assert doctor.code == (1 if worst == "FAIL" else 0)
    for check in doctor.report["checks"]:
        assert set(check) == {"check", "status", "message", "hint"}
        assert check["status"] in {"OK", "WARN", "FAIL"}
        assert isinstance(check["message"], str)
        assert check["message"]


# -- each check made to fail ------------------------------------------------------------------


def test_a_stopped_daemon_is_a_fail_and_doctor_creates_nothing(user: NewUser) -> None:
    _, daemon = _ready(user)
    assert user.stop(daemon)[0] == 0
    state, runtime = _tree(user.database.parent), _tree(user.runtime)
    doctor = Doctor(user)
    assert doctor.code == 1
    assert doctor.line("daemon") == f"FAIL  daemon     not running: nothing answers on {user.socket}"
    assert "systemctl --user start sessionsync" in doctor.checks["daemon"]["hint"]
    assert doctor.status("socket") == "WARN"
    # What needs no daemon is still checked, from the database and the folders.
    assert {"schema", "db-files", "reconcile", "sessions", "inotify", "projects"} <= set(doctor.checks)
    assert "watch states need the daemon" in doctor.checks["projects"]["message"]
    assert doctor.failing() == {"daemon": "FAIL", "socket": "WARN", "unit": "WARN"}
    assert _tree(user.database.parent) == state  # no -wal or -shm left behind, modes untouched
    assert _tree(user.runtime) == runtime


def test_a_first_run_creates_no_database(user: NewUser) -> None:
    user.project()
    doctor = Doctor(user)
    assert doctor.code == 1
    assert doctor.checks["database"]["status"] == "WARN"
    assert doctor.checks["database"]["message"].endswith("sessions.db: no database file yet")
    assert "schema" not in doctor.checks
    assert not user.database.parent.exists()
    assert not (user.runtime / "sessionsync").exists()


def test_a_lowered_watch_limit_through_the_seam_fails_with_the_sysctl_lines(
    user: NewUser, tmp_path: Path
) -> None:
    project, _ = _ready(user)
    (project / "agents" / "sessions" / "first" / "research" / "deep").mkdir(parents=True)
    (project / "agents" / "sessions" / "second").mkdir()
    # The project needs 4 watches: the sessions folder, its parent, first/ and second/ (nothing
    # deeper: first/research/ costs none).
    doctor = Doctor(user, env=_seam(tmp_path, max_user_watches=3))
    assert doctor.code == 1
    assert set(doctor.failing()) - {"unit"} == {"inotify"}
    assert doctor.line("inotify").startswith(
        "FAIL  inotify    watches 4 for 1 project, over fs.inotify.max_user_watches = 3 (stand-in from "
        f"${INOTIFY_SYSCTL_ENV}): projects past it are scanned every 30 s, not live"
    )
    hint = doctor.checks["inotify"]["hint"].splitlines()
    assert hint[1:] == [
        "  sudo sysctl fs.inotify.max_user_watches=524288",
        "  echo 'fs.inotify.max_user_watches=524288' | sudo tee /etc/sysctl.d/60-inotify.conf",
    ]
    # The commands are printed whole, never wrapped, so that they can be copied.
    assert "     sudo sysctl fs.inotify.max_user_watches=524288\n" in doctor.text

    both = Doctor(user, env=_seam(tmp_path, max_user_watches=3, max_user_instances=0))
    assert both.status("inotify") == "FAIL"
    assert "instances 1, over fs.inotify.max_user_instances = 0" in both.checks["inotify"]["message"]
    assert both.checks["inotify"]["hint"].splitlines()[1:] == [
        "  sudo sysctl fs.inotify.max_user_watches=524288 fs.inotify.max_user_instances=1024",
        "  printf '%s\\n' 'fs.inotify.max_user_watches=524288' 'fs.inotify.max_user_instances=1024'"
        " | sudo tee /etc/sysctl.d/60-inotify.conf",
    ]


def test_a_project_in_fallback_is_named(user: NewUser, tmp_path: Path) -> None:
    project = user.project()
    write_state(project, "first", fixture_doc("v2-spec"))
    seam = _seam(tmp_path, max_user_watches=1)
    daemon = user.start([str(SESSIONSYNC), "run"], env=seam)
    user.wait_answering(daemon)
    wait_for(lambda: request(user.socket, {"cmd": "status"})["watch"][0]["state"] == "fallback", timeout=10)
    doctor = Doctor(user, env=seam)
    assert doctor.code == 1
    assert doctor.line("projects") == (
        "WARN  projects   1 watched (1 fallback); ~/code/app without an inotify watch, "
        "scanned every 30 s instead"
    )
    assert doctor.status("inotify") == "FAIL"


def test_loose_modes_are_reported_and_left_alone(user: NewUser) -> None:
    _ready(user)
    user.database.chmod(0o644)
    user.database.parent.chmod(0o755)
    user.socket.chmod(0o666)
    doctor = Doctor(user)
    assert doctor.code == 1
    assert set(doctor.failing()) - {"unit"} == {"db-files", "socket"}
    assert doctor.line("db-files") == (
        "FAIL  db-files   ~/.local/state/sessionsync/sessions.db holds every session's state; readable by "
        "other users: sessions.db 644, its folder 755"
    )
    assert f"  chmod -R go= {user.database.parent}" in doctor.checks["db-files"]["hint"].splitlines()
    assert doctor.status("socket") == "WARN"  # the daemon's peer check still refuses other users
    assert "mode 666 in a 700 folder, not 600 in 700" in doctor.checks["socket"]["message"]
    assert f"  chmod 600 {user.socket}" in doctor.checks["socket"]["hint"].splitlines()
    assert stat.S_IMODE(user.database.stat().st_mode) == 0o644  # doctor only reports
    assert stat.S_IMODE(user.database.parent.stat().st_mode) == 0o755
    assert stat.S_IMODE(user.socket.stat().st_mode) == 0o666


def test_a_stale_reconcile_is_a_fail(user: NewUser) -> None:
    _ready(user)
    with sqlite3.connect(user.database) as conn:
        conn.execute("UPDATE projects SET last_reconciled_at = '2020-01-01 00:00:00.000000'")
    doctor = Doctor(user)
    assert doctor.code == 1
    assert set(doctor.failing()) - {"unit"} == {"reconcile"}
    assert re.fullmatch(
        r"FAIL  reconcile  missed: the full reconcile due 2020-01-0[12] \d\d:00 \(\d+ d \d+ h ago\) "
        r"\(0 3 \* \* \*\) did not run; the last was 2020-01-01 \d\d:00 \(\d+ d \d+ h ago\)",
        doctor.line("reconcile"),
    ), doctor.line("reconcile")
    assert doctor.checks["reconcile"]["hint"].startswith("`sessionsync resync --all --wait` runs one now")


def test_an_old_schema_says_run_db_upgrade(user: NewUser) -> None:
    _ready(user)
    with sqlite3.connect(user.database) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0004'")  # stamped one revision back
    doctor = Doctor(user)
    assert doctor.code == 1
    assert set(doctor.failing()) - {"unit"} == {"schema"}
    assert doctor.line("schema") == "FAIL  schema     revision 0004, 1 behind this install's head 0005"
    assert doctor.checks["schema"]["hint"] == "run `sessionsync db upgrade`, then restart the daemon"


def test_a_broken_config_is_a_fail_line_not_a_crash(user: NewUser) -> None:
    _, daemon = _ready(user)
    config = user.home / ".config" / "sessionsync" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[watch]\ndebounce = 100\n")
    doctor = Doctor(user)
    assert doctor.code == 1  # not 2: the command worked, and found a problem
    assert doctor.line("config").startswith("FAIL  config     invalid configuration: unknown key 'debounce'")
    assert f"({config})" in doctor.checks["config"]["message"]
    # The running daemon is still asked (it keeps the config it started with).
    assert doctor.status("daemon") == "OK"
    assert f"pid {daemon.pid}" in doctor.checks["daemon"]["message"]
    assert "database" not in doctor.checks
    assert "skipped" in doctor.checks["config"]["hint"]


def test_a_unit_that_runs_another_install(user: NewUser) -> None:
    _install_unit(user)
    unit = user.home / ".config" / "systemd" / "user" / "sessionsync.service"
    text = unit.read_text()
    unit.write_text(re.sub(r"(?m)^ExecStart=\S+", "ExecStart=/nonexistent/bin/sessionsync", text))
    doctor = Doctor(user)
    assert doctor.status("unit") == "FAIL"
    assert "it runs /nonexistent/bin/sessionsync, which is not there" in doctor.checks["unit"]["message"]
    unit.write_text(re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={shutil.which('true')}", text))
    doctor = Doctor(user)
    assert doctor.status("unit") == "WARN"
    assert f"not this install's {SESSIONSYNC}" in doctor.checks["unit"]["message"]


@pytest.mark.postgres
def test_postgres_reachable_old_unknown_and_unreachable(user: NewUser) -> None:
    from alembic import command
    from sqlalchemy import create_engine, text

    from sessionsync.daemon.migrate import alembic_config

    with postgres_schema(require_postgres()) as schema:
        url = schema.url
        env = {"SESSIONSYNC_DATABASE__URL": url}
        assert user.run("db", "upgrade", env=env).returncode == 0
        doctor = Doctor(user, env=env)
        assert (doctor.status("database"), doctor.status("schema")) == ("OK", "OK")
        assert "db-files" not in doctor.checks
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                cfg = alembic_config()
                cfg.attributes["connection"] = conn
                command.downgrade(cfg, "0004")
                conn.commit()
            doctor = Doctor(user, env=env)
            assert doctor.checks["schema"]["message"] == "revision 0004, 1 behind this install's head 0005"
            with engine.begin() as conn:
                conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
            doctor = Doctor(user, env=env)
            assert doctor.status("schema") == "FAIL"
            assert "revision ffff is unknown to this install" in doctor.checks["schema"]["message"]
        finally:
            engine.dispose()
    unreachable = "postgresql+psycopg://me:secret@127.0.0.1:1/none"
    doctor = Doctor(user, env={"SESSIONSYNC_DATABASE__URL": unreachable})
    assert doctor.code == 1
    assert doctor.checks["database"]["message"].startswith(
        "postgresql+psycopg://me:***@127.0.0.1:1/none: cannot connect: "
    )
    assert "secret" not in doctor.text


# -- the parts, without subprocesses ----------------------------------------------------------


def test_suggested_limits_and_the_raise_lines() -> None:
    assert suggested_limit("max_user_watches", 1000) == 524_288
    assert suggested_limit("max_user_watches", 600_000) == 2_097_152
    assert suggested_limit("max_user_instances", 10) == 1024
    assert raise_commands({"max_user_instances": 1024}).splitlines()[1:] == [
        "  sudo sysctl fs.inotify.max_user_instances=1024",
        "  echo 'fs.inotify.max_user_instances=1024' | sudo tee /etc/sysctl.d/60-inotify.conf",
    ]


def test_a_reconcile_is_stale_an_hour_after_a_missed_run() -> None:
    tz = ZoneInfo("Europe/Paris")
    last = datetime(2026, 11, 20, 3, 0, 5, tzinfo=tz)
    due = datetime(2026, 11, 21, 3, 0, tzinfo=tz)

    def status(now: datetime, last: datetime | None = last) -> str:
        return reconcile_finding("0 3 * * *", tz, last, now, None, daemon_running=True).status

    assert status(due - timedelta(hours=5)) == "OK"
    assert status(due + timedelta(minutes=59)) == "OK"  # a machine that just woke runs it late
    assert status(due + timedelta(hours=1, minutes=1)) == "FAIL"
    assert status(due, last=None) == "WARN"
    stopped = reconcile_finding("0 3 * * *", tz, last, due + timedelta(days=2), None, daemon_running=False)
    assert "sessionsync reconcile" in stopped.hint
    assert stopped.status == "FAIL"


def test_report_lines_wrap_messages_but_never_commands() -> None:
    command = "  sudo sysctl fs.inotify.max_user_watches=524288 " + "x" * 80
    report = Report(
        [
            Finding("config", "OK", "fine"),
            Finding("inotify", "FAIL", "word " * 40, f"raise it:\n{command}"),
            Finding("unit", "WARN", "not installed", "install it"),
        ]
    )
    assert report.status == "FAIL"
    lines = list(report.lines(width=80))
    assert lines[1] == "OK    config     fine"
    assert lines[2].startswith("FAIL  inotify    word word")
    assert all(len(line) <= 80 for line in lines if "sysctl" not in line)
    assert "                    " + command in lines
    assert lines[-1] == "3 checks: 1 FAIL, 1 WARN"
    assert Report([Finding("a", "OK", "x")]).status == "OK"

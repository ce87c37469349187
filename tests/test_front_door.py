"""The front door, walked the way a new user walks it: a fresh HOME and XDG_RUNTIME_DIR, no
config file anywhere, no test-only flags. The README's own commands (parsed from README.md), the
unit `install-unit` writes started as systemd would, and the messages and exit codes a hook or a
person relies on.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sessionsync.daemon.cli import build_parser
from sessionsync.daemon.control.client import request
from tests.support.newuser import SESSIONSYNC, NewUser
from tests.support.sessions import age_sessions, fixture_doc, write_state
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent


def _readme_command(heading: str) -> str:
    """The shell command in the first ```sh block under `heading` in README.md."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1]
    match = re.search(r"```sh\n(.*?)\n```", section, re.DOTALL)
    assert match, f"no ```sh block under '## {heading}' in README.md"
    return match.group(1).strip()


def _copy_checkout(dest: Path) -> None:
    """The working tree as a fresh clone would have it: tracked and untracked files git keeps."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = REPO / os.fsdecode(name)
        if source.is_file():
            target = dest / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


# -- the README, letter by letter -------------------------------------------------------------


@pytest.mark.timeout(420)
def test_the_readme_commands_set_up_run_and_test_on_a_fresh_machine(user: NewUser, tmp_path: Path) -> None:
    set_up_and_run = _readme_command("Set up and run")
    run_tests = _readme_command("Run the tests")
    assert set_up_and_run.endswith("sessionsync run"), set_up_and_run
    clone = tmp_path / "clone"
    _copy_checkout(clone)
    project = user.project()
    write_state(project, "first", fixture_doc("v2-spec"))

    daemon = user.start(["bash", "-c", set_up_and_run], cwd=clone)
    # The install takes a while; then the daemon answers on the default socket.
    wait_for(lambda: user.socket.exists() or daemon.poll() is not None, timeout=300)
    status = user.wait_answering(daemon)
    assert status["config"] is None  # built-in defaults: there is no config file anywhere
    wait_for(lambda: "first" in user.rows(), timeout=10)
    write_state(project, "first", {**fixture_doc("v2-spec"), "topic": "edited later"})
    wait_for(lambda: user.rows()["first"]["title"] == "edited later", timeout=10)
    os.kill(status["pid"], signal.SIGTERM)
    assert daemon.wait(30) == 0, user.output(daemon)

    # The test command as written; the environment only narrows which tests it runs (the whole
    # suite inside the suite would double its time), the command itself is untouched.
    tests = subprocess.run(
        ["bash", "-c", run_tests],
        cwd=clone,
        env={**user.env, "PYTEST_ADDOPTS": "-q -p no:cacheprovider tests/test_config.py"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
    assert re.search(r"\d+ passed", tests.stdout), tests.stdout[-2000:]


def _exec_start(unit: str) -> list[str]:
    line = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def _unit_environment(unit: str, home: Path, runtime: Path) -> dict[str, str]:
    """What systemd puts in the service's environment from the unit: Environment= lines
    (%h is the home folder) and RuntimeDirectory=."""
    env = {}
    for line in unit.splitlines():
        if line.startswith("Environment="):
            name, _, value = line.removeprefix("Environment=").partition("=")
            env[name] = value.replace("%h", str(home))
        if line.startswith("RuntimeDirectory="):
            env["RUNTIME_DIRECTORY"] = str(runtime / line.removeprefix("RuntimeDirectory="))
    return env


@pytest.mark.parametrize("with_config", [False, True], ids=["defaults", "config"])
def test_the_unit_install_unit_writes_starts_as_systemd_would(user: NewUser, with_config: bool) -> None:
    project = user.project()
    write_state(project, "first", fixture_doc("v2-spec"))
    args = ["install-unit", "--user"]
    config = user.home / "conf" / "mine.toml"
    if with_config:
        config.parent.mkdir()
        config.write_text("[workers]\nthreads = 1\n")
        args = ["install-unit", "--user", "--config", "conf/mine.toml"]  # relative, from HOME
    installed = user.run(*args)
    assert installed.returncode == 0, installed.stderr
    unit_path = user.home / ".config" / "systemd" / "user" / "sessionsync.service"
    assert installed.stdout.startswith(f"wrote {unit_path}\n")
    unit = unit_path.read_text()
    argv = _exec_start(unit)
    assert argv[:2] == [str(SESSIONSYNC), "run"]
    assert argv[2:] == (["--config", str(config)] if with_config else [])

    env = _unit_environment(unit, user.home, user.runtime)
    Path(env["RUNTIME_DIRECTORY"]).mkdir(mode=0o700)
    Path(env["STATE_DIRECTORY"]).mkdir(mode=0o700, parents=True)  # ExecStartPre's mkdir
    daemon = user.start(argv, cwd=Path("/"), env=env)
    status = user.wait_answering(daemon)
    assert status["config"] == (str(config) if with_config else None)
    # A client in the user's shell (no RUNTIME_DIRECTORY) finds the same socket and database.
    answered = user.run("status")
    assert answered.returncode == 0, answered.stderr
    assert f"pid {status['pid']}" in answered.stdout
    assert str(user.database) in answered.stdout
    code, output = user.stop(daemon)
    assert code == 0, output


# -- options, help and version ----------------------------------------------------------------


def test_global_options_work_before_and_after_the_command(user: NewUser) -> None:
    config = user.home / "c.toml"
    socket = user.runtime / "elsewhere.sock"
    config.write_text(f'[control]\nsocket = "{socket}"\n')
    daemon = user.daemon("--config", str(config), socket=socket)
    before = user.run("--config", str(config), "status", "--json")
    after = user.run("status", "--json", "--config", str(config))
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert json.loads(before.stdout)["pid"] == json.loads(after.stdout)["pid"] == daemon.pid
    assert json.loads(before.stdout)["config"] == str(config)
    assert user.stop(daemon)[0] == 0


def test_version_prints_the_installed_version() -> None:
    from importlib.metadata import version

    out = subprocess.run([str(SESSIONSYNC), "--version"], capture_output=True, text=True, check=False)
    assert (out.returncode, out.stdout) == (0, f"sessionsync {version('sessionsync')}\n")


def _actions(parser: Any) -> Iterator[tuple[str, Any]]:
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {where}", a) for where, a in _actions(sub))
        else:
            yield ("/".join(action.option_strings) or action.dest, action)


def test_every_option_and_argument_has_help_and_project_says_folder() -> None:
    actions = list(_actions(build_parser()))
    assert len(actions) > 30
    missing = [name for name, action in actions if not action.help]
    assert missing == []
    project = next(a for name, a in actions if name == "sessions --project")
    assert "folder" in project.help
    assert project.metavar == "FOLDER"


# -- the mirror is private --------------------------------------------------------------------


def test_the_default_database_is_created_private(user: NewUser) -> None:
    user.project()
    daemon = user.daemon()
    for path in (user.database, Path(f"{user.database}-wal"), Path(f"{user.database}-shm")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(user.database.parent.stat().st_mode) == 0o700
    code, output = user.stop(daemon)
    assert code == 0
    assert "readable by other users" not in output


def test_a_loose_database_is_tightened_with_one_line(user: NewUser) -> None:
    user.project()
    user.database.parent.mkdir(parents=True, mode=0o755)
    user.database.parent.chmod(0o755)
    user.database.touch(mode=0o644)
    user.database.chmod(0o644)
    daemon = user.daemon()
    assert stat.S_IMODE(user.database.stat().st_mode) == 0o600
    assert stat.S_IMODE(user.database.parent.stat().st_mode) == 0o700
    code, output = user.stop(daemon)
    assert code == 0
    lines = [line for line in output.splitlines() if "readable by other users" in line]
    assert len(lines) == 1, output
    assert f"{user.database} 644 -> 600" in lines[0]
    assert f"{user.database.parent} 755 -> 700" in lines[0]


# -- exit codes and messages a hook can trust -------------------------------------------------


@pytest.fixture
def running(user: NewUser) -> Iterator[tuple[NewUser, Path, subprocess.Popen[str]]]:
    project = user.project()
    write_state(project, "first", fixture_doc("v2-spec"))
    daemon = user.daemon()
    wait_for(lambda: "first" in user.rows(), timeout=10)
    yield user, project, daemon
    user.stop(daemon)


def test_sync_of_a_missing_folder_is_not_found(running: tuple[NewUser, Path, Any]) -> None:
    user, project, _ = running
    missing = project / "agents" / "sessions" / "no-such-session"
    out = user.run("sync", str(missing))
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == f"sessionsync: no session folder at {missing}\n"


def test_sync_errors_and_watch_name_the_real_session_folder(running: tuple[NewUser, Path, Any]) -> None:
    user, project, _ = running
    folder = project / "agents" / "sessions" / "first"
    watch = user.start([str(SESSIONSYNC), "watch"])
    wait_for(lambda: request(user.socket, {"cmd": "status"})["counters"]["subscribers"] == 1, timeout=10)
    write_state(project, "first", {**fixture_doc("v2-spec"), "current_phase": "plan"})
    write_state(project, "broken", b"{ not json")
    out = user.run("sync", "agents/sessions/first", cwd=project)  # a hook runs inside the project
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(rf"{re.escape(str(folder))}: (written|unchanged)\n", out.stdout)
    wait_for(lambda: "broken" in user.rows(), timeout=10)
    errors = user.run("errors")
    assert errors.stdout.startswith(f"{project}/agents/sessions/broken: invalid: not valid JSON")

    assert watch.stdout is not None
    # Three events in all, in whatever order the two sessions were written: first's phase change,
    # broken's creation and its invalid content.
    lines = [watch.stdout.readline() for _ in range(3)]
    watch.kill()
    assert "None" not in "".join(lines)
    assert any(
        re.search(rf"session\.phase_changed\s+{re.escape(str(folder))} spec -> plan$", x) for x in lines
    )
    assert any(
        re.search(rf"session\.created\s+{re.escape(str(project))}/agents/sessions/broken", x) for x in lines
    )
    assert any(
        re.search(r"session\.invalid\s+.*/agents/sessions/broken \(not valid JSON", x) for x in lines
    ), lines


def test_wrong_type_fields_are_listed_as_field_problems_and_logged_once(
    running: tuple[NewUser, Path, Any],
) -> None:
    user, project, daemon = running
    lots = {**fixture_doc("v2-build"), "build_progress": {"checkpoints_total": "lots"}}
    write_state(project, "lots", lots)
    wait_for(lambda: "lots" in user.rows(), timeout=10)
    # The same content written again, and a resync: neither logs it a second time.
    write_state(project, "lots", lots)
    assert user.run("resync", str(project), "--wait").returncode == 0
    errors = user.run("errors")
    folder = project / "agents" / "sessions" / "lots"
    assert f"{folder}: field problems: build_progress.checkpoints_total" in errors.stdout
    code, output = user.stop(daemon)
    assert code == 0
    warned = [line for line in output.splitlines() if "fields of the wrong type" in line]
    assert len(warned) == 1, output
    assert "[~/code/app/agents/sessions/lots]" in warned[0]


def test_sessions_for_an_unknown_project_exits_1_naming_it(running: tuple[NewUser, Path, Any]) -> None:
    user, project, _ = running
    known = user.run("sessions", "--project", str(project))
    assert known.returncode == 0, known.stderr
    assert "first" in known.stdout
    out = user.run("sessions", "--project", str(user.home / "elsewhere"))
    assert out.returncode == 1
    assert out.stderr.startswith(f"sessionsync: no project {user.home / 'elsewhere'} in the mirror\n")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://me@localhost/s", "uses 'mysql'; sessionsync supports sqlite and postgresql"),
        ("postgres://me@localhost/s", "'postgres://' is not a SQLAlchemy URL scheme"),
        ("postgresql+psycopg://me@localhost:99999/s", "the port '99999' is not a number from 1 to 65535"),
    ],
)
def test_check_config_refuses_what_run_refuses_with_the_same_message(
    user: NewUser, url: str, message: str
) -> None:
    env = {"SESSIONSYNC_DATABASE__URL": url}
    checked = user.run("check-config", env=env)
    started = user.run("run", env=env)
    assert checked.returncode == started.returncode == 2
    assert message in checked.stderr
    assert checked.stderr == started.stderr


def test_a_broken_config_file_still_reaches_the_running_daemon(running: tuple[NewUser, Path, Any]) -> None:
    user, _, daemon = running
    config = user.home / ".config" / "sessionsync" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[watch]\ndebounce = 100\n")  # an unknown key, added while it runs
    out = user.run("status")
    assert out.returncode == 0
    assert f"pid {daemon.pid}" in out.stdout
    assert "unknown key 'debounce' in [watch]" in out.stderr
    assert "asking the running daemon anyway" in out.stderr
    # Commands that need the file itself still refuse it.
    assert user.run("check-config").returncode == 2


def test_status_into_a_closed_pipe_ends_quietly(running: tuple[NewUser, Path, Any]) -> None:
    user, _, _ = running
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head -1` that has already gone
    try:
        proc = subprocess.run(
            [str(SESSIONSYNC), "status"], env=user.env, stdout=write_end, stderr=subprocess.PIPE, check=False
        )
    finally:
        os.close(write_end)
    assert proc.stderr == b""
    assert proc.returncode == 141


def test_sqlite_errors_never_blame_a_server(user: NewUser) -> None:
    blocked = user.home / "file-not-folder"
    blocked.write_text("")
    out = user.run("sessions", env={"SESSIONSYNC_DATABASE__URL": f"sqlite:///{blocked}/sessions.db"})
    assert out.returncode == 1
    assert "server" not in out.stderr


def test_a_missing_schema_without_auto_migrate_says_run_db_upgrade(user: NewUser) -> None:
    env = {"SESSIONSYNC_DATABASE__AUTO_MIGRATE": "false"}
    for command in (["sessions"], ["run"]):
        out = user.run(*command, env=env)
        assert out.returncode == 1, out.stderr
        assert "run `sessionsync db upgrade`" in out.stderr, out.stderr
    assert user.run("db", "upgrade").returncode == 0
    assert user.run("sessions", env=env).returncode == 0


# -- logs and status that tell the story ------------------------------------------------------


def test_logs_tell_a_sessions_story_at_info(user: NewUser) -> None:
    project = user.project()
    daemon = user.daemon()
    folder = project / "agents" / "sessions" / "story"
    steps = [
        fixture_doc("v2-spec"),
        {**fixture_doc("v2-spec"), "topic": "a plain rewrite"},
        {**fixture_doc("v2-spec"), "current_phase": "plan"},
        {**fixture_doc("v2-spec"), "current_phase": "plan", "status": "paused"},
        b"{ cut off",
        {**fixture_doc("v2-spec"), "current_phase": "plan", "status": "paused", "topic": "fixed"},
    ]
    for content in steps:
        write_state(project, "story", content)
        wait_for(lambda c=content: _mirrors(user, "story", c), timeout=10)
    shutil.rmtree(folder)
    wait_for(lambda: user.rows().get("story", {}).get("deleted_at"), timeout=10)
    write_state(project, "story", fixture_doc("v2-spec"))
    wait_for(lambda: not user.rows()["story"]["deleted_at"], timeout=10)
    code, output = user.stop(daemon)
    assert code == 0
    story = [
        line.split("] ", 1)[1] for line in output.splitlines() if "[~/code/app/agents/sessions/story]" in line
    ]
    assert story == [
        "session created, phase spec",
        "phase spec -> plan",
        "status active -> paused",
        "state.json is invalid (not valid JSON: Expecting property name enclosed in double quotes at line 1 "
        "column 3); keeping the last good mirror",
        "state.json is valid again; mirrored",
        "session deleted: its folder or state.json is gone; row tombstoned",
        "session restored: its state.json is back",
        "phase plan -> spec",  # it came back as it was first written
        "status paused -> active",
    ], output
    started = next(line for line in output.splitlines() if "sessionsync started:" in line)
    assert "config built-in defaults" in started
    assert f"roots {user.home}" in started
    assert f"database sqlite:///{user.database}" in started


def _mirrors(user: NewUser, slug: str, content: dict[str, Any] | bytes) -> bool:
    row = user.rows().get(slug)
    if row is None:
        return False
    if isinstance(content, bytes):
        return bool(row["invalid"])
    wanted = (content.get("topic"), content["current_phase"], content.get("status", "active"), 0)
    return (row["title"], row["current_phase"], row["status"], row["invalid"]) == wanted


def test_debug_is_not_drowned_and_sql_needs_its_own_setting(user: NewUser) -> None:
    project = user.project()
    write_state(project, "first", fixture_doc("v2-spec"))
    log_file = user.home / "sessionsync.log"
    title = fixture_doc("v2-spec")["topic"]
    for sql in ("false", "true"):
        env = {
            "SESSIONSYNC_LOG__LEVEL": "debug",
            "SESSIONSYNC_LOG__SQL": sql,
            "SESSIONSYNC_LOG__FORMAT": "json",
            "SESSIONSYNC_LOG__FILE": str(log_file),
        }
        daemon = user.start([str(SESSIONSYNC), "run"], env=env)
        user.wait_answering(daemon)
        # Mirrored first, so that the write below is an update, not part of the start-up reconcile.
        wait_for(lambda t=title: user.rows().get("first", {}).get("title") == t, timeout=10)
        title = f"sql {sql}"
        write_state(project, "first", {**fixture_doc("v2-spec"), "topic": title})
        wait_for(lambda t=title: user.rows()["first"]["title"] == t, timeout=10)
        code, output = user.stop(daemon)
        assert code == 0
        records = [json.loads(line) for line in output.splitlines()]
        loggers = {r["logger"].split(".")[0] for r in records}
        assert ("sqlalchemy" in loggers) == (sql == "true"), loggers
        assert loggers <= {"sessionsync", "sqlalchemy"}, loggers
        assert any(r["message"] == "updated" and r["level"] == "DEBUG" for r in records)
    # The file sink speaks JSON too.
    file_records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert any("sessionsync started:" in r["message"] for r in file_records)


def test_status_for_people(running: tuple[NewUser, Path, Any]) -> None:
    user, project, daemon = running
    write_state(project, "bad", b"[]")
    bad = str(project / "agents" / "sessions" / "bad")
    wait_for(lambda: _error_sessions(user) == [bad], timeout=10)
    out = user.run("status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    from importlib.metadata import version

    assert re.fullmatch(
        rf"sessionsync {re.escape(version('sessionsync'))}, pid {daemon.pid}, up \d+ s", lines[0]
    )
    assert "  config       built-in defaults" in lines
    assert any(re.match(r"  reconcile    last .* ago\), next \d{4}-\d\d-\d\d 03:00 ", line) for line in lines)
    groups = [line.split()[0] for line in lines if line.startswith(("  activity ", "  scans ", "  faults "))]
    assert groups == ["activity", "scans", "faults"], out.stdout
    assert any("[~/code/app/agents/sessions/bad] state.json is invalid" in line for line in lines), out.stdout
    # Fixed, the session drops out of the recent errors.
    write_state(project, "bad", fixture_doc("v2-spec"))
    wait_for(lambda: _error_sessions(user) == [], timeout=10)
    assert "sessions/bad" not in user.run("status").stdout


def _error_sessions(user: NewUser) -> list[str]:
    return [e["session"] for e in request(user.socket, {"cmd": "status"})["recent_errors"] if e["session"]]


@pytest.mark.parametrize("config", [None, REPO / "config.toml"], ids=["defaults", "shipped-config"])
def test_status_imports_no_database_or_scheduler_library(
    running: tuple[NewUser, Path, Any], config: Path | None
) -> None:
    user, _, _ = running
    args = ["status"] if config is None else ["status", "--config", str(config)]
    out = user.run(*args, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert out.returncode == 0, out.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "sessionsync.daemon.status" in imported  # the whole command ran, rendering included
    heavy = sorted(
        m for m in imported if m.split(".")[0] in {"sqlalchemy", "psycopg", "alembic", "apscheduler"}
    )
    assert heavy == []


def test_a_reconcile_with_nothing_to_do_imports_only_what_it_uses(user: NewUser) -> None:
    """The one-shot CLI's start-up is its imports: a reconcile that finds nothing changed on the
    default SQLite mirror is answered through the standard library's sqlite3, with no SQLAlchemy,
    Alembic, psycopg, scheduler, watcher, progress bar, metrics, TOML parser or state.json models;
    the first change found brings the full pass back."""
    project = user.project()
    write_state(project, "first", fixture_doc("v2-spec"))
    age_sessions(project)  # untouched lately: its stat can be trusted for skipping
    assert user.run("reconcile").returncode == 0  # creates the database and mirrors the session
    with sqlite3.connect(user.database) as conn:
        (marked,) = conn.execute("SELECT last_reconciled_at FROM projects").fetchone()

    out = user.run("reconcile", env={"PYTHONPROFILEIMPORTTIME": "1"})

    assert out.returncode == 0, out.stderr
    assert ", 0 written, 1 unchanged," in out.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "sessionsync.daemon.quick_reconcile" in imported  # the whole command ran
    # tomllib: there is no config file to read.
    unused = {
        "sqlalchemy",
        "alembic",
        "psycopg",
        "apscheduler",
        "watchdog",
        "tqdm",
        "prometheus_client",
        "tomllib",
    }
    heavy = sorted(m for m in imported if m.split(".")[0] in unused)
    assert heavy == []
    # No document to map, no store, and the default schedule needs no checking.
    assert imported.isdisjoint(
        {"sessionsync.models.state_documents", "sessionsync.daemon.store", "sessionsync.daemon.crontab"}
    )
    with sqlite3.connect(user.database) as conn:  # the project is marked reconciled all the same
        (now_marked,) = conn.execute("SELECT last_reconciled_at FROM projects").fetchone()
    assert now_marked > marked

    write_state(project, "first", fixture_doc("v2-build"))
    out = user.run("reconcile", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert out.returncode == 0, out.stderr
    assert ", 1 written, 0 unchanged," in out.stdout
    assert "sessionsync.daemon.store" in out.stderr


def test_a_one_shot_reconcile_never_collects_garbage_during_its_start_up(user: NewUser) -> None:
    """Start-up allocates only what the process keeps: the collector stays off until the command is
    set up, which freezes it all, and then runs for the rest of the work. (A reconcile with nothing
    to do is answered without the store, and keeps the collector off for its few milliseconds.)"""
    report = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('gc', gc.isenabled(), gc.get_freeze_count(),"
        " gc.get_stats()[2]['collections'], file=sys.stderr))\n"
        "from sessionsync.daemon.cli import main\n"
        "main(['reconcile'])\n"
    )
    python = SESSIONSYNC.parent / "python"
    # The first creates the database and mirrors the session, the second writes its new state.
    for doc in ("v2-spec", "v2-build"):
        write_state(user.project(), "first", fixture_doc(doc))
        out = subprocess.run(
            [str(python), "-c", report],
            env=user.env,
            cwd=user.home,
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        (line,) = [line for line in out.stderr.splitlines() if line.startswith("gc ")]
        _, enabled, frozen, full_collections = line.split()
        assert enabled == "True"  # on again for the work
        assert int(frozen) > 10_000  # the modules, classes and validators of the start-up
        assert full_collections == "0"


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["reconcile", "--help"]])
def test_help_and_version_import_neither_the_config_model_nor_a_database_library(
    user: NewUser, args: list[str]
) -> None:
    out = user.run(*args, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("sessionsync " if args == ["--version"] else "usage: sessionsync")
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "sessionsync.daemon.cli" in imported
    heavy = {"pydantic", "pydantic_core", "sqlalchemy", "loguru", "alembic", "psycopg"}
    assert sorted(m for m in imported if m.split(".")[0] in heavy) == []
    # The installed version is looked up (in the packages' metadata) only when it is asked for.
    assert ("importlib.metadata" in imported) == (args == ["--version"])


def test_a_one_shot_reconcile_logs_like_the_daemon(user: NewUser) -> None:
    project = user.project()
    write_state(project, "good", fixture_doc("v2-spec"))
    write_state(project, "bad", b"[]")
    out = user.run("reconcile")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(
        "reconciled 1 project(s): 2 session(s) seen, 2 written, 0 unchanged, 1 invalid"
    )
    (line,) = out.stderr.splitlines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} WARNING  batch: \[~/code/app/agents/sessions/bad\] "
        r"state\.json is invalid \(top level is a list, not an object\); keeping the last good mirror",
        line,
    ), line

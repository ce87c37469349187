"""The one-shot commands (check-config, db upgrade, reconcile, sessions) through the real
`sessionsync` console script in a subprocess: exit codes, what users read, what lands in the
database, and processes racing each other on one database.

Each run gets an explicit --config in the test's folder and an environment with no
SESSIONSYNC_* variables and every XDG folder inside the test's folder, so nothing leaks in or out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select

from sessionsync.daemon.migrate import head_revision
from sessionsync.models.tables import projects, sessions
from tests.support.sessions import fixture_doc, remove_session, write_state

SESSIONSYNC = Path(sys.executable).parent / "sessionsync"
UNREACHABLE_URL = "postgresql+psycopg://nobody@127.0.0.1:1/x"
SECRET_URL = "postgresql+psycopg://u:sekrit@127.0.0.1:1/x"
SUMMARY = re.compile(
    r"reconciled (?P<projects>\d+) project\(s\): (?P<seen>\d+) session\(s\) seen, "
    r"(?P<written>\d+) written, (?P<unchanged>\d+) unchanged, (?P<invalid>\d+) invalid, "
    r"(?P<tombstoned>\d+) tombstoned, (?P<no_state>\d+) without state\.json, in \d+ ms"
)
# Variables a systemd service or a developer's shell may set that change where things go.
_SERVICE_VARS = ("STATE_DIRECTORY", "RUNTIME_DIRECTORY", "NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC")


@dataclass
class Cli:
    """Runs `sessionsync` with one config file and a sealed environment."""

    config: Path
    env: dict[str, str]
    cwd: Path

    def start(self, *args: str, wrapper: Sequence[str] = ()) -> subprocess.Popen[str]:
        """`--config` goes last unless `args` already place it; `wrapper` runs the command."""
        config = [] if "--config" in args else ["--config", str(self.config)]
        return subprocess.Popen(
            [*wrapper, str(SESSIONSYNC), *args, *config],
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return finish(self.start(*args))

    def all(self, *commands: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
        """Start every command at once, then wait for each: racing processes, or just speed."""
        return [finish(p) for p in [self.start(*c) for c in commands]]


def finish(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} did not finish within 60 s; stderr: {err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def make_cli(base: Path, url: str, projects: Sequence[Path] = ()) -> Cli:
    home = base / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONSYNC_") and k not in _SERVICE_VARS}
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_STATE_HOME=str(home / ".local" / "state"),
        XDG_RUNTIME_DIR=str(home / "run"),
    )
    home.mkdir(parents=True, exist_ok=True)
    config = base / "config.toml"
    write_config(config, url, projects)
    return Cli(config, env, base)


def write_config(path: Path, url: str, projects: Sequence[Path] = (), extra: str = "") -> None:
    # JSON strings are valid TOML basic strings, which quotes paths and URLs safely.
    path.write_text(
        f"[database]\nurl = {json.dumps(url)}\n\n"
        f"[watch]\nroots = []\nprojects = {json.dumps([str(p) for p in projects])}\n{extra}"
    )


def summary(result: subprocess.CompletedProcess[str]) -> dict[str, int]:
    assert result.returncode == 0, result.stderr
    match = SUMMARY.search(result.stdout)
    assert match, f"no summary in {result.stdout!r}"
    return {k: int(v) for k, v in match.groupdict().items()}


def rows(url: str) -> list[dict[str, Any]]:
    """Every session row, live or not, with its project folder."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            query = (
                select(projects.c.working_dir.label("project"), sessions)
                .join(projects, sessions.c.project_id == projects.c.id)
                .order_by(projects.c.working_dir, sessions.c.slug)
            )
            return [dict(r._mapping) for r in conn.execute(query)]
    finally:
        engine.dispose()


def count(url: str, table: Any) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())
    finally:
        engine.dispose()


def add_fixture_sessions(project: Path, names: Sequence[str]) -> None:
    for name in names:
        write_state(project, name, fixture_doc(name))


FIXTURES = ("v1-build", "v2-build", "v2-complete-quick", "v2-spec")


# -- check-config -----------------------------------------------------------------------------


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    cli = make_cli(tmp_path, "")
    result = cli.run("check-config")
    assert result.returncode == 0, result.stderr
    assert f"configuration OK ({cli.config})" in result.stdout


def test_check_config_accepts_the_repository_config(tmp_path: Path) -> None:
    cli = make_cli(tmp_path, "")
    cli.config = Path(__file__).resolve().parent.parent / "config.toml"
    result = cli.run("check-config")
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ('debounce_ms = "fast"\n', "[watch] debounce_ms = 'fast'"),
        ("debounce = 100\n", "unknown key 'debounce' in [watch]"),
        ("[log]\nformat = 'xml'\n", "[log] format = 'xml'"),
        ("[schedule\n", "is not valid TOML"),
    ],
)
def test_check_config_rejects_a_bad_file_with_exit_2_naming_the_key(
    tmp_path: Path, extra: str, named: str
) -> None:
    cli = make_cli(tmp_path, "")
    write_config(cli.config, "", extra=extra)
    result = cli.run("check-config")
    assert result.returncode == 2
    assert named in result.stderr
    assert str(cli.config) in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_bad_environment_override_is_a_configuration_error(tmp_path: Path) -> None:
    cli = make_cli(tmp_path, "")
    cli.env["SESSIONSYNC_WATCH__NOPE"] = "1"
    result = cli.run("check-config")
    assert result.returncode == 2
    assert "SESSIONSYNC_WATCH__NOPE" in result.stderr


def test_missing_config_file_exits_2_naming_it(tmp_path: Path) -> None:
    cli = make_cli(tmp_path, "")
    cli.config = tmp_path / "missing.toml"
    result = cli.run("check-config")
    assert result.returncode == 2
    assert f"config file {cli.config} does not exist" in result.stderr


# -- db upgrade -------------------------------------------------------------------------------


def test_db_upgrade_migrates_then_says_up_to_date(tmp_path: Path, db_url: str) -> None:
    cli = make_cli(tmp_path, db_url)
    first = cli.run("db", "upgrade")
    assert first.returncode == 0, first.stderr
    assert f"upgraded from empty to revision {head_revision()}" in first.stdout
    # --config may also come between `db` and its action.
    second = cli.run("db", "--config", str(cli.config), "upgrade")
    assert second.returncode == 0, second.stderr
    assert f"database {db_url} is up to date (revision {head_revision()})" in second.stdout


@pytest.mark.postgres
def test_three_db_upgrades_at_once_on_a_fresh_postgres_all_succeed(tmp_path: Path, pg_url: str) -> None:
    cli = make_cli(tmp_path, pg_url)
    results = cli.all(*[["db", "upgrade"]] * 3)
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
    outputs = sorted(r.stdout for r in results)
    assert sum("upgraded from empty" in out for out in outputs) == 1, outputs
    assert sum("is up to date" in out for out in outputs) == 2, outputs
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            versions = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all()
    finally:
        engine.dispose()
    assert versions == [head_revision()]


# -- reconcile --------------------------------------------------------------------------------


def test_reconcile_prints_a_summary_and_a_second_run_only_tombstones(tmp_path: Path, db_url: str) -> None:
    project = (tmp_path / "proj").resolve()
    add_fixture_sessions(project, FIXTURES)
    (project / "agents" / "sessions" / "no-state-yet").mkdir()
    # Discovered through [watch] projects, not named on the command line.
    cli = make_cli(tmp_path, db_url, [project])

    first = summary(cli.run("reconcile"))
    assert first == {
        "projects": 1,
        "seen": 5,
        "written": 4,
        "unchanged": 0,
        "invalid": 0,
        "tombstoned": 0,
        "no_state": 1,
    }
    remove_session(project, "v2-spec")
    second = summary(cli.run("reconcile", str(project)))
    assert (second["written"], second["unchanged"], second["tombstoned"], second["no_state"]) == (0, 3, 1, 1)

    mirrored = {r["slug"]: r for r in rows(db_url)}
    assert set(mirrored) == set(FIXTURES)
    assert mirrored["v2-spec"]["deleted_at"] is not None
    assert mirrored["v1-build"]["checkpoints_completed"] == 2
    assert mirrored["v2-build"]["title"] == "Search index rebuild"


def test_reconcile_of_a_missing_project_exits_1_naming_it(tmp_path: Path) -> None:
    cli = make_cli(tmp_path, f"sqlite:///{tmp_path / 's.db'}")
    result = cli.run("reconcile", "/nonexistent")
    assert result.returncode == 1
    assert "/nonexistent" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_database_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    project = (tmp_path / "proj").resolve()
    add_fixture_sessions(project, ["v2-build"])
    cli = make_cli(tmp_path, UNREACHABLE_URL)
    result = cli.run("reconcile", str(project))
    assert result.returncode == 1
    assert f"cannot use the database {UNREACHABLE_URL}: connection failed" in result.stderr
    assert "check [database] url and that the server is running" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_password_in_the_database_url_never_appears_in_output(tmp_path: Path) -> None:
    project = (tmp_path / "proj").resolve()
    add_fixture_sessions(project, ["v2-build"])
    cli = make_cli(tmp_path, SECRET_URL)
    from_file = cli.all(["reconcile", str(project)], ["sessions"])
    # The same URL from the environment instead of the file.
    cli.env["SESSIONSYNC_DATABASE__URL"] = SECRET_URL
    write_config(cli.config, "")
    results = from_file + cli.all(["db", "upgrade"], ["check-config"])
    for result in results:
        assert "sekrit" not in result.stdout + result.stderr, result.args
        assert "Traceback" not in result.stderr
    for result in results[:3]:
        assert result.returncode == 1
        assert "cannot use the database postgresql+psycopg://u:***@127.0.0.1:1/x" in result.stderr


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_two_reconciles_at_once_leave_one_row_per_session(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    # Both start on an empty database, so they also race through the migration.
    url = request.getfixturevalue("pg_url") if backend == "postgres" else f"sqlite:///{tmp_path / 's.db'}"
    project = (tmp_path / "proj").resolve()
    doc = fixture_doc("v2-build")
    slugs = [f"s{n:03}" for n in range(120)]
    for slug in slugs:
        write_state(project, slug, doc)
    cli = make_cli(tmp_path, url, [project])

    results = cli.all(["reconcile"], ["reconcile"])
    for result in results:
        assert summary(result)["seen"] == len(slugs)
    mirrored = rows(url)
    assert sorted(r["slug"] for r in mirrored) == slugs
    assert all(r["deleted_at"] is None and not r["invalid"] for r in mirrored)
    assert count(url, projects) == 1


# -- sessions ---------------------------------------------------------------------------------


def _json_lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_sessions_lists_and_filters(tmp_path: Path) -> None:
    # SQLite only: the query is plain SQLAlchemy Core, and each backend costs six processes.
    db_url = f"sqlite:///{tmp_path / 's.db'}"
    first, second = (tmp_path / "first").resolve(), (tmp_path / "second").resolve()
    add_fixture_sessions(first, ["v2-build", "v2-complete-quick", "v2-spec"])
    add_fixture_sessions(second, ["v1-build"])
    cli = make_cli(tmp_path, db_url, [first, second])
    assert summary(cli.run("reconcile"))["written"] == 4

    everything, plain_first, only_second, build, complete, nothing = cli.all(
        ["sessions", "--json"],
        ["sessions", "--project", str(first)],
        ["sessions", "--json", "--project", str(second)],
        ["sessions", "--json", "--phase", "build"],
        ["sessions", "--json", "--status", "complete"],
        ["sessions", "--phase", "docs"],
    )
    assert plain_first.returncode == 0, plain_first.stderr
    assert plain_first.stdout.splitlines() == [
        f"{first}  v2-build  build  active  4/6  Search index rebuild",
        f"{first}  v2-complete-quick  complete  complete  1/1  Fix flaky upload test",
        f"{first}  v2-spec  spec  active  0/0  Auth token refresh",
    ]

    listed = _json_lines(everything)
    assert [(r["project"], r["slug"]) for r in listed] == [
        (str(first), "v2-build"),
        (str(first), "v2-complete-quick"),
        (str(first), "v2-spec"),
        (str(second), "v1-build"),
    ]
    quick = listed[1]
    assert (quick["current_phase"], quick["status"], quick["invalid"]) == ("complete", "complete", False)
    assert {r["slug"] for r in _json_lines(build)} == {"v2-build", "v1-build"}
    assert [r["slug"] for r in _json_lines(complete)] == ["v2-complete-quick"]
    assert [r["slug"] for r in _json_lines(only_second)] == ["v1-build"]
    assert json.loads(only_second.stdout)["title"] == "Billing CSV export"
    assert (nothing.returncode, nothing.stdout) == (0, "no sessions match\n")


# -- an unreadable state.json -----------------------------------------------------------------


def _as_plain_user() -> list[str]:
    """A command prefix under which a chmod 000 file cannot be read, even by root.

    Root ignores file modes. Switching to another uid is not reliable: that uid may not be able
    to run the venv's interpreter (here it lives under /root, mode 0700). Without the two
    capabilities that bypass file modes, root is held to the owner bits like anyone else.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is needed to drop root's file-access capabilities")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_unreadable_state_json_is_invalid_with_the_os_error_and_others_sync(tmp_path: Path) -> None:
    project = (tmp_path / "proj").resolve()
    add_fixture_sessions(project, ["v2-build", "v2-spec"])
    (project / "agents" / "sessions" / "v2-spec" / "state.json").chmod(0o000)
    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    cli = make_cli(tmp_path, url, [project])

    counts = summary(finish(cli.start("reconcile", wrapper=_as_plain_user())))
    assert (counts["seen"], counts["written"], counts["invalid"]) == (2, 2, 1)

    mirrored = {r["slug"]: r for r in rows(url)}
    good, locked = mirrored["v2-build"], mirrored["v2-spec"]
    assert (good["invalid"], good["sync_error"], good["current_phase"]) == (False, None, "build")
    assert locked["invalid"] is True
    assert locked["sync_error"] == "cannot read state.json: Permission denied"

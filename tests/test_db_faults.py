"""Faults that are nobody's session's: the process out of file descriptors, the database refusing
every write. Each reproduced for real against the running daemon; none may be stored as a
session's error, and every session converges once the fault ends."""

from __future__ import annotations

import os
import resource
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from tests.support.databases import libpq_url
from tests.support.oracle import converged
from tests.support.proxy import TcpProxy, proxied_url, url_target
from tests.support.runner import Daemon
from tests.support.sessions import fixture_doc, write_state
from tests.support.snapshot import session_rows
from tests.support.waiting import wait_for


def _errors(url: str) -> list[str]:
    return [row["sync_error"] for row in session_rows(url) if row["sync_error"]]


@contextmanager
def _out_of_descriptors(pid: int) -> Iterator[None]:
    """Lower the daemon's open-files limit to the lowest descriptor it has free, so its next
    open() fails with EMFILE, as under `ulimit -n` with every descriptor taken; then restore it."""
    before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    taken = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    lowest_free = next(n for n in range(len(taken) + 1) if n not in taken)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, before[1]))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, before)


def test_running_out_of_file_descriptors_is_retried_never_stored_as_invalid(
    tmp_path: Path, db_url: str
) -> None:
    project = tmp_path / "proj"
    write_state(project, "before", fixture_doc("v2-spec"))
    with Daemon(tmp_path, db_url, projects=[project], debounce_ms=50) as daemon:
        daemon.wait_started()
        wait_for(lambda: converged(db_url, [project]), timeout=10)
        with _out_of_descriptors(daemon.pid):
            write_state(project, "during", fixture_doc("v2-build"))
            write_state(project, "before", fixture_doc("v2-build"))
            wait_for(lambda: daemon.log_count("Too many open files; ") == 1, timeout=10)
        wait_for(lambda: converged(db_url, [project]), timeout=20)
        assert _errors(db_url) == []
        wait_for(lambda: daemon.log_count("session files can be read again") == 1, timeout=10)
        log = daemon.log()
    assert "state.json is invalid" not in log, log
    assert "Traceback" not in log, log


@contextmanager
def _own_role(url: str) -> Iterator[tuple[str, str]]:
    """A login role of this test's own with the schema of `url` to work in: (its URL, its name)."""
    parsed = make_url(url)
    schema = str(parsed.query["options"]).split("=", 1)[1]
    role = f"ss_fault_{uuid.uuid4().hex[:10]}"
    admin = libpq_url(url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT USAGE, CREATE ON SCHEMA {schema} TO {role}")
    try:
        yield parsed.set(username=role, password=None).render_as_string(hide_password=False), role
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def _admin(url: str, sql: str) -> None:
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute(sql)


def test_a_revoked_privilege_is_a_database_fault_not_the_sessions(tmp_path: Path, pg_url: str) -> None:
    project = tmp_path / "proj"
    for n in range(3):
        write_state(project, f"s{n}", fixture_doc("v2-spec"))
    schema = str(make_url(pg_url).query["options"]).split("=", 1)[1]
    with (
        _own_role(pg_url) as (url, role),
        Daemon(tmp_path, url, projects=[project], debounce_ms=50) as daemon,
    ):
        daemon.wait_started()
        wait_for(lambda: converged(url, [project]), timeout=10)
        _admin(pg_url, f"REVOKE INSERT, UPDATE ON ALL TABLES IN SCHEMA {schema} FROM {role}")
        try:
            for n in range(3):
                write_state(project, f"s{n}", fixture_doc("v2-build"))
            write_state(project, "new", fixture_doc("v2-build"))
            down = wait_for(lambda: None if (s := daemon.status())["database_ok"] else s, timeout=15)
            assert "permission denied" in down["database"]["last_error"]
            assert _errors(url) == []
        finally:
            _admin(pg_url, f"GRANT INSERT, UPDATE ON ALL TABLES IN SCHEMA {schema} TO {role}")
        wait_for(lambda: converged(url, [project]), timeout=40)
        wait_for(lambda: daemon.status()["database_ok"], timeout=10)
        assert _errors(url) == []
        log = daemon.log()
    assert log.count("database unavailable: ") == 1, log
    assert log.count("database back after") == 1, log
    assert "Traceback" not in log, log
    assert "refused this state" not in log, log


def test_a_privilege_revoked_while_the_daemon_starts_is_waited_out(tmp_path: Path, pg_url: str) -> None:
    """Registering the projects at start-up is refused (no INSERT on projects): the daemon waits,
    as for an outage, instead of exiting; given the privilege back it starts and mirrors."""
    project = tmp_path / "proj"
    write_state(project, "before", fixture_doc("v2-spec"))
    schema = str(make_url(pg_url).query["options"]).split("=", 1)[1]
    with _own_role(pg_url) as (url, role):
        daemon = Daemon(tmp_path, url, projects=[project], debounce_ms=50)
        with daemon:
            daemon.wait_started()  # the schema made, as the daemon's role
            assert daemon.stop() == 0
        _admin(pg_url, f"REVOKE INSERT, UPDATE ON ALL TABLES IN SCHEMA {schema} FROM {role}")
        write_state(project, "meanwhile", fixture_doc("v2-build"))
        other = tmp_path / "other"
        write_state(other, "elsewhere", fixture_doc("v2-spec"))  # a project to register anew
        daemon = Daemon(tmp_path, url, projects=[project, other], debounce_ms=50)
        with daemon:
            try:
                wait_for(lambda: daemon.log_count("permission denied for table projects") == 1, timeout=15)
                status = daemon.status()
                assert status["state"] == "starting: waiting for the database", status
            finally:
                _admin(pg_url, f"GRANT INSERT, UPDATE ON ALL TABLES IN SCHEMA {schema} TO {role}")
            daemon.wait_started(timeout=40)
            wait_for(lambda: converged(url, [project, other]), timeout=10)
            assert daemon.stop() == 0
        log = daemon.log()
    assert log.count("database unavailable: ") == 1, log
    assert "Traceback" not in log, log


def test_a_stalled_connection_is_noticed_shown_and_retried_on_a_fresh_one(
    tmp_path: Path, pg_url: str
) -> None:
    project = tmp_path / "proj"
    write_state(project, "before", fixture_doc("v2-spec"))
    with TcpProxy(*url_target(pg_url)) as proxy:
        url = proxied_url(pg_url, proxy.host, proxy.port)
        with Daemon(tmp_path, url, projects=[project], debounce_ms=50, timeout_s=2) as daemon:
            daemon.wait_started()
            wait_for(lambda: converged(pg_url, [project]), timeout=10)
            proxy.stall()
            stalled_at = time.monotonic()
            try:
                write_state(project, "during", fixture_doc("v2-build"))
                down = wait_for(lambda: None if (s := daemon.status())["database_ok"] else s, timeout=30)
                assert time.monotonic() - stalled_at < 30
                # The stalled connection is dropped; so is the fresh one, if the stall outlasts its connect.
                reason = down["database"]["last_error"]
                assert "stopped answering" in reason or "connection timeout expired" in reason, reason
            finally:
                proxy.restore()
            wait_for(lambda: converged(pg_url, [project]), timeout=30)
            wait_for(lambda: daemon.status()["database_ok"], timeout=10)
            log = daemon.log()
    assert log.count("database unavailable: ") == 1, log
    assert log.count("database back after") == 1, log
    assert "Traceback" not in log, log


def rebuilt_and_converged(url: str, project: Path) -> bool:
    """The new file holds every session; while its schema is being built it has no tables yet."""
    try:
        return converged(url, [project])
    except OperationalError as exc:
        if "no such table" in str(exc):
            return False
        raise


def test_a_sqlite_file_deleted_under_the_daemon_is_rebuilt_with_every_session(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    for n in range(3):
        write_state(project, f"s{n}", fixture_doc("v2-spec"))
    database = tmp_path / "sessions.db"
    url = f"sqlite:///{database}"
    with Daemon(tmp_path, url, projects=[project], debounce_ms=50) as daemon:
        daemon.wait_started()
        wait_for(lambda: converged(url, [project]), timeout=10)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{database}{suffix}").unlink(missing_ok=True)
        write_state(project, "after", fixture_doc("v2-build"))
        wait_for(
            lambda: daemon.log_count("was deleted or replaced under the running daemon") == 1, timeout=15
        )
        wait_for(lambda: rebuilt_and_converged(url, project), timeout=15)
        log = daemon.log()
    assert "Traceback" not in log, log
    assert "refused this state" not in log, log

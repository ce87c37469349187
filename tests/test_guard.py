"""Hostile input and faults, continued: two daemons on one database, planted links, passwords
that a URL allows, the control socket's limits, and a linked sessions folder. Each with the real
daemon in a subprocess."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from tests.support.databases import libpq_url
from tests.support.oracle import converged
from tests.support.runner import Daemon
from tests.support.sessions import fixture_doc, write_state
from tests.support.waiting import wait_for


def test_a_second_daemon_on_the_same_database_exits_naming_the_first(tmp_path: Path, db_url: str) -> None:
    project = tmp_path / "proj"
    write_state(project, "before", fixture_doc("v2-spec"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    second = Daemon(tmp_path / "b", db_url, projects=[project], debounce_ms=50)
    with Daemon(tmp_path / "a", db_url, projects=[project], debounce_ms=50) as first:
        first.wait_started()
        try:
            assert second.start().wait_exit() == 1
        finally:
            second.close()
        refusal = second.log()
        assert f"pid {first.pid}, control socket {first.socket_path}" in refusal, refusal
        assert "Traceback" not in refusal
        # The first one goes on as if nothing happened.
        write_state(project, "after", fixture_doc("v2-build"))
        wait_for(lambda: converged(db_url, [project]), timeout=10)
        assert first.status()["database_ok"] is True
        assert first.stop() == 0
        assert "Traceback" not in first.log()


def _lock_backend(conn: psycopg.Connection[Any], daemon_pid: int) -> tuple[int, int, int]:
    """The server process holding a daemon's instance lock, and the lock's two key halves."""
    row = conn.execute(
        "SELECT a.pid, l.classid::bigint, l.objid::bigint FROM pg_stat_activity a "
        "JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'advisory' AND l.granted "
        "WHERE a.application_name = %s",
        (f"sessionsync pid {daemon_pid}",),
    ).fetchone()
    assert row is not None, "the daemon holds no advisory lock"
    return int(row[0]), int(row[1]), int(row[2])


def test_the_postgres_lock_is_taken_again_after_its_connection_drops(tmp_path: Path, pg_url: str) -> None:
    project = tmp_path / "proj"
    write_state(project, "before", fixture_doc("v2-spec"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    second = Daemon(tmp_path / "b", pg_url, projects=[project])
    with (
        Daemon(tmp_path / "a", pg_url, projects=[project]) as first,
        psycopg.connect(libpq_url(pg_url), autocommit=True) as admin,
    ):
        first.wait_started()
        backend, _, _ = _lock_backend(admin, first.pid)
        admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
        wait_for(lambda: first.log_count("took the single-instance lock again"), timeout=15)
        assert _lock_backend(admin, first.pid)[0] != backend
        try:
            assert second.start().wait_exit() == 1
        finally:
            second.close()
        assert f"pid {first.pid}, control socket {first.socket_path}" in second.log(), second.log()
        assert first.stop() == 0


def test_a_daemon_whose_lock_another_took_meanwhile_stops(tmp_path: Path, pg_url: str) -> None:
    project = tmp_path / "proj"
    write_state(project, "before", fixture_doc("v2-spec"))
    with (
        Daemon(tmp_path, pg_url, projects=[project]) as daemon,
        psycopg.connect(libpq_url(pg_url), autocommit=True) as admin,
        psycopg.connect(libpq_url(pg_url), autocommit=True, application_name="the other one") as other,
    ):
        daemon.wait_started()
        backend, high, low = _lock_backend(admin, daemon.pid)
        admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
        # The other daemon's stand-in takes the lock in the gap, before the daemon reconnects.
        key = (high << 32 | low) - (1 << 64 if high >= 1 << 31 else 0)
        wait_for(lambda: other.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone() == (True,))
        assert daemon.wait_exit() == 1
        log = daemon.log()
        assert "the other one" in log and "this daemon stops, the other one goes on" in log, log
        assert "Traceback" not in log

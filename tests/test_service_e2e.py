"""The daemon as systemd runs it: `sessionsync run` in a subprocess, talking the notify protocol
to a socket the test owns (READY, STATUS, WATCHDOG, RELOADING, STOPPING), reloading its config
on SIGHUP, and writing its log the way journald and log shippers expect.
"""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from tests.support.notify import FakeSystemd
from tests.support.runner import Daemon
from tests.support.sessions import write_state
from tests.support.snapshot import rows
from tests.support.waiting import wait_for

DEADLINE_S = 10.0
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")
PRIORITY = re.compile(r"^<[0-7]>")


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    """A notify socket at a short path: sockaddr_un holds 107 bytes, pytest's tmp paths run long."""
    folder = Path(tempfile.mkdtemp(prefix="ssn-", dir="/tmp"))
    fake = FakeSystemd(str(folder / "notify"))
    yield fake
    fake.close()
    os.unlink(folder / "notify")
    folder.rmdir()


@pytest.fixture
def abstract_systemd() -> Iterator[FakeSystemd]:
    fake = FakeSystemd(f"@sessionsync-test-{uuid.uuid4().hex}")
    yield fake
    fake.close()


def doc(topic: str) -> dict[str, Any]:
    return {"session_id": topic, "topic": topic, "phase_history": [], "status": "active"}


def sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sessions.db'}"


def titles(db_url: str) -> dict[tuple[str, str], Any]:
    return {key: row["title"] for key, row in rows(db_url).items() if row["deleted_at"] is None}


def rewrite_config(daemon: Daemon, section: str, **values: Any) -> None:
    """Edit the daemon's config file as a user would before `systemctl reload` (atomically)."""
    data = tomllib.loads(daemon.config_path.read_text())
    data.setdefault(section, {}).update(values)
    # JSON's strings, numbers, booleans and arrays of them are valid TOML values.
    text = "".join(
        f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())
        for name, keys in data.items()
    )
    tmp = daemon.config_path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, daemon.config_path)


def assert_reload_notified(systemd: FakeSystemd) -> None:
    """RELOADING=1 first, READY=1 once the reload is over (applied or refused)."""
    firsts = [fields[0] for fields in systemd.until("READY=1")]
    assert "RELOADING=1" in firsts
    assert firsts.index("RELOADING=1") < firsts.index("READY=1")


def field(fields: list[str], name: str) -> str:
    return next(f.removeprefix(name + "=") for f in fields if f.startswith(name + "="))


# -- notify protocol --------------------------------------------------------------------------


def test_ready_status_watchdog_then_stopping_and_exit_0(
    tmp_path: Path, project: Path, systemd: FakeSystemd
) -> None:
    write_state(project, "s1", doc("one"))
    with Daemon(
        tmp_path, sqlite(tmp_path), projects=[project], env=systemd.env(watchdog_usec=1_000_000)
    ) as daemon:
        ready = systemd.until("READY=1")[-1]
        assert "1 project(s)" in field(ready, "STATUS")
        # READY=1 does not wait for the start-up reconcile; the STATUS= line says when it is over.
        wait_for(
            lambda: any(
                f.startswith("STATUS=") and "1 session(s)" in f for got in systemd.pending() for f in got
            ),
            DEADLINE_S,
        )
        assert titles(daemon.db_url) == {(str(project), "s1"): "one"}

        systemd.until("WATCHDOG=1")
        first = time.monotonic()
        systemd.until("WATCHDOG=1", count=3)
        # Every half of WATCHDOG_USEC (sd_watchdog_enabled(3)): 3 more pings take 1.5 s. The margin
        # is for the first ping having waited in the socket before we read it.
        assert time.monotonic() - first >= 1.0

        assert daemon.stop() == 0
        systemd.until("STOPPING=1")


@contextmanager
def sessions_table_locked(pg_url: str) -> Iterator[None]:
    """Hold off every write to the sessions table, as another client's long transaction would;
    reads go through. (On SQLite every transaction, reads included, takes the write lock.)"""
    engine = create_engine(pg_url)
    try:
        with engine.begin() as held:
            held.exec_driver_sql("LOCK TABLE sessions IN SHARE ROW EXCLUSIVE MODE")
            yield
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_ready_comes_before_the_start_up_reconcile_and_a_write_during_it_is_kept(
    tmp_path: Path, project: Path, systemd: FakeSystemd, pg_url: str
) -> None:
    """READY=1 and the control socket come once the watcher collects, not after the start-up
    reconcile: here that reconcile cannot write at all until the test lets go of the table.
    A session written meanwhile is the watcher's, and both reach their rows."""
    write_state(project, "s1", doc("one"))
    with Daemon(tmp_path, pg_url, projects=[project], env=systemd.env()) as daemon:
        daemon.wait_started()
        assert daemon.stop() == 0
        systemd.pending()  # the first run's notifications
        write_state(project, "s1", doc("changed while down"))
        with sessions_table_locked(pg_url):
            daemon.start()
            ready = systemd.until("READY=1")[-1]
            assert field(ready, "STATUS").startswith("starting: start-up reconcile; ")
            assert daemon.status()["state"] == "starting: start-up reconcile"
            # status says which reconcile runs and how far it is (0 of 1 here: it cannot write).
            running = wait_for(lambda: daemon.status()["reconcile"])
            assert running["reason"] == "start-up" and running["seen"] == 0, running
            shown = daemon.cli("status").stdout
            assert re.search(
                r"^  reconciling  (listing folders|0 of 1 session\(s\) \(0 %\)), start-up$", shown, re.M
            )
            write_state(project, "s2", doc("written during it"))
            assert titles(pg_url) == {(str(project), "s1"): "one"}
        daemon.wait_started()
        wait_for(
            lambda: (
                titles(pg_url)
                == {(str(project), "s1"): "changed while down", (str(project), "s2"): "written during it"}
            ),
            DEADLINE_S,
        )
        assert daemon.status()["state"] == "running"
        assert daemon.status()["reconcile"] is None
        assert daemon.stop() == 0


def test_watchdog_pings_stop_while_a_worker_is_wedged(
    tmp_path: Path, project: Path, systemd: FakeSystemd
) -> None:
    """A worker stuck on one batch for 2 x WatchdogSec (here 1 s) withholds the pings, so systemd
    would restart the daemon; the other worker still syncs the other sessions meanwhile."""
    env = {**systemd.env(watchdog_usec=500_000), "SESSIONSYNC_TEST_WEDGE_SLUG": "stuck"}
    with Daemon(tmp_path, sqlite(tmp_path), projects=[project], env=env, debounce_ms=20, threads=2) as daemon:
        systemd.until("READY=1")
        systemd.until("WATCHDOG=1", count=2)

        write_state(project, "stuck", doc("stuck"))
        wait_for(lambda: daemon.log_count("withholding watchdog pings"), timeout=DEADLINE_S)
        # The check that said "unhealthy" logged before it would have pinged: every earlier ping
        # is queued on our socket by now, and no later one may come.
        systemd.during(0)
        write_state(project, "fine", doc("fine"))
        assert not [fields for fields in systemd.during(1.0) if "WATCHDOG=1" in fields]  # 4 intervals
        wait_for(lambda: titles(daemon.db_url) == {(str(project), "fine"): "fine"})


# -- SIGHUP -------------------------------------------------------------------------------------


def test_sighup_makes_a_new_project_live_and_a_new_log_level_take_effect(
    tmp_path: Path, project: Path, abstract_systemd: FakeSystemd
) -> None:
    second = tmp_path / "second"
    write_state(second, "early", doc("written before the reload"))
    with Daemon(
        tmp_path, sqlite(tmp_path), projects=[project], env=abstract_systemd.env(), debounce_ms=20
    ) as daemon:
        abstract_systemd.until("READY=1")
        assert daemon.log_count(" DEBUG ") == 0

        rewrite_config(daemon, "watch", projects=[str(project), str(second)])
        rewrite_config(daemon, "log", level="DEBUG")
        os.kill(daemon.pid, signal.SIGHUP)
        assert_reload_notified(abstract_systemd)

        assert {"project": str(second), "state": "live"} in daemon.status()["watch"]
        wait_for(lambda: (str(second), "early") in titles(daemon.db_url))  # the new project's reconcile
        write_state(second, "late", doc("written after the reload"))  # only inotify can tell
        wait_for(lambda: (str(second), "late") in titles(daemon.db_url))
        assert daemon.log_count("configuration reloaded from") == 1
        assert daemon.log_count(" DEBUG ") > 0


def test_sighup_with_a_broken_config_keeps_the_running_one(
    tmp_path: Path, project: Path, abstract_systemd: FakeSystemd
) -> None:
    with Daemon(
        tmp_path, sqlite(tmp_path), projects=[project], env=abstract_systemd.env(), debounce_ms=20
    ) as daemon:
        abstract_systemd.until("READY=1")
        rewrite_config(daemon, "watch", debounce_ms="fast")
        os.kill(daemon.pid, signal.SIGHUP)
        assert_reload_notified(abstract_systemd)

        log = daemon.log()
        refused = log.index("configuration reload refused, keeping the running one")
        assert "[watch] debounce_ms = 'fast'" in log[refused : refused + 500]
        assert daemon.running
        write_state(project, "after", doc("after the refused reload"))
        wait_for(lambda: (str(project), "after") in titles(daemon.db_url))


# -- logs ---------------------------------------------------------------------------------------


def test_under_journald_lines_carry_priorities_and_no_timestamp(tmp_path: Path, project: Path) -> None:
    log = tmp_path / "daemon.log"
    log.touch()  # the harness appends to it: its inode is the stream journald would own
    st = log.stat()
    env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    with Daemon(tmp_path, sqlite(tmp_path), projects=[project], env=env, debounce_ms=20) as daemon:
        wait_for(lambda: daemon.log_count("sessionsync started"))
        write_state(project, "broken-one", b"{not json")
        wait_for(lambda: daemon.log_count("broken-one"))
        assert daemon.stop() == 0
        lines = daemon.log().splitlines()
    assert lines
    assert [line for line in lines if not PRIORITY.match(line) or TIMESTAMP.search(line)] == []
    invalid = [line for line in lines if "broken-one" in line]
    assert invalid[0].startswith("<4>")  # a warning, so `journalctl -p warning` shows it
    assert str(project) in invalid[0]


def test_json_format_every_line_is_an_object_and_session_lines_name_the_session(
    tmp_path: Path, project: Path
) -> None:
    with Daemon(
        tmp_path, sqlite(tmp_path), projects=[project], format="json", level="DEBUG", debounce_ms=20
    ) as daemon:
        wait_for(lambda: daemon.log_count("sessionsync started"))
        write_state(project, "broken-one", b"[1, 2]")
        # At DEBUG the slug shows up early in inotify and SQL lines; wait for the session's own line.
        wait_for(lambda: daemon.log_count('"slug": "broken-one"'))
        assert daemon.stop() == 0
        lines = daemon.log().splitlines()
    records = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) and {"time", "level", "message"} <= r.keys() for r in records)
    session = [r for r in records if r.get("slug") == "broken-one"]
    assert session
    assert session[0]["project"] == str(project)
    assert session[0]["level"] == "WARNING"


@pytest.mark.postgres
def test_a_database_password_never_reaches_the_log(tmp_path: Path, project: Path, pg_url: str) -> None:
    # Trust authentication accepts any password: this one is only there to leak.
    with_password = make_url(pg_url).set(password="sekrit").render_as_string(hide_password=False)
    write_state(project, "s1", doc("one"))
    with Daemon(tmp_path, with_password, projects=[project], level="DEBUG", debounce_ms=20) as daemon:
        wait_for(lambda: daemon.log_count("sessionsync started"))
        write_state(project, "s2", doc("two"))
        wait_for(lambda: (str(project), "s2") in titles(pg_url))
        status = daemon.status()
        assert daemon.stop() == 0
        log = daemon.log()
    assert "sekrit" not in log
    assert "postgres:***@127.0.0.1" in log  # the URL is shown, masked
    assert "sekrit" not in json.dumps(status)

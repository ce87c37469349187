"""Hostile input and faults, continued: two daemons on one database, planted links, passwords
that a URL allows, the control socket's limits, and a linked sessions folder. Each with the real
daemon in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from sessionsync.daemon import dburl, instance_lock
from tests.support.databases import libpq_url
from tests.support.oracle import converged
from tests.support.runner import Daemon
from tests.support.sessions import fixture_doc, write_state
from tests.support.waiting import wait_for

SESSIONSYNC = Path(sys.executable).parent / "sessionsync"


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


def test_a_lock_left_by_a_daemon_that_is_gone_is_waited_out_not_a_reason_to_exit(
    tmp_path: Path, pg_url: str
) -> None:
    """A kill -9'd daemon behind a stalled network: its database session (holding the lock) lives
    on until the server notices. Its pid is not running here, so the new daemon waits for it."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    project = tmp_path / "proj"
    write_state(project, "s1", fixture_doc("v2-spec"))
    with psycopg.connect(libpq_url(pg_url), autocommit=True) as stale:
        schema = stale.execute("SELECT current_schema()").fetchone()[0]
        key = instance_lock._key(f"sessionsync:{socket.gethostname()}:{schema}")
        assert stale.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone() == (True,)
        stale.execute(f"SELECT 'pid {gone.pid}, control socket /gone.sock' AS sessionsync_holder".encode())
        with Daemon(tmp_path, pg_url, projects=[project]) as daemon:
            wait_for(lambda: daemon.log_count("waiting for the server to end that session") == 1)
            assert daemon.running
            assert daemon.status()["state"] == "starting: waiting for the database"
            stale.close()  # the server ends the session: the lock is free
            daemon.wait_started()
            wait_for(lambda: converged(pg_url, [project]))
            assert daemon.stop() == 0
    log = daemon.log()
    assert "Traceback" not in log and "already running" not in log, log


NOBODY = 65534


@pytest.fixture
def nobody_tmp() -> Iterator[Path]:
    """A folder owned by an unprivileged uid (no user account needed): the daemon runs as it."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv(1) to run a command as another uid")
    folder = Path(tempfile.mkdtemp(prefix="ss-nobody-", dir="/tmp"))
    os.chown(folder, NOBODY, NOBODY)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def _mkdir_as_nobody(path: Path, mode: int) -> None:
    path.mkdir(mode=mode)
    path.chmod(mode)
    os.chown(path, NOBODY, NOBODY)


@pytest.mark.parametrize("planted", ["socket-lock", "database-lock", "folder-of-another-user"])
def test_a_link_planted_at_a_lock_path_is_refused_and_its_target_unchanged(
    nobody_tmp: Path, planted: str
) -> None:
    project = nobody_tmp / "proj"
    for folder in (project, project / "agents", project / "agents" / "sessions"):
        _mkdir_as_nobody(folder, 0o755)
    runtime = nobody_tmp / "run"
    if planted == "folder-of-another-user":
        runtime.mkdir(mode=0o777)  # root's, the attacker here, and open to everyone
        runtime.chmod(0o777)
    else:
        _mkdir_as_nobody(runtime, 0o700)
    state = nobody_tmp / "state"
    _mkdir_as_nobody(state, 0o700)
    # The daemon's own file, which the link would have it truncate and overwrite.
    target = nobody_tmp / "precious.txt"
    target.write_text("keep me\n")
    os.chown(target, NOBODY, NOBODY)
    link = (state / "sessions.db.lock") if planted == "database-lock" else (runtime / "control.sock.lock")
    link.symlink_to(target)
    os.lchown(link, NOBODY, NOBODY)
    config = nobody_tmp / "c.toml"
    config.write_text(
        f'[database]\nurl = "sqlite:///{state / "sessions.db"}"\n'
        f'[watch]\nprojects = ["{project}"]\nroots = []\n'
        f'[control]\nsocket = "{runtime / "control.sock"}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SESSIONSYNC_", "XDG_"))}
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    out = subprocess.run(
        [*setpriv, str(SESSIONSYNC), "run", "--config", str(config)],
        env={**env, "HOME": str(nobody_tmp)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    if planted == "folder-of-another-user":
        assert f"the control socket folder {runtime} is owned by uid 0" in out.stderr, out.stderr
    else:
        assert f"the lock file {link} is a symbolic link; refusing to use it" in out.stderr, out.stderr
    assert target.read_text() == "keep me\n"
    assert link.is_symlink()


# A password may hold any character: these are the ones a URL treats specially. A raw '@' or '%'
# means something else in a URL, to the driver too: those are only ever written encoded.
_PASSWORD_CHARS = ["/", "#", "?", " ", "@", ":", "%"]
_RAW_CHARS = [c for c in _PASSWORD_CHARS if c not in "@%"]


def _password_forms(password: str) -> set[str]:
    return {password, quote(password, safe=""), quote(password)}


def _urls_with(chars: str, written: str) -> tuple[str, str, list[str]]:
    """(user info, query, passwords) for a URL whose passwords hold `chars`, written "encoded" (one
    percent-encoded in the user info, another in `?password=`) or "raw" (the user info only)."""
    password, in_query = f"Zq{chars}wX7-secret", f"Yv{chars}kP4-secret"
    if written == "encoded":
        return quote(password, safe=""), f"password={quote(in_query, safe='')}", [password, in_query]
    return password, "", [password]


@pytest.mark.parametrize(
    ("char", "written"),
    [(c, "encoded") for c in _PASSWORD_CHARS] + [(c, "raw") for c in _RAW_CHARS],
)
def test_masking_hides_a_password_holding_any_special_character(char: str, written: str) -> None:
    """Each special character alone, through the masking every output uses (the end-to-end test
    below holds them all in one password)."""
    userinfo, query, passwords = _urls_with(char, written)
    url = f"postgresql+psycopg://postgres:{userinfo}@db.example/s" + (f"?{query}" if query else "")
    dburl.check_url(url)  # every URL the daemon uses comes through here, which remembers it
    said = f"cannot use {url}: " + " ".join(f"[{form}]" for p in passwords for form in _password_forms(p))
    masked, masked_url = dburl.mask_known(said), dburl.mask_url(url)
    assert "***" in masked and "***" in masked_url
    for form in {f for p in passwords for f in _password_forms(p)}:
        assert form not in masked, f"{form!r} in {masked!r}"
        assert form not in masked_url, f"{form!r} in {masked_url!r}"


@pytest.mark.parametrize("written", ["encoded", "raw"])
def test_a_password_shows_nowhere_whatever_it_holds(tmp_path: Path, pg_url: str, written: str) -> None:
    """Every output path, on a server that answers and on one that does not: start-up line, log,
    `status` (text and --json), `doctor`, `db upgrade`, `check-config`, `sessions`; with every
    special character in one password."""
    userinfo, query, passwords = _urls_with(
        "".join(_PASSWORD_CHARS if written == "encoded" else _RAW_CHARS), written
    )
    good = pg_url.replace("postgresql+psycopg://postgres@", f"postgresql+psycopg://postgres:{userinfo}@", 1)
    good += f"&{query}" if query else ""
    bad = f"postgresql+psycopg://postgres:{userinfo}@127.0.0.1:1/nowhere" + (f"?{query}" if query else "")
    assert good != pg_url
    outputs: list[str] = []
    project = tmp_path / "proj"
    write_state(project, "s1", fixture_doc("v2-spec"))
    with Daemon(tmp_path, good, projects=[project]) as daemon:
        daemon.wait_started()
        for args in (["status", "--json"], ["status"], ["doctor"], ["db", "upgrade"], ["check-config"]):
            outputs.append(daemon.cli(*args).stdout)
        assert daemon.stop() == 0
        outputs.append(daemon.log())
    # The same commands, and a daemon, on a server that is not there: every error path.
    (tmp_path / "down").mkdir()
    with Daemon(tmp_path / "down", bad, projects=[project]) as down:
        down.wait_ready()
        wait_for(lambda: down.status()["database"]["last_error"])
        for args in (["status", "--json"], ["doctor"], ["db", "upgrade"], ["sessions"]):
            outputs.append(down.cli(*args).stdout)
        assert down.stop() == 0
        outputs.append(down.log())
    shown = "\n".join(outputs)
    assert "***" in shown
    for form in {f for p in passwords for f in _password_forms(p)}:
        assert form not in shown, f"{form!r} in:\n{shown}"


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    # Not select(): a thousand sockets take descriptors past FD_SETSIZE (1024).
    try:
        return sock.recv(4096, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_the_control_socket_answers_while_a_thousand_idle_connections_are_held(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    (project / "agents" / "sessions").mkdir(parents=True)
    env = {"SESSIONSYNC_TEST_CONTROL_IDLE_S": "3"}
    with Daemon(
        tmp_path, f"sqlite:///{tmp_path / 's.db'}", projects=[project], debounce_ms=50, env=env
    ) as daemon:
        daemon.wait_started()
        subscriber = _connect(daemon.socket_path)
        subscriber.sendall(b'{"cmd": "subscribe"}\n')
        assert b'"subscribed"' in subscriber.recv(4096)
        idle = [_connect(daemon.socket_path) for _ in range(1000)]
        try:
            shown = daemon.cli("status")
            assert shown.returncode == 0, shown.stdout
            # Every idle one is closed: the oldest to make room, the rest after the idle timeout.
            wait_for(lambda: all(_closed_by_peer(s) for s in idle), timeout=30)
        finally:
            for sock in idle:
                sock.close()
        # The subscriber outlived the idle timeout and still gets its events.
        write_state(project, "s1", fixture_doc("v2-spec"))
        subscriber.settimeout(10)
        assert b'"session.created"' in subscriber.recv(65536)
        subscriber.close()
        assert "Traceback" not in daemon.log()


def test_a_connection_beyond_the_cap_with_nobody_idle_gets_busy(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    (project / "agents" / "sessions").mkdir(parents=True)
    with Daemon(tmp_path, f"sqlite:///{tmp_path / 's.db'}", projects=[project]) as daemon:
        daemon.wait_started()
        subscribers = []
        try:
            for _ in range(256):  # the cap under any descriptor limit of 1024 or more
                sock = _connect(daemon.socket_path)
                sock.sendall(b'{"cmd": "subscribe"}\n')
                subscribers.append(sock)
            for sock in subscribers:
                assert b'"subscribed"' in sock.recv(4096)
            extra = _connect(daemon.socket_path)
            extra.settimeout(10)
            line = extra.recv(4096)
            assert json.loads(line)["error"]["code"] == "busy", line
            assert extra.recv(4096) == b""
            extra.close()
        finally:
            for sock in subscribers:
                sock.close()
        # Once they are gone, the daemon answers again.
        wait_for(lambda: daemon.cli("status").returncode == 0, timeout=20)
        assert daemon.log_count("connections busy; refusing new ones") == 1


def _big_tree(root: Path) -> None:
    """A tree like /usr: a few top folders, hundreds below, one holding a state.json deep down, a
    link to a session elsewhere, and a real session among the direct children."""
    for top in ("bin", "lib", "share"):
        for i in range(150):
            (root / top / f"d{i}" / "x").mkdir(parents=True)
    write_state(root / "share" / "d3", "deep", fixture_doc("v2-spec"))  # share/d3/agents/sessions/deep
    (root / "lib" / "d1" / "state.json").write_text("{}")  # not a direct child of the sessions folder
    (root / "real").mkdir()
    (root / "real" / "state.json").write_text(json.dumps(fixture_doc("v2-build")))


def _live_rows(url: str) -> set[str]:
    import sqlite3

    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
        rows = conn.execute("SELECT slug, sync_error FROM sessions WHERE deleted_at IS NULL").fetchall()
    return {slug for slug, error in rows if error is None}


def test_a_linked_sessions_folder_makes_rows_of_its_direct_children_only(tmp_path: Path) -> None:
    tree = tmp_path / "big"
    _big_tree(tree)
    project = tmp_path / "proj"
    (project / "agents").mkdir(parents=True)
    (project / "agents" / "sessions").symlink_to(tree)
    url = f"sqlite:///{tmp_path / 's.db'}"
    with Daemon(tmp_path, url, projects=[project], debounce_ms=50) as daemon:
        daemon.wait_started()
        assert _live_rows(url) == {"real"}
        write_state(tree / "share" / "d7", "later", fixture_doc("v2-spec"))  # deep: not a session
        (tree / "lib" / "d2" / "state.json").write_text("{}")  # a grandchild: not a session
        write_state(project, "new", fixture_doc("v2-spec"))  # written through the link: a session
        wait_for(lambda: _live_rows(url) == {"real", "new"})
        assert daemon.wait_idle()
        assert _live_rows(url) == {"real", "new"}


def _inotify_watches(pid: int) -> int:
    count = 0
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            count += sum(line.startswith("inotify wd:") for line in info.read_text().splitlines())
        except OSError:
            continue  # the descriptor closed meanwhile
    return count


def test_a_linked_sessions_folder_costs_only_the_watches_of_its_children(tmp_path: Path) -> None:
    tree = tmp_path / "big"
    _big_tree(tree)  # 4 direct children, 900+ folders below them
    project = tmp_path / "proj"
    (project / "agents").mkdir(parents=True)
    (project / "agents" / "sessions").symlink_to(tree)
    with Daemon(tmp_path, f"sqlite:///{tmp_path / 's.db'}", projects=[project]) as daemon:
        daemon.wait_started()
        assert _inotify_watches(daemon.pid) == 2 + 4  # the project's two, one per direct child

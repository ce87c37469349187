"""The control socket against the real daemon: `sessionsync run` in a subprocess, real Unix
sockets, real inotify, SQLite (PostgreSQL for LISTEN/NOTIFY), and the `sessionsync` client.

Most tests share one daemon (it starts in about half a second) and keep to their own session
slugs; the flood test and the PostgreSQL ones start their own. Raw sockets (`Conn`) send what
the client library never would: broken JSON, bad UTF-8, a 1 MiB line, a hang-up mid-request.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from sessionsync.daemon.control.protocol import MAX_LINE
from sessionsync.daemon.errors import ControlError
from sessionsync.models.tables import sessions
from tests.support.databases import libpq_url
from tests.support.runner import SESSIONSYNC, Daemon
from tests.support.sessions import fixture_doc, write_state
from tests.support.snapshot import rows
from tests.support.waiting import wait_for

NOBODY = 65534
STATUS_KEYS = {
    "projects",
    "sessions",
    "pending",
    "database_ok",
    "paused",
    "last_reconcile_at",
    "counters",
    "watch",
    "recent_errors",
}


def doc(phase: str, status: str = "active", topic: str = "e2e") -> dict[str, Any]:
    """A valid v2 state.json in the given phase and status."""
    return fixture_doc("v2-spec") | {"current_phase": phase, "status": status, "topic": topic}


def make_project(path: Path) -> Path:
    (path / "agents" / "sessions").mkdir(parents=True)
    return path.resolve()


@contextlib.contextmanager
def unclosed_write(state: Path, content: dict[str, Any]) -> Iterator[None]:
    """Rewrite state.json in place and keep it open for the block.

    The watcher listens for closed-after-write, not for modify, so the daemon hears nothing of
    this change until the block ends: only a resync, reconcile or sync can find it.
    """
    with state.open("r+b") as f:
        f.truncate(0)
        f.write(json.dumps(content).encode())
        f.flush()
        yield


class Conn:
    """A raw client connection: any bytes out, lines in, every read bounded by a deadline."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10.0)
        self.sock.connect(str(path))
        self._buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self, timeout: float = 10.0) -> bytes | None:
        """The next line without its newline; None once the daemon hangs up."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line from the daemon within {timeout} s")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def reply(self, timeout: float = 10.0) -> dict[str, Any]:
        line = self.line(timeout)
        assert line is not None, "the daemon hung up without a reply"
        obj = json.loads(line)
        assert isinstance(obj, dict), obj
        return obj

    def ask(self, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        self.send(json.dumps(payload).encode() + b"\n")
        return self.reply(timeout)

    def event(self, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        """The next event `match` accepts; events of other sessions are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.reply(max(0.001, deadline - time.monotonic()))
            if match(event):
                return event

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@contextlib.contextmanager
def subscribed(daemon: Daemon) -> Iterator[Conn]:
    with Conn(daemon.socket_path) as conn:
        reply = conn.ask({"cmd": "subscribe"})
        assert reply["ok"] is True and reply["result"]["subscribed"] is True
        yield conn


def of(slug: str, *kinds: str) -> Callable[[dict[str, Any]], bool]:
    return of_any({slug}, *kinds)


def of_any(slugs: Collection[str], *kinds: str) -> Callable[[dict[str, Any]], bool]:
    """Matches events of these sessions (of these kinds, when given)."""
    return lambda e: e.get("slug") in slugs and (not kinds or e["kind"] in kinds)


def settle(daemon: Daemon, condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    """wait_for, with the end of the daemon's log attached when it times out."""
    try:
        return wait_for(condition, timeout)
    except AssertionError as exc:
        exc.add_note(f"--- daemon log ---\n{daemon.log_tail()}")
        raise


def row(daemon: Daemon, project: Path, slug: str) -> dict[str, Any] | None:
    return rows(daemon.db_url).get((str(project), slug))


def phase(daemon: Daemon, project: Path, slug: str) -> str | None:
    found = row(daemon, project, slug)
    return None if found is None else found["current_phase"]


def wait_started(daemon: Daemon) -> None:
    """Ping answers before the start-up reconcile ends; the first reconcile marks a full start."""
    daemon.wait_ready()
    settle(daemon, lambda: daemon.status()["last_reconcile_at"], timeout=30)


def assert_working(daemon: Daemon, slug: str) -> None:
    """A fresh connection is answered and a file change still reaches the database."""
    assert daemon.request({"cmd": "ping"})["pong"] is True
    app = Path(daemon.status()["watch"][0]["project"])
    write_state(app, slug, doc("plan"))
    settle(daemon, lambda: phase(daemon, app, slug) == "plan")


def error_of(daemon: Daemon, payload: dict[str, Any]) -> ControlError:
    with pytest.raises(ControlError) as caught:
        daemon.request(payload)
    return caught.value


# -- the shared daemon --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("e2e")
    apps = [make_project(tmp / name) for name in ("app", "lib")]
    for app in apps:
        write_state(app, "seed", doc("spec"))
    d = Daemon(tmp, f"sqlite:///{tmp / 'sessions.db'}", projects=apps)
    # Traversable by other users (still not writable by them, which the server refuses), so the
    # other-uid test reaches the socket itself.
    d.runtime_dir.chmod(0o755)
    with d:
        wait_started(d)
        yield d
        assert d.stop() == 0, d.log_tail()


@pytest.fixture
def app(daemon: Daemon) -> Path:
    return Path(daemon.status()["watch"][0]["project"])


def test_ping_and_status_carry_the_contract_keys(daemon: Daemon) -> None:
    pong = daemon.request({"cmd": "ping"})
    assert pong == {"pong": True, "pid": daemon.pid}
    status = daemon.status()
    assert status.keys() >= STATUS_KEYS
    assert status["projects"] == 2
    assert status["sessions"] >= 2
    assert status["database_ok"] is True
    assert status["paused"] is False
    assert isinstance(status["pending"], int)
    datetime.fromisoformat(status["last_reconcile_at"])
    assert [w["state"] for w in status["watch"]] == ["live", "live"]
    assert [Path(w["project"]).name for w in status["watch"]] == ["app", "lib"]
    assert status["counters"]["reconciles"] >= 1
    assert all(isinstance(v, int) for v in status["counters"].values())
    assert isinstance(status["recent_errors"], list)


def test_status_counts_sessions_as_they_come_and_go(daemon: Daemon, app: Path) -> None:
    def live() -> int:
        return sum(r["deleted_at"] is None for r in rows(daemon.db_url).values())

    write_state(app, "counted-1", doc("spec"))
    settle(daemon, lambda: phase(daemon, app, "counted-1") == "spec")
    settle(daemon, lambda: daemon.status()["sessions"] == live())
    shutil.rmtree(app / "agents" / "sessions" / "counted-1")
    settle(daemon, lambda: (gone := row(daemon, app, "counted-1")) and gone["deleted_at"] is not None)
    settle(daemon, lambda: daemon.status()["sessions"] == live())


def test_resync_with_wait_replies_once_the_change_is_committed(daemon: Daemon, app: Path) -> None:
    state = write_state(app, "resync-1", doc("spec"))
    settle(daemon, lambda: phase(daemon, app, "resync-1") == "spec")
    with unclosed_write(state, doc("build")):
        result = daemon.request({"cmd": "resync", "projects": [str(app)], "wait": True})
        assert phase(daemon, app, "resync-1") == "build"  # committed before the reply
    assert result["projects"] == 1
    assert result["changed"] == 1
    assert result["sessions"] == len(list((app / "agents" / "sessions").iterdir()))
    assert result["ms"] >= 0


def test_resync_without_wait_is_queued(daemon: Daemon, app: Path) -> None:
    assert daemon.request({"cmd": "resync", "projects": [str(app)]}) == {"queued": True}


def test_resync_all_rescans_every_project(daemon: Daemon) -> None:
    lib = Path(daemon.status()["watch"][1]["project"])
    state = write_state(lib, "resync-all", doc("spec"))
    settle(daemon, lambda: phase(daemon, lib, "resync-all") == "spec")
    with subscribed(daemon) as sub, unclosed_write(state, doc("plan")):
        result = daemon.request({"cmd": "resync", "all": True, "wait": True})
        assert phase(daemon, lib, "resync-all") == "plan"
        resynced = {sub.event(lambda e: e["kind"] == "project.resynced")["project"] for _ in range(2)}
    assert resynced == {w["project"] for w in daemon.status()["watch"]}
    assert result["projects"] == 2
    assert result["changed"] == 1


def test_resync_of_an_unknown_project_is_not_found(daemon: Daemon, tmp_path: Path) -> None:
    error = error_of(daemon, {"cmd": "resync", "projects": [str(tmp_path)], "wait": True})
    assert error.code == "not_found"
    assert str(tmp_path) in error.message


def test_sync_writes_the_session_before_replying(daemon: Daemon, app: Path) -> None:
    state = write_state(app, "sync-1", doc("spec"))
    settle(daemon, lambda: phase(daemon, app, "sync-1") == "spec")
    with unclosed_write(state, doc("docs")):
        result = daemon.request({"cmd": "sync", "path": str(state.parent)})
        assert phase(daemon, app, "sync-1") == "docs"
        again = daemon.request({"cmd": "sync", "path": str(state.parent)})
    folder = str(state.parent)
    assert result == {
        "project": str(app),
        "slug": "sync-1",
        "path": folder,
        "written": 1,
        "invalid": 0,
        "unchanged": 0,
    }
    assert again == {
        "project": str(app),
        "slug": "sync-1",
        "path": folder,
        "written": 0,
        "invalid": 0,
        "unchanged": 1,
    }


def test_sync_names_a_session_through_a_symbolic_link(daemon: Daemon, app: Path, tmp_path: Path) -> None:
    """A user's path may reach the project through a link (~/code -> /data/code)."""
    state = write_state(app, "linked-1", doc("spec"))
    settle(daemon, lambda: phase(daemon, app, "linked-1") == "spec")
    (tmp_path / "link").symlink_to(app)
    with unclosed_write(state, doc("build")):
        result = daemon.request(
            {"cmd": "sync", "path": str(tmp_path / "link" / "agents" / "sessions" / "linked-1")}
        )
    # The reply names the folder where the daemon knows it, by the project's real path.
    assert result == {
        "project": str(app),
        "slug": "linked-1",
        "path": str(state.parent),
        "written": 1,
        "invalid": 0,
        "unchanged": 0,
    }


@pytest.mark.parametrize(
    "where",
    [
        "/usr/share",  # outside every project
        "{app}",  # the project, not a session of it
        "{app}/agents/sessions",  # the sessions folder itself
        "{app}/agents/sessions/seed/research",  # inside a session
        "{app}/../elsewhere/agents/sessions/x",  # a project the daemon does not know
    ],
    ids=["outside", "project", "sessions-folder", "deeper", "unknown-project"],
)
def test_sync_outside_a_known_sessions_folder_is_not_found(daemon: Daemon, app: Path, where: str) -> None:
    path = where.format(app=app)
    error = error_of(daemon, {"cmd": "sync", "path": path})
    assert error.code == "not_found"
    assert path in error.message


def test_reconcile_with_wait_covers_every_project(daemon: Daemon) -> None:
    lib = Path(daemon.status()["watch"][1]["project"])
    before = daemon.status()["last_reconcile_at"]
    state = write_state(lib, "reconcile-1", doc("spec"))
    settle(daemon, lambda: phase(daemon, lib, "reconcile-1") == "spec")
    with subscribed(daemon) as sub, unclosed_write(state, doc("complete", "complete")):
        result = daemon.request({"cmd": "reconcile", "wait": True})
        assert phase(daemon, lib, "reconcile-1") == "complete"
        finished = sub.event(lambda e: e["kind"] == "reconcile.finished")
    assert result["projects"] == 2
    assert result["changed"] == 1
    assert finished["changed"] == 1
    assert daemon.status()["last_reconcile_at"] > before


def test_pause_holds_writes_and_resume_lets_them_go(daemon: Daemon, app: Path) -> None:
    assert daemon.request({"cmd": "pause"})["paused"] is True
    try:
        state = write_state(app, "paused-1", doc("spec"))
        status = settle(daemon, lambda: (s := daemon.status())["pending"] >= 1 and s)
        assert status["paused"] is True
        # Past the debounce and a batch, the session must still not be written.
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:
            assert row(daemon, app, "paused-1") is None
            time.sleep(0.05)
        assert error_of(daemon, {"cmd": "resync", "all": True, "wait": True}).code == "unavailable"
        assert error_of(daemon, {"cmd": "sync", "path": str(state.parent)}).code == "unavailable"
        assert row(daemon, app, "paused-1") is None
    finally:
        resumed = daemon.request({"cmd": "resume"})
    assert resumed["paused"] is False
    settle(daemon, lambda: phase(daemon, app, "paused-1") == "spec")
    settle(daemon, lambda: daemon.status()["pending"] == 0)


def test_errors_lists_an_invalid_session_with_its_reason(daemon: Daemon, app: Path) -> None:
    write_state(app, "broken-1", '{"topic": "half a docu')

    def listed() -> list[dict[str, Any]]:
        return [e for e in daemon.request({"cmd": "errors"})["errors"] if e["slug"] == "broken-1"]

    [entry] = settle(daemon, listed)
    assert entry["project"] == str(app)
    assert entry["path"] == str(app / "agents" / "sessions" / "broken-1")
    assert entry["kind"] == "invalid"
    assert "JSON" in entry["sync_error"]
    datetime.fromisoformat(entry["sync_error_at"])
    recent = [e for e in daemon.status()["recent_errors"] if e["session"] == entry["path"]]
    assert any("invalid" in e["message"] for e in recent), recent


def test_subscribe_streams_session_and_project_events(daemon: Daemon, app: Path) -> None:
    with subscribed(daemon) as sub:
        write_state(app, "sub-1", doc("spec"))
        created = sub.event(of("sub-1"))
        assert created["kind"] == "session.created"
        assert created["project"] == str(app)
        datetime.fromisoformat(created["at"])

        write_state(app, "sub-1", doc("build"))
        changed = sub.event(of("sub-1"))
        assert (changed["kind"], changed["from"], changed["to"]) == ("session.phase_changed", "spec", "build")

        write_state(app, "sub-1", doc("build", topic="renamed"))
        assert sub.event(of("sub-1"))["kind"] == "session.updated"

        daemon.request({"cmd": "resync", "projects": [str(app)], "wait": True})
        resynced = sub.event(lambda e: e["kind"] == "project.resynced")
        assert resynced["project"] == str(app)


# -- abuse -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "code", "fragment"),
    [
        (b'{"cmd": "ping"', "bad_request", "malformed JSON"),
        (b'{"cmd": "launch"}', "unknown_command", "unknown command 'launch'"),
        (b'{"cmd": "sync"}', "bad_request", "missing field 'path'"),
        (b'{"cmd": "resync", "all": "yes"}', "bad_request", "field 'all'"),
        (b'{"cmd": "sync", "path": "relative/dir"}', "bad_request", "absolute"),
        (b'{"cmd": "sync", "path": "/tmp/a\\u0000b"}', "bad_request", "NUL byte"),
        (b'{"cmd": "resync", "projects": ["/tmp/a\\u0000b"]}', "bad_request", "NUL byte"),
        (b'{"cmd": "\xff\xfe"}', "bad_request", "UTF-8"),
        (b"[1, 2]", "bad_request", "JSON object"),
    ],
    ids=[
        "malformed-json",
        "unknown-command",
        "missing-field",
        "wrong-type",
        "relative",
        "nul-in-sync",
        "nul-in-resync",
        "utf8",
        "array",
    ],
)
def test_a_bad_request_gets_an_error_and_harms_nothing(
    daemon: Daemon, line: bytes, code: str, fragment: str, request: pytest.FixtureRequest
) -> None:
    with Conn(daemon.socket_path) as conn:
        conn.send(line + b"\n")
        reply = conn.reply()
        assert reply["ok"] is False
        assert reply["error"]["code"] == code
        assert fragment in reply["error"]["message"]
        # The same connection goes on: the line was framed, only its content was bad.
        assert conn.ask({"cmd": "ping"})["ok"] is True
    assert_working(daemon, f"after-{request.node.callspec.id}")


def test_a_1_mib_line_is_refused_and_the_connection_closed(daemon: Daemon) -> None:
    with Conn(daemon.socket_path) as conn:

        def send_it() -> None:
            with contextlib.suppress(OSError):  # the daemon hangs up long before the end
                conn.send(b'{"cmd": "ping", "pad": "' + b"x" * (1 << 20) + b'"}\n')

        sender = threading.Thread(target=send_it)
        sender.start()
        reply = conn.reply()
        # Then the end of the connection: EOF, or ECONNRESET since our bytes were left unread.
        with contextlib.suppress(ConnectionResetError):
            assert conn.line() is None
        sender.join(10)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "bad_request"
    assert "longer than 65536 bytes" in reply["error"]["message"]
    assert_working(daemon, "after-1mib")


@pytest.mark.parametrize(("size", "ok"), [(MAX_LINE, True), (MAX_LINE + 1, False)])
def test_the_line_limit_is_64_kib_exactly(daemon: Daemon, size: int, ok: bool) -> None:
    head, tail = b'{"cmd": "ping"', b"}"
    with Conn(daemon.socket_path) as conn:
        conn.send(head + b" " * (size - len(head) - len(tail)) + tail + b"\n")
        assert conn.reply()["ok"] is ok
        if not ok:
            with contextlib.suppress(ConnectionResetError):
                assert conn.line() is None


def test_pipelined_requests_are_answered_in_order(daemon: Daemon) -> None:
    with Conn(daemon.socket_path) as conn:
        conn.send(b"".join(b'{"cmd": "%s"}\n' % cmd for cmd in [b"ping", b"status", b"nope"] * 30))
        replies = [conn.reply() for _ in range(90)]
    assert [r["result"].get("pong") for r in replies[0::3]] == [True] * 30
    assert all("pending" in r["result"] for r in replies[1::3])
    assert {r["error"]["code"] for r in replies[2::3]} == {"unknown_command"}


def test_abrupt_disconnects_leave_the_daemon_working(daemon: Daemon) -> None:
    logged_before = {(e["at"], e["message"]) for e in daemon.status()["recent_errors"]}
    with Conn(daemon.socket_path) as conn:
        conn.send(b'{"cmd": "sta')  # half a request
    with Conn(daemon.socket_path) as conn:
        conn.send(b'{"cmd": "reconcile", "wait": true}\n')  # nobody left to read the reply
    with Conn(daemon.socket_path) as conn:
        conn.send(b'{"cmd": "status"}\n' * 200)  # replies pile up unread
    with subscribed(daemon):
        pass  # a subscriber that vanishes
    Conn(daemon.socket_path).close()  # not a word
    settle(daemon, lambda: daemon.status()["counters"]["subscribers"] == 0)
    # Hang-ups are the client's business: nothing worse than a warning in the log.
    logged = daemon.status()["recent_errors"]
    assert [
        e for e in logged if e["level"] != "WARNING" and (e["at"], e["message"]) not in logged_before
    ] == []
    assert_working(daemon, "after-hangups")


def test_a_hundred_concurrent_clients_are_all_answered(daemon: Daemon) -> None:
    clients = 100
    all_connected = threading.Barrier(clients, timeout=20)
    replies: list[dict[str, Any]] = []
    failures: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with Conn(daemon.socket_path) as conn:
                all_connected.wait()  # a hundred open connections before anyone asks
                replies.append(conn.ask({"cmd": "status" if n % 2 else "ping"}, timeout=30))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert failures == []
    assert len(replies) == clients
    assert all(r["ok"] is True for r in replies)
    assert sum("pong" in r["result"] for r in replies) == clients // 2


def test_another_uid_is_refused(daemon: Daemon) -> None:
    """The socket's 0600 keeps other users out; the SO_PEERCRED check stands behind it."""
    assert "Permission denied" in _as_nobody(daemon.socket_path)
    daemon.socket_path.chmod(0o666)  # as if the first line of defence had failed
    try:
        reply = json.loads(_as_nobody(daemon.socket_path))
    finally:
        daemon.socket_path.chmod(0o600)
    assert reply["ok"] is False
    assert reply["error"] == {
        "code": "bad_request",
        "message": f"permission denied: uid {NOBODY} may not use this daemon",
    }
    assert daemon.request({"cmd": "ping"})["pong"] is True


def _as_nobody(path: Path) -> str:
    """In a forked child running as uid 65534: ping, and report the reply line or the OSError."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing of pytest's may run here, and it must always exit
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(5)
                    sock.connect(str(path))
                    sock.sendall(b'{"cmd": "ping"}\n')
                    os.write(write_end, sock.makefile("rb").readline())
            except OSError as exc:
                os.write(write_end, f"{type(exc).__name__}: {exc.strerror}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        out = pipe.read()
    os.waitpid(pid, 0)
    return out.decode()


# -- the command line -----------------------------------------------------------------------------


def test_cli_status_readable_and_json(daemon: Daemon, app: Path) -> None:
    readable = daemon.cli("status")
    assert readable.returncode == 0, readable.stdout
    assert f", pid {daemon.pid}, up " in readable.stdout
    assert re.search(r"^  projects     \d+ \(\d+ live\), sessions \d+, pending \d+$", readable.stdout, re.M)
    assert f"  config       {daemon.config_path}\n" in readable.stdout
    assert "  database     sqlite:///" in readable.stdout
    as_json = daemon.cli("status", "--json")
    assert as_json.returncode == 0, as_json.stdout
    assert json.loads(as_json.stdout).keys() >= STATUS_KEYS


def test_cli_commands_answered_by_the_daemon(daemon: Daemon, app: Path) -> None:
    state = write_state(app, "cli-1", doc("spec"))
    settle(daemon, lambda: phase(daemon, app, "cli-1") == "spec")
    # The folder's creation had the leading edge; the rename into it may still be pending, and
    # must not be what finds the unclosed write below.
    assert daemon.wait_idle()

    resync = daemon.cli("resync", str(app), "--wait")
    assert resync.returncode == 0, resync.stdout
    assert resync.stdout.startswith("resynced 1 project(s): ")

    with unclosed_write(state, doc("plan")):
        synced = daemon.cli("sync", str(state.parent))
    assert synced.returncode == 0, synced.stdout
    assert synced.stdout == f"{app}/agents/sessions/cli-1: written\n"

    paused = daemon.cli("pause")
    assert paused.returncode == 0, paused.stdout
    assert paused.stdout.startswith("paused: database writes held")
    try:
        assert "PAUSED" in daemon.cli("status").stdout
    finally:
        resumed = daemon.cli("resume")
    assert resumed.returncode == 0, resumed.stdout
    assert resumed.stdout.startswith("resumed: writing")

    write_state(app, "cli-broken", b"\xff\xfe not UTF-8")
    settle(
        daemon, lambda: any(e["slug"] == "cli-broken" for e in daemon.request({"cmd": "errors"})["errors"])
    )
    errors = daemon.cli("errors")
    assert errors.returncode == 0
    assert f"{app}/agents/sessions/cli-broken: invalid: not valid UTF-8 at byte 0" in errors.stdout


def test_cli_watch_prints_within_a_second_of_a_change(daemon: Daemon, app: Path) -> None:
    before = daemon.status()["counters"]["subscribers"]
    watch = subprocess.Popen(
        [str(SESSIONSYNC), "watch", "--config", str(daemon.config_path)],
        env=daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        settle(daemon, lambda: daemon.status()["counters"]["subscribers"] == before + 1)
        written = time.monotonic()
        write_state(app, "watch-1", doc("spec"))
        line = _line_with(watch, b"watch-1", deadline=written + 1.0)
        elapsed = time.monotonic() - written
    finally:
        watch.terminate()
        watch.communicate(timeout=10)
    assert b"session.created" in line
    assert f"{app}/agents/sessions/watch-1 spec".encode() in line
    assert elapsed < 1.0


def _line_with(proc: subprocess.Popen[bytes], text: bytes, deadline: float) -> bytes:
    """The first line of `proc`'s stdout containing `text`, read before `deadline`."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    while True:
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if text in line:
                return line
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no line with {text!r} in time; got {lines!r} {buf!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(
                    f"`sessionsync watch` exited; stderr: {proc.stderr and proc.stderr.read()!r}"
                )
            buf += chunk


def test_cli_status_without_a_daemon_names_the_socket(tmp_path: Path) -> None:
    absent = Daemon(tmp_path, f"sqlite:///{tmp_path / 'sessions.db'}")
    try:
        result = absent.cli("status")
    finally:
        absent.close()
    assert result.returncode == 1
    assert "not running" in result.stdout
    assert str(absent.socket_path) in result.stdout


# -- a subscriber that never reads ------------------------------------------------------------------

FLOOD = 3000
# Each round moves every session to a new phase and a new status: two events per session.
ROUNDS = [("spec", "active"), ("plan", "paused"), ("build", "active")]


def _flood_slug(i: int) -> str:
    # Realistic, longish slugs: fewer events fit in the socket buffer, more must queue in the hub.
    return f"2026-03-{i:04}_refactor-the-billing-export-pipeline"


def _flood_round(daemon: Daemon, engine: sa.Engine, project: Path, n: int) -> float:
    """Write every session in round n's phase and status; returns the daemon's catch-up time,
    from the last write to the moment every row shows it (the writes themselves are the test's
    cost, and vary with the machine's load)."""
    want_phase, want_status = ROUNDS[n]
    content = json.dumps(doc(want_phase, want_status)).encode()
    for i in range(FLOOD):
        write_state(project, _flood_slug(i), content)
    written = time.monotonic()

    def done() -> bool:
        query = sa.select(sa.func.count()).where(
            sessions.c.current_phase == want_phase,
            sessions.c.status == want_status,
            sessions.c.deleted_at.is_(None),
        )
        with engine.connect() as conn:
            return conn.execute(query).scalar_one() == FLOOD

    settle(daemon, done, timeout=60)
    return time.monotonic() - written


def test_a_stuck_subscriber_slows_nothing_and_is_told_it_lagged(tmp_path: Path) -> None:
    project = make_project(tmp_path / "flood")
    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    engine = sa.create_engine(url, poolclass=NullPool)
    with Daemon(tmp_path, url, projects=[project]) as daemon:
        wait_started(daemon)
        baseline = _flood_round(daemon, engine, project, 0)  # 3,000 sessions appear
        with Conn(daemon.socket_path) as stuck:
            assert stuck.ask({"cmd": "subscribe"})["ok"] is True
            # Two events a session a round: the second round passes the 10,000 a subscriber may
            # have queued plus the socket buffer (under 1,000 of these with Linux's defaults).
            with_stuck: list[float] = []
            while daemon.status()["counters"]["subscribers"] and len(with_stuck) < 5:
                with_stuck.append(_flood_round(daemon, engine, project, 1 + len(with_stuck) % 2))
            started = time.monotonic()
            status = daemon.status()
            status_s = time.monotonic() - started
            # Now it reads: what the socket buffer held, then the verdict, then the end.
            lines = []
            while (line := stuck.line(timeout=20)) is not None:
                lines.append(json.loads(line))
        assert status["counters"]["subscribers"] == 0  # dropped, not waited for
        assert status_s < 1.0
        assert lines[-1]["kind"] == "lagged"
        assert len(lines) == 1 or lines[-1]["last_id"] == lines[-2]["id"]  # where to resume
        assert all(e["kind"].startswith("session.") for e in lines[:-1])
        assert max(with_stuck) < 3 * baseline + 2.0, (baseline, with_stuck)
        assert daemon.stop() == 0
    engine.dispose()


# -- PostgreSQL LISTEN/NOTIFY -------------------------------------------------------------------------


@contextlib.contextmanager
def listening(url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("LISTEN sessionsync")
        yield conn


def notified(
    conn: psycopg.Connection[Any], match: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The first NOTIFY payload `match` accepts, and every one before it (channels are shared by
    the whole database, so other tests' events may be among them)."""
    deadline = time.monotonic() + timeout
    before: list[dict[str, Any]] = []
    while (remaining := deadline - time.monotonic()) > 0:
        for note in conn.notifies(timeout=remaining, stop_after=1):
            payload = json.loads(note.payload)
            if match(payload):
                return payload, before
            before.append(payload)
    raise AssertionError(f"no matching notification within {timeout} s; saw {before!r}")


@pytest.mark.postgres
def test_postgres_listeners_are_notified_of_a_file_change(pg_url: str, tmp_path: Path) -> None:
    project = make_project(tmp_path / "pg")
    with Daemon(tmp_path, pg_url, projects=[project]) as daemon, listening(pg_url) as conn:
        wait_started(daemon)
        write_state(project, "pg-1", doc("spec"))
        event, _ = notified(conn, lambda e: e.get("project") == str(project) and e.get("slug") == "pg-1")
        assert event["kind"] == "session.created"
        assert event["to"] == "spec"
        # Sent at commit: the row is there for whoever reacts to the notification.
        assert phase(daemon, project, "pg-1") == "spec"
        write_state(project, "pg-1", doc("build"))
        event, _ = notified(conn, lambda e: e.get("project") == str(project) and e.get("slug") == "pg-1")
        assert (event["kind"], event["from"], event["to"]) == ("session.phase_changed", "spec", "build")
        assert daemon.stop() == 0


@pytest.mark.postgres
def test_postgres_a_rolled_back_write_notifies_nobody(pg_url: str, tmp_path: Path) -> None:
    """The store's own write path, made to fail after its NOTIFY: at COMMIT, by a deferred
    trigger that refuses the ghost's event."""
    from sessionsync.daemon.batch import sync_batch
    from sessionsync.daemon.db import make_engine
    from sessionsync.daemon.migrate import upgrade
    from sessionsync.daemon.store import Store
    from sessionsync.models.keys import SessionKey

    project = make_project(tmp_path / "pg")
    engine = make_engine(pg_url)
    try:
        upgrade(engine)
        store = Store(engine)
        ref = store.ensure_project(str(project), str(project / "agents" / "sessions"))
        write_state(project, "ghost", doc("spec"))
        write_state(project, "real", doc("spec"))
        with engine.begin() as setup:
            setup.exec_driver_sql(
                "CREATE FUNCTION refuse_ghost() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " IF (SELECT slug FROM sessions WHERE id = NEW.session_id) = 'ghost' THEN"
                " RAISE EXCEPTION 'crashed between NOTIFY and COMMIT'; END IF; RETURN NULL; END $$"
            )
            setup.exec_driver_sql(
                "CREATE CONSTRAINT TRIGGER refuse_ghost AFTER INSERT ON session_events"
                " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_ghost()"
            )

        with listening(pg_url) as conn:
            with pytest.raises(Exception, match="between NOTIFY and COMMIT"):
                sync_batch(store, {ref.path: ref}, [SessionKey(ref.path, "ghost")], 1 << 20)
            sync_batch(store, {ref.path: ref}, [SessionKey(ref.path, "real")], 1 << 20)
            # Notifications arrive in commit order: had the ghost's been sent, it would come first.
            real, before = notified(conn, lambda e: e.get("project") == ref.path and e.get("slug") == "real")
        assert real["kind"] == "session.created"
        assert [e for e in before if e.get("project") == ref.path] == []
        assert set(store.live_slugs(ref.id)) == {"real"}
    finally:
        engine.dispose()


# -- figures for the report -------------------------------------------------------------------------


def test_measure_status_time_and_event_latency(
    daemon: Daemon, app: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Printed, not asserted: `sessionsync status` wall time, and file write -> subscriber latency."""
    status_s = []
    for _ in range(10):
        started = time.perf_counter()
        assert daemon.cli("status").returncode == 0
        status_s.append(time.perf_counter() - started)

    # 200 writes, ten sessions at a time (agents update state.json; each write changes the phase).
    slugs = [f"latency-{n}" for n in range(10)]
    for slug in slugs:
        write_state(app, slug, doc("spec"))
    settle(daemon, lambda: all(phase(daemon, app, s) == "spec" for s in slugs))
    latencies = []
    with subscribed(daemon) as sub:
        for n in range(20):
            now_phase = "build" if n % 2 == 0 else "spec"
            written: dict[str, float] = {}
            for slug in slugs:
                write_state(app, slug, doc(now_phase))
                written[slug] = time.perf_counter()
            while written:
                event = sub.event(of_any(written, "session.phase_changed"))
                latencies.append(time.perf_counter() - written.pop(event["slug"]))
    latencies.sort()
    with capsys.disabled():
        print(
            f"\n`sessionsync status` wall time: median {statistics.median(status_s) * 1000:.0f} ms "
            f"(min {min(status_s) * 1000:.0f}, max {max(status_s) * 1000:.0f}) over 10 runs"
            f"\nfile write -> subscriber event: p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, "
            f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.0f} ms over {len(latencies)} writes "
            f"(debounce_ms 200)"
        )

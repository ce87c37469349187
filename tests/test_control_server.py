"""The control server and client over real Unix sockets, with small fake handlers.

Each test starts a ControlServer in its own tmp folder; the real daemon's handlers are tested
end to end elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sessionsync.daemon.control import client
from sessionsync.daemon.control.protocol import MAX_LINE
from sessionsync.daemon.control.server import ControlServer, Handler
from sessionsync.daemon.errors import (
    AlreadyRunning,
    ConfigError,
    ControlError,
    DaemonNotRunning,
    DatabaseUnavailable,
)
from sessionsync.daemon.hub import EventHub
from sessionsync.models.control import PingRequest, ResyncRequest, SyncRequest
from tests.support.waiting import wait_for

NOBODY = 65534


def _sync(request: SyncRequest) -> dict[str, Any]:
    raise ControlError("not_found", f"no project holds {request.path}")


def _reconcile(_request: Any) -> dict[str, Any]:
    raise RuntimeError("the store fell over")


def _pause(_request: Any) -> dict[str, Any]:
    raise DatabaseUnavailable("the database at sqlite:///x cannot be reached")


def _status(_request: Any) -> dict[str, Any]:
    return {"blob": "x" * MAX_LINE}  # too long for one reply line


HANDLERS: dict[str, Handler] = {
    "ping": lambda request: {"pong": isinstance(request, PingRequest)},
    "resync": lambda request: {"projects": len(request.projects), "all": request.all},
    "sync": _sync,
    "reconcile": _reconcile,
    "status": _status,
    "pause": _pause,
}


class Peer:
    """A raw client: send bytes, read reply lines, as a misbehaving client would."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.reader = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> Any:
        """The next line as JSON, or None once the server hung up."""
        try:
            line = self.reader.readline()
        except ConnectionResetError:
            return None
        return json.loads(line) if line else None

    def ask(self, line: bytes) -> Any:
        self.send(line + b"\n")
        return self.read()

    def hang_up(self) -> None:
        # Unlike close, shutdown wakes a thread blocked reading this socket.
        self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "control.sock"


@pytest.fixture
def hub() -> EventHub:
    return EventHub()


@pytest.fixture
def server(sock_path: Path, hub: EventHub) -> Iterator[ControlServer]:
    srv = ControlServer(sock_path, HANDLERS, hub)
    srv.start()
    yield srv
    srv.stop()


PING = b'{"cmd": "ping"}'
PONG = {"ok": True, "result": {"pong": True}}


def test_ping_round_trip(server: ControlServer) -> None:
    assert client.request(server.path, {"cmd": "ping"}) == {"pong": True}
    assert client.request(server.path, {"cmd": "resync", "all": True}) == {"projects": 0, "all": True}


def test_socket_is_0600_in_a_0700_folder(server: ControlServer) -> None:
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(server.path.parent).st_mode) == 0o700


def test_stop_unlinks_the_socket_and_is_idempotent(sock_path: Path, hub: EventHub) -> None:
    srv = ControlServer(sock_path, HANDLERS, hub)
    srv.start()
    srv.stop()
    assert not sock_path.exists()
    srv.stop()
    with pytest.raises(DaemonNotRunning):
        client.request(sock_path, {"cmd": "ping"})


def test_a_stale_socket_is_replaced(sock_path: Path, hub: EventHub) -> None:
    sock_path.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(sock_path))  # bound, never listening: what a killed daemon leaves
    srv = ControlServer(sock_path, HANDLERS, hub)
    srv.start()
    try:
        assert client.request(sock_path, {"cmd": "ping"}) == {"pong": True}
    finally:
        srv.stop()


def test_a_live_socket_is_already_running(server: ControlServer, hub: EventHub) -> None:
    second = ControlServer(server.path, HANDLERS, hub)
    with pytest.raises(AlreadyRunning, match=str(server.path)):
        second.start()
    second.stop()
    assert client.request(server.path, {"cmd": "ping"}) == {"pong": True}


def test_a_file_in_the_way_is_not_removed(sock_path: Path, hub: EventHub) -> None:
    sock_path.parent.mkdir(mode=0o700)
    sock_path.write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        ControlServer(sock_path, HANDLERS, hub).start()
    assert sock_path.read_text() == "mine"


def test_a_shared_folder_is_refused(tmp_path: Path, hub: EventHub) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(ConfigError, match="writable by other users"):
        ControlServer(shared / "control.sock", HANDLERS, hub).start()


@pytest.mark.skipif(os.getuid() != 0, reason="chown needs root")
def test_a_folder_owned_by_someone_else_is_refused(tmp_path: Path, hub: EventHub) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"owned by uid {NOBODY}"):
        ControlServer(theirs / "control.sock", HANDLERS, hub).start()


@pytest.mark.parametrize(
    ("line", "code", "fragment"),
    [
        (b'{"cmd": "ping"', "bad_request", "malformed JSON"),
        (b'{"cmd": "launch"}', "unknown_command", "unknown command 'launch'"),
        (b'{"cmd": "sync"}', "bad_request", "missing field 'path'"),
        (b'{"cmd": "\xff\xfe"}', "bad_request", "UTF-8"),
        (b'{"cmd": "resume"}', "unknown_command", "does not handle 'resume'"),
    ],
)
def test_a_bad_request_gets_an_error_and_the_connection_still_answers(
    server: ControlServer, line: bytes, code: str, fragment: str
) -> None:
    peer = Peer(server.path)
    reply = peer.ask(line)
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    assert fragment in reply["error"]["message"]
    assert peer.ask(PING) == PONG
    peer.close()


def test_a_handler_error_passes_its_code_through(server: ControlServer) -> None:
    with pytest.raises(ControlError) as caught:
        client.request(server.path, {"cmd": "sync", "path": "/nowhere/s"})
    assert caught.value.code == "not_found"
    assert caught.value.message == "no project holds /nowhere/s"


def test_a_database_outage_in_a_handler_is_unavailable(server: ControlServer) -> None:
    with pytest.raises(ControlError) as caught:
        client.request(server.path, {"cmd": "pause"})
    assert caught.value.code == "unavailable"
    assert "cannot be reached" in caught.value.message


def test_a_crashing_handler_is_an_internal_error_and_the_connection_survives(server: ControlServer) -> None:
    peer = Peer(server.path)
    reply = peer.ask(b'{"cmd": "reconcile"}')
    assert reply["error"]["code"] == "internal"
    assert "RuntimeError: the store fell over" in reply["error"]["message"]
    assert peer.ask(PING) == PONG
    peer.close()


def test_a_result_too_long_for_a_line_is_an_internal_error(server: ControlServer) -> None:
    peer = Peer(server.path)
    reply = peer.ask(b'{"cmd": "status"}')
    assert reply["error"]["code"] == "internal"
    assert "exceeds" in reply["error"]["message"]
    assert peer.ask(PING) == PONG
    peer.close()


def test_a_1_mib_line_is_refused_and_the_server_still_answers(server: ControlServer) -> None:
    peer = Peer(server.path)

    def flood() -> None:
        # The server may hang up before all of it is sent: an expected outcome.
        with contextlib.suppress(OSError):
            peer.send(b'{"cmd": "sync", "path": "/' + b"x" * (1 << 20) + b'"}\n')

    sender = threading.Thread(target=flood)
    sender.start()
    reply = peer.read()
    sender.join()
    if reply is not None:
        assert reply["error"]["code"] == "bad_request"
        assert str(MAX_LINE) in reply["error"]["message"]
    assert peer.read() is None  # and the connection is closed
    peer.close()
    assert client.request(server.path, {"cmd": "ping"}) == {"pong": True}


def test_a_client_hanging_up_mid_line_or_before_its_reply_harms_nothing(
    sock_path: Path, hub: EventHub
) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow_ping(_request: Any) -> dict[str, Any]:
        entered.set()
        release.wait(5)
        return {"pong": True}

    srv = ControlServer(sock_path, {**HANDLERS, "errors": slow_ping}, hub)
    srv.start()
    try:
        mid_line = Peer(sock_path)
        mid_line.send(b'{"cmd": "pi')
        mid_line.close()
        gone = Peer(sock_path)
        gone.send(b'{"cmd": "errors"}\n')
        assert entered.wait(5)
        gone.close()
        release.set()  # the reply now goes to a closed socket
        assert client.request(sock_path, {"cmd": "ping"}) == {"pong": True}
    finally:
        srv.stop()


def test_100_concurrent_clients_are_all_answered(sock_path: Path, hub: EventHub) -> None:
    # Every handler call waits for all 100: the test passes only if they run at the same time.
    together = threading.Barrier(100, timeout=10)

    def gather(request: ResyncRequest) -> dict[str, Any]:
        together.wait()
        return {"project": request.projects[0]}

    srv = ControlServer(sock_path, {"resync": gather}, hub)
    srv.start()
    try:
        with ThreadPoolExecutor(max_workers=100) as pool:
            replies = list(
                pool.map(
                    lambda n: client.request(sock_path, {"cmd": "resync", "projects": [f"/p/{n}"]}),
                    range(100),
                )
            )
        assert replies == [{"project": f"/p/{n}"} for n in range(100)]
    finally:
        srv.stop()


def test_events_published_after_subscribing_arrive_in_order(server: ControlServer, hub: EventHub) -> None:
    received: list[dict[str, Any]] = []

    def follow() -> None:
        received.extend(client.stream(server.path, {"cmd": "subscribe"}))

    follower = threading.Thread(target=follow)
    follower.start()
    wait_for(lambda: hub.subscriber_count() == 1)
    hub.publish_many([{"kind": "session.updated", "slug": f"s{n}", "n": n} for n in range(100)])
    wait_for(lambda: len(received) == 100)
    assert [e["n"] for e in received] == list(range(100))
    server.stop()  # ends the stream: the follower returns
    follower.join(5)
    assert not follower.is_alive()
    assert hub.subscriber_count() == 0


class _Collector:
    """Reads a subscriber connection in a thread; the test waits on its count, not on time."""

    def __init__(self, peer: Peer) -> None:
        self.events: list[dict[str, Any]] = []
        self._grew = threading.Condition()
        self._peer = peer
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while (event := self._peer.read()) is not None:
            with self._grew:
                self.events.append(event)
                self._grew.notify_all()

    def wait_for(self, count: int) -> None:
        with self._grew:
            assert self._grew.wait_for(lambda: len(self.events) >= count, timeout=10)

    def join(self) -> None:
        self._thread.join(5)
        assert not self._thread.is_alive()


def test_a_stalled_subscriber_is_dropped_with_lagged_and_never_slows_publish(
    server: ControlServer, hub: EventHub
) -> None:
    total, chunk = 50_000, 1_000
    stalled, reading = Peer(server.path), Peer(server.path)
    assert stalled.ask(b'{"cmd": "subscribe"}') == {"ok": True, "result": {"subscribed": True, "last_id": 0}}
    assert reading.ask(b'{"cmd": "subscribe"}') == {"ok": True, "result": {"subscribed": True, "last_id": 0}}
    collector = _Collector(reading)

    publishing = 0.0
    for start in range(0, total, chunk):
        events = [{"kind": "session.updated", "slug": f"s{n}", "n": n} for n in range(start, start + chunk)]
        began = time.perf_counter()
        for event in events:
            hub.publish(event)
        publishing += time.perf_counter() - began
        # A reader that keeps up: it is the stalled one that must not hold publish back.
        collector.wait_for(start + chunk)

    # About 0.05 s on an idle 2-core machine; the bound leaves room for a loaded test run.
    assert publishing < 1.0, f"publishing {total} events took {publishing:.3f} s"
    assert [e["n"] for e in collector.events] == list(range(total))
    assert hub.subscriber_count() == 1

    # The stalled subscriber finally reads: the events that fit in the socket, then lagged, then EOF.
    got = list(iter(stalled.read, None))
    assert got[-1] == {"kind": "lagged", "last_id": 0}  # these test events are live-only: no ids
    numbers = [e["n"] for e in got[:-1]]
    assert numbers == list(range(len(numbers)))
    assert len(numbers) < total
    stalled.close()
    reading.hang_up()
    collector.join()
    reading.close()


def test_a_peer_with_an_uid_not_allowed_is_refused(sock_path: Path, hub: EventHub) -> None:
    srv = ControlServer(sock_path, HANDLERS, hub, allowed_uids={NOBODY})
    srv.start()
    try:
        peer = Peer(sock_path)
        reply = peer.read()
        assert reply["error"]["code"] == "bad_request"
        assert reply["error"]["message"] == f"permission denied: uid {os.getuid()} may not use this daemon"
        assert peer.read() is None
        peer.close()
    finally:
        srv.stop()


@pytest.mark.skipif(os.getuid() != 0, reason="switching to another uid needs root")
def test_a_process_of_another_user_is_refused_by_its_credentials(hub: EventHub) -> None:
    # pytest's tmp folders are private to root; this one lets uid 65534 reach the socket, and
    # the socket is opened to everyone, so only the SO_PEERCRED check stands in the way.
    base = Path(tempfile.mkdtemp(prefix="sessionsync-peer-"))
    try:
        base.chmod(0o711)
        path = base / "run" / "control.sock"
        srv = ControlServer(path, HANDLERS, hub)
        srv.start()
        try:
            path.parent.chmod(0o711)
            path.chmod(0o666)
            reply_from_child = _as_nobody(path)
        finally:
            srv.stop()
    finally:
        shutil.rmtree(base)
    reply = json.loads(reply_from_child)
    assert reply["error"]["code"] == "bad_request"
    assert reply["error"]["message"] == f"permission denied: uid {NOBODY} may not use this daemon"


def _as_nobody(path: Path) -> bytes:
    """Connect as uid 65534 in a forked child; the first line it reads comes back through a pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no exceptions escaping, exit at once
        try:
            os.close(read_end)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(path))
                os.write(write_end, sock.makefile("rb").readline())
        except BaseException as e:
            os.write(write_end, repr(e).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return data


def test_handlers_for_unknown_commands_are_refused(sock_path: Path, hub: EventHub) -> None:
    with pytest.raises(ValueError, match="unknown commands: launch"):
        ControlServer(sock_path, {"launch": HANDLERS["ping"]}, hub)
    with pytest.raises(ValueError, match="subscribe"):
        ControlServer(sock_path, {"subscribe": HANDLERS["ping"]}, hub)


# The client.


def test_no_daemon_names_the_socket_and_how_to_start_one(tmp_path: Path) -> None:
    missing = tmp_path / "run" / "control.sock"
    with pytest.raises(DaemonNotRunning) as caught:
        client.request(missing, {"cmd": "status"})
    assert str(missing) in str(caught.value)
    assert "systemctl --user start sessionsync" in str(caught.value)
    assert "sessionsync run" in str(caught.value)


def test_a_stale_socket_is_no_daemon_either(tmp_path: Path) -> None:
    stale = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(stale))
    with pytest.raises(DaemonNotRunning, match=str(stale)):
        client.request(stale, {"cmd": "status"})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RUNTIME_DIRECTORY": "/run/user/1000/sessionsync", "XDG_RUNTIME_DIR": "/run/user/1000"},
         "/run/user/1000/sessionsync/control.sock"),
        ({"RUNTIME_DIRECTORY": "/run/sessionsync:/run/other"}, "/run/sessionsync/control.sock"),
        ({"XDG_RUNTIME_DIR": "/run/user/1000"}, "/run/user/1000/sessionsync/control.sock"),
        ({"RUNTIME_DIRECTORY": "", "XDG_RUNTIME_DIR": "/run/user/1000"},
         "/run/user/1000/sessionsync/control.sock"),
    ],
)  # fmt: skip
def test_default_socket_path(env: dict[str, str], expected: str) -> None:
    assert client.default_socket_path(env) == Path(expected)


@pytest.mark.parametrize("env", [{}, {"XDG_RUNTIME_DIR": ""}, {"XDG_RUNTIME_DIR": "run/user/1000"}])
def test_no_runtime_folder_is_a_config_error_never_tmp(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        client.default_socket_path(env)
    assert "control.socket" in str(caught.value)
    assert "XDG_RUNTIME_DIR" in str(caught.value)


def test_the_client_imports_no_heavy_library() -> None:
    heavy = ("pydantic", "sqlalchemy", "psycopg", "alembic", "loguru")
    check = (
        "import sessionsync.daemon.control.client, sys;"
        f" heavy = sorted(m for m in sys.modules if m.startswith({heavy!r})); assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr

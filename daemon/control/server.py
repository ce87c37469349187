"""The control socket: a Unix stream socket that answers one JSON request per line.

Each connection gets its own thread, so a slow handler (`resync --wait`) or a slow subscriber
delays only its own client. The socket is 0600 in a private folder and the peer's uid
(SO_PEERCRED) is checked, because any local process could otherwise drive the daemon.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from io import BufferedReader
from pathlib import Path
from typing import Any

from loguru import logger

from sessionsync.daemon.control.protocol import (
    MAX_LINE,
    LineTooLong,
    Progressing,
    ProtocolError,
    encode_error,
    encode_event,
    encode_ok,
    parse_request,
    read_line,
)
from sessionsync.daemon.errors import (
    AlreadyRunning,
    ConfigError,
    ControlError,
    DatabaseUnavailable,
    OperationalError,
    ProjectNotFound,
)
from sessionsync.daemon.hub import EventFilter, EventHub, Subscription
from sessionsync.daemon.instance_lock import LockFile
from sessionsync.daemon.logs import mask_secrets
from sessionsync.models.control import COMMANDS, ControlRequest, SubscribeRequest

Replay = Callable[[int, int, Collection[str] | None, Collection[str] | None], Iterable[dict[str, Any]]]
"""Committed session events `after < id <= upto` of these kinds and projects, in id order
(Store.events_between)."""

Handler = Callable[[Any], dict[str, Any] | Progressing]
"""Takes the validated request model of its command (e.g. ResyncRequest) and returns the result
(or a Progressing that sends progress lines, then returns it).

Raise ControlError(code, message) for an error reply; ProjectNotFound and DatabaseUnavailable
become `not_found` and `unavailable`, any other exception an `internal` reply (logged). The
parameter is typed Any so that a handler can declare its own command's model.
"""

_SUN_PATH_MAX = 107  # bytes in sockaddr_un.sun_path, less the terminating NUL
_SEND_BATCH = 256  # events written to a subscriber per system call when it is behind
_STOP_JOIN_S = 5.0  # how long stop() waits for connection threads (a handler may be mid-call)
SUBSCRIBER_QUEUE = 10_000  # events a subscriber may fall behind before it is dropped (lagged)
IDLE_TIMEOUT_S = 300.0  # a client silent this long between requests is hung up on


def connection_cap() -> int:
    """Connections served at once: well below the descriptor limit, which the database, the
    inotify watches and the session files share."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(4, min(256, soft // 4)) if soft != resource.RLIM_INFINITY else 256


class _Connection:
    """One accepted client: its socket, its thread and, once it subscribes, its subscription."""

    def __init__(self, sock: socket.socket, number: int) -> None:
        self.sock = sock
        self.name = f"control-{number}"
        self.sub: Subscription | None = None
        self.thread: threading.Thread | None = None
        self.idle_since: float | None = time.monotonic()  # None while in a request or subscribed

    def hang_up(self) -> None:
        # shutdown, unlike close, wakes this connection's threads blocked in recv or sendall.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class ControlServer:
    """Unix stream socket, 0600 in a 0700 folder; peer uid (SO_PEERCRED) must be ours or root.

    `start` returns once the socket is listening; `stop` closes the listener and every
    connection and unlinks the socket. The server answers `subscribe` itself, from `hub`.
    """

    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        hub: EventHub,
        allowed_uids: Collection[int] | None = None,
        idle_timeout_s: float | None = None,
        replay: Replay | None = None,
        subscriber_queue: int | None = None,
    ) -> None:
        unknown = sorted(set(handlers) - set(COMMANDS))
        if unknown:
            raise ValueError(f"handlers for unknown commands: {', '.join(unknown)}")
        if "subscribe" in handlers:
            raise ValueError("'subscribe' is answered by the server itself and takes no handler")
        self._path = path
        self._handlers = dict(handlers)
        self._hub = hub
        self._allowed_uids = frozenset({os.getuid(), 0} if allowed_uids is None else allowed_uids)
        self._listener: socket.socket | None = None
        self._socket_ino = 0
        self._wake_r = self._wake_w = -1
        self._accept_thread: threading.Thread | None = None
        self._conns: set[_Connection] = set()
        self._conns_lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._stopping = threading.Event()
        self._idle_timeout_s = idle_timeout_s or IDLE_TIMEOUT_S
        self._replay = replay
        self._subscriber_queue = subscriber_queue or SUBSCRIBER_QUEUE
        self._cap = connection_cap()
        self._full = False  # at the cap with nobody idle: said once until a connection is taken again
        # Two daemons started at once on one socket must not both replace it (instance_lock.py).
        self._lock = LockFile(
            path.with_name(path.name + ".lock"), f"pid {os.getpid()}", f"the control socket {path}"
        )

    @property
    def path(self) -> Path:
        return self._path

    def start(self) -> None:
        """Prepare the folder, replace a stale socket, listen, and serve in background threads.

        Raises ConfigError for an unusable path or folder, AlreadyRunning when another daemon
        answers on the socket, OperationalError when the socket cannot be created.
        """
        if self._listener is not None:
            raise RuntimeError("the control server is already started")
        if len(os.fsencode(self._path)) > _SUN_PATH_MAX:
            raise ConfigError(
                f"control socket path is longer than {_SUN_PATH_MAX} bytes: {self._path}",
                hint="set control.socket to a shorter path",
            )
        self._prepare_folder()
        self._lock.acquire()
        try:
            stale = self._check_existing_socket()
        except BaseException:
            self._lock.release()
            raise
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if stale:
                self._path.unlink()
            listener.bind(str(self._path))
            # The folder already keeps other users out; 0600 also covers a folder we did not make.
            os.chmod(self._path, 0o600)
            self._socket_ino = os.stat(self._path).st_ino
            listener.listen(socket.SOMAXCONN)
            listener.setblocking(False)
        except OSError as e:
            listener.close()
            self._lock.release()
            raise OperationalError(f"cannot listen on the control socket {self._path}: {e.strerror}") from e
        self._listener = listener
        self._wake_r, self._wake_w = os.pipe()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name="control-accept", daemon=True
        )
        self._accept_thread.start()
        if stale:
            logger.info("control: replaced a stale socket left by a daemon that did not stop cleanly")
        logger.info("control socket listening on {}", self._path)

    def stop(self) -> None:
        """Close the listener, hang up every connection and unlink the socket. Idempotent.

        Order: stop accepting first so no connection appears after the sweep, then hang up the
        connections (subscribers end at once; a busy handler finishes but cannot reply).
        """
        with self._conns_lock:
            if self._listener is None or self._stopping.is_set():
                return
            self._stopping.set()
        os.write(self._wake_w, b"x")
        if self._accept_thread is not None:
            self._accept_thread.join()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._unlink_socket()
        self._lock.release()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            if conn.sub is not None:
                conn.sub.close()
            conn.hang_up()
        deadline = time.monotonic() + _STOP_JOIN_S
        for conn in conns:
            if conn.thread is not None:
                conn.thread.join(max(0.0, deadline - time.monotonic()))
        busy = sum(1 for c in conns if c.thread is not None and c.thread.is_alive())
        if busy:
            logger.warning("control socket closed; {} connection(s) still inside a handler", busy)
        else:
            logger.info("control socket closed ({} connection(s) hung up)", len(conns))

    def _prepare_folder(self) -> None:
        folder = self._path.parent
        try:
            folder.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass  # checked below, whoever made it
        except OSError as e:
            raise ConfigError(
                f"cannot create the control socket folder {folder}: {e.strerror}",
                hint="set control.socket to a path in a folder you own",
            ) from e
        else:
            os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask
        st = os.stat(folder)
        problem = ""
        if not stat.S_ISDIR(st.st_mode):
            problem = "is not a folder"
        elif st.st_uid != os.getuid():
            problem = f"is owned by uid {st.st_uid}, not by this daemon's uid {os.getuid()}"
        elif st.st_mode & 0o022:
            problem = f"is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
        if problem:
            raise ConfigError(
                f"the control socket folder {folder} {problem}; it must be a private folder",
                hint="set control.socket to a path in a folder only you can write (mode 0700)",
            )

    def _check_existing_socket(self) -> bool:
        """True when a stale socket is in the way; AlreadyRunning when a live one answers."""
        try:
            st = os.lstat(self._path)
        except FileNotFoundError:
            return False
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(
                f"the control socket path {self._path} exists and is not a socket",
                hint="remove it, or set control.socket to another path",
            )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(2.0)
            try:
                probe.connect(str(self._path))
            except ConnectionRefusedError:
                return True  # nobody listens: the daemon that made it was killed
            except TimeoutError:
                pass  # a listener whose queue is full is still a live daemon
            except OSError as e:
                raise OperationalError(f"cannot check the control socket {self._path}: {e.strerror}") from e
        raise AlreadyRunning(
            f"another sessionsync daemon is answering on {self._path}",
            hint="stop it first (systemctl --user stop sessionsync), or set control.socket to another path",
        )

    def _unlink_socket(self) -> None:
        # Unlink only our own socket: a daemon started after us may have replaced it.
        try:
            if os.lstat(self._path).st_ino == self._socket_ino:
                self._path.unlink()
        except FileNotFoundError:
            pass

    def _accept_loop(self, listener: socket.socket) -> None:
        # poll on the listener and a wake pipe: stop() needs no timeout loop to be noticed.
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        failing = False
        while True:
            if any(fd == self._wake_r for fd, _ in poller.poll()):
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue  # the client gave up between poll and accept
            except OSError as e:
                # Out of file descriptors, say: the client stays queued and poll would return at
                # once, so wait a little instead of spinning; log once until accept works again.
                if not failing:
                    logger.error("control: cannot accept connections: {}", e)
                    failing = True
                if self._stopping.wait(0.5):
                    return
                continue
            if failing:
                logger.info("control: accepting connections again")
                failing = False
            if self._admit(sock):
                sock.setblocking(True)
                self._serve_in_thread(sock)

    def _admit(self, sock: socket.socket) -> bool:
        """At the cap, a new client takes the place of the one idle longest; with nobody idle (all
        in a request or subscribed) it gets one `busy` line and is closed."""
        with self._conns_lock:
            if len(self._conns) < self._cap:
                idle = None
            else:
                waiting = [c for c in self._conns if c.idle_since is not None]
                idle = min(waiting, key=lambda c: c.idle_since or 0.0, default=None)
                if idle is None:
                    if not self._full:
                        logger.warning("control: {} connections busy; refusing new ones", len(self._conns))
                        self._full = True
                    with contextlib.suppress(OSError):
                        sock.send(encode_error("busy", f"{len(self._conns)} connections busy; try again"))
                    sock.close()
                    return False
                idle.idle_since = None  # taken once
            if self._full:
                logger.info("control: taking new connections again")
                self._full = False
        if idle is not None:
            idle.hang_up()
        return True

    def _serve_in_thread(self, sock: socket.socket) -> None:
        conn = _Connection(sock, next(self._numbers))
        conn.thread = threading.Thread(target=self._serve, args=(conn,), name=conn.name, daemon=True)
        with self._conns_lock:
            self._conns.add(conn)
        conn.thread.start()

    def _serve(self, conn: _Connection) -> None:
        try:
            uid = _peer_uid(conn.sock)
            if uid not in self._allowed_uids:
                logger.warning("control: refused a connection from uid {}", uid)
                conn.sock.sendall(
                    encode_error("bad_request", f"permission denied: uid {uid} may not use this daemon")
                )
                # Take the request line before closing: closing with it unread resets the
                # connection, and the client could lose the reply that says why.
                conn.sock.shutdown(socket.SHUT_WR)
                conn.sock.settimeout(1.0)
                conn.sock.recv(MAX_LINE)
                return
            with conn.sock.makefile("rb") as reader:
                self._serve_requests(conn, reader)
        except OSError as e:
            # The client hung up mid-reply, or stop() hung up on it: nobody is left to answer.
            logger.debug("control: {} ended: {}", conn.name, e)
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.sock.close()

    def _serve_requests(self, conn: _Connection, reader: BufferedReader) -> None:
        while True:
            conn.idle_since = time.monotonic()
            conn.sock.settimeout(self._idle_timeout_s)
            try:
                line = read_line(reader)
            except TimeoutError:
                logger.debug("control: hung up on {}, idle for {:.0f} s", conn.name, self._idle_timeout_s)
                return
            except LineTooLong as e:
                # The rest of an oversized line cannot be told from the next request: hang up.
                logger.warning("control: hung up on a client that sent a line over {} bytes", MAX_LINE)
                conn.sock.sendall(encode_error(e.code, e.message))
                return
            if line is None:
                return
            conn.idle_since = None
            conn.sock.settimeout(None)
            try:
                request = parse_request(line)
            except ProtocolError as e:
                conn.sock.sendall(encode_error(e.code, e.message))
                continue
            if isinstance(request, SubscribeRequest):
                self._stream(conn, reader, request)
                return
            conn.sock.sendall(self._call(request, conn.sock))

    def _call(self, request: ControlRequest, sock: socket.socket) -> bytes:
        handler = self._handlers.get(request.cmd)
        if handler is None:
            return encode_error("unknown_command", f"this daemon does not handle {request.cmd!r}")
        try:
            result = handler(request)
            if isinstance(result, Progressing):  # progress lines first (resync --wait)
                result = result.run(lambda update: _send_quietly(sock, encode_event(update)))
        except ControlError as e:
            return encode_error(e.code, e.message)
        except ProjectNotFound as e:
            return encode_error("not_found", str(e))
        except DatabaseUnavailable as e:
            return encode_error("unavailable", str(e))
        except Exception as e:
            logger.opt(exception=e).error("control: {} failed", request.cmd)
            why = mask_secrets(f"{type(e).__name__}: {e}")
            return encode_error("internal", f"{request.cmd} failed: {why} (see the daemon log)")
        try:
            return encode_ok(result)
        except ProtocolError as e:
            logger.error("control: cannot send the result of {}: {}", request.cmd, e.message)
            return encode_error(e.code, e.message)

    def _stream(self, conn: _Connection, reader: BufferedReader, request: SubscribeRequest) -> None:
        """Turn the connection into an event stream until the client or the server hangs up."""
        if request.since is not None and (self._replay is None or not self._hub.resumed):
            conn.sock.sendall(
                encode_error("unavailable", "the daemon is still connecting to its database; try again")
            )
            return
        sub = self._hub.subscribe(self._subscriber_queue, _event_filter(request.kinds, request.projects))
        with self._conns_lock:
            conn.sub = sub
            if self._stopping.is_set():  # stop() may have swept the connections already
                sub.close()
        sender: threading.Thread | None = None
        try:
            # Subscribed before the reply: every event released after the client reads it arrives,
            # and `last_id` is the last one released before.
            conn.sock.sendall(encode_ok({"subscribed": True, "last_id": sub.start_id}))
            sender = threading.Thread(
                target=self._send_events, args=(conn, sub, request), name=f"{conn.name}-events", daemon=True
            )
            sender.start()
            # A subscriber has nothing more to say; reading only tells when it hangs up.
            while reader.read1(4096):
                pass
        finally:
            sub.close()  # wakes the sender if it waits for an event
            conn.hang_up()  # wakes it if it waits in sendall
            if sender is not None:
                sender.join()

    def _send_events(self, conn: _Connection, sub: Subscription, request: SubscribeRequest) -> None:
        try:
            resume = None if request.since is None else self._send_replay(conn, sub, request.since, request)
            if resume is None:  # live: from where the replay (if any) ended
                while (event := sub.get()) is not None:
                    lines = [_encode_event(event)]
                    # Catch up in large writes when behind; get(timeout=0) never waits.
                    while len(lines) < _SEND_BATCH and (event := sub.get(timeout=0)) is not None:
                        lines.append(_encode_event(event))
                    conn.sock.sendall(b"".join(lines))
                resume = sub.last_id
            if sub.lagged:
                logger.warning("control: dropped a subscriber that fell too far behind the events")
                conn.sock.sendall(encode_event({"kind": "lagged", "last_id": resume}))
        except OSError as e:
            logger.debug("control: subscriber {} ended: {}", conn.name, e)
        finally:
            sub.close()
            conn.hang_up()

    def _send_replay(
        self, conn: _Connection, sub: Subscription, since: int, request: SubscribeRequest
    ) -> int | None:
        """Send the committed events after `since` up to where the live stream starts (the live
        events buffer meanwhile). None when the live stream takes over; the id to resume from
        when the replay was cut short (the buffer overflowed, the database failed)."""
        assert self._replay is not None
        if since >= sub.start_id:  # nothing to replay; live events the client has are skipped
            sub.sent(since)
            return None
        sent = since
        lines: list[bytes] = []
        try:
            for event in self._replay(since, sub.start_id, request.kinds, request.projects):
                lines.append(_encode_event(event))
                if len(lines) == _SEND_BATCH:
                    if sub.lagged:
                        return sent
                    conn.sock.sendall(b"".join(lines))
                    lines.clear()
                    sent = event["id"]
        except Exception as e:
            if isinstance(e, OSError):
                raise
            # The database failed mid-replay: the client resumes from what it was sent.
            logger.warning("control: replay for a subscriber failed: {}", mask_secrets(str(e)))
            sub.drop()
            return sent
        conn.sock.sendall(b"".join(lines))
        return None


def _event_filter(kinds: list[str] | None, projects: list[str] | None) -> EventFilter | None:
    if kinds is None and projects is None:
        return None
    kind_set = None if kinds is None else frozenset(kinds)
    project_set = None if projects is None else frozenset(projects)
    return lambda e: (
        (kind_set is None or e.get("kind") in kind_set)
        and (project_set is None or e.get("project") in project_set)
    )


def _encode_event(event: Mapping[str, Any]) -> bytes:
    try:
        return encode_event(event)
    except (TypeError, ValueError) as e:
        # A publisher's bug must not end the stream; the log says which event was skipped.
        logger.error("control: skipped an event that is not JSON ({}): {}", event.get("kind"), e)
        return b""


def _send_quietly(sock: socket.socket, line: bytes) -> None:
    # A client gone mid-wait is noticed when the reply cannot be sent; its progress need not be.
    with contextlib.suppress(OSError):
        sock.sendall(line)


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)

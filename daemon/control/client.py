"""The control-socket client used by the CLI (`sessionsync status`, `resync`, `watch`, ...).

It imports only the standard library (and the stdlib-only error tree and framing) so that a
command answered by the daemon starts in milliseconds: no pydantic, SQLAlchemy or psycopg here.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator, Mapping
from io import BufferedReader
from pathlib import Path
from typing import Any

from sessionsync.daemon.control.protocol import (
    MAX_LINE,
    ProtocolError,
    encode_request,
    parse_reply,
    read_line,
)
from sessionsync.daemon.errors import DaemonNotRunning, OperationalError
from sessionsync.daemon.paths import default_socket_path

__all__ = ["default_socket_path", "open_stream", "request", "request_with_progress", "stream"]


def request(path: Path, payload: Mapping[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request and return its result; an error reply raises ControlError(code, message).

    Raises DaemonNotRunning when nothing listens on `path`, OperationalError when the daemon
    does not answer within `timeout` seconds or answers something that is not a reply.
    """
    with _connect(path, payload, timeout) as sock, sock.makefile("rb") as reader:
        return _read_reply(path, reader, timeout)


def stream(path: Path, payload: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """For `subscribe`: yield each event until the daemon hangs up, a `{"kind": "lagged"}` one too.

    The request itself must be answered within 10 s, with the errors of `request`; after that
    the stream waits as long as it takes for the next event.
    """
    _reply, events = open_stream(path, payload)
    yield from events


def open_stream(path: Path, payload: Mapping[str, Any]) -> tuple[dict[str, Any], Iterator[dict[str, Any]]]:
    """`stream`, subscribed now: the reply's result, and the events to come."""
    sock = _connect(path, payload, 10.0)
    reader = sock.makefile("rb")
    try:
        reply = _read_reply(path, reader, 10.0)
    except BaseException:
        reader.close()
        sock.close()
        raise
    sock.settimeout(None)
    return reply, _events(path, sock, reader)


def _events(path: Path, sock: socket.socket, reader: BufferedReader) -> Iterator[dict[str, Any]]:
    with sock, reader:
        while (line := _read_line(path, reader)) is not None:
            yield decode_event(path, line)


def decode_event(path: Path, line: bytes) -> dict[str, Any]:
    """One event line from the daemon at `path` as an object; OperationalError when it is not one."""
    try:
        event = json.loads(line)
    except ValueError as e:
        raise OperationalError(f"the daemon at {path} sent a malformed event: {e}") from e
    if not isinstance(event, dict):
        raise OperationalError(f"the daemon at {path} sent an event that is not an object: {event!r}")
    return event


def _connect(path: Path, payload: Mapping[str, Any], timeout: float) -> socket.socket:
    line = encode_request(payload)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        sock.sendall(line)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
        sock.close()
        raise DaemonNotRunning(
            f"the sessionsync daemon is not running: nothing answers on {path}",
            hint="start it with 'systemctl --user start sessionsync' or 'sessionsync run'",
        ) from e
    except TimeoutError as e:
        sock.close()
        raise OperationalError(f"the daemon at {path} did not take the request within {timeout:g} s") from e
    except OSError as e:
        sock.close()
        raise OperationalError(f"cannot talk to the daemon at {path}: {e.strerror or e}") from e
    return sock


def _read_reply(path: Path, reader: BufferedReader, timeout: float) -> dict[str, Any]:
    return parse_reply(_read_reply_line(path, reader, timeout))


def _read_line(path: Path, reader: BufferedReader) -> bytes | None:
    try:
        return read_line(reader)
    except ProtocolError as e:
        raise OperationalError(f"the daemon at {path} sent a line over {MAX_LINE} bytes") from e
    except TimeoutError:
        raise
    except OSError as e:
        raise OperationalError(f"the connection to the daemon at {path} broke: {e.strerror or e}") from e


def request_with_progress(
    path: Path, payload: Mapping[str, Any], on_progress: Callable[[int, int], None], timeout: float = 10.0
) -> dict[str, Any]:
    """`request` for a waiting resync or reconcile sent with `"progress": true`: each
    `{"kind": "progress", "seen", "total"}` line before the reply goes to `on_progress`."""
    with _connect(path, payload, timeout) as sock, sock.makefile("rb") as reader:
        while True:
            line = _read_reply_line(path, reader, timeout)
            try:
                update = json.loads(line)
            except ValueError:
                update = None
            if isinstance(update, dict) and update.get("kind") == "progress":
                on_progress(int(update.get("seen", 0)), int(update.get("total", 0)))
                continue
            return parse_reply(line)


def _read_reply_line(path: Path, reader: BufferedReader, timeout: float) -> bytes:
    try:
        line = _read_line(path, reader)
    except TimeoutError as e:
        raise OperationalError(f"the daemon at {path} did not answer within {timeout:g} s") from e
    if line is None:
        raise OperationalError(
            f"the daemon at {path} hung up without answering",
            hint="see its log: journalctl --user -u sessionsync",
        )
    return line

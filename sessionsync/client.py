"""Talk to a running sessionsync daemon from Python: `Client` (blocking) and `AsyncClient` (asyncio).

    from sessionsync.client import Client

    with Client() as daemon:                      # the socket the daemon's config names
        print(daemon.status()["sessions"])
        for event in daemon.subscribe(since=0, kinds=["session.phase_changed"]):
            print(event.id, event.project, event.slug, event.from_value, "->", event.to_value)

Replies are typed dicts, events `Event` dataclasses; an error reply raises `ControlError` whose
`code` is the protocol's (`not_found`, `unavailable`, ...), no daemon raises `DaemonNotRunning`.
`subscribe` resumes by itself after a lag (reconnecting with `since`), so a slow consumer misses
nothing. Standard library only: no SQLAlchemy, psycopg or pydantic is imported (a web backend
pays nothing for it). The protocol is written down in docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict, cast

from sessionsync.daemon.control.client import decode_event, open_stream, request
from sessionsync.daemon.control.protocol import MAX_LINE, encode_request, parse_reply
from sessionsync.daemon.errors import (
    ControlError,
    DaemonNotRunning,
    OperationalError,
    SessionSyncError,
)
from sessionsync.daemon.paths import default_socket_path

__all__ = [
    "AsyncClient",
    "Client",
    "ControlError",
    "DaemonNotRunning",
    "ErrorsReply",
    "Event",
    "OperationalError",
    "ResyncReply",
    "SessionError",
    "SessionSyncError",
    "StatusReply",
    "SyncReply",
]


class StatusReply(TypedDict, total=False):
    """`status`: the fields other tools may rely on (docs/protocol.md lists them all)."""

    version: str
    state: str
    pid: int
    projects: int
    sessions: int
    pending: int
    in_flight: int
    database_ok: bool
    paused: bool
    last_reconcile_at: str | None
    counters: dict[str, int]
    recent_errors: list[dict[str, Any]]


class ResyncReply(TypedDict, total=False):
    """`resync`: `{"queued": true}`, or with `wait` the pass's summary."""

    queued: bool
    projects: int
    sessions: int
    changed: int
    written: int
    unchanged: int
    invalid: int
    tombstoned: int
    ms: int


class SyncReply(TypedDict, total=False):
    project: str
    slug: str
    path: str
    written: int
    invalid: int
    unchanged: int


class SessionError(TypedDict):
    """A session whose state.json is invalid (`kind` "invalid") or has fields of the wrong type."""

    project: str
    slug: str
    path: str
    kind: str
    sync_error: str
    sync_error_at: str | None


class ErrorsReply(TypedDict):
    errors: list[SessionError]
    more: int


@dataclass(frozen=True)
class Event:
    """One event of the stream. Session events (`session.*`) have an `id`, their place in the
    database's `session_events`, to resume after with `since`; `project.resynced` and
    `reconcile.finished` are live-only (`id` None). `data` is the whole object as sent."""

    kind: str
    id: int | None = None
    at: str | None = None
    project: str | None = None
    slug: str | None = None
    path: str | None = None
    from_value: str | None = None
    to_value: str | None = None
    data: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Event:
        return cls(
            kind=str(data.get("kind")),
            id=data.get("id"),
            at=data.get("at"),
            project=data.get("project"),
            slug=data.get("slug"),
            path=data.get("path"),
            from_value=data.get("from"),
            to_value=data.get("to"),
            data=data,
        )


def _subscribe_request(
    since: int | None, kinds: Sequence[str] | None, projects: Sequence[str] | None
) -> dict[str, Any]:
    payload: dict[str, Any] = {"cmd": "subscribe"}
    if since is not None:
        payload["since"] = since
    if kinds is not None:
        payload["kinds"] = list(kinds)
    if projects is not None:
        payload["projects"] = [os.path.abspath(p) for p in projects]
    return payload


def _resync_request(projects: Sequence[str] | None, wait: bool) -> dict[str, Any]:
    if projects is None:
        return {"cmd": "resync", "all": True, "wait": wait}
    return {"cmd": "resync", "projects": [os.path.abspath(p) for p in projects], "wait": wait}


class _Cursor:
    """Where a subscription stands: the last session event id it delivered."""

    def __init__(self, since: int | None) -> None:
        self.last_id = since

    def started(self, reply: Mapping[str, Any]) -> None:
        """From the subscribe reply: with no `since`, the stream starts after its `last_id`."""
        if self.last_id is None and isinstance(reply.get("last_id"), int):
            self.last_id = reply["last_id"]

    def take(self, data: dict[str, Any]) -> Event | int | None:
        """The event to deliver; an int for a lag line (resume from it); None to skip."""
        if data.get("kind") == "lagged":
            last = data.get("last_id")
            return last if isinstance(last, int) else self.last_id or 0
        event = Event.from_json(data)
        if event.id is not None:
            self.last_id = event.id
        return event


class Client:
    """Blocking client; one connection per request (a subscription keeps its own).

    `socket` defaults to the path the daemon uses without a config ($RUNTIME_DIRECTORY or
    $XDG_RUNTIME_DIR + /sessionsync/control.sock). `timeout` bounds each request's answer."""

    def __init__(self, socket: str | os.PathLike[str] | None = None, timeout: float = 10.0) -> None:
        self.socket = Path(socket) if socket is not None else default_socket_path()
        self.timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def call(self, payload: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Any command, as a dict (`{"cmd": ...}`); returns the reply's `result`."""
        return request(self.socket, payload, self.timeout if timeout is None else timeout)

    def ping(self) -> dict[str, Any]:
        return self.call({"cmd": "ping"})

    def status(self) -> StatusReply:
        return cast(StatusReply, self.call({"cmd": "status"}))

    def resync(self, projects: Sequence[str] | None = None, wait: bool = False) -> ResyncReply:
        """Rescan these project folders, or every project when None; `wait` for the summary."""
        timeout = None if not wait else max(self.timeout, 3600.0)
        return cast(ResyncReply, self.call(_resync_request(projects, wait), timeout))

    def sync(self, path: str | os.PathLike[str]) -> SyncReply:
        """Sync one session folder now."""
        return cast(SyncReply, self.call({"cmd": "sync", "path": os.path.abspath(path)}))

    def errors(self) -> ErrorsReply:
        return cast(ErrorsReply, self.call({"cmd": "errors"}))

    def subscribe(
        self,
        since: int | None = None,
        kinds: Sequence[str] | None = None,
        projects: Sequence[str] | None = None,
    ) -> Subscription:
        """Events as they commit; with `since`, every committed session event after that id
        first. Subscribed when this returns; the iteration ends when the daemon hangs up (it
        stopped), and `last_id` says where to resume."""
        return Subscription(self.socket, since, kinds, projects)


class Subscription:
    """An iterator of Events, subscribed from the moment it is made (errors are raised then);
    reconnects with `since` by itself when the daemon reports a lag."""

    def __init__(
        self,
        socket: Path,
        since: int | None,
        kinds: Sequence[str] | None,
        projects: Sequence[str] | None,
    ) -> None:
        self._socket = socket
        self._cursor = _Cursor(since)
        self._kinds = kinds
        self._projects = projects
        self._lines: Iterator[dict[str, Any]] | None = self._open()

    @property
    def last_id(self) -> int | None:
        """The id of the last session event delivered, or where the stream started (`since`, or
        the daemon's latest id when it was subscribed): resume with `since=last_id`."""
        return self._cursor.last_id

    def _open(self) -> Iterator[dict[str, Any]]:
        reply, lines = open_stream(
            self._socket, _subscribe_request(self._cursor.last_id, self._kinds, self._projects)
        )
        self._cursor.started(reply)
        return lines

    def __iter__(self) -> Iterator[Event]:
        while self._lines is not None:
            resume = None
            for data in self._lines:
                taken = self._cursor.take(data)
                if isinstance(taken, Event):
                    yield taken
                elif taken is not None:
                    resume = taken
            self._lines = None
            if resume is not None:
                self._cursor.last_id = resume
                self._lines = self._open()


class AsyncClient:
    """The asyncio twin of `Client`: the same methods, awaited; `subscribe` is an async iterator."""

    def __init__(self, socket: str | os.PathLike[str] | None = None, timeout: float = 10.0) -> None:
        self.socket = Path(socket) if socket is not None else default_socket_path()
        self.timeout = timeout

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def call(self, payload: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Any command, as a dict; returns the reply's `result`."""
        limit = self.timeout if timeout is None else timeout
        reader, writer = await self._open(payload, limit)
        try:
            return parse_reply(await self._reply(reader, limit))
        finally:
            writer.close()

    async def ping(self) -> dict[str, Any]:
        return await self.call({"cmd": "ping"})

    async def status(self) -> StatusReply:
        return cast(StatusReply, await self.call({"cmd": "status"}))

    async def resync(self, projects: Sequence[str] | None = None, wait: bool = False) -> ResyncReply:
        timeout = None if not wait else max(self.timeout, 3600.0)
        return cast(ResyncReply, await self.call(_resync_request(projects, wait), timeout))

    async def sync(self, path: str | os.PathLike[str]) -> SyncReply:
        return cast(SyncReply, await self.call({"cmd": "sync", "path": os.path.abspath(path)}))

    async def errors(self) -> ErrorsReply:
        return cast(ErrorsReply, await self.call({"cmd": "errors"}))

    async def subscribe(
        self,
        since: int | None = None,
        kinds: Sequence[str] | None = None,
        projects: Sequence[str] | None = None,
    ) -> AsyncIterator[Event]:
        """As Client.subscribe: events as they commit, after `since` first; resumes after a lag.
        Subscribed when the iteration starts (an async generator runs nothing before)."""
        cursor = _Cursor(since)
        while True:
            reader, writer = await self._open(
                _subscribe_request(cursor.last_id, kinds, projects), self.timeout
            )
            resume = None
            try:
                cursor.started(parse_reply(await self._reply(reader, self.timeout)))
                while (line := await self._line(reader, None)) is not None:
                    taken = cursor.take(decode_event(self.socket, line))
                    if isinstance(taken, Event):
                        yield taken
                    elif taken is not None:
                        resume = taken
            finally:
                writer.close()
            if resume is None:
                return
            cursor.last_id = resume

    async def _open(
        self, payload: Mapping[str, Any], timeout: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        line = encode_request(payload)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket), limit=MAX_LINE + 2), timeout
            )
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
            raise DaemonNotRunning(
                f"the sessionsync daemon is not running: nothing answers on {self.socket}",
                hint="start it with 'systemctl --user start sessionsync' or 'sessionsync run'",
            ) from e
        except TimeoutError as e:
            raise OperationalError(
                f"the daemon at {self.socket} did not take the request within {timeout:g} s"
            ) from e
        writer.write(line)
        await writer.drain()
        return reader, writer

    async def _reply(self, reader: asyncio.StreamReader, timeout: float) -> bytes:
        line = await self._line(reader, timeout)
        if line is None:
            raise OperationalError(f"the daemon at {self.socket} hung up without answering")
        return line

    async def _line(self, reader: asyncio.StreamReader, timeout: float | None) -> bytes | None:
        """The next line without its newline; None once the daemon hung up."""
        try:
            line = await asyncio.wait_for(reader.readline(), timeout)
        except TimeoutError as e:
            raise OperationalError(f"the daemon at {self.socket} did not answer within {timeout:g} s") from e
        except (ValueError, asyncio.LimitOverrunError) as e:
            raise OperationalError(f"the daemon at {self.socket} sent a line over {MAX_LINE} bytes") from e
        except OSError as e:
            raise OperationalError(f"the connection to the daemon at {self.socket} broke: {e}") from e
        return line[:-1] if line.endswith(b"\n") else None

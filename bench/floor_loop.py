"""The latency floor: the least a mirror can do per isolated save, in a process of its own.

One inotify descriptor (ctypes, IN_MOVED_TO | IN_CLOSE_WRITE on every session folder), and per
event naming a state.json: read it, orjson.loads, one upsert of its sessions row with the bare
driver (sqlite3 / psycopg), commit, then one event line to its subscriber. No debounce, no queue,
no batching, no validation. It speaks just enough of the control socket (`subscribe`, then one
event line per row write) for bench.live's EventStream, so both sides are timed the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import socket
import sqlite3
import struct
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from sqlalchemy.engine import make_url

from bench.reconcile import JSON_COLUMNS, RAW_COLUMNS, raw_row
from tests.support.databases import libpq_url

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CLOEXEC = 0o2000000
EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len, as struct inotify_event
STATE_FILE = b"state.json"
UPDATED = tuple(c for c in RAW_COLUMNS if c not in ("project_id", "slug", "first_seen_at"))


def upsert_sql(placeholder: Callable[[str], str]) -> str:
    values = ", ".join(placeholder(c) for c in RAW_COLUMNS)
    updates = ", ".join(f"{c} = excluded.{c}" for c in UPDATED)
    return (
        f"INSERT INTO sessions ({', '.join(RAW_COLUMNS)}) VALUES ({values}) "
        f"ON CONFLICT (project_id, slug) DO UPDATE SET {updates}"
    )


class Writer:
    """One upsert and one commit per call, on a bare driver connection."""

    def __init__(self, url: str) -> None:
        self.sqlite = url.startswith("sqlite")
        self._sqlite: sqlite3.Connection | None = None
        self._pg: psycopg.Connection[Any] | None = None
        if self.sqlite:
            conn = sqlite3.connect(make_url(url).database or "", isolation_level=None)
            # The product's pragmas: WAL, synchronous=NORMAL, foreign keys on.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._sqlite = conn
            self.sql = upsert_sql(lambda _c: "?")
        else:
            self._pg = psycopg.connect(libpq_url(url))
            self.sql = upsert_sql(lambda c: "%s::jsonb" if c in JSON_COLUMNS else "%s")

    def write(self, row: tuple[Any, ...]) -> None:
        if self._sqlite is not None:
            self._sqlite.execute("BEGIN IMMEDIATE")
            self._sqlite.execute(self.sql, row)
            self._sqlite.execute("COMMIT")
        elif self._pg is not None:
            self._pg.execute(self.sql, row)
            self._pg.commit()

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._pg is not None:
            self._pg.close()


def inotify(folders: Sequence[str]) -> tuple[int, dict[int, str]]:
    """An inotify descriptor watching these folders for renames into them and closed writes."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = libc.inotify_init1(IN_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    folder_of = {}
    for folder in folders:
        wd = libc.inotify_add_watch(fd, os.fsencode(folder), IN_MOVED_TO | IN_CLOSE_WRITE)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
        folder_of[wd] = folder
    return fd, folder_of


def changed(buffer: bytes, folder_of: dict[int, str]) -> list[str]:
    """The session folders whose state.json the events of one read() name, in order."""
    out = []
    offset = 0
    while offset < len(buffer):
        wd, _mask, _cookie, length = EVENT_HEADER.unpack_from(buffer, offset)
        name = buffer[offset + EVENT_HEADER.size : offset + EVENT_HEADER.size + length].rstrip(b"\0")
        offset += EVENT_HEADER.size + length
        if name == STATE_FILE:
            out.append(folder_of[wd])
    return out


def serve(
    url: str, sessions: Sequence[tuple[str, str, int]], socket_path: str, ready: Any, stop: Any
) -> None:
    """The floor process: `sessions` are (project path, session folder, project id); every row is
    written once before `ready` is set, then each save is mirrored and announced until `stop`."""
    project_of = {folder: (project, project_id) for project, folder, project_id in sessions}
    with ExitStack() as stack:
        writer = Writer(url)
        stack.callback(writer.close)

        def mirror(folder: str) -> tuple[str, str]:
            with open(f"{folder}/state.json", "rb") as f:
                mtime_ns = os.fstat(f.fileno()).st_mtime_ns
                data = f.read()
            project, project_id = project_of[folder]
            slug = os.path.basename(folder)
            now = datetime.now(UTC).isoformat(" ")
            writer.write(raw_row(project_id, slug, data, mtime_ns, now))
            return project, slug

        fd, folder_of = inotify(list(project_of))
        stack.callback(os.close, fd)
        for folder in project_of:
            mirror(folder)
        server = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        server.bind(socket_path)
        server.listen(1)
        ready.set()
        conn, _ = server.accept()
        stack.enter_context(conn)
        conn.makefile("rb").readline()  # the subscribe request
        conn.sendall(b'{"ok": true, "result": {}}\n')
        while not stop.is_set():
            readable, _, _ = select.select([fd, conn.fileno()], [], [], 0.5)
            if conn.fileno() in readable:
                return  # the subscriber hung up: the measurement is over
            if fd not in readable:
                continue
            lines = []
            for folder in changed(os.read(fd, 65536), folder_of):
                project, slug = mirror(folder)
                at = datetime.now(UTC).isoformat()
                lines.append(
                    orjson.dumps({"kind": "session.updated", "project": project, "slug": slug, "at": at})
                )
            if lines:
                conn.sendall(b"\n".join(lines) + b"\n")

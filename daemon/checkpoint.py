"""SQLite WAL checkpoints on a thread of their own, so that no commit waits for one.

By default SQLite checkpoints inside the COMMIT that takes the WAL past 1,000 pages: that commit
copies the WAL into the database file and fsyncs it, which in a cold reconcile is about a third
of the wall time, and for a live save is a stall of tens of milliseconds every few megabytes.
Our connections turn that off (`wal_autocheckpoint=0`, daemon/db.py) and `Store.write` calls
`committed` after each commit: past `WAL_BYTES` the checkpointer thread runs a PASSIVE
checkpoint on a connection of its own while the writer goes on reading files (SQLite releases
the GIL while it copies). A checkpoint that has caught up lets the next write transaction start
the WAL over, and `journal_size_limit` then cuts the file back to `WAL_BYTES`.

Should the thread fall behind (the writer never pauses, a reader holds an old snapshot), the WAL
still cannot grow without bound: past `INLINE_BYTES` the writer checkpoints on its own connection
right after its commit, as SQLite itself would have. Writes that do not go through
`Store.write` (registering a project, marking a reconcile) are small, and the next batch's
commit covers them; SQLite also checkpoints when the last connection closes.
"""

from __future__ import annotations

import os
import sqlite3
import threading

from loguru import logger

# SQLite's own threshold (1,000 pages of 4 KiB), kept as the point the thread is woken at.
WAL_BYTES = 4 * 1024 * 1024
# Past this the writer checkpoints itself: the thread is not keeping up.
INLINE_BYTES = 16 * WAL_BYTES
# How long the thread's connection waits for the database file's locks when opening it.
_OPEN_TIMEOUT_S = 5.0


def wal_bytes(path: str) -> int:
    """The size of the database's WAL file (0 when there is none)."""
    try:
        return os.stat(f"{path}-wal").st_size
    except OSError:
        return 0


class Checkpointer:
    """One thread for the process: the files whose WAL is due, checkpointed in turn."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: set[str] = set()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Have the thread running (once per process): a store on a SQLite file starts it when it
        opens, so that the daemon's threads are as many whatever it writes."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
                self._thread.start()

    def committed(self, path: str, conn: sqlite3.Connection | None) -> None:
        """A transaction on `path` committed on `conn`: wake the thread if its WAL is due, or
        checkpoint on `conn` at once if the thread has fallen behind."""
        size = wal_bytes(path)
        if size > INLINE_BYTES:
            checkpoint(path, conn)
        elif size > WAL_BYTES:
            self.start()
            with self._lock:
                self._due.add(path)
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                due, self._due = self._due, set()
            for path in due:
                checkpoint(path)


def checkpoint(path: str, conn: sqlite3.Connection | None = None) -> None:
    """A PASSIVE checkpoint of `path` (on `conn`, else on a connection of its own): it copies what
    no reader still needs and never waits. A failure is left for the next one: the file may be
    gone (daemon/service.py rebuilds it) or busy."""
    try:
        own = conn or sqlite3.connect(path, timeout=_OPEN_TIMEOUT_S, isolation_level=None)
        try:
            own.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        finally:
            if conn is None:
                own.close()
    except sqlite3.Error as exc:
        logger.debug("checkpoint of {} not done: {}", path, exc)


checkpointer = Checkpointer()

"""The SQLite mirror as the standard library sees it: the file's modes, the pragmas each connection
sets, and the text a time is stored as. The engine (daemon/db.py) and the one-shot reconcile's
shortcut (daemon/quick_reconcile.py) share them, and neither needs SQLAlchemy for them.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from datetime import UTC, datetime

from loguru import logger

from sessionsync.daemon import checkpoint

BUSY_TIMEOUT_MS = 30_000


def make_private(database: str, own_folder: bool) -> None:
    """The mirror holds every session's raw state: create it 0600 (its folder 0700 when it is
    ours), and tighten an existing one whose modes are looser, saying so in one line."""
    folder = os.path.dirname(database)
    wanted: list[tuple[str, int]] = []
    if not os.path.isdir(folder):
        os.makedirs(folder, mode=0o700)
    elif own_folder:
        wanted.append((folder, 0o700))
    try:
        # Created here, empty, so that SQLite never creates it with the umask's 0644; its -wal
        # and -shm files take the database file's mode.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        os.close(os.open(database, flags, 0o600))
    except FileExistsError:
        wanted += [(path, 0o600) for path in (database, f"{database}-wal", f"{database}-shm")]
    changed = [change for path, mode in wanted if (change := _tighten(path, mode))]
    if changed:
        logger.warning(
            "the mirror was readable by other users; made it private (it holds every session's state): {}",
            ", ".join(changed),
        )


def _tighten(path: str, mode: int) -> str:
    """Take away every permission bit outside `mode` from a file of ours; what changed, or ""."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ""
    old = stat.S_IMODE(st.st_mode)
    if not old & ~mode or st.st_uid != os.getuid():
        return ""
    try:
        os.chmod(path, old & mode)
    except OSError as exc:
        logger.warning("{} is readable by other users and cannot be made private: {}", path, exc.strerror)
        return ""
    return f"{path} {old:o} -> {old & mode:o}"


def configure(dbapi_conn: sqlite3.Connection) -> None:
    """The pragmas every connection to the mirror sets (the engine's, and the one-shot reconcile's
    own in daemon/quick_reconcile.py)."""
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    # Switching a new file to WAL takes an exclusive lock and answers "locked" at once, without the
    # busy handler, when another process opens the same new file at that moment: wait like it would.
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    cur.execute("PRAGMA synchronous=NORMAL")
    # Checkpoints run on a thread of their own, not inside a commit (daemon/checkpoint.py).
    cur.execute("PRAGMA wal_autocheckpoint=0")
    cur.execute(f"PRAGMA journal_size_limit={checkpoint.WAL_BYTES}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def sqlite_time(value: datetime | None) -> str | None:
    """What UTCDateTime and SQLite's DATETIME together bind: naive UTC as `YYYY-MM-DD HH:MM:SS.ffffff`."""
    if value is None:
        return None
    if value.tzinfo is UTC:
        # What the product makes (now, file times, parsed timestamps): its text less "+00:00".
        return value.isoformat(" ", "microseconds")[:-6]
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: sessionsync stores aware UTC times only")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")

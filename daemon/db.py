"""Engines for SQLite and PostgreSQL, set up for one writer daemon plus occasional CLI readers."""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from typing import Any

from loguru import logger
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from sessionsync.daemon import checkpoint
from sessionsync.daemon.dburl import check_url, mask_url
from sessionsync.daemon.errors import ConfigError
from sessionsync.models.jsontext import dumps

SQLITE_BUSY_TIMEOUT_MS = 30_000
# How long a PostgreSQL server may take to answer before the connection counts as stalled
# (`[database] timeout_s`).
DEFAULT_TIMEOUT_S = 20.0


def make_engine(
    url: str, *, pool_size: int = 4, own_folder: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S
) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and BEGIN IMMEDIATE writes;
    PostgreSQL gets timeouts and keepalives, and gives up on a server silent for `timeout_s`.
    Statement parameters (whole state.json documents) never reach logs or error messages.

    A SQLite file is made private (0600) before SQLite first opens it; `own_folder` says its
    folder is sessionsync's own (the default state folder), which is kept at 0700 too."""
    try:
        check_url(url)
        parsed = make_url(url)
    except Exception as exc:
        raise ConfigError(f"[database] url = {mask_url(url)!r}: {exc}") from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:":
            make_private(os.path.abspath(database), own_folder)
        engine = create_engine(
            parsed,
            hide_parameters=True,
            json_serializer=dumps,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    # psycopg only now: a SQLite user never pays for importing it.
    from sessionsync.daemon.pg import StallGuardedConnection, pg_connect_args

    if parsed.get_driver_name() != "psycopg":
        parsed = parsed.set(drivername="postgresql+psycopg")  # plain postgresql:// means psycopg 3
    engine = create_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=2,
        pool_pre_ping=True,
        pool_recycle=1800,
        # Parameters are whole state.json documents: keep them out of logs and error messages.
        hide_parameters=True,
        json_serializer=dumps,
        connect_args=pg_connect_args(parsed, timeout_s),
    )

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        conn = StallGuardedConnection.connect(*cargs, **cparams)
        conn.stall_timeout_s = timeout_s
        return conn

    return engine


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


def _sqlite_on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    # Let SQLAlchemy's "begin" hook issue BEGIN itself (the pysqlite driver would defer it).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    # Switching a new file to WAL takes an exclusive lock and answers "locked" at once, without the
    # busy handler, when another process opens the same new file at that moment: wait like it would.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
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


def _sqlite_on_begin(conn: Any) -> None:
    # IMMEDIATE takes the write lock up front: two writers queue on the busy timeout instead of
    # one failing with "database is locked" when it upgrades a read lock mid-transaction.
    conn.exec_driver_sql("BEGIN IMMEDIATE")

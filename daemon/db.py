"""Engines for SQLite and PostgreSQL, set up for one writer daemon plus occasional CLI readers."""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from sessionsync.daemon.errors import ConfigError
from sessionsync.models.jsontext import dumps

SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str, *, pool_size: int = 4) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and BEGIN IMMEDIATE writes.
    Statement parameters (whole state.json documents) never reach logs or error messages."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise ConfigError(f"[database] url is not a valid database URL: {exc}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(database)), exist_ok=True)
        engine = create_engine(
            parsed,
            hide_parameters=True,
            json_serializer=dumps,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    if backend == "postgresql":
        if parsed.get_driver_name() not in ("psycopg", "psycopg_async"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(
            parsed,
            pool_size=pool_size,
            max_overflow=2,
            pool_pre_ping=True,
            pool_recycle=1800,
            # Parameters are whole state.json documents: keep them out of logs and error messages.
            hide_parameters=True,
            json_serializer=dumps,
            connect_args={"connect_timeout": 5, "application_name": "sessionsync"},
        )
    raise ConfigError(
        f"[database] url uses {backend!r}; sessionsync supports sqlite and postgresql",
        'e.g. url = "postgresql+psycopg://me@localhost/sessions", or leave it empty for SQLite',
    )


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
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_on_begin(conn: Any) -> None:
    # IMMEDIATE takes the write lock up front: two writers queue on the busy timeout instead of
    # one failing with "database is locked" when it upgrades a read lock mid-transaction.
    conn.exec_driver_sql("BEGIN IMMEDIATE")

"""Engines for SQLite and PostgreSQL, set up for one writer daemon plus occasional CLI readers."""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from sessionsync.daemon import sqlite_db
from sessionsync.daemon.dburl import check_url, mask_url
from sessionsync.daemon.errors import ConfigError
from sessionsync.models.jsontext import dumps

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
            sqlite_db.make_private(os.path.abspath(database), own_folder)
        engine = create_engine(
            parsed,
            hide_parameters=True,
            json_serializer=dumps,
            connect_args={"timeout": sqlite_db.BUSY_TIMEOUT_MS / 1000},
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


def _sqlite_on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    # Let SQLAlchemy's "begin" hook issue BEGIN itself (the pysqlite driver would defer it).
    dbapi_conn.isolation_level = None
    sqlite_db.configure(dbapi_conn)


def _sqlite_on_begin(conn: Any) -> None:
    # IMMEDIATE takes the write lock up front: two writers queue on the busy timeout instead of
    # one failing with "database is locked" when it upgrades a read lock mid-transaction.
    conn.exec_driver_sql("BEGIN IMMEDIATE")

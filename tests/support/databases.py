"""Fresh databases for tests and benchmarks: numbered SQLite files, a PostgreSQL schema of one's
own, or a PostgreSQL database emptied of sessionsync's tables.

A schema is what tests and chaos runs use: many of them share one server and one database at
once, and each sees only its own tables. The live and reconcile benchmarks empty a whole database
instead (the `--pg-url` one), as their READMEs say.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

# Everything sessionsync creates, migrations' bookkeeping included.
SESSIONSYNC_TABLES = ("session_events", "sessions", "projects", "alembic_version")
MAINTENANCE_DATABASE = "postgres"  # where CREATE DATABASE is sent from


def libpq_url(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as psycopg takes it (no driver name, password kept)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class SqliteFiles:
    """A new, numbered SQLite file in `folder` for every `fresh()`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    def fresh(self, name: str) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count += 1
        return f"sqlite:///{self.folder / f'{name}-{self.count}.db'}"


def ensure_database(url: str) -> None:
    """Create `url`'s database when the server does not have it yet."""
    parsed = make_url(url)
    name = parsed.database or ""
    admin = libpq_url(parsed.set(database=MAINTENANCE_DATABASE).render_as_string(hide_password=False))
    with psycopg.connect(admin, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{name}"')


def empty_postgres_database(url: str) -> str:
    """`url`, its database created when missing and emptied of sessionsync's tables."""
    ensure_database(url)
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {', '.join(SESSIONSYNC_TABLES)} CASCADE")
    return url


def server_version(url: str) -> str:
    with psycopg.connect(libpq_url(url)) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


@dataclass(frozen=True)
class Schema:
    """A schema of one's own: `url` connects with it as the search path."""

    url: str
    name: str
    database: str


@contextmanager
def postgres_schema(
    base: str,
    prefix: str = "t_",
    *,
    create_database: bool = False,
    keep: Callable[[], bool] = lambda: False,
) -> Iterator[Schema]:
    """A new, empty schema in `base`'s database (created first if asked and missing), dropped on
    leaving unless `keep()` says to leave it for inspection."""
    if create_database:
        ensure_database(base)
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq_url(base), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    sep = "&" if "?" in base else "?"
    schema = Schema(f"{base}{sep}options=-csearch_path%3D{name}", name, make_url(base).database or "")
    try:
        yield schema
    finally:
        if not keep():
            with psycopg.connect(libpq_url(base), autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {name} CASCADE")

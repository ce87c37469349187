"""The tables, in SQLAlchemy Core: projects, sessions, session_events.

The column names are a contract (DESIGN.md, "Database contract"); other tools query them.
JSON columns are JSONB on PostgreSQL. Times are stored in UTC and come back timezone-aware.
Core only: the daemon writes through statements, and sqlalchemy.orm would only add to every
start-up's imports (the benchmarks' naive ORM mirror maps these tables in bench/orm.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.types import TypeEngine


class JSONDoc(TypeDecorator[Any]):
    """JSON; JSONB on PostgreSQL, whose dialect is imported only when a PostgreSQL engine uses it
    (a SQLite daemon never loads it: 2 MiB and 20 ms). A None is stored as JSON null, as JSON
    stores it."""

    impl = JSON
    cache_ok = True
    should_evaluate_none = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(JSON())


class UTCDateTime(TypeDecorator[datetime]):
    """timestamptz on PostgreSQL; on SQLite a naive UTC value. Always aware UTC in Python."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: sessionsync stores aware UTC times only")
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


metadata = MetaData(naming_convention=NAMING)

# A folder that holds `agents/sessions`, on one host.
projects = Table(
    "projects",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("host", String(255), nullable=False),
    Column("working_dir", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("sessions_dir", Text, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("last_reconciled_at", UTCDateTime()),
    UniqueConstraint("host", "working_dir"),
)

# The mirror of one session folder's state.json (plus spec.md / plan.json presence).
sessions = Table(
    "sessions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("project_id", ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
    Column("slug", Text, nullable=False),
    Column("session_id", Text),
    Column("title", Text),
    Column("description", Text),
    Column("session_type", Text),
    Column("status", Text),
    Column("current_phase", Text),
    Column("phase_history", JSONDoc),
    Column("git_branch", Text),
    Column("git_worktree", Text),
    Column("git_base_branch", Text),
    Column("checkpoints_total", Integer),
    Column("checkpoints_completed", Integer),
    Column("checkpoints_completed_list", JSONDoc),
    Column("current_checkpoint", Integer),
    Column("commits", JSONDoc),
    Column("artifacts", JSONDoc),
    Column("spec_exists", Boolean, nullable=False, default=False),
    Column("plan_exists", Boolean, nullable=False, default=False),
    Column("schema_version", Integer),
    Column("raw_state", JSONDoc),
    # What the mirror was made from: the skip checks compare these before reading a file.
    Column("state_hash", String(64)),
    Column("state_size", BigInteger),
    Column("state_mtime", UTCDateTime()),
    Column("state_mtime_ns", BigInteger),
    Column("dir_mtime_ns", BigInteger),  # the session folder's (inspection.Probe)
    Column("created_at", UTCDateTime()),
    Column("updated_at", UTCDateTime()),
    Column("first_seen_at", UTCDateTime(), nullable=False),
    Column("synced_at", UTCDateTime(), nullable=False),
    Column("deleted_at", UTCDateTime()),
    # invalid: the file could not be read as a JSON object; the mirrored fields are the last good
    # ones. sync_error also names fields of the wrong type on a row that is otherwise current.
    Column("invalid", Boolean, nullable=False, default=False),
    Column("sync_error", Text),
    Column("sync_error_at", UTCDateTime()),
    UniqueConstraint("project_id", "slug"),
    Index("ix_sessions_phase", "current_phase"),
    Index("ix_sessions_status", "status"),
    # What a reconcile compares each folder with, read from the index alone (migration 0005).
    Index(
        "ix_sessions_stat", "project_id", "slug", "state_size", "state_mtime_ns", "dir_mtime_ns", "deleted_at"
    ),
)

# One meaningful change of a session: created, updated, phase_changed, ...
# Ids are never reused (a subscriber resumes after one): AUTOINCREMENT on SQLite (migration 0004).
session_events = Table(
    "session_events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("session_id", ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    Column("at", UTCDateTime(), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("from_value", Text),
    Column("to_value", Text),
    Column("detail", JSONDoc),
    Index("ix_session_events_session_at", "session_id", "at"),
    sqlite_autoincrement=True,
)

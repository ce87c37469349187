"""SQLAlchemy 2.0 typed tables: projects, sessions, session_events.

The column names are a contract (DESIGN.md, "Database contract"); other tools query them.
JSON columns are JSONB on PostgreSQL. Times are stored in UTC and come back timezone-aware.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
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
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JSONDoc = JSON().with_variant(JSONB(), "postgresql")


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


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Project(Base):
    """A folder that holds `agents/sessions`, on one host."""

    __tablename__ = "projects"
    __table_args__ = (UniqueConstraint("host", "working_dir"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    working_dir: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)
    sessions_dir: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_reconciled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Session(Base):
    """The mirror of one session folder's state.json (plus spec.md / plan.json presence)."""

    __tablename__ = "sessions"
    __table_args__ = (
        UniqueConstraint("project_id", "slug"),
        Index("ix_sessions_phase", "current_phase"),
        Index("ix_sessions_status", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    slug: Mapped[str] = mapped_column(Text)
    session_id: Mapped[str | None] = mapped_column(Text)
    title: Mapped[str | None] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    session_type: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str | None] = mapped_column(Text)
    current_phase: Mapped[str | None] = mapped_column(Text)
    phase_history: Mapped[Any] = mapped_column(JSONDoc, nullable=True)
    git_branch: Mapped[str | None] = mapped_column(Text)
    git_worktree: Mapped[str | None] = mapped_column(Text)
    git_base_branch: Mapped[str | None] = mapped_column(Text)
    checkpoints_total: Mapped[int | None] = mapped_column(Integer)
    checkpoints_completed: Mapped[int | None] = mapped_column(Integer)
    checkpoints_completed_list: Mapped[Any] = mapped_column(JSONDoc, nullable=True)
    current_checkpoint: Mapped[int | None] = mapped_column(Integer)
    commits: Mapped[Any] = mapped_column(JSONDoc, nullable=True)
    artifacts: Mapped[Any] = mapped_column(JSONDoc, nullable=True)
    spec_exists: Mapped[bool] = mapped_column(Boolean, default=False)
    plan_exists: Mapped[bool] = mapped_column(Boolean, default=False)
    schema_version: Mapped[int | None] = mapped_column(Integer)
    raw_state: Mapped[Any] = mapped_column(JSONDoc, nullable=True)
    # What the mirror was made from: the skip checks compare these before reading a file.
    state_hash: Mapped[str | None] = mapped_column(String(64))
    state_size: Mapped[int | None] = mapped_column(BigInteger)
    state_mtime: Mapped[datetime | None] = mapped_column(UTCDateTime())
    state_mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    dir_mtime_ns: Mapped[int | None] = mapped_column(BigInteger)  # the session folder's (sync.Probe)
    created_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    synced_at: Mapped[datetime] = mapped_column(UTCDateTime())
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # invalid: the file could not be read as a JSON object; the mirrored fields are the last good
    # ones. sync_error also names fields of the wrong type on a row that is otherwise current.
    invalid: Mapped[bool] = mapped_column(Boolean, default=False)
    sync_error: Mapped[str | None] = mapped_column(Text)
    sync_error_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class SessionEvent(Base):
    """One meaningful change of a session: created, updated, phase_changed, ..."""

    __tablename__ = "session_events"
    # Ids are never reused (a subscriber resumes after one): AUTOINCREMENT on SQLite (migration 0004).
    __table_args__ = (
        Index("ix_session_events_session_at", "session_id", "at"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(String(32))
    from_value: Mapped[str | None] = mapped_column(Text)
    to_value: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[Any] = mapped_column(JSONDoc, nullable=True)


projects = cast(Table, Project.__table__)
sessions = cast(Table, Session.__table__)
session_events = cast(Table, SessionEvent.__table__)

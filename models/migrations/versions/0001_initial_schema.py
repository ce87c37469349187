"""Initial schema: projects, sessions, session_events.

Revision ID: 0001
Revises:
Create Date: 2026-11-20
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("working_dir", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("sessions_dir", sa.Text(), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("last_reconciled_at", _time(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_projects")),
        sa.UniqueConstraint("host", "working_dir", name=op.f("uq_projects_host")),
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("slug", sa.Text(), nullable=False),
        sa.Column("session_id", sa.Text(), nullable=True),
        sa.Column("title", sa.Text(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("session_type", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), nullable=True),
        sa.Column("current_phase", sa.Text(), nullable=True),
        sa.Column("phase_history", _json(), nullable=True),
        sa.Column("git_branch", sa.Text(), nullable=True),
        sa.Column("git_worktree", sa.Text(), nullable=True),
        sa.Column("git_base_branch", sa.Text(), nullable=True),
        sa.Column("checkpoints_total", sa.Integer(), nullable=True),
        sa.Column("checkpoints_completed", sa.Integer(), nullable=True),
        sa.Column("checkpoints_completed_list", _json(), nullable=True),
        sa.Column("current_checkpoint", sa.Integer(), nullable=True),
        sa.Column("commits", _json(), nullable=True),
        sa.Column("artifacts", _json(), nullable=True),
        sa.Column("spec_exists", sa.Boolean(), nullable=False),
        sa.Column("plan_exists", sa.Boolean(), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=True),
        sa.Column("raw_state", _json(), nullable=True),
        sa.Column("state_hash", sa.String(length=64), nullable=True),
        sa.Column("state_size", sa.BigInteger(), nullable=True),
        sa.Column("state_mtime", _time(), nullable=True),
        sa.Column("state_mtime_ns", sa.BigInteger(), nullable=True),
        sa.Column("created_at", _time(), nullable=True),
        sa.Column("updated_at", _time(), nullable=True),
        sa.Column("first_seen_at", _time(), nullable=False),
        sa.Column("synced_at", _time(), nullable=False),
        sa.Column("deleted_at", _time(), nullable=True),
        sa.Column("invalid", sa.Boolean(), nullable=False),
        sa.Column("sync_error", sa.Text(), nullable=True),
        sa.Column("sync_error_at", _time(), nullable=True),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_sessions_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sessions")),
        sa.UniqueConstraint("project_id", "slug", name=op.f("uq_sessions_project_id")),
    )
    op.create_index("ix_sessions_phase", "sessions", ["current_phase"])
    op.create_index("ix_sessions_status", "sessions", ["status"])
    op.create_table(
        "session_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("at", _time(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("from_value", sa.Text(), nullable=True),
        sa.Column("to_value", sa.Text(), nullable=True),
        sa.Column("detail", _json(), nullable=True),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.id"],
            name=op.f("fk_session_events_session_id_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_session_events")),
    )
    op.create_index("ix_session_events_session_at", "session_events", ["session_id", "at"])


def downgrade() -> None:
    op.drop_table("session_events")
    op.drop_table("sessions")
    op.drop_table("projects")

"""session_events.id never reused: AUTOINCREMENT on SQLite, so an event id is a durable cursor.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

An event's id is where a subscriber resumes (`subscribe` with `since`). Without AUTOINCREMENT,
SQLite gives a new row max(id) + 1, so purging the newest events would hand their ids out again
and a client holding one would skip the new rows. The table is recreated (SQLite cannot alter a
primary key); the copied rows keep their ids and sqlite_sequence starts past the highest. On
PostgreSQL the id comes from a sequence, which never goes back: nothing to do.
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _recreate(autoincrement: bool) -> None:
    if op.get_context().dialect.name != "sqlite":
        return
    with op.batch_alter_table(
        "session_events", recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
    ):
        pass


def upgrade() -> None:
    _recreate(True)


def downgrade() -> None:
    _recreate(False)

"""sessions.dir_mtime_ns: the session folder's mtime, so a warm reconcile skips the spec/plan checks.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: existing rows have no folder mtime yet, so their next pass checks
    # spec.md and plan.json as before and records it.
    op.add_column("sessions", sa.Column("dir_mtime_ns", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("dir_mtime_ns")

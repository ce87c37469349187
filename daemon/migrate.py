"""Schema migrations with Alembic, run from code.

Several processes may start at once against one PostgreSQL database (a daemon and a one-shot
reconcile, or two machines): an advisory lock makes them take turns, and the later ones find
nothing left to do. A schema already at the head is read with one query and Alembic is not even
imported: most starts are of that kind, and Alembic costs more to import than the rest of a
reconcile with nothing to do.
"""

from __future__ import annotations

from importlib.resources import files
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, inspect, text

from sessionsync.models.migrations import HEAD

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

# Alembic's own table; its one row names the revision the schema is at.
VERSION_TABLE = "alembic_version"

# Any fixed 64-bit number works; this one spells "sessync" in ASCII.
ADVISORY_LOCK_ID = 0x73657373796E63


def alembic_config() -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(files("sessionsync.models") / "migrations"))
    return cfg


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(conn: Connection) -> str | None:
    """The revision the schema is at, None for a database without sessionsync's schema."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def upgrade(engine: Engine) -> tuple[str | None, str | None]:
    """Bring the schema to head; returns (revision before, revision after)."""
    with engine.connect() as conn:
        at = current_revision(conn)
    if at == HEAD:
        return at, at
    return _upgrade(engine)


def _upgrade(engine: Engine) -> tuple[str | None, str | None]:
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    cfg = alembic_config()
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": ADVISORY_LOCK_ID})
            conn.commit()
        try:
            before = MigrationContext.configure(conn).get_current_revision()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()
            after = MigrationContext.configure(conn).get_current_revision()
        finally:
            if conn.dialect.name == "postgresql":
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": ADVISORY_LOCK_ID})
                conn.commit()
    return before, after

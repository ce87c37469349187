"""The database as it is: every session row and event, read through one NullPool engine per URL,
so nothing stays connected between two polls and a test's PostgreSQL schema can be dropped.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, select
from sqlalchemy.pool import NullPool

from sessionsync.models.tables import projects, session_events, sessions

Key = tuple[str, str]  # (project folder, slug); SessionKey compares equal to it

_engines: dict[str, Engine] = {}


def engine(url: str) -> Engine:
    """The shared engine that reads `url` (NullPool: see above)."""
    if url not in _engines:
        _engines[url] = create_engine(url, poolclass=NullPool)
    return _engines[url]


def rows(url: str) -> dict[Key, dict[str, Any]]:
    """Every session row, tombstoned ones too, by (project folder, slug)."""
    found: dict[Key, dict[str, Any]] = {}
    for row in session_rows(url):
        key = (row["project"], row["slug"])
        if key in found:
            raise AssertionError(f"two session rows for {key}: {found[key]} and {row}")
        found[key] = row
    return found


def session_rows(url: str) -> list[dict[str, Any]]:
    """Every session row as it is, with its project folder as `project`."""
    query = select(projects.c.working_dir.label("project"), sessions).join(
        projects, sessions.c.project_id == projects.c.id
    )
    with engine(url).connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def events(url: str) -> list[dict[str, Any]]:
    """Every session event, oldest first, with its project folder and slug."""
    query = (
        select(
            session_events,
            projects.c.working_dir.label("project"),
            sessions.c.slug.label("slug"),
        )
        .join(sessions, session_events.c.session_id == sessions.c.id)
        .join(projects, sessions.c.project_id == projects.c.id)
        .order_by(session_events.c.id)
    )
    with engine(url).connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]

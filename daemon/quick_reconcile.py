"""`sessionsync reconcile` when nothing changed, answered with the standard library alone.

Most one-shot reconciles (by hand, from cron, from a UI after its own save) find every folder as its
row says. Telling that takes one read of the rows' stats and two lstat calls per session, which a
SQLite mirror answers through the standard library's sqlite3; importing SQLAlchemy and the store
would cost more (about 150 ms) than the whole check. So `reconcile_unchanged` makes the check the
full pass makes (`inspection.not_unchanged`), and when every folder passes it, it does what the full
pass would then do, marking the projects reconciled, and returns the same summary.

At the first doubt it returns None and writes nothing, and the full reconcile (daemon/reconcile.py)
runs and says what it finds: a URL that is not a plain SQLite file, the file missing or not at the
head revision, a project not registered or moved, a folder that does not match its row, a live
row whose folder is gone, a sessions folder that cannot be listed, any SQLite error.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from collections.abc import Sequence
from contextlib import closing
from datetime import UTC, datetime

from sessionsync.daemon.discovery import ProjectPath, list_slugs
from sessionsync.daemon.inspection import gone, to_inspect
from sessionsync.daemon.results import ReconcileSummary
from sessionsync.daemon.sqlite_db import BUSY_TIMEOUT_MS, configure, make_private, sqlite_time
from sessionsync.models.migrations import HEAD

# The URL form the shortcut reads; any other (a driver named, query parameters, escapes) goes the
# full way, through SQLAlchemy's parser.
_PLAIN = "sqlite:///"


def reconcile_unchanged(url: str, own_folder: bool, found: Sequence[ProjectPath]) -> ReconcileSummary | None:
    """The summary of a reconcile of `found` that had nothing to write (the projects now marked
    reconciled), or None: the full reconcile must run."""
    started = time.perf_counter()
    database = url[len(_PLAIN) :]
    if not url.startswith(_PLAIN) or "?" in url or "%" in url or database in ("", ":memory:"):
        return None
    if not os.path.isfile(database):
        return None
    make_private(os.path.abspath(database), own_folder)  # as the engine does before it opens the file
    try:
        with closing(sqlite3.connect(database, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)) as conn:
            configure(conn)
            checked = _check(conn, found)
            if checked is None:
                return None
            summary, project_ids = checked
            _mark_reconciled(conn, project_ids)
    except sqlite3.Error:
        return None
    summary.seconds = time.perf_counter() - started
    return summary


def _check(
    conn: sqlite3.Connection, found: Sequence[ProjectPath]
) -> tuple[ReconcileSummary, list[int]] | None:
    """The summary and the project ids, when the schema is at the head and every project is
    registered where it is and has nothing to write."""
    (revision,) = conn.execute("SELECT version_num FROM alembic_version").fetchone() or (None,)
    if revision != HEAD:
        return None
    registered = {
        path: (project_id, sessions_dir)
        for project_id, path, sessions_dir in conn.execute(
            "SELECT id, working_dir, sessions_dir FROM projects WHERE host = ?", (socket.gethostname(),)
        )
    }
    summary = ReconcileSummary(projects=len(found))
    project_ids = []
    for project in found:
        project_id, sessions_dir = registered.get(project.path, (None, None))
        if project_id is None or sessions_dir != project.sessions_dir:
            return None
        seen = _unchanged_folders(conn, project_id, project.sessions_dir)
        if seen is None:
            return None
        summary.seen += seen
        project_ids.append(project_id)
    summary.totals.unchanged = summary.seen
    return summary, project_ids


def _unchanged_folders(conn: sqlite3.Connection, project_id: int, sessions_dir: str) -> int | None:
    """How many session folders the project has, when each matches its row and every live row
    has its folder; otherwise None."""
    try:
        slugs = list_slugs(sessions_dir)
    except OSError:
        return None
    rows = {  # inspection.Stat, the driver's rows as they come
        row[1]: row
        for row in conn.execute(
            "SELECT project_id, slug, state_size, state_mtime_ns, dir_mtime_ns, deleted_at IS NOT NULL"
            " FROM sessions WHERE project_id = ?",
            (project_id,),
        )
    }
    if gone(rows, slugs) or to_inspect(sessions_dir, slugs, rows):
        return None  # a row to tombstone, or a folder to look at
    return len(slugs)


def _mark_reconciled(conn: sqlite3.Connection, project_ids: Sequence[int]) -> None:
    if not project_ids:
        return
    at = sqlite_time(datetime.now(UTC))
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(
            "UPDATE projects SET last_reconciled_at = ? WHERE id = ?", [(at, pid) for pid in project_ids]
        )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")

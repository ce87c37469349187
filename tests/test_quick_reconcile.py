"""The one-shot reconcile's shortcut (daemon/quick_reconcile.py) on a real SQLite mirror: it answers
only when the full pass would have had nothing to write, with the full pass's summary and its
mark on the projects; at any doubt it answers None and writes nothing, for the full pass to run."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from sessionsync.daemon.db import make_engine
from sessionsync.daemon.discovery import ProjectPath, project_at
from sessionsync.daemon.migrate import upgrade
from sessionsync.daemon.quick_reconcile import reconcile_unchanged
from sessionsync.daemon.reconcile import reconcile, register
from sessionsync.daemon.results import ReconcileSummary
from sessionsync.daemon.store import Store
from sessionsync.models.tables import projects
from tests.support.sessions import age_sessions, fixture_doc, remove_session, write_state

MAX = 1_048_576
SESSIONS = "agents/sessions"


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "state" / "sessions.db"


@pytest.fixture
def store(database: Path) -> Iterator[Store]:
    engine = make_engine(f"sqlite:///{database}")
    upgrade(engine)
    yield Store(engine)
    engine.dispose()


@pytest.fixture
def mirrored(store: Store, project: Path) -> Path:
    """A project of three sessions, untouched for an hour and mirrored."""
    write_state(project, "a", fixture_doc("v2-build"))
    write_state(project, "b", fixture_doc("v2-spec"))
    write_state(project, "broken", b"{not json")
    age_sessions(project)
    full(store, project)
    return project


def full(store: Store, *folders: Path, subdir: str = SESSIONS) -> ReconcileSummary:
    refs = register(store, [project_at(str(f), subdir) for f in folders])
    return reconcile(store, list(refs.values()), MAX, batch_size=2)


def quick(
    database: Path, *folders: Path, url: str | None = None, subdir: str = SESSIONS
) -> ReconcileSummary | None:
    found: list[ProjectPath] = [project_at(str(f), subdir) for f in folders]
    return reconcile_unchanged(url or f"sqlite:///{database}", False, found)


def contents(database: Path) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(database) as conn:
        return {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in ("projects", "sessions", "session_events", "alembic_version")
        }


def counts(summary: ReconcileSummary) -> dict[str, int | float]:
    return {k: v for k, v in summary.as_dict().items() if k != "ms"}


def test_nothing_changed_answers_as_the_full_pass_and_marks_the_project(
    store: Store, database: Path, mirrored: Path
) -> None:
    expected = counts(full(store, mirrored))  # the full pass over the same folders: nothing to write
    with store.engine.connect() as conn:
        (marked,) = conn.execute(select(projects.c.last_reconciled_at)).scalars()
    before = contents(database)

    answer = quick(database, mirrored)

    assert answer is not None
    assert counts(answer) == expected == counts(ReconcileSummary(projects=1, seen=3)) | {"unchanged": 3}
    after = contents(database)
    assert {t: rows for t, rows in after.items() if t != "projects"} == {
        t: rows for t, rows in before.items() if t != "projects"
    }
    with store.engine.connect() as conn:  # stored as SQLAlchemy stores it: it reads back aware and later
        (now_marked,) = conn.execute(select(projects.c.last_reconciled_at)).scalars()
    assert now_marked.tzinfo is not None and now_marked > marked


def _rewritten(project: Path, _db: Path) -> None:
    write_state(project, "a", fixture_doc("v2-spec"))


def _new_session(project: Path, _db: Path) -> None:
    write_state(project, "c", fixture_doc("v2-spec"))


def _gone(project: Path, _db: Path) -> None:
    remove_session(project, "b")


def _saved_just_now(project: Path, _db: Path) -> None:
    os.utime(project / SESSIONS / "a" / "state.json")  # same bytes, a fresh mtime


def _spec_appeared(project: Path, _db: Path) -> None:
    (project / SESSIONS / "a" / "spec.md").write_text("# spec\n")
    age_sessions(project, 1800)  # old enough to trust, and later than mirrored: the folder's mtime tells


def _sessions_folder_replaced_by_a_file(project: Path, _db: Path) -> None:
    for slug in ("a", "b", "broken"):
        remove_session(project, slug)
    (project / SESSIONS).rmdir()
    (project / SESSIONS).write_text("not a folder")


def _old_schema(_project: Path, db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0004'")


DOUBTS: dict[str, Callable[[Path, Path], None]] = {
    "a state.json rewritten": _rewritten,
    "a new session folder": _new_session,
    "a session folder gone": _gone,
    "a save within the racy window": _saved_just_now,
    "a spec.md appeared": _spec_appeared,
    "the sessions folder is not a folder": _sessions_folder_replaced_by_a_file,
    "the schema not at the head": _old_schema,
}


@pytest.mark.parametrize("doubt", DOUBTS.values(), ids=DOUBTS.keys())
def test_a_doubt_leaves_everything_to_the_full_pass(
    database: Path, mirrored: Path, doubt: Callable[[Path, Path], None]
) -> None:
    doubt(mirrored, database)
    before = contents(database)
    assert quick(database, mirrored) is None
    assert contents(database) == before


def test_a_folder_that_came_back_to_a_tombstone_is_left_to_the_full_pass(
    store: Store, database: Path, mirrored: Path
) -> None:
    remove_session(mirrored, "b")
    assert full(store, mirrored).totals.tombstoned == 1
    write_state(mirrored, "b", fixture_doc("v2-spec"))
    age_sessions(mirrored)
    before = contents(database)
    assert quick(database, mirrored) is None
    assert contents(database) == before


def test_projects_not_registered_where_they_are_are_left_to_the_full_pass(
    store: Store, database: Path, mirrored: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    write_state(other, "x", fixture_doc("v2-spec"))
    age_sessions(other)
    before = contents(database)
    assert quick(database, mirrored, other) is None  # a new project
    (mirrored / "elsewhere").symlink_to(mirrored / "agents")
    assert quick(database, mirrored, subdir="elsewhere/sessions") is None  # its sessions folder moved
    assert contents(database) == before


@pytest.mark.parametrize(
    "url",
    ["sqlite:///{db}?timeout=5", "sqlite+pysqlite:///{db}", "sqlite://", "sqlite:///{db}.missing"],
    ids=["query", "driver named", "in memory", "no such file"],
)
def test_a_url_other_than_a_plain_existing_file_is_left_to_the_full_pass(
    database: Path, mirrored: Path, url: str
) -> None:
    before = contents(database)
    assert quick(database, mirrored, url=url.format(db=database)) is None
    assert contents(database) == before
    assert not Path(f"{database}.missing").exists()

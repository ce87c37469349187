"""The warm reconcile's skip (`inspection.not_unchanged`, two lstat calls per folder) is exactly as
strict as the inspection: each fact it compares, moved alone, gets the session looked at again,
and what the rows then say proves it was. Run on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from sessionsync.daemon.discovery import project_at
from sessionsync.daemon.reconcile import ReconcileSummary, reconcile, register
from sessionsync.daemon.store import Store
from sessionsync.models.tables import sessions
from tests.support.sessions import fixture_doc, write_state

MAX = 1_048_576
HOUR_NS = 3600 * 10**9


def run(store: Store, project: Path) -> ReconcileSummary:
    refs = register(store, [project_at(str(project), "agents/sessions")])
    return reconcile(store, list(refs.values()), MAX, batch_size=3)


def row(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(select(sessions).where(sessions.c.slug == "s")).one()._mapping)


def set_row(engine: Engine, **values: Any) -> None:
    with engine.begin() as conn:
        conn.execute(update(sessions).where(sessions.c.slug == "s").values(**values))


def set_mtime(path: Path, mtime_ns: int) -> int:
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
    return mtime_ns


@pytest.fixture
def folder(store: Store, engine: Engine, project: Path) -> Path:
    """Session "s", mirrored, its folder and state.json dated an hour ago (trusted for skipping);
    a second pass skips it."""
    folder = write_state(project, "s", fixture_doc("v2-spec")).parent
    set_mtime(folder / "state.json", time.time_ns() - HOUR_NS)
    set_mtime(folder, time.time_ns() - HOUR_NS)
    run(store, project)
    assert (row(engine)["state_mtime_ns"], row(engine)["dir_mtime_ns"]) == (
        (folder / "state.json").stat().st_mtime_ns,
        folder.stat().st_mtime_ns,
    )
    totals = run(store, project).totals
    assert (totals.unchanged, totals.touched, totals.written) == (1, 0, 0)
    return folder


def test_a_state_json_mtime_moved_alone_is_looked_at(
    store: Store, engine: Engine, project: Path, folder: Path
) -> None:
    moved = set_mtime(folder / "state.json", time.time_ns() - 2 * HOUR_NS)  # same bytes, same size
    totals = run(store, project).totals
    assert (totals.touched, totals.written) == (1, 0)
    assert row(engine)["state_mtime_ns"] == moved


def test_a_state_json_size_changed_alone_is_looked_at(
    store: Store, engine: Engine, project: Path, folder: Path
) -> None:
    state = folder / "state.json"
    recorded = state.stat().st_mtime_ns
    # Rewritten in place (the folder's mtime stays), then dated back to the recorded mtime.
    write_state(project, "s", {**fixture_doc("v2-spec"), "topic": "a longer title than before"}, atomic=False)
    set_mtime(state, recorded)
    assert folder.stat().st_mtime_ns == row(engine)["dir_mtime_ns"]
    assert run(store, project).totals.written == 1
    assert row(engine)["title"] == "a longer title than before"


def test_a_folder_mtime_moved_alone_is_looked_at(
    store: Store, engine: Engine, project: Path, folder: Path
) -> None:
    (folder / "spec.md").write_text("spec")
    set_mtime(folder, time.time_ns() - 2 * HOUR_NS)
    assert run(store, project).totals.written == 1
    assert row(engine)["spec_exists"] is True


def test_a_folder_mtime_inside_the_racy_window_is_not_trusted_even_when_the_row_has_it(
    store: Store, engine: Engine, project: Path, folder: Path
) -> None:
    # The row holds the folder's very mtime, but one too recent to trust (a mtime in the future,
    # from a clock set back, is as recent as can be): an entry may have come in the same tick.
    (folder / "spec.md").write_text("spec")
    recent = set_mtime(folder, time.time_ns() + 60 * 10**9)
    set_row(engine, dir_mtime_ns=recent)
    assert run(store, project).totals.written == 1
    assert row(engine)["spec_exists"] is True


def test_a_tombstoned_row_whose_folder_is_as_recorded_is_restored(
    store: Store, engine: Engine, project: Path, folder: Path
) -> None:
    set_row(engine, deleted_at=datetime.now(UTC))
    assert run(store, project).totals.written == 1
    assert row(engine)["deleted_at"] is None


def test_a_folder_replaced_by_a_link_with_the_recorded_mtime_is_looked_at(
    store: Store, engine: Engine, project: Path, folder: Path, tmp_path: Path
) -> None:
    # Through the link, state.json's stat is as recorded; only the folder's type tells.
    recorded = row(engine)["dir_mtime_ns"]
    elsewhere = tmp_path / "elsewhere"
    folder.rename(elsewhere)
    folder.symlink_to(elsewhere)
    set_mtime(folder, recorded)
    assert os.lstat(folder).st_mtime_ns == recorded
    assert run(store, project).totals.invalid == 1
    assert "symbolic link" in row(engine)["sync_error"]


def test_a_state_json_replaced_by_a_link_with_the_recorded_stat_is_looked_at(
    store: Store, engine: Engine, project: Path, folder: Path, tmp_path: Path
) -> None:
    # The row made to hold the link's own size and mtime, the folder dated back: only the type tells.
    recorded_dir = row(engine)["dir_mtime_ns"]
    state = folder / "state.json"
    elsewhere = tmp_path / "elsewhere.json"
    state.rename(elsewhere)
    state.symlink_to(elsewhere)
    set_mtime(folder, recorded_dir)
    link = os.lstat(state)
    set_row(engine, state_size=link.st_size, state_mtime_ns=link.st_mtime_ns)
    assert run(store, project).totals.invalid == 1
    assert "symbolic link" in row(engine)["sync_error"]

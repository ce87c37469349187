"""The store and reconcile contract, run against SQLite and PostgreSQL alike: what the rows say
after real files are reconciled, which events are written, and what bad input gets."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, delete, event, null, select
from sqlalchemy import exc as sa_exc

from sessionsync.daemon.batch import load_known, sync_batch
from sessionsync.daemon.checkpoint import INLINE_BYTES, wal_bytes
from sessionsync.daemon.db import make_engine
from sessionsync.daemon.discovery import project_at
from sessionsync.daemon.migrate import alembic_config, head_revision, upgrade
from sessionsync.daemon.reconcile import PRELOAD_GROUP, reconcile, register
from sessionsync.daemon.results import BatchResult, ReconcileSummary
from sessionsync.daemon.store import Store, is_row_fault, is_transient
from sessionsync.models.keys import SessionKey
from sessionsync.models.migrations import HEAD
from sessionsync.models.tables import JSONDoc, metadata, projects, session_events, sessions
from tests.conftest import require_postgres
from tests.support.databases import libpq_url, postgres_schema
from tests.support.sessions import fixture_doc, remove_session, write_state
from tests.support.waiting import wait_for

MAX = 1_048_576


def run(store: Store, *folders: Path) -> ReconcileSummary:
    refs = register(store, [project_at(str(f), "agents/sessions") for f in folders])
    return reconcile(store, list(refs.values()), MAX, batch_size=3)


def row(engine: Engine, slug: str, project: Path | None = None) -> dict[str, Any]:
    query = select(sessions).where(sessions.c.slug == slug)
    if project is not None:
        query = query.join(projects).where(projects.c.working_dir == str(project))
    with engine.connect() as conn:
        return dict(conn.execute(query).one()._mapping)


def events(engine: Engine, slug: str | None = None) -> list[str]:
    query = select(session_events.c.kind).order_by(session_events.c.id)
    if slug is not None:
        query = query.join(sessions).where(sessions.c.slug == slug)
    with engine.connect() as conn:
        return list(conn.execute(query).scalars())


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return len(conn.execute(select(table)).all())


def test_models_and_migrations_agree(engine: Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    assert diff == []


def test_upgrade_twice_is_a_no_op(engine: Engine) -> None:
    assert upgrade(engine) == (HEAD, HEAD)


def test_the_head_constant_is_alembics_head() -> None:
    # A start at the head skips Alembic by this constant: a new migration must move it.
    assert head_revision() == HEAD


def test_examples_mirror_as_the_readme_says(store: Store, engine: Engine, project: Path) -> None:
    for name in ("v1-build", "v2-build", "v2-complete-quick", "v2-spec"):
        write_state(project, name, fixture_doc(name))
    (project / "agents/sessions/v2-build/spec.md").write_text("# spec")
    summary = run(store, project)
    assert (summary.seen, summary.totals.written) == (4, 4)

    v1 = row(engine, "v1-build")
    assert (v1["current_phase"], v1["status"], v1["session_type"], v1["schema_version"]) == (
        "build",
        "active",
        "full",
        1,
    )
    assert (v1["checkpoints_total"], v1["checkpoints_completed"], v1["current_checkpoint"]) == (5, 2, 3)
    assert v1["checkpoints_completed_list"] == [1, 2]
    assert [c["checkpoint"] for c in v1["commits"]] == [1, 2]
    assert v1["phase_history"]["plan_completed_at"] == "2025-12-11T11:00:00+00:00"
    assert v1["phase_history"]["docs_started_at"] is None
    assert (v1["git_branch"], v1["git_worktree"], v1["git_base_branch"]) == (None, None, None)
    assert v1["artifacts"] == {"spec": "spec.md", "plan": "plan.json", "plan_readable": "plan.md"}
    assert v1["title"] == "Billing CSV export"
    assert v1["session_id"] == "2025-12-11_billing-export"
    assert v1["created_at"] == datetime(2025, 12, 11, 8, 0, tzinfo=UTC)
    assert v1["sync_error"] is None
    assert not v1["invalid"]

    v2 = row(engine, "v2-build")
    assert (v2["schema_version"], v2["checkpoints_total"], v2["checkpoints_completed"]) == (2, 6, 4)
    assert (v2["git_branch"], v2["git_base_branch"]) == ("feature/incremental-index", "main")
    assert v2["raw_state"]["agent_notes"] == "extra fields like this one must survive in raw_state"
    assert (v2["spec_exists"], v2["plan_exists"]) == (True, False)
    assert v2["state_hash"] and v2["state_size"] > 0

    quick = row(engine, "v2-complete-quick")
    assert (quick["status"], quick["current_phase"], quick["session_type"]) == (
        "complete",
        "complete",
        "quick",
    )
    assert quick["updated_at"] == datetime(2026, 1, 8, 10, 52, tzinfo=UTC)
    spec = row(engine, "v2-spec")
    assert (spec["checkpoints_total"], spec["checkpoints_completed"], spec["checkpoints_completed_list"]) == (
        0,
        0,
        [],
    )
    assert events(engine) == ["created"] * 4


def test_second_reconcile_with_nothing_changed_writes_nothing(
    store: Store, engine: Engine, project: Path
) -> None:
    write_state(project, "a", fixture_doc("v2-build"))
    write_state(project, "b", b"{broken")
    run(store, project)
    before = (count(engine, session_events), row(engine, "a")["synced_at"], row(engine, "b")["synced_at"])
    summary = run(store, project)
    assert (summary.totals.written, summary.totals.tombstoned, summary.totals.events) == (0, 0, [])
    after = (count(engine, session_events), row(engine, "a")["synced_at"], row(engine, "b")["synced_at"])
    assert after == before


def test_after_release_memory_the_store_goes_on_writing(store: Store, engine: Engine, project: Path) -> None:
    """A full pass ends with `release_memory`: SQLite's idle connections hand back the page caches
    the pass filled, and stay open for the next batch, which writes as before."""
    write_state(project, "a", fixture_doc("v2-spec"))
    run(store, project)
    idle = getattr(engine.pool, "checkedin", lambda: 0)()
    store.release_memory()
    assert getattr(engine.pool, "checkedin", lambda: 0)() == idle
    write_state(project, "a", fixture_doc("v2-build"))
    assert run(store, project).totals.written == 1
    assert row(engine, "a")["current_phase"] == "build"


def test_reconcile_spans_more_projects_than_one_preload_group(
    store: Store, engine: Engine, tmp_path: Path
) -> None:
    folders = [tmp_path / f"p{n:02d}" for n in range(PRELOAD_GROUP + 5)]
    for n, folder in enumerate(folders):
        write_state(folder, f"s{n}", fixture_doc("v2-build"))
    assert run(store, *folders).totals.written == len(folders)
    remove_session(folders[-1], f"s{len(folders) - 1}")  # a project of the second group
    totals = run(store, *folders).totals
    assert (totals.written, totals.tombstoned) == (0, 1)
    assert row(engine, f"s{len(folders) - 1}")["deleted_at"] is not None
    assert row(engine, "s0")["deleted_at"] is None


def test_same_slug_in_two_projects_gives_two_rows(store: Store, engine: Engine, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    write_state(one, "login", fixture_doc("v2-spec"))
    write_state(two, "login", fixture_doc("v2-build"))
    run(store, one, two)
    assert row(engine, "login", one)["current_phase"] == "spec"
    assert row(engine, "login", two)["current_phase"] == "build"


def test_change_events_follow_the_file(store: Store, engine: Engine, project: Path) -> None:
    doc = fixture_doc("v2-spec")
    write_state(project, "s", doc)
    run(store, project)
    doc["description"] = "new words"
    write_state(project, "s", doc)
    run(store, project)
    doc["current_phase"] = "plan"
    write_state(project, "s", doc)
    run(store, project)
    doc["status"] = "failed"
    write_state(project, "s", doc)
    run(store, project)
    write_state(project, "s", b"")
    run(store, project)
    write_state(project, "s", doc)
    run(store, project)
    remove_session(project, "s")
    run(store, project)
    assert row(engine, "s")["deleted_at"] is not None
    write_state(project, "s", doc)
    run(store, project)
    assert row(engine, "s")["deleted_at"] is None
    assert events(engine, "s") == [
        "created",
        "updated",
        "phase_changed",
        "status_changed",
        "invalid",
        "recovered",
        "deleted",
        "restored",
    ]


def test_invalid_file_keeps_the_last_good_mirror(store: Store, engine: Engine, project: Path) -> None:
    write_state(project, "s", fixture_doc("v2-build"))
    run(store, project)
    write_state(project, "s", b'{"session_id": "cut off mid-wr')
    summary = run(store, project)
    assert summary.totals.invalid == 1
    r = row(engine, "s")
    assert r["invalid"]
    assert "not valid JSON" in r["sync_error"]
    assert r["current_phase"] == "build" and r["checkpoints_total"] == 6
    write_state(project, "s", fixture_doc("v2-spec"))
    run(store, project)
    r = row(engine, "s")
    assert (r["invalid"], r["sync_error"], r["current_phase"]) == (False, None, "spec")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty"),
        (b"\xff\xfe{}", "UTF-8"),
        (b'{"a": "x\x00y"}', ""),
        (b"[]", "list"),
        (b'"x"', ""),
        (b"3", ""),
        (b"[" * 100 + b"]" * 100, ""),
        (b'{"topic": "\\u0000"}', ""),
    ],
)
def test_unreadable_documents_are_invalid_and_never_hide_others(
    store: Store, engine: Engine, project: Path, content: bytes, reason: str
) -> None:
    write_state(project, "bad", content)
    write_state(project, "good", fixture_doc("v2-spec"))
    run(store, project)
    bad = row(engine, "bad")
    assert bad["invalid"]
    assert reason in bad["sync_error"]
    assert bad["sync_error_at"] is not None
    assert not row(engine, "good")["invalid"]


def test_bom_nan_and_duplicate_keys_are_accepted(store: Store, engine: Engine, project: Path) -> None:
    write_state(project, "bom", b"\xef\xbb\xbf" + json.dumps(fixture_doc("v2-spec")).encode())
    write_state(project, "nan", b'{"topic": "t", "topic": "second", "score": NaN, "x": [Infinity]}')
    run(store, project)
    assert row(engine, "bom")["current_phase"] == "spec"
    nan = row(engine, "nan")
    assert not nan["invalid"]
    assert nan["title"] == "second"
    assert nan["raw_state"]["score"] is None and nan["raw_state"]["x"] == [None]


def test_integers_beyond_64_bits_are_stored_exactly(store: Store, engine: Engine, project: Path) -> None:
    # orjson writes neither these nor reads them exactly: both directions fall back to the stdlib.
    big = 123456789012345678901234567890
    write_state(project, "big", f'{{"topic": "t", "n": {big}, "l": [-{big}, "Café"]}}')
    run(store, project)
    assert row(engine, "big")["raw_state"] == {"topic": "t", "n": big, "l": [-big, "Café"]}


def test_wrong_field_type_nulls_only_that_field(store: Store, engine: Engine, project: Path) -> None:
    doc = fixture_doc("v2-build")
    doc["build_progress"]["checkpoints_total"] = "lots"
    doc["commits"] = {}
    doc["status"] = "pondering"
    doc["session_id"] = "not-the-folder-name"
    write_state(project, "s", doc)
    run(store, project)
    r = row(engine, "s")
    assert r["checkpoints_total"] is None and r["commits"] is None
    assert "checkpoints_total" in r["sync_error"] and "commits" in r["sync_error"]
    assert not r["invalid"]
    assert (r["status"], r["current_phase"], r["checkpoints_completed"]) == ("pondering", "build", 4)
    assert r["session_id"] == "not-the-folder-name" and r["slug"] == "s"


def test_oversized_file_is_invalid_and_not_read_past_the_limit(
    store: Store, engine: Engine, project: Path
) -> None:
    doc = fixture_doc("v2-spec")
    doc["padding"] = "x" * 4096
    write_state(project, "big", doc)
    refs = register(store, [project_at(str(project), "agents/sessions")])
    summary = reconcile(store, list(refs.values()), max_bytes=2048, batch_size=10)
    assert summary.totals.invalid == 1
    r = row(engine, "big")
    assert r["invalid"] and "max_state_bytes (2048)" in r["sync_error"]
    assert r["raw_state"] is None


def test_links_are_never_followed(store: Store, engine: Engine, project: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write_state(outside, "secret", fixture_doc("v2-build"))
    sessions_dir = project / "agents" / "sessions"
    os.symlink(outside / "agents/sessions/secret", sessions_dir / "linked-folder")
    (sessions_dir / "linked-file").mkdir()
    os.symlink(outside / "agents/sessions/secret/state.json", sessions_dir / "linked-file/state.json")
    run(store, project)
    for slug in ("linked-folder", "linked-file"):
        r = row(engine, slug)
        assert r["invalid"] and "symbolic link" in r["sync_error"]
        assert r["raw_state"] is None and r["title"] is None


def test_folder_without_state_json_gets_no_row_and_a_vanished_one_is_tombstoned(
    store: Store, engine: Engine, project: Path
) -> None:
    (project / "agents/sessions/empty").mkdir()
    write_state(project, "s", fixture_doc("v2-spec"))
    summary = run(store, project)
    assert summary.totals.no_state == 1
    assert count(engine, sessions) == 1
    (project / "agents/sessions/s/state.json").unlink()
    assert run(store, project).totals.tombstoned == 1
    assert row(engine, "s")["deleted_at"] is not None


def test_spec_and_plan_presence_follow_the_folder(store: Store, engine: Engine, project: Path) -> None:
    write_state(project, "s", fixture_doc("v2-spec"))
    run(store, project)
    assert (row(engine, "s")["spec_exists"], row(engine, "s")["plan_exists"]) == (False, False)
    (project / "agents/sessions/s/spec.md").write_text("spec")
    (project / "agents/sessions/s/plan.json").write_text("{}")
    assert run(store, project).totals.written == 1
    assert (row(engine, "s")["spec_exists"], row(engine, "s")["plan_exists"]) == (True, True)
    (project / "agents/sessions/s/plan.json").unlink()
    run(store, project)
    assert row(engine, "s")["plan_exists"] is False


def age(path: Path, seconds: float) -> int:
    """Date `path` `seconds` in the past (past the racy window, so its mtime is trusted); its mtime."""
    mtime = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
    return mtime


def test_an_old_folder_is_trusted_until_an_entry_changes(store: Store, engine: Engine, project: Path) -> None:
    folder = write_state(project, "s", fixture_doc("v2-spec")).parent
    age(folder / "state.json", 3600)
    recorded = age(folder, 3600)
    run(store, project)
    assert row(engine, "s")["dir_mtime_ns"] == recorded
    # A new entry moves the folder's mtime, so the artifacts are looked at again.
    (folder / "spec.md").write_text("spec")
    assert run(store, project).totals.written == 1
    assert row(engine, "s")["spec_exists"] is True
    assert row(engine, "s")["dir_mtime_ns"] is None  # modified just now: not trusted yet
    # A scratch file that came and went changes nothing but the folder's mtime: remembered, no event.
    age(folder, 3600)
    run(store, project)
    (folder / "notes.tmp").write_text("x")
    (folder / "notes.tmp").unlink()
    moved = age(folder, 1800)
    before = count(engine, session_events)
    totals = run(store, project).totals
    assert (totals.written, totals.touched, count(engine, session_events)) == (0, 1, before)
    assert row(engine, "s")["dir_mtime_ns"] == moved
    assert run(store, project).totals.touched == 0


def test_a_database_at_0001_upgrades_keeping_its_rows(db_url: str, project: Path) -> None:
    """0002 adds sessions.dir_mtime_ns to a database that holds rows; the next pass fills it."""
    folder = write_state(project, "s", fixture_doc("v2-build")).parent
    age(folder / "state.json", 3600)
    recorded = age(folder, 3600)
    engine = make_engine(db_url)
    try:
        cfg = alembic_config()
        with engine.connect() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0001")
            conn.commit()
        store = Store(engine)
        now = datetime.now(UTC)
        with engine.begin() as conn:
            project_id = conn.execute(
                projects.insert()
                .values(
                    host=store.host,
                    working_dir=str(project),
                    name="proj",
                    sessions_dir=str(project / "agents/sessions"),
                    created_at=now,
                )
                .returning(projects.c.id)
            ).scalar_one()
            conn.execute(
                sessions.insert().values(
                    project_id=project_id,
                    slug="s",
                    title="mirrored before 0002",
                    spec_exists=False,
                    plan_exists=False,
                    first_seen_at=now,
                    synced_at=now,
                    invalid=False,
                )
            )
        assert upgrade(engine) == ("0001", HEAD)
        mirrored = row(engine, "s")
        assert (mirrored["title"], mirrored["dir_mtime_ns"]) == ("mirrored before 0002", None)
        run(store, project)
        mirrored = row(engine, "s")
        assert (mirrored["title"], mirrored["dir_mtime_ns"]) == ("Search index rebuild", recorded)
    finally:
        engine.dispose()


def test_concurrent_reconciles_leave_one_row_per_session(db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "p"
    for i in range(60):
        write_state(folder, f"s{i:02}", fixture_doc("v2-build"))
    engines = [make_engine(db_url) for _ in range(2)]
    upgrade(engines[0])
    errors: list[BaseException] = []

    def go(engine: Engine) -> None:
        try:
            run(Store(engine), folder)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert count(engines[0], sessions) == 60
    assert count(engines[0], projects) == 1
    for e in engines:
        e.dispose()


def test_purge_removes_only_old_tombstones(store: Store, engine: Engine, project: Path) -> None:
    write_state(project, "old", fixture_doc("v2-spec"))
    write_state(project, "new", fixture_doc("v2-spec"))
    write_state(project, "live", fixture_doc("v2-spec"))
    run(store, project)
    remove_session(project, "old")
    remove_session(project, "new")
    run(store, project)
    with engine.begin() as conn:
        conn.execute(
            sessions.update()
            .where(sessions.c.slug == "old")
            .values(deleted_at=datetime.now(UTC) - timedelta(days=8))
        )
    assert store.purge_tombstones(timedelta(days=7)) == 1
    with engine.connect() as conn:
        assert sorted(conn.execute(select(sessions.c.slug)).scalars()) == ["live", "new"]


# --- the batch writer: a row the database refuses, a connection lost mid-pass ------------------------
# With three sessions a batch, on PostgreSQL batch N+1 is read while batch N is in the pipeline
# (daemon/writer.py); these check that a failure there costs nothing but the time to redo it.

REFUSE_POISON = {
    "postgresql": [
        """CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.title = 'poison' THEN RAISE EXCEPTION 'poison refused'; END IF; RETURN NEW; END $$""",
        """CREATE TRIGGER refuse_poison BEFORE INSERT OR UPDATE ON sessions
           FOR EACH ROW EXECUTE FUNCTION refuse_poison()""",
    ],
    "sqlite": [
        """CREATE TRIGGER refuse_poison BEFORE INSERT ON sessions WHEN NEW.title = 'poison'
           BEGIN SELECT RAISE(ABORT, 'poison refused'); END""",
    ],
}


def created_events(engine: Engine) -> dict[str, int]:
    query = select(sessions.c.slug).join(session_events).where(session_events.c.kind == "created")
    with engine.connect() as conn:
        slugs = list(conn.execute(query).scalars())
    return {slug: slugs.count(slug) for slug in slugs}


def test_a_row_the_database_refuses_costs_only_its_own_session(
    store: Store, engine: Engine, project: Path
) -> None:
    slugs = [f"s{n}" for n in range(9)]
    for slug in slugs:
        write_state(project, slug, {**fixture_doc("v2-build"), "topic": "poison" if slug == "s4" else slug})
    with engine.begin() as conn:
        for ddl in REFUSE_POISON[engine.dialect.name]:
            conn.exec_driver_sql(ddl)

    summary = run(store, project)

    assert summary.totals.written == 9
    refused = row(engine, "s4")
    assert refused["invalid"] is True
    assert refused["sync_error"].startswith("the database refused this state")
    assert "poison refused" in refused["sync_error"]
    for slug in slugs:
        if slug != "s4":
            assert (row(engine, slug)["title"], row(engine, slug)["invalid"]) == (slug, False)
    assert created_events(engine) == dict.fromkeys(slugs, 1)


def backend_pids(engine: Engine) -> set[int]:
    """The server processes of every connection `engine` opens from now on. Only these may be
    killed: other tests (and other runs) share the server."""
    pids: set[int] = set()
    event.listen(engine, "connect", lambda dbapi_conn, _record: pids.add(dbapi_conn.info.backend_pid))
    return pids


def terminate(url: str, pids: set[int]) -> list[int]:
    """Kill the server side of these connections (as a restart or an admin would), and wait until
    they are gone."""
    import psycopg

    libpq = libpq_url(url)
    alive = "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)"
    with psycopg.connect(libpq, autocommit=True) as conn:
        killed = sorted(pids)
        for pid in killed:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_for(lambda: not list(conn.execute(alive, (killed,))))
    return killed


# The first write of the title 'slow' stalls in the server (a sequence counts across rollbacks), so
# the connection is cut with that batch still uncommitted.
STALL_ONCE = [
    "CREATE SEQUENCE stalls",
    """CREATE FUNCTION stall_once() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN IF NEW.title = 'slow' AND nextval('stalls') = 1 THEN PERFORM pg_sleep(60); END IF;
       RETURN NEW; END $$""",
    "CREATE TRIGGER stall_once BEFORE INSERT ON sessions FOR EACH ROW EXECUTE FUNCTION stall_once()",
]


@pytest.mark.postgres
def test_a_connection_lost_mid_reconcile_is_redone_without_duplicates(pg_url: str, project: Path) -> None:
    titles = {f"s{n:02}": "slow" if n == 4 else f"s{n:02}" for n in range(12)}
    for slug, title in titles.items():
        write_state(project, slug, {**fixture_doc("v2-build"), "topic": title})
    engine = make_engine(pg_url)
    pids = backend_pids(engine)
    upgrade(engine)
    with engine.begin() as conn:
        for ddl in STALL_ONCE:
            conn.exec_driver_sql(ddl)
    store = Store(engine)
    refs = list(register(store, [project_at(str(project), "agents/sessions")]).values())
    killed: list[int] = []

    def kill_once(_batch: object) -> None:
        # The first batch is settled; the second (s03-s05) is in the pipeline, stalled at s04.
        if not killed:
            killed.extend(terminate(pg_url, pids))

    try:
        reconcile(store, refs, MAX, batch_size=3, on_batch=kill_once)
        assert killed
        assert {r["slug"]: r["title"] for r in store.query_sessions()} == titles
        assert created_events(engine) == dict.fromkeys(titles, 1)
        # And the next pass finds nothing to do.
        again = reconcile(store, refs, MAX, batch_size=3)
        assert (again.totals.written, again.totals.unchanged + again.totals.touched) == (0, 12)
    finally:
        engine.dispose()


def test_a_summary_says_which_sessions_were_not_read_for_now() -> None:
    # A reconcile that met EMFILE for some sessions wrote nothing for them; its one-line summary
    # (what `sessionsync reconcile` prints) must not read like a complete pass.
    summary = ReconcileSummary(projects=1, seen=3)
    summary.totals.add(BatchResult(unchanged=1, retry=[(SessionKey("/p", "a"), "Too many open files")] * 2))
    said = ", 2 not read for now (Too many open files; nothing written for them: run it again)"
    assert said in summary.line()
    assert summary.as_dict()["not_read_for_now"] == 2
    assert "not read" not in ReconcileSummary(projects=1, seen=3).line()


def test_a_write_whose_project_row_is_gone_is_the_databases_fault_not_the_sessions(engine: Engine) -> None:
    # As when the SQLite file is rebuilt while a batch for the old project ids is on its way.
    now = datetime.now(UTC)
    orphan = sessions.insert().values(project_id=999_999, slug="s", first_seen_at=now, synced_at=now)
    with pytest.raises(sa_exc.IntegrityError) as refused, engine.begin() as conn:
        conn.execute(orphan)
    assert is_transient(refused.value)
    assert not is_row_fault(refused.value)
    # A row's own fault stays its own: a second project of the same folder and host.
    project = projects.insert().values(
        host="h", working_dir="/p", name="p", sessions_dir="/p/s", created_at=now
    )
    with engine.begin() as conn:
        conn.execute(project)
    with pytest.raises(sa_exc.IntegrityError) as duplicate, engine.begin() as conn:
        conn.execute(project)
    assert is_row_fault(duplicate.value) and not is_transient(duplicate.value)


@contextmanager
def _second_database(db_url: str, tmp_path: Path) -> Iterator[Engine]:
    """An empty, migrated database of the same kind as `db_url`'s."""
    if db_url.startswith("sqlite"):
        engine = make_engine(f"sqlite:///{tmp_path / 'copy.db'}")
        upgrade(engine)
        yield engine
        engine.dispose()
        return
    with postgres_schema(require_postgres()) as schema:
        engine = make_engine(schema.url)
        upgrade(engine)
        yield engine
        engine.dispose()


def _raw_rows(engine: Engine, table: Any) -> list[Any]:
    """The table's rows as the database holds them: SQLite's values, PostgreSQL's row text (which
    tells SQL NULL from JSON null)."""
    sql = f"SELECT * FROM {table.name} ORDER BY id"
    if engine.dialect.name == "postgresql":
        sql = f"SELECT t::text FROM {table.name} AS t ORDER BY id"
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(sql)]


def test_rows_hold_what_sqlalchemy_itself_would_bind(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """Batches bind their values themselves (store._Bulk on SQLite, times and JSON as text;
    store._RecordsetUpsert on PostgreSQL, the rows as one JSON array), not through SQLAlchemy's
    per-row processing: every column of every row must hold what SQLAlchemy would have stored for
    the same values. Copied through SQLAlchemy into a second database, the raw rows must come out
    identical."""
    project = tmp_path / "p"
    for name in ("v1-build", "v2-build", "v2-spec", "v2-complete-quick"):
        write_state(project, name, fixture_doc(name))
    write_state(project, "broken", b"{not json")
    write_state(project, "nulls", {**fixture_doc("v2-build"), "commits": None, "phase_history": None})
    store = Store(engine)
    run(store, project)
    remove_session(project, "v2-spec")  # a tombstone
    write_state(project, "v1-build", {**fixture_doc("v1-build"), "current_phase": "plan"})
    run(store, project)
    tables = (projects, sessions, session_events)
    with _second_database(db_url, tmp_path) as copy:
        with engine.connect() as source, copy.begin() as target:
            for table in tables:
                rows = [dict(r._mapping) for r in source.execute(select(table))]
                for r in rows:  # SQL NULL stays NULL (SQLAlchemy binds a JSON None as JSON null)
                    for c in table.columns:
                        if isinstance(c.type, JSONDoc) and _is_null(source, table, c.name, r["id"]):
                            r[c.name] = null()
                target.execute(table.insert(), rows)
        fast, copied = ({t.name: _raw_rows(e, t) for t in tables} for e in (engine, copy))
    assert len(fast["sessions"]) == 6 and len(fast["session_events"]) >= 8
    assert fast == copied
    # A None in a JSON column is JSON null, as SQLAlchemy binds it; SQL NULL only where the batch
    # writes no value (the invalid row's document columns).
    with engine.connect() as conn:
        nulls = select(sessions.c.commits.is_(None), sessions.c.phase_history.is_(None))
        assert conn.execute(nulls.where(sessions.c.slug == "nulls")).one() == (False, False)
        assert conn.execute(nulls.where(sessions.c.slug == "broken")).one() == (True, True)


def _is_null(conn: Any, table: Any, column: str, row_id: int) -> bool:
    query = select(table.c[column].is_(None)).where(table.c.id == row_id)
    return bool(conn.execute(query).scalar_one())


def test_an_event_whose_session_row_is_gone_is_left_out_and_the_others_keep_their_ids(
    store: Store, engine: Engine, tmp_path: Path
) -> None:
    project = tmp_path / "p"
    write_state(project, "a", fixture_doc("v2-spec"))
    write_state(project, "b", fixture_doc("v2-build"))
    run(store, project)
    refs = {r.path: r for r in store.known_projects()}
    keys = [SessionKey(str(project), "a"), SessionKey(str(project), "b")]
    known = load_known(store, refs, keys)  # read before b's row is deleted by hand
    with engine.begin() as conn:
        b_id = conn.execute(select(sessions.c.id).where(sessions.c.slug == "b")).scalar_one()
        conn.execute(delete(session_events).where(session_events.c.session_id == b_id))
        conn.execute(delete(sessions).where(sessions.c.id == b_id))
    write_state(project, "a", {**fixture_doc("v2-spec"), "current_phase": "plan"})
    remove_session(project, "b")  # its tombstone's event finds no row
    result = sync_batch(store, refs, keys, MAX, known=known)
    with engine.connect() as conn:
        stored = conn.execute(
            select(session_events.c.id, session_events.c.kind)
            .where(session_events.c.session_id != b_id)
            .order_by(session_events.c.id.desc())
            .limit(len(result.events))
        ).all()
    assert {e["slug"] for e in result.events} == {"a"}
    assert sorted((e["id"], e["kind"]) for e in result.events) == sorted(
        (i, f"session.{k}") for i, k in stored
    )


def test_sqlite_checkpoints_run_beside_the_writer_and_keep_the_wal_bounded(tmp_path: Path) -> None:
    """No commit checkpoints (wal_autocheckpoint=0): the checkpointer thread copies the WAL into
    the database file while the connections stay open, and the WAL never grows past the point
    where the writer would checkpoint itself."""
    database = tmp_path / "sessions.db"
    engine = make_engine(f"sqlite:///{database}")
    try:
        upgrade(engine)
        project = tmp_path / "p"
        doc = {**fixture_doc("v2-build"), "key_decisions": ["x" * 2000]}
        for n in range(2500):
            write_state(project, f"s{n:04d}", {**doc, "session_id": f"s{n:04d}"})
        store = Store(engine)
        biggest = 0

        def watch(_result: BatchResult) -> None:
            nonlocal biggest
            biggest = max(biggest, wal_bytes(str(database)))

        refs = register(store, [project_at(str(project), "agents/sessions")])
        summary = reconcile(store, list(refs.values()), MAX, batch_size=100, on_batch=watch)
        assert summary.totals.written == 2500
        # ~12 MB written: the database file holds it while every connection is still open.
        wait_for(lambda: database.stat().st_size > 8_000_000, timeout=10)
        assert biggest <= INLINE_BYTES + 2_000_000
    finally:
        engine.dispose()

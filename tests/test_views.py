"""The views of migration 0003 on SQLite and PostgreSQL: each against what the file oracle reads
from a set of session folders mirrored by the real reconcile, the example queries of
docs/database.md against the output the docs show, and the migration's round trip."""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Engine, inspect, text

from sessionsync.daemon.discovery import project_at
from sessionsync.daemon.migrate import alembic_config, upgrade
from sessionsync.daemon.reconcile import reconcile, register
from sessionsync.daemon.store import Store
from sessionsync.models.migrations import HEAD
from tests.support.oracle import (
    Expectation,
    expected_from_bytes,
    expected_from_files,
    phase_times,
)
from tests.support.sessions import fixture_doc, remove_session, write_state
from tests.support.snapshot import session_rows

DOCS = Path(__file__).resolve().parent.parent / "docs" / "database.md"
DOC_ROOT = "/home/me/code"  # where the docs' example projects live
OLD = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)  # the mtime of the "stale" files
VIEWS = {"live_sessions", "session_phases", "project_summary"}


def _failed() -> dict[str, Any]:
    doc = fixture_doc("v2-build")
    doc.update(topic="Payment retries", status="failed")
    # Offsets, a naive time (UTC) and microseconds: all must land as the same UTC instants.
    doc["phase_history"] = {
        "spec_started_at": "2026-02-01T10:00:00+02:00",
        "spec_completed_at": "2026-02-01 09:30:00.250000",
        "plan_started_at": "2026-02-01T09:31:00Z",
        "plan_completed_at": "2026-02-01T05:00:00-05:00",
        "build_started_at": "2026-02-02T08:00:00+05:30",
        "build_completed_at": "2026-02-02T10:15:00.5Z",
        "docs_started_at": None,
        "docs_completed_at": None,
    }
    return doc


def _odd_times() -> dict[str, Any]:
    doc = fixture_doc("v2-spec")
    doc["topic"] = "Odd phase times"
    doc["phase_history"] = {
        "spec_started_at": "2026-02-30T10:00:00Z",  # no such day
        "spec_completed_at": "yesterday",
        "plan_started_at": 1234,
        "plan_completed_at": "2026-03-01T24:00:00",  # no such hour
        "review_started_at": "2026-03-01T23:30:00-05:00",  # a phase of its own, crossing midnight
        "review_completed_at": "2026-03-02T10:00:00.000001+23:59",
        "notes": "not a phase key",
    }
    return doc


def _many_checkpoints() -> dict[str, Any]:
    doc = fixture_doc("v2-build")
    doc["topic"] = "Rate limiter"
    doc["build_progress"] = {
        "checkpoints_total": 8,
        "checkpoints_completed": [1, 2, 3, 4, 5, 6],
        "current_checkpoint": 7,
    }
    return doc


class Mirror:
    """Two projects and an empty one, mirrored by reconcile, with what their files said."""

    def __init__(self, root: Path, engine: Engine) -> None:
        self.root = root
        self.shop, self.api, self.empty = root / "shop", root / "api", root / "docs-site"
        (self.empty / "agents" / "sessions").mkdir(parents=True)
        self.store = Store(engine)
        for name in ("v1-build", "v2-build", "v2-complete-quick", "v2-spec"):
            write_state(self.shop, name, fixture_doc(name))
        write_state(self.shop, "gone", fixture_doc("v2-build"))
        write_state(self.api, "payments", _failed())
        write_state(self.api, "odd-times", _odd_times())
        write_state(self.api, "limiter", _many_checkpoints())
        write_state(self.api, "cutoff", fixture_doc("v2-build"))
        no_history = fixture_doc("v2-build")
        no_history.update(topic="No history", phase_history=None)
        write_state(self.api, "no-history", no_history)
        bad_v1 = fixture_doc("v1-build")
        bad_v1.update(topic="Bad v1 phases", phases={"spec": "yes"})
        write_state(self.api, "bad-v1", bad_v1)
        self.reconcile()
        # Then: one session goes (tombstoned), one turns unreadable keeping its last good mirror,
        # one never was readable.
        self.last_good = {
            (str(self.api), "cutoff"): (self.api / "agents/sessions/cutoff/state.json").read_bytes()
        }
        remove_session(self.shop, "gone")
        write_state(self.api, "cutoff", b'{"topic": "Search')
        write_state(self.api, "array", b"[]")
        for slug in ("v1-build", "v2-spec"):
            os.utime(self.shop / "agents/sessions" / slug / "state.json", (OLD.timestamp(), OLD.timestamp()))
        self.reconcile()

    def reconcile(self) -> None:
        refs = register(self.store, [project_at(str(p), "agents/sessions") for p in self.projects()])
        reconcile(self.store, list(refs.values()), 1_048_576, batch_size=4)

    def projects(self) -> list[Path]:
        return [self.shop, self.api, self.empty]

    def expected(self) -> dict[tuple[str, str], tuple[Expectation, dict[str, Any] | None]]:
        """Each live session's expectation and the document its mirror holds (None: never good)."""
        found = {}
        for key, want in expected_from_files(self.projects()).items():
            data = self.last_good.get(key)
            if data is None and want.valid:
                data = (Path(key[0]) / "agents/sessions" / key[1] / "state.json").read_bytes()
            doc = None if data is None else json.loads(data)
            found[key] = (want, doc)
        return found


@pytest.fixture
def mirror(tmp_path: Path, engine: Engine) -> Mirror:
    return Mirror((tmp_path / "code").resolve(), engine)


def query(engine: Engine, sql: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(sql))]


def utc(value: Any) -> datetime | None:
    """A view's time: aware on PostgreSQL, `YYYY-MM-DD HH:MM:SS.ffffff` UTC text on SQLite."""
    if value is None or isinstance(value, datetime):
        return None if value is None else value.astimezone(UTC)
    return datetime.fromisoformat(str(value)).replace(tzinfo=UTC)


def test_live_sessions_are_the_live_folders_with_their_projects(engine: Engine, mirror: Mirror) -> None:
    rows = {(r["project"], r["slug"]): r for r in query(engine, "SELECT * FROM live_sessions")}
    expected = mirror.expected()
    assert set(rows) == set(expected)  # "gone" is tombstoned, so not here
    for key, (want, doc) in expected.items():
        row = rows[key]
        assert (row["project_name"], row["host"]) == (Path(key[0]).name, mirror.store.host)
        assert bool(row["invalid"]) == (not want.valid), key
        mirrored = want if doc is None or want.valid else expected_from_bytes(json.dumps(doc).encode())
        if doc is None:
            assert row["title"] is None and row["current_phase"] is None
            continue
        for name in ("title", "current_phase", "status", "checkpoints_total", "checkpoints_completed"):
            assert row[name] == getattr(mirrored, name), (key, name)
    table = {(r["project"], r["slug"]): r for r in session_rows(str(engine.url)) if r["deleted_at"] is None}
    for key, row in rows.items():
        assert utc(row["file_changed_at"]) == (table[key]["state_mtime"] or table[key]["synced_at"])
    assert utc(rows[(str(mirror.shop), "v1-build")]["file_changed_at"]) == OLD


def test_session_phases_are_the_phase_times_of_the_files(engine: Engine, mirror: Mirror) -> None:
    rows = query(engine, "SELECT * FROM session_phases")
    got = {
        (r["project"], r["slug"], r["phase"]): (utc(r["started_at"]), utc(r["completed_at"]), r["duration_s"])
        for r in rows
    }
    assert len(got) == len(rows)
    want = {}
    for key, (_, doc) in mirror.expected().items():
        for phase, (started, completed) in ({} if doc is None else phase_times(doc)).items():
            duration = None if started is None or completed is None else (completed - started).total_seconds()
            want[(*key, phase)] = (started, completed, duration)
    assert got == want
    # A few by hand, so that the oracle and the views cannot be wrong together.
    api = str(mirror.api)
    assert got[(api, "payments", "build")][2] == 27900.5  # 02:30Z to 10:15:00.5Z
    assert got[(api, "payments", "spec")][2] == 5400.25  # 08:00Z to 09:30:00.25 naive (UTC)
    assert got[(api, "odd-times", "review")][:2] == (
        datetime(2026, 3, 2, 4, 30, tzinfo=UTC),
        datetime(2026, 3, 1, 10, 1, 0, 1, tzinfo=UTC),
    )
    assert not any(k[1] in {"odd-times"} and k[2] in {"spec", "plan"} for k in got)
    assert not any(k[1] in {"no-history", "bad-v1", "array", "gone"} for k in got)
    assert (api, "cutoff", "build") in got  # the last good mirror's


def test_project_summary_counts_each_projects_live_sessions(engine: Engine, mirror: Mirror) -> None:
    rows = {r["project"]: r for r in query(engine, "SELECT * FROM project_summary")}
    assert set(rows) == {str(p) for p in mirror.projects()}
    table = session_rows(str(engine.url))
    for project in mirror.projects():
        live = [
            (want if doc is None or want.valid else expected_from_bytes(json.dumps(doc).encode()), want.valid)
            for key, (want, doc) in mirror.expected().items()
            if key[0] == str(project)
        ]
        row = rows[str(project)]
        assert row["sessions"] == len(live)
        for phase in ("spec", "plan", "build", "docs", "complete"):
            assert row[f"phase_{phase}"] == sum(m.current_phase == phase for m, _ in live), (project, phase)
        phases = {"spec", "plan", "build", "docs", "complete"}
        assert row["phase_other"] == sum(m.current_phase not in phases for m, _ in live)
        for status in ("active", "complete", "failed"):
            assert row[f"status_{status}"] == sum(m.status == status for m, _ in live), (project, status)
        assert row["status_other"] == sum(m.status not in {"active", "complete", "failed"} for m, _ in live)
        assert row["invalid"] == sum(not valid for _, valid in live)
        synced = [r["synced_at"] for r in table if r["project"] == str(project)]
        assert utc(row["last_change_at"]) == (max(synced) if synced else None)
    assert (rows[str(mirror.api)]["invalid"], rows[str(mirror.api)]["status_failed"]) == (2, 1)
    assert rows[str(mirror.empty)]["sessions"] == 0


# -- the docs ----------------------------------------------------------------------------------------


def documented_examples() -> list[tuple[str, str | None, str, list[list[str]]]]:
    """(heading, dialect or None for both, query, rows shown) for each query of "Example queries"."""
    section = DOCS.read_text().split("\n## Example queries\n", 1)[1].split("\n## ", 1)[0]
    found = []
    pending: list[tuple[str, str | None, str]] = []
    heading = ""
    for match in re.finditer(
        r"(?m)^### ([^\n]+)$|^(PostgreSQL|SQLite)[^\n]*:\n\n```sql\n(.*?)```"
        r"|^```sql\n(.*?)```|^```\n(.*?)```",
        section,
        re.S,
    ):
        title, dialect, tagged, plain, output = match.groups()
        if title:
            heading = title
        elif tagged or plain:
            pending.append((heading, dialect and dialect.lower(), tagged or plain))
        else:
            lines = [line for line in output.splitlines() if line.strip()]
            shown = [[cell.strip() for cell in line.split("|")] for line in lines[2:]]
            found += [(h, d, q, shown) for h, d, q in pending]
            pending = []
    return found


def cell(value: Any) -> Any:
    """One value as compared: times as UTC instants, numbers as floats, the rest as text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float | Decimal):
        return round(float(value), 6)
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    text = str(value)
    if re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?(\+00)?", text):
        return datetime.fromisoformat(text.removesuffix("+00")).replace(tzinfo=UTC)
    if re.fullmatch(r"-?\d+(\.\d+)?", text):
        return round(float(text), 6)
    return {"t": 1.0, "f": 0.0}.get(text, text)


def test_every_documented_example_query_returns_the_rows_the_docs_show(
    engine: Engine, mirror: Mirror
) -> None:
    examples = documented_examples()
    assert len({h for h, _, _, _ in examples}) >= 5, examples
    dialect = engine.dialect.name
    ran = 0
    for heading, only, sql, shown in examples:
        if only is not None and only != dialect:
            continue
        got = [
            [cell(v) for v in row.values()] for row in query(engine, sql.replace(DOC_ROOT, str(mirror.root)))
        ]
        want = [[cell(c.replace(DOC_ROOT, str(mirror.root))) for c in row] for row in shown]
        assert got == want, f"{heading}:\n{sql}"
        ran += 1
    assert ran >= 5


# -- the migration -----------------------------------------------------------------------------------


def test_downgrade_drops_the_views_and_upgrade_brings_them_back(engine: Engine, mirror: Mirror) -> None:
    assert set(inspect(engine).get_view_names()) >= VIEWS
    cfg = alembic_config()
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0002")
        conn.commit()
    assert not VIEWS & set(inspect(engine).get_view_names())
    assert len(session_rows(str(engine.url))) == 12  # the tables keep their rows
    assert upgrade(engine) == ("0002", HEAD)
    assert set(inspect(engine).get_view_names()) >= VIEWS
    assert len(query(engine, "SELECT * FROM live_sessions")) == 11

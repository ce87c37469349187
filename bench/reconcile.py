"""Reconcile benchmark: cold and warm reconcile against floors measured in the same run.

Builds trees of realistic session folders, then on SQLite and/or PostgreSQL measures in one
process (time.perf_counter, median of --repeat runs, each product run paired with its floor):

- warm reconcile (nothing changed) against the list + stat floor: os.scandir of every project's
  sessions folder and one os.stat of each state.json;
- cold reconcile (empty database) against the read + parse + raw write floor: per session open,
  fstat, read, orjson.loads, and the same sessions rows written with the bare driver (sqlite3
  executemany / psycopg executemany), one transaction per batch of 256 as the product batches,
  into a fresh database of the product's schema (indexes and foreign key included). It does not
  use the product's `map_state` (its validation costs 2-5x the parse itself, and is part of what
  is measured): plain lookups fill the same columns (JSON columns as text, raw_state as read, the
  same blake2b digest); no event rows, no spec/plan probe;
- a naive ORM mirror (per file: read, parse, select, insert, commit, default engine), up to
  --naive-max sessions.

Targets (issue #13): warm <= 2x list + stat at every size, warm < 0.6 s at 100,000; cold at least
20x faster than the naive ORM (where it ran); cold <= 1.5x read + parse + raw write at 100,000
(printed at every size).
Run (from the repository root):
     .venv/bin/python -m bench.reconcile [--sizes 10000,100000] [--db sqlite|postgres|both]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

import orjson
import psycopg
from loguru import logger
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session as OrmSession

from bench.naive import naive_upsert
from bench.orm import Project
from bench.table import Row, load, median, ratio, render, seconds, versions
from sessionsync.daemon.db import make_engine
from sessionsync.daemon.discovery import ProjectPath
from sessionsync.daemon.migrate import upgrade
from sessionsync.daemon.reconcile import freeze_long_lived, reconcile, register
from sessionsync.daemon.results import ReconcileSummary
from sessionsync.daemon.store import ProjectRef, Store
from sessionsync.models.state import map_state
from tests.support.databases import SqliteFiles, empty_postgres_database, libpq_url, server_version
from tests.support.sessions import FIXTURES

SESSIONS_SUBDIR = os.path.join("agents", "sessions")
MAX_BYTES = 1 << 20
BATCH_SIZE = 256
LARGE = 100_000
# Issue #13's targets: warm within 2x of list + stat (and under 0.6 s at 100,000), cold at least
# 20x faster than the naive ORM, cold within 1.5x of read + parse + raw write at 100,000.
WARM_OVER_FLOOR = 2.0
WARM_LARGE_S = 0.6
NAIVE_OVER_COLD = 20.0
COLD_OVER_FLOOR = 1.5
# Every file is dated at least this far back, well outside sync.RACY_WINDOW_NS.
MTIME_AGE = timedelta(days=2)

WORDS = (
    *("auth", "billing", "search", "index", "cache", "export", "import", "upload", "retry", "queue"),
    *("webhook", "token", "refresh", "schema", "migration", "report", "invoice", "audit", "logging"),
    *("metrics", "pager", "flaky", "test", "docs", "onboarding", "payment", "sync", "backfill"),
    *("cleanup", "rollout", "feature", "flag", "rate", "limit", "session", "storage"),
)
V2_PHASES = ("spec", "plan", "build", "build", "build", "docs", "complete")
V2_STATUSES = ("active", "active", "active", "complete", "failed", "paused", "abandoned")
V1_PHASES = ("spec", "plan", "build", "build")
SESSION_TYPES = ("full", "full", "full", "quick")
NOTES = (
    "Kept the public API unchanged; callers migrate in a follow-up session.",
    "The flaky part was a race between the upload ack and the cleanup job.",
    "Chose incremental updates over a nightly rebuild: the index is 40 GB.",
    "Open question: do we backfill the last 90 days or start from today?",
    "Benchmarks on staging show p95 latency down from 480 ms to 95 ms.",
    "Rolled back once: the migration locked the invoices table for 12 s.",
)


# --- the session tree ---------------------------------------------------------------------------


def load_templates() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The example documents that map cleanly, split into (v1, v2); malformed examples are skipped."""
    v1: list[dict[str, Any]] = []
    v2: list[dict[str, Any]] = []
    for path in sorted(FIXTURES.glob("*.json")):
        try:
            doc = json.loads(path.read_bytes())
        except ValueError:
            continue
        if not isinstance(doc, dict) or map_state(doc).field_errors:
            continue
        (v2 if "phase_history" in doc or "build_progress" in doc else v1).append(doc)
    if not (v1 and v2):
        raise SystemExit(f"no v1 and v2 example state.json files in {FIXTURES}")
    return v1, v2


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _commits(rng: random.Random, count: int, start: datetime, v1: bool) -> list[dict[str, Any]]:
    key = "checkpoint_id" if v1 else "checkpoint"
    return [
        {
            "sha": f"{rng.getrandbits(28):07x}",
            "message": f"{rng.choice(('feat', 'fix', 'test', 'refactor'))}: {' '.join(rng.sample(WORDS, 3))}",
            key: n,
            "created_at": _iso(start + timedelta(minutes=37 * n)),
        }
        for n in range(1, count + 1)
    ]


def make_document(rng: random.Random, template: dict[str, Any], slug: str) -> dict[str, Any]:
    """A variation of an example document: its own slug, phase, status, times and commits."""
    doc = copy.deepcopy(template)
    v1 = "phase_history" not in doc and "build_progress" not in doc
    created = datetime(2025, 6, 1, tzinfo=UTC) + timedelta(minutes=rng.randrange(400 * 24 * 60))
    total = rng.randint(1, 9)
    done = rng.randint(0, total)
    doc.update(
        session_id=slug,
        topic=" ".join(rng.sample(WORDS, 3)).capitalize(),
        description=rng.choice(NOTES),
        created_at=_iso(created),
        updated_at=_iso(created + timedelta(minutes=rng.randrange(1, 5000))),
        commits=_commits(rng, done, created, v1),
    )
    progress = {
        "checkpoints_total": total,
        "checkpoints_completed": list(range(1, done + 1)),
        "current_checkpoint": done + 1 if done < total else None,
    }
    if v1:
        doc["current_phase"] = rng.choice(V1_PHASES)
        doc["granularity"] = rng.choice(SESSION_TYPES)
        doc["plan_state"] = {**doc.get("plan_state", {}), **progress}
    else:
        doc["current_phase"] = rng.choice(V2_PHASES)
        doc["status"] = rng.choice(V2_STATUSES)
        doc["session_type"] = rng.choice(SESSION_TYPES)
        doc["build_progress"] = progress
        doc["git"] = {
            "branch": f"feature/{slug.split('_', 1)[1]}",
            "worktree": rng.choice((None, f"/home/dev/code/wt/{slug}")),
            "base_branch": rng.choice(("main", "main", "develop")),
        }
    # Agents keep notes and decisions in the file too; they bring it to the usual ~2 KB.
    target = rng.randint(1700, 2500)
    decisions: list[str] = doc.setdefault("key_decisions", [])
    while len(json.dumps(doc, indent=2)) < target:
        decisions.append(rng.choice(NOTES))
    return doc


@dataclass
class Tree:
    """The built session folders: where they are and the precomputed state.json paths."""

    projects: list[ProjectPath]
    state_files: list[str]
    bytes_written: int


def build_tree(root: Path, sessions: int, project_count: int, seed: int = 7) -> Tree:
    """`sessions` session folders spread over `project_count` projects, all dated in the past."""
    v1_templates, v2_templates = load_templates()
    rng = random.Random(seed)
    past = time.time_ns() - int(MTIME_AGE.total_seconds() * 1e9)
    projects = [
        ProjectPath(str(root / f"project-{p:04d}"), str(root / f"project-{p:04d}" / SESSIONS_SUBDIR))
        for p in range(project_count)
    ]
    state_files = []
    total = 0
    for n in range(sessions):
        project = projects[n % project_count]
        date = datetime(2025, 1, 1) + timedelta(days=rng.randrange(500))
        slug = f"{date:%Y-%m-%d}_{'-'.join(rng.sample(WORDS, 2))}-{n}"
        # A mix of generations: roughly 30% legacy v1 documents, the rest v2.
        template = rng.choice(v1_templates if rng.random() < 0.3 else v2_templates)
        doc = make_document(rng, template, slug)
        folder = os.path.join(project.sessions_dir, slug)
        os.makedirs(folder)
        data = json.dumps(doc, indent=2).encode()
        state = os.path.join(folder, "state.json")
        with open(state, "wb") as f:
            f.write(data)
        total += len(data)
        # Sessions past the spec phase have a spec and a plan, as the agents leave them.
        if doc["current_phase"] != "spec":
            for name in ("spec.md", "plan.json"):
                with open(os.path.join(folder, name), "w") as f:
                    f.write(f"# {doc['topic']}\n")
        mtime = past - rng.randrange(30 * 24 * 3600) * 1_000_000_000
        os.utime(state, ns=(mtime, mtime))
        os.utime(folder, ns=(mtime, mtime))  # as old as its last entry, as on a real disk
        state_files.append(state)
    return Tree(projects, state_files, total)


# --- databases ----------------------------------------------------------------------------------


class Backend(Protocol):
    """A way to get an empty database (no sessionsync tables) over and over."""

    name: str

    def fresh_url(self) -> str: ...

    def describe(self) -> str: ...


class SqliteBackend:
    """A new SQLite file for every fresh database."""

    name = "sqlite"

    def __init__(self, folder: Path) -> None:
        self.files = SqliteFiles(folder)

    def fresh_url(self) -> str:
        return self.files.fresh("bench")

    def describe(self) -> str:
        return f"SQLite {sqlite3.sqlite_version}, files in {self.files.folder}"


class PostgresBackend:
    """One PostgreSQL database whose sessionsync tables are dropped for every fresh start."""

    name = "postgres"

    def __init__(self, url: str) -> None:
        self.url = url
        self.version = ""

    def fresh_url(self) -> str:
        self.version = server_version(empty_postgres_database(self.url))
        return self.url

    def describe(self) -> str:
        return f"PostgreSQL {self.version} at {make_url(self.url).render_as_string(hide_password=True)}"


@contextmanager
def daemon_store(backend: Backend, tree: Tree) -> Iterator[tuple[Store, list[ProjectRef]]]:
    """An empty, migrated database with the daemon's engine settings and the projects registered."""
    engine = make_engine(backend.fresh_url())
    try:
        upgrade(engine)
        store = Store(engine, host="bench")
        refs = register(store, tree.projects)
        yield store, [refs[p.path] for p in tree.projects]
    finally:
        engine.dispose()


# --- the measurements ---------------------------------------------------------------------------


_P = ParamSpec("_P")
_R = TypeVar("_R")


def timed(action: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> tuple[float, _R]:
    """Seconds `action(*args, **kwargs)` took, by time.perf_counter, and what it returned."""
    started = time.perf_counter()
    outcome = action(*args, **kwargs)
    return time.perf_counter() - started, outcome


def check_cold(summary: ReconcileSummary, tree: Tree) -> None:
    t = summary.totals
    expected = len(tree.state_files)
    assert (t.written, t.invalid) == (expected, 0), f"cold reconcile: {summary.line()}; expected {expected}"


def check_warm(summary: ReconcileSummary) -> None:
    t = summary.totals
    assert t.written == t.touched == t.tombstoned == 0, f"warm reconcile changed rows: {summary.line()}"


def list_stat_floor(tree: Tree) -> int:
    """The warm floor: list every project's sessions folder, one os.stat of each state.json."""
    count = 0
    for project in tree.projects:
        with os.scandir(project.sessions_dir) as entries:
            for entry in entries:
                os.stat(f"{entry.path}/state.json")
                count += 1
    return count


# The sessions columns the raw write fills: every column the product writes for a new session,
# minus the ones the raw write has no cheap value for (sync_error, deleted_at, ...: NULL there too).
RAW_COLUMNS = (
    *("project_id", "slug", "session_id", "title", "description", "session_type", "status"),
    *("current_phase", "phase_history", "git_branch", "git_worktree", "git_base_branch"),
    *("checkpoints_total", "checkpoints_completed", "checkpoints_completed_list", "current_checkpoint"),
    *("commits", "artifacts", "spec_exists", "plan_exists", "schema_version", "raw_state"),
    *("state_hash", "state_size", "state_mtime", "state_mtime_ns", "created_at", "updated_at"),
    *("first_seen_at", "synced_at", "invalid"),
)
JSON_COLUMNS = frozenset(("phase_history", "checkpoints_completed_list", "commits", "artifacts", "raw_state"))


def raw_row(project_id: int, slug: str, data: bytes, mtime_ns: int, now: str) -> tuple[Any, ...]:
    """One sessions row from a state.json's bytes: orjson, then plain lookups (no validation, no
    defaults, no v1 translation beyond picking the v1 key), JSON columns as text."""
    doc = orjson.loads(data)
    v2 = "phase_history" in doc or "build_progress" in doc
    progress = doc.get("build_progress" if v2 else "plan_state") or {}
    git = doc.get("git") or {}
    completed = progress.get("checkpoints_completed") or []
    mtime = datetime.fromtimestamp(mtime_ns / 1e9, UTC).isoformat(" ")
    return (
        *(project_id, slug, doc.get("session_id"), doc.get("topic"), doc.get("description")),
        *(doc.get("session_type") or doc.get("granularity"), doc.get("status"), doc.get("current_phase")),
        orjson.dumps(doc.get("phase_history" if v2 else "phases")).decode(),
        *(git.get("branch"), git.get("worktree"), git.get("base_branch")),
        *(progress.get("checkpoints_total"), len(completed), orjson.dumps(completed).decode()),
        progress.get("current_checkpoint"),
        *(orjson.dumps(doc.get("commits")).decode(), orjson.dumps(doc.get("artifacts")).decode()),
        *(False, False, 2 if v2 else 1, data.decode()),
        *(hashlib.blake2b(data, digest_size=16).hexdigest(), len(data), mtime, mtime_ns),
        *(doc.get("created_at"), doc.get("updated_at"), now, now, False),
    )


def raw_batches(tree: Tree, project_ids: dict[str, int]) -> Iterator[list[tuple[Any, ...]]]:
    """Every session's row, BATCH_SIZE at a time, as the product batches them: list a project's
    sessions folder, then per folder open, fstat, read, parse."""
    now = datetime.now(UTC).isoformat(" ")
    batch: list[tuple[Any, ...]] = []
    for project in tree.projects:
        project_id = project_ids[project.sessions_dir]
        with os.scandir(project.sessions_dir) as entries:
            names = [entry.name for entry in entries]
        for slug in names:
            with open(f"{project.sessions_dir}/{slug}/state.json", "rb") as f:
                mtime_ns = os.fstat(f.fileno()).st_mtime_ns
                data = f.read()
            batch.append(raw_row(project_id, slug, data, mtime_ns, now))
            if len(batch) == BATCH_SIZE:
                yield batch
                batch = []
    if batch:
        yield batch


def raw_mirror_sqlite(path: str, tree: Tree, project_ids: dict[str, int]) -> int:
    """The cold floor on SQLite: sqlite3 executemany, one BEGIN IMMEDIATE .. COMMIT per batch, on
    the product's pragmas (WAL, synchronous=NORMAL, foreign keys on)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        sql = f"INSERT INTO sessions ({', '.join(RAW_COLUMNS)}) VALUES ({', '.join('?' * len(RAW_COLUMNS))})"
        written = 0
        for batch in raw_batches(tree, project_ids):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(sql, batch)
            conn.execute("COMMIT")
            written += len(batch)
        return written
    finally:
        conn.close()


def raw_mirror_postgres(url: str, tree: Tree, project_ids: dict[str, int]) -> int:
    """The cold floor on PostgreSQL: psycopg executemany (pipelined by psycopg), one transaction
    per batch; JSON text cast to jsonb by the server."""
    values = ", ".join("%s::jsonb" if c in JSON_COLUMNS else "%s" for c in RAW_COLUMNS)
    sql = f"INSERT INTO sessions ({', '.join(RAW_COLUMNS)}) VALUES ({values})"
    written = 0
    with psycopg.connect(libpq_url(url)) as conn:
        for batch in raw_batches(tree, project_ids):
            with conn.cursor() as cur:
                cur.executemany(sql, batch)
            conn.commit()
            written += len(batch)
    return written


def raw_database(backend: Backend, tree: Tree) -> tuple[str, dict[str, int]]:
    """A fresh, migrated database with the projects registered (not timed): the raw write's."""
    url = backend.fresh_url()
    engine = make_engine(url)
    try:
        upgrade(engine)
        refs = register(Store(engine, host="bench"), tree.projects)
    finally:
        engine.dispose()
    return url, {p.sessions_dir: refs[p.path].id for p in tree.projects}


def raw_mirror(backend: Backend, url: str, tree: Tree, project_ids: dict[str, int]) -> int:
    if backend.name == "sqlite":
        return raw_mirror_sqlite(make_url(url).database or "", tree, project_ids)
    return raw_mirror_postgres(url, tree, project_ids)


def naive(engine: Engine, tree: Tree, project_ids: dict[str, int]) -> int:
    """What a straightforward ORM mirror does with every file (bench/naive.py)."""
    for path in tree.state_files:
        naive_upsert(engine, project_ids[os.path.dirname(os.path.dirname(path))], path)
    return len(tree.state_files)


def naive_database(backend: Backend, tree: Tree) -> tuple[Engine, dict[str, int]]:
    """A fresh database of the same schema behind a plain engine (driver defaults, no pragmas)."""
    engine = create_engine(backend.fresh_url())
    upgrade(engine)
    now = datetime.now(UTC)
    with OrmSession(engine) as orm:
        rows = [
            Project(
                host="bench",
                working_dir=p.path,
                name=os.path.basename(p.path),
                sessions_dir=p.sessions_dir,
                created_at=now,
            )
            for p in tree.projects
        ]
        orm.add_all(rows)
        orm.commit()
        return engine, {row.sessions_dir: row.id for row in rows}


@dataclass
class Figures:
    """Seconds per run of each measurement, on one backend at one size."""

    backend: str
    sessions: int
    projects: int
    description: str = ""
    cold: list[float] = field(default_factory=list)
    cold_floor: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)
    warm_floor: list[float] = field(default_factory=list)
    naive: list[float] = field(default_factory=list)  # empty: not run at this size (--naive-max)


def measure(backend: Backend, tree: Tree, repeat: int, naive_max: int) -> Figures:
    """Each product figure paired with its floor, back to back, their order swapped every other
    run, so that load from elsewhere moves both sides of a ratio alike; the naive loop in the same
    rounds."""
    n = len(tree.state_files)
    figures = Figures(backend.name, n, len(tree.projects))
    tag = f"{backend.name} {n:,}"

    def cold(last: bool) -> None:
        with daemon_store(backend, tree) as (store, refs):
            seconds, summary = timed(reconcile, store, refs, MAX_BYTES, batch_size=BATCH_SIZE)
            check_cold(summary, tree)
            figures.cold.append(seconds)
            if last:  # warm runs on the last cold database: nothing changed since it was written
                for run in range(repeat):
                    for side in (0, 1) if run % 2 == 0 else (1, 0):
                        if side == 0:
                            seconds, summary = timed(reconcile, store, refs, MAX_BYTES, batch_size=BATCH_SIZE)
                            check_warm(summary)
                            figures.warm.append(seconds)
                        else:
                            seconds, listed = timed(list_stat_floor, tree)
                            assert listed == n, f"list + stat saw {listed} sessions, not {n}"
                            figures.warm_floor.append(seconds)
                progress(f"{tag}: warm {fmt_runs(figures.warm)}; list + stat {fmt_runs(figures.warm_floor)}")

    def floor() -> None:
        url, project_ids = raw_database(backend, tree)
        seconds, written = timed(raw_mirror, backend, url, tree, project_ids)
        assert written == n, f"raw write wrote {written} rows, not {n}"
        figures.cold_floor.append(seconds)

    def naive_run() -> None:
        engine, project_ids = naive_database(backend, tree)
        try:
            seconds, written = timed(naive, engine, tree, project_ids)
        finally:
            engine.dispose()
        assert written == n
        figures.naive.append(seconds)

    for run in range(repeat):
        last = run == repeat - 1
        if run % 2 == 0:
            cold(last)
            floor()
        else:
            floor()
            cold(last)
        # The naive loop takes a minute or more at 10,000: run in the same rounds as cold, so that
        # the load of the moment weighs on both sides of naive / cold.
        if n <= naive_max:
            naive_run()
        progress(
            f"{tag}: round {run + 1}/{repeat}: cold {figures.cold[-1] * 1000:.0f} ms, "
            f"read + parse + raw write {figures.cold_floor[-1] * 1000:.0f} ms"
            + (f", naive ORM {figures.naive[-1] * 1000:.0f} ms" if n <= naive_max else "")
        )
    figures.description = backend.describe()
    return figures


# --- the report ---------------------------------------------------------------------------------


def progress(line: str) -> None:
    print(f"  .. [{time.strftime('%H:%M:%S')} load {load()}] {line}", file=sys.stderr, flush=True)


def fmt_runs(runs: list[float]) -> str:
    return ", ".join(f"{s * 1000:.0f}" for s in runs) + " ms"


def rows(figures: Figures) -> list[Row]:
    """The #13 table's reconcile rows for one backend at one size, with their verdicts."""
    n, db = figures.sessions, figures.backend
    size = f"{n // 1000}k" if n % 1000 == 0 else f"{n:,}"
    warm, warm_floor = median(figures.warm), median(figures.warm_floor)
    cold, cold_floor = median(figures.cold), median(figures.cold_floor)
    large = n >= LARGE
    out = [
        Row(
            f"warm reconcile {size}, in-process ({db})",
            seconds(warm),
            f"list + stat {seconds(warm_floor)}",
            ratio(warm, warm_floor),
            f"<= {WARM_OVER_FLOOR:g}x floor",
            warm / warm_floor <= WARM_OVER_FLOOR,
        ),
    ]
    if large:
        out.append(
            Row(
                f"warm reconcile {size}, in-process ({db})",
                seconds(warm),
                target=f"< {seconds(WARM_LARGE_S)}",
                ok=warm < WARM_LARGE_S,
            )
        )
    out.append(
        Row(
            f"cold reconcile {size}, in-process ({db})",
            seconds(cold),
            f"read+parse+raw write {seconds(cold_floor)}",
            ratio(cold, cold_floor),
            f"<= {COLD_OVER_FLOOR:g}x floor" + ("" if large else f" (at {LARGE // 1000}k)"),
            cold / cold_floor <= COLD_OVER_FLOOR if large else None,
        )
    )
    if figures.naive:
        naive_s = median(figures.naive)
        out.append(
            Row(
                f"cold reconcile {size} vs naive ORM ({db})",
                seconds(cold),
                f"naive ORM {seconds(naive_s)}",
                f"naive/cold {ratio(naive_s, cold)}",
                f">= {NAIVE_OVER_COLD:g}x faster",
                naive_s / cold >= NAIVE_OVER_COLD,
            )
        )
    else:
        out.append(Row(f"cold reconcile {size} vs naive ORM ({db})", seconds(cold), "naive ORM not run"))
    return out


def report(all_figures: list[Figures], trees: dict[int, Tree], repeat: int) -> None:
    print()
    print(f"sessionsync reconcile benchmark: batch_size {BATCH_SIZE}, median of {repeat} run(s)")
    # Other work on the machine moves every figure; the load average says how much there was.
    print(f"{versions()}; load average {load()}")
    for n, tree in sorted(trees.items()):
        print(
            f"  {n:,} sessions in {len(tree.projects)} projects, "
            f"{tree.bytes_written / n:,.0f} B state.json on average"
        )
    if not all_figures:
        print("\nno database was measured")
    for figures in all_figures:
        print()
        print(f"[{figures.backend}, {figures.sessions:,} sessions] {figures.description}")
        print(f"  {'measure':<24} {'median ms':>10} {'rows/s':>12}   runs")
        for label, runs in (
            ("list + stat floor", figures.warm_floor),
            ("warm reconcile", figures.warm),
            ("read+parse+raw write", figures.cold_floor),
            ("cold reconcile", figures.cold),
            ("naive ORM", figures.naive),
        ):
            if not runs:
                print(f"  {label:<24} {'not run':>10}   (more than --naive-max sessions)")
                continue
            m = median(runs)
            print(f"  {label:<24} {m * 1000:>10,.1f} {figures.sessions / m:>12,.0f}   {fmt_runs(runs)}")
    if all_figures:
        print()
        for line in render([row for figures in all_figures for row in rows(figures)]):
            print(line)


def postgres_reachable(url: str) -> str | None:
    """None when a connection works, else why not."""
    engine = create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect():
            return None
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    finally:
        engine.dispose()


def sizes(text: str) -> list[int]:
    try:
        values = sorted({int(part.replace("_", "")) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"sizes must be at least 1: {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--sessions", type=int, help="session folders to build (default 10,000); same as --sizes N"
    )
    size.add_argument(
        "--sizes",
        type=sizes,
        help="comma-separated session counts measured one after the other, e.g. 10000,100000",
    )
    size.add_argument("--large", action="store_true", help=f"10,000 and {LARGE:,} sessions")
    parser.add_argument(
        "--projects", type=int, default=100, help="projects to spread them over (default 100)"
    )
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("SESSIONSYNC_TEST_PG_URL") or "postgresql+psycopg://postgres@127.0.0.1/test",
        help="PostgreSQL database whose sessionsync tables are dropped and recreated (default "
        "$SESSIONSYNC_TEST_PG_URL, else the local 'test' database)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument(
        "--naive-max",
        type=int,
        default=10_000,
        help="run the naive ORM mirror only up to this many sessions (default 10,000: at 100,000 it "
        "takes minutes per run)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the session trees and SQLite files")
    args = parser.parse_args(argv)
    if args.large:
        args.sizes = [10_000, LARGE]
    elif args.sessions is not None:
        args.sizes = [args.sessions]
    elif args.sizes is None:
        args.sizes = [10_000]
    if min(args.sizes) < 1 or args.projects < 1 or args.repeat < 1:
        parser.error("--sessions, --projects and --repeat must be at least 1")
    return args


def run(
    sizes: list[int], dbs: str, pg_url: str, repeat: int, naive_max: int, projects: int, root: Path
) -> tuple[list[Figures], dict[int, Tree]]:
    """Every size on every reachable backend; the session trees and SQLite files go under `root`."""
    # The reconcile summary line would interleave with the progress lines; the table says it all.
    logger.disable("sessionsync")
    trees: dict[int, Tree] = {}
    for n in sizes:
        seconds, trees[n] = timed(build_tree, root / f"tree-{n}", n, min(projects, n))
        progress(f"built {n:,} sessions in {seconds:.1f} s under {root / f'tree-{n}'}")
    # What `sessionsync reconcile` and the daemon do once set up; the naive loop and the floors
    # run in the same process state, so every side gets the same garbage collector.
    freeze_long_lived()
    backends: list[Backend] = []
    if dbs in ("sqlite", "both"):
        backends.append(SqliteBackend(root / "sqlite"))
    if dbs in ("postgres", "both"):
        problem = postgres_reachable(pg_url)
        if problem is None:
            backends.append(PostgresBackend(pg_url))
        else:
            print(f"PostgreSQL skipped: cannot connect to {pg_url}: {problem}", file=sys.stderr)
    figures = [measure(b, trees[n], repeat, naive_max) for n in sizes for b in backends]
    return figures, trees


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="sessionsync-bench-"))
    try:
        figures, trees = run(
            args.sizes, args.db, args.pg_url, args.repeat, args.naive_max, args.projects, root
        )
        report(figures, trees, args.repeat)
    finally:
        if args.keep:
            print(f"\nkept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

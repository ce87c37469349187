"""Reconcile benchmark: cold and warm reconcile against a bare stat floor and a naive ORM loop.

Builds a tree of realistic session folders, then on SQLite and/or PostgreSQL measures in one
process (time.perf_counter, median of --repeat runs) what the acceptance criteria compare:
naive / cold (>= 8 on SQLite, >= 12 on PostgreSQL) and warm / floor (<= 5).
Run (from the repository root):
     .venv/bin/python -m bench.reconcile [--sessions N] [--projects P] [--db sqlite|postgres|both]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

from loguru import logger
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session as OrmSession

from bench.naive import naive_upsert
from bench.orm import Project
from sessionsync.daemon.db import make_engine
from sessionsync.daemon.discovery import ProjectPath
from sessionsync.daemon.migrate import upgrade
from sessionsync.daemon.reconcile import ReconcileSummary, freeze_long_lived, reconcile, register
from sessionsync.daemon.store import ProjectRef, Store
from sessionsync.models.state import map_state
from tests.support.databases import SqliteFiles, empty_postgres_database, server_version
from tests.support.sessions import FIXTURES

SESSIONS_SUBDIR = os.path.join("agents", "sessions")
MAX_BYTES = 1 << 20
BATCH_SIZE = 256
LARGE = 100_000
# Acceptance targets: (naive / cold minimum by backend, warm / floor maximum).
NAIVE_OVER_COLD = {"sqlite": 8.0, "postgres": 12.0}
WARM_OVER_FLOOR = 5.0
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


def floor(tree: Tree) -> None:
    for path in tree.state_files:
        os.stat(path)


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
    """Seconds per run of each measurement on one backend."""

    backend: str
    description: str = ""
    cold: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    naive: list[float] = field(default_factory=list)


def measure(backend: Backend, tree: Tree, repeat: int) -> Figures:
    figures = Figures(backend.name)
    for run in range(repeat):
        with daemon_store(backend, tree) as (store, refs):
            seconds, summary = timed(reconcile, store, refs, MAX_BYTES, batch_size=BATCH_SIZE)
            check_cold(summary, tree)
            figures.cold.append(seconds)
            progress(f"{backend.name}: cold reconcile {run + 1}/{repeat}: {seconds * 1000:.0f} ms")
            # Warm runs on the last cold database: nothing changed since it was written.
            if run == repeat - 1:
                for _ in range(repeat):
                    seconds, summary = timed(reconcile, store, refs, MAX_BYTES, batch_size=BATCH_SIZE)
                    check_warm(summary)
                    figures.warm.append(seconds)
                progress(f"{backend.name}: warm reconcile: {fmt_runs(figures.warm)}")
    for _ in range(repeat):
        figures.floor.append(timed(floor, tree)[0])
    progress(f"{backend.name}: stat floor: {fmt_runs(figures.floor)}")
    for run in range(repeat):
        engine, project_ids = naive_database(backend, tree)
        try:
            seconds, written = timed(naive, engine, tree, project_ids)
        finally:
            engine.dispose()
        assert written == len(tree.state_files)
        figures.naive.append(seconds)
        progress(f"{backend.name}: naive ORM {run + 1}/{repeat}: {seconds * 1000:.0f} ms")
    figures.description = backend.describe()
    return figures


# --- the report ---------------------------------------------------------------------------------


def progress(line: str) -> None:
    print(f"  .. {line}", file=sys.stderr, flush=True)


def fmt_runs(runs: list[float]) -> str:
    return ", ".join(f"{s * 1000:.0f}" for s in runs) + " ms"


def report(all_figures: list[Figures], tree: Tree, repeat: int) -> None:
    n = len(tree.state_files)
    print()
    print(
        f"sessionsync reconcile benchmark: {n:,} sessions in {len(tree.projects)} projects, "
        f"{tree.bytes_written / n:,.0f} B state.json on average, batch_size {BATCH_SIZE}, "
        f"median of {repeat} run(s)"
    )
    # Other work on the machine moves every figure; the load average says how much there was.
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"Python {platform.python_version()}, {os.cpu_count()} CPU(s), load average {load}")
    if not all_figures:
        print("\nno database was measured")
    for figures in all_figures:
        print()
        print(f"[{figures.backend}] {figures.description}")
        print(f"  {'measure':<18} {'median ms':>10} {'rows/s':>12}   runs")
        for label, runs in (
            ("stat floor", figures.floor),
            ("warm reconcile", figures.warm),
            ("cold reconcile", figures.cold),
            ("naive ORM", figures.naive),
        ):
            median = statistics.median(runs)
            print(f"  {label:<18} {median * 1000:>10,.1f} {n / median:>12,.0f}   {fmt_runs(runs)}")
        naive_ratio = statistics.median(figures.naive) / statistics.median(figures.cold)
        warm_ratio = statistics.median(figures.warm) / statistics.median(figures.floor)
        need = NAIVE_OVER_COLD[figures.backend]
        print(f"  naive / cold  = {naive_ratio:6.1f}x  (target >= {need:g})  {mark(naive_ratio >= need)}")
        print(
            f"  warm / floor  = {warm_ratio:6.1f}x  (target <= {WARM_OVER_FLOOR:g})  "
            f"{mark(warm_ratio <= WARM_OVER_FLOOR)}"
        )


def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--sessions", type=int, default=10_000, help="session folders to build (default 10,000)"
    )
    size.add_argument("--large", action="store_true", help=f"build {LARGE:,} sessions")
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
    parser.add_argument("--keep", action="store_true", help="keep the session tree and SQLite files")
    args = parser.parse_args(argv)
    if args.large:
        args.sessions = LARGE
    if args.sessions < 1 or args.projects < 1 or args.repeat < 1:
        parser.error("--sessions, --projects and --repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The reconcile summary line would interleave with the progress lines; the table says it all.
    logger.disable("sessionsync")
    root = Path(tempfile.mkdtemp(prefix="sessionsync-bench-"))
    try:
        seconds, tree = timed(build_tree, root / "tree", args.sessions, args.projects)
        progress(f"built {args.sessions:,} sessions in {seconds:.1f} s under {root / 'tree'}")
        # What `sessionsync reconcile` and the daemon do once set up; the naive loop runs in the
        # same process state, so both sides get the same garbage collector.
        freeze_long_lived()
        backends: list[Backend] = []
        if args.db in ("sqlite", "both"):
            backends.append(SqliteBackend(root / "sqlite"))
        if args.db in ("postgres", "both"):
            problem = postgres_reachable(args.pg_url)
            if problem is None:
                backends.append(PostgresBackend(args.pg_url))
            else:
                print(f"PostgreSQL skipped: cannot connect to {args.pg_url}: {problem}", file=sys.stderr)
        report([measure(backend, tree, args.repeat) for backend in backends], tree, args.repeat)
    finally:
        if args.keep:
            print(f"\nkept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

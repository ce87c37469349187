"""Live benchmark: the real daemon (`sessionsync run`) against real files, timed from the outside.

Measures write->row latency, a 10,000-write burst (convergence and row writes) against a naive
per-event ORM mirror of the same burst, idle CPU, and memory and start-up time with 10,000
sessions watched. Prints every figure with its target and PASS/FAIL, and exits 0 whatever the
figures; 1 only when a step could not run at all (the daemon did not start, say), after printing
what was measured before.
Run (from the repository root):
     .venv/bin/python -m bench.live [--db sqlite|postgres] [--debounce-ms 200] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import random
import shutil
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, bindparam, create_engine, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session as OrmSession
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from bench import floor_loop
from bench.naive import naive_upsert
from bench.orm import Project
from bench.table import Row, ratio, render
from sessionsync.daemon.db import make_engine
from sessionsync.daemon.discovery import ProjectPath
from sessionsync.daemon.migrate import upgrade
from sessionsync.daemon.reconcile import register
from sessionsync.daemon.store import Store
from sessionsync.models.tables import metadata, projects, session_events, sessions
from tests.support.databases import SqliteFiles, empty_postgres_database, server_version
from tests.support.notify import FakeSystemd
from tests.support.runner import Daemon
from tests.support.waiting import poll

SESSIONS_SUBDIR = os.path.join("agents", "sessions")
MAX_DELAY_MS = 2000  # the daemon's default ceiling; the burst's writes/session target is per window
# The systemd unit's WatchdogSec=30: the daemon pings every 15 s, as it would in production.
WATCHDOG_USEC = 30_000_000
WRITE_KINDS = ("created", "updated", "phase_changed", "status_changed")
READY_TIMEOUT_S = 180.0
STATUS_TIMEOUT_S = 30.0  # a status request answered while the daemon works through a burst
EVENT_TIMEOUT_S = 10.0
# How often the burst's convergence is checked: fine enough for a 2 s target, cheap enough
# (one indexed count) not to compete with the daemon for the machine's two cores.
CONVERGE_POLL_S = 0.005
CONVERGE_DEADLINE_S = 60.0
CONVERGE_TARGET_MS = 1000  # issue #13: the burst converges within 1 s of its last write
NAIVE_DEADLINE_S = 120.0
# After converging the naive mirror still rewrites rows from its backlog: watched this long (from
# the last write), then what is left is counted, not waited for (on SQLite it takes minutes).
NAIVE_DRAIN_S = 30.0
# An isolated save is mirrored on the debouncer's leading edge, without waiting out debounce_ms.
LATENCY_P50_MS = 10
LATENCY_P99_MS = 50
# How much longer than debounce_ms a latency session is left alone before its next write, so that
# the daemon (which times an event when its watcher sees it, a little after the rename) sees it quiet.
LATENCY_QUIET_MARGIN_S = 0.02


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: the default one, or --quick for a smoke run."""

    latency_writes: int
    latency_sessions: int
    burst_writes: int
    burst_sessions: int
    idle_s: float
    memory_sessions: int
    memory_projects: int


FULL = Plan(1000, 50, 10_000, 500, 30.0, 10_000, 100)
QUICK = Plan(100, 10, 1000, 50, 5.0, 1000, 10)


# --- machine and process figures ----------------------------------------------------------------


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        # The command name may hold spaces or parentheses: the fields start after the last ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def inotify_watches(pid: int) -> int:
    """Inotify watches held by a process: one `inotify wd:` line per watch in its fdinfo."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
                with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as f:
                    count += sum(1 for line in f if line.startswith("inotify wd:"))
    return count


def progress(line: str) -> None:
    print(f"  .. [{time.strftime('%H:%M:%S')} load {load()}] {line}", file=sys.stderr, flush=True)


def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank: an observed value, never an interpolation."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# --- session folders ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionFile:
    """One session folder of the benchmark, with its state.json and its writer's temp file."""

    project: str
    slug: str
    path: str
    tmp: str


def document(slug: str, description: str, seq: int) -> bytes:
    """A v2 state.json of the usual size (~1.5 KB). Only `description` and `updated_at` change
    between writes, so each row write makes exactly one `updated` event (phase and status stay)."""
    start = datetime(2026, 2, 20, 13, 0, tzinfo=UTC)
    doc = {
        "session_id": slug,
        "topic": f"Benchmark session {slug}",
        "description": description,
        "session_type": "full",
        "created_at": start.isoformat(),
        "updated_at": (start + timedelta(seconds=seq)).isoformat(),
        "current_phase": "build",
        "status": "active",
        "phase_history": {
            "spec_started_at": start.isoformat(),
            "spec_completed_at": (start + timedelta(hours=1)).isoformat(),
            "plan_started_at": (start + timedelta(hours=1)).isoformat(),
            "plan_completed_at": (start + timedelta(hours=2)).isoformat(),
            "build_started_at": (start + timedelta(hours=3)).isoformat(),
            "build_completed_at": None,
            "docs_started_at": None,
            "docs_completed_at": None,
        },
        "build_progress": {
            "checkpoints_total": 6,
            "checkpoints_completed": [1, 2, 3],
            "current_checkpoint": 4,
        },
        "git": {"branch": f"feature/{slug}", "worktree": None, "base_branch": "main"},
        "commits": [
            {
                "sha": f"{n:07x}",
                "message": f"feat: checkpoint {n}",
                "checkpoint": n,
                "created_at": (start + timedelta(hours=3 + n)).isoformat(),
            }
            for n in (1, 2, 3)
        ],
        "artifacts": {"spec": "spec.md", "plan": "plan.json", "plan_readable": "plan.md"},
        "agent_notes": "Chose incremental updates over a nightly rebuild; the index is 40 GB.",
    }
    return json.dumps(doc, indent=2).encode()


def atomic_write(session: SessionFile, data: bytes) -> None:
    """What agents do: write a temp file next to state.json, then rename it over state.json."""
    with open(session.tmp, "wb") as f:
        f.write(data)
    os.replace(session.tmp, session.path)


def build_sessions(root: Path, name: str, count: int, project_count: int) -> list[SessionFile]:
    """`count` session folders with a first state.json, spread over `project_count` projects."""
    files = []
    for n in range(count):
        project = str(root / f"{name}-{n % project_count:03d}")
        slug = f"2026-02-20_{name}-{n:05d}"
        folder = os.path.join(project, SESSIONS_SUBDIR, slug)
        os.makedirs(folder)
        session = SessionFile(
            project, slug, os.path.join(folder, "state.json"), os.path.join(folder, ".state.json.tmp")
        )
        atomic_write(session, document(slug, "initial", 0))
        files.append(session)
    return files


def project_paths(files: Sequence[SessionFile]) -> list[str]:
    return sorted({f.project for f in files})


# --- databases ----------------------------------------------------------------------------------


class Database:
    """Fresh, empty databases for the daemons and the naive mirror, and read-only queries."""

    def __init__(self, kind: str, pg_url: str, folder: Path) -> None:
        self.kind = kind
        self.pg_url = pg_url
        self.sqlite = SqliteFiles(folder)
        self.description = ""

    def fresh(self, name: str) -> str:
        """An empty database named `name`: a new SQLite file, or a PostgreSQL database whose
        sessionsync tables are dropped (created first if missing)."""
        if self.kind == "sqlite":
            self.description = f"SQLite {sqlite3.sqlite_version}, files in {self.sqlite.folder}"
            return self.sqlite.fresh(name)
        url = make_url(self.pg_url)
        database = url.database if name == "daemon" else f"{url.database}_{name}"
        if database == "test":
            raise SystemExit("refusing to use the 'test' database: other engineers' tests run there")
        fresh = empty_postgres_database(url.set(database=database).render_as_string(hide_password=False))
        self.description = f"PostgreSQL {server_version(fresh)} at {make_url(fresh).render_as_string()}"
        return fresh


def reader(url: str) -> Engine:
    """A plain engine for polling: on SQLite no BEGIN IMMEDIATE (the daemon's engine takes the
    write lock for every transaction), so reads in WAL mode never hold up the daemon's writes."""
    return create_engine(url, pool_size=2) if url.startswith("postgresql") else create_engine(url)


def count_with_description(engine: Engine, project_list: Sequence[str], description: str) -> int:
    query = (
        select(func.count())
        .select_from(sessions.join(projects))
        .where(
            projects.c.working_dir.in_(list(project_list)),
            sessions.c.description == description,
            sessions.c.deleted_at.is_(None),
        )
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def description_of(engine: Engine, session: SessionFile) -> str | None:
    query = (
        select(sessions.c.description)
        .select_from(sessions.join(projects))
        .where(projects.c.working_dir == session.project, sessions.c.slug == session.slug)
    )
    with engine.connect() as conn:
        value = conn.execute(query).scalar_one_or_none()
    return None if value is None else str(value)


def last_event_id(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.coalesce(func.max(session_events.c.id), 0))).scalar_one())


def row_writes(engine: Engine, project_list: Sequence[str], after_id: int) -> dict[str, int]:
    """Row writes per slug since event `after_id`. Every row write leaves at least one event
    (created / updated / phase_changed / status_changed), all with the batch's time: a distinct
    (session, at) is one write, even when phase and status changed together."""
    per_write = (
        select(session_events.c.session_id, session_events.c.at)
        .join(sessions, sessions.c.id == session_events.c.session_id)
        .join(projects, projects.c.id == sessions.c.project_id)
        .where(
            session_events.c.id > after_id,
            session_events.c.kind.in_(WRITE_KINDS),
            projects.c.working_dir.in_(bindparam("paths", expanding=True)),
        )
        .distinct()
        .subquery()
    )
    query = (
        select(sessions.c.slug, func.count())
        .join(per_write, per_write.c.session_id == sessions.c.id)
        .group_by(sessions.c.slug)
    )
    with engine.connect() as conn:
        return {slug: int(n) for slug, n in conn.execute(query, {"paths": list(project_list)})}


# --- the daemon ---------------------------------------------------------------------------------


@contextmanager
def running_daemon(
    workdir: Path, name: str, url: str, project_list: Sequence[str], debounce_ms: int
) -> Iterator[tuple[Daemon, float]]:
    """Start `sessionsync run` on these projects as systemd does (a notify socket, the unit's
    watchdog); yields it with its start-up time once it has sent READY=1; SIGTERM at exit."""
    run_dir = workdir / f"run-{name}"
    run_dir.mkdir(mode=0o700)
    systemd = FakeSystemd(str(run_dir / "notify.sock"))
    systemd.drain()
    daemon = Daemon(
        run_dir,
        url,
        projects=project_list,  # and no roots: never search the home folder, only the projects built here
        env=systemd.env(watchdog_usec=WATCHDOG_USEC),
        debounce_ms=debounce_ms,
        max_delay_ms=max(MAX_DELAY_MS, debounce_ms),
    )
    try:
        daemon.start()
        poll(lambda: systemd.ready.is_set() or not daemon.running, READY_TIMEOUT_S, interval=0.05)
        if not systemd.ready.is_set():
            raise SystemExit(f"daemon {name} did not become ready:\n{daemon.log_tail(15)}")
        yield daemon, systemd.ready_at - daemon.started_at
    finally:
        # SIGTERM drains and exits 0; one still draining after its limit is killed by close().
        with suppress(AssertionError):
            if daemon.running:
                daemon.stop(timeout=45)
        daemon.close()
        systemd.close()


class EventStream:
    """Subscribed to the daemon's change events: when each session's rows were committed.

    The daemon publishes after the commit, so an event's arrival is an upper bound of the moment
    the row became visible; waiting costs nothing, where polling every 2 ms would take CPU from
    the daemon on a two-core machine and so inflate the very latency being measured."""

    def __init__(self, socket_path: Path) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.connect(str(socket_path))
        self._sock.sendall(b'{"cmd": "subscribe"}\n')
        self._reader = self._sock.makefile("rb")
        reply = json.loads(self._reader.readline())
        if not reply.get("ok"):
            raise SystemExit(f"subscribe refused: {reply}")
        self._cond = threading.Condition()
        self._arrivals: dict[tuple[str, str], list[tuple[str, float]]] = defaultdict(list)
        self.lagged = False
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with suppress(OSError, ValueError):
            for line in self._reader:
                now = time.monotonic()
                event = json.loads(line)
                kind = str(event.get("kind", ""))
                if kind == "lagged":
                    self.lagged = True
                if kind.removeprefix("session.") not in WRITE_KINDS:
                    continue
                with self._cond:
                    seen = self._arrivals[(event["project"], event["slug"])]
                    # One write with a phase and a status change sends two events with one `at`.
                    if not seen or seen[-1][0] != event["at"]:
                        seen.append((event["at"], now))
                        self._cond.notify_all()

    def count(self, session: SessionFile) -> int:
        with self._cond:
            return len(self._arrivals[(session.project, session.slug)])

    def wait(self, session: SessionFile, n: int, timeout: float) -> float | None:
        """When the n-th row write of this session was announced; None on timeout."""
        key = (session.project, session.slug)
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._arrivals[key]) >= n, timeout):
                return None
            return self._arrivals[key][n - 1][1]

    def close(self) -> None:
        # shutdown() ends the reader thread's loop (end of file); then the files can be closed.
        with suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self._reader.close()
        self._sock.close()


# --- 1. latency -----------------------------------------------------------------------------------


@dataclass
class Latency:
    """Seconds from os.replace() being called to the row write being announced, per write."""

    seconds: list[float] = field(default_factory=list)
    timeouts: int = 0
    mismatches: int = 0
    elapsed: float = 0.0


def measure_latency(
    stream: EventStream,
    engine: Engine,
    files: Sequence[SessionFile],
    writes: int,
    inflight: int,
    quiet_s: float,
) -> Latency:
    """`writes` atomic writes, each an isolated save: it waits for its row, and its session is not
    written again until it has been quiet for `quiet_s` (the daemon's quiet period and a margin, so
    that the save meets the leading edge, not a burst's trailing one). With inflight > 1, that many
    sessions (disjoint sets, one lane each) have a write under way at once."""
    result = Latency()
    last_write: dict[str, float] = {}
    lock = threading.Lock()
    seq = iter(range(1, writes + 1))

    def lane(index: int) -> None:
        own = list(files[index::inflight])
        # Stagger the lanes over 200 ms (the default quiet period), so that their writes do not all
        # come due together and share batches by construction.
        threading.Event().wait(index * 0.2 / inflight)
        turn = 0
        while True:
            with lock:
                n = next(seq, None)
            if n is None:
                return
            session = own[turn % len(own)]
            turn += 1
            quiet_for = last_write.get(session.slug, -math.inf) + quiet_s - time.monotonic()
            if quiet_for > 0:
                threading.Event().wait(quiet_for)
            description = f"latency write {n}"
            expected = stream.count(session) + 1
            with open(session.tmp, "wb") as f:
                f.write(document(session.slug, description, n))
            # Timed from just before the rename: a thread preempted right after it (the machine is
            # shared) cannot make a write look faster than it was.
            written = time.monotonic()
            os.replace(session.tmp, session.path)
            last_write[session.slug] = written
            arrived = stream.wait(session, expected, EVENT_TIMEOUT_S)
            if arrived is None:
                with lock:
                    result.timeouts += 1
                continue
            # One SELECT confirms the announced row holds this write's content.
            if description_of(engine, session) != description:
                with lock:
                    result.mismatches += 1
                continue
            with lock:
                result.seconds.append(arrived - written)

    started = time.monotonic()
    threads = [threading.Thread(target=lane, args=(i,), name=f"lane-{i}") for i in range(inflight)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.elapsed = time.monotonic() - started
    return result


# --- 2. and 3. the burst --------------------------------------------------------------------------


@dataclass
class Burst:
    """One run of the burst: when it started and ended, and when each session was written."""

    started: float = 0.0
    ended: float = 0.0
    times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    def allowed_writes(self, slug: str, debounce_s: float, max_delay_s: float) -> int:
        """The target, for each run of the session's writes with no quiet period between two of
        them (a gap of debounce_s or more ends a run: the next write is an isolated save again):
        two row writes (the run's leading and trailing edge), plus one per max_delay window the
        run spans, and never more than the run's writes."""
        allowed = 0
        times = self.times[slug]
        start = 0
        for n, (before, after) in enumerate(pairwise([*times, math.inf])):
            if after - before >= debounce_s:
                allowed += min(n + 1 - start, 2 + int((before - times[start]) // max_delay_s))
                start = n + 1
        return allowed

    def gaps(self) -> list[float]:
        """Seconds between consecutive writes of one session, over all sessions."""
        return [b - a for times in self.times.values() for a, b in pairwise(times)]


def debounce_fires(times: Sequence[float], debounce_s: float, max_delay_s: float) -> int:
    """How many times the per-key debounce rule fires for these event times: an event with none in
    the `debounce_s` before it fires at once (leading edge); the events after it within the quiet
    period fire `debounce_s` after the last of them, never later than `max_delay_s` after the first
    (trailing edge)."""
    fires = 0
    first = last = None  # the pending trailing edge, if any
    previous = None  # the latest event, pending or fired
    for t in times:
        if first is not None and last is not None and t >= min(last + debounce_s, first + max_delay_s):
            fires += 1
            first = None
        if previous is None or t - previous >= debounce_s:
            if first is None:
                fires += 1  # leading edge
        elif first is None:
            first = t
        if first is not None:
            last = t
        previous = t
    return fires + (first is not None)


FINAL = "burst final"


def burst_plan(files: Sequence[SessionFile], writes: int, seed: int = 11) -> list[tuple[SessionFile, bytes]]:
    """`writes` writes, round after round over every session in a shuffled order; the last round
    writes the FINAL description, so a row holds the final content exactly when it says FINAL."""
    rng = random.Random(seed)
    rounds = writes // len(files)
    plan = []
    for r in range(rounds):
        order = list(files)
        rng.shuffle(order)
        description = FINAL if r == rounds - 1 else f"burst round {r}"
        plan += [(s, document(s.slug, description, 1000 + r)) for s in order]
    return plan


def run_burst(plan: Sequence[tuple[SessionFile, bytes]]) -> Burst:
    """Every write of the plan as fast as one thread can: payloads are encoded beforehand."""
    burst = Burst(started=time.monotonic())
    times = burst.times
    now = burst.started
    for session, data in plan:
        with open(session.tmp, "wb") as f:
            f.write(data)
        # Just before the rename, as for latency: convergence is timed from the last rename's start.
        now = time.monotonic()
        os.replace(session.tmp, session.path)
        times[session.slug].append(now)
    burst.ended = now
    return burst


@dataclass
class BurstResult:
    """One mirror's side of the burst: when its rows matched the files, and its row writes."""

    burst: Burst
    converged: float | None  # time.monotonic() when every row held the final content
    writes: int
    cpu: float
    per_session: dict[str, int] = field(default_factory=dict)
    detail: str = ""


# --- 3. the naive mirror, in a process of its own like the daemon -----------------------------------


def state_path(event: FileSystemEvent) -> str | None:
    """The state.json an event names (a rename's destination), or None: temp files, folders, and
    opened / closed-without-write are skipped (the last two are the mirror's own reads, and
    handling them would loop forever). The naive side's most favourable reading."""
    if event.is_directory or event.event_type in ("opened", "closed_no_write"):
        return None
    path = os.fsdecode(event.dest_path if event.event_type == "moved" else event.src_path)
    return path if os.path.basename(path) == "state.json" else None


def prepare_naive(url: str, files: Sequence[SessionFile]) -> dict[str, int]:
    """The naive mirror's fresh database (driver defaults, no pragmas) with every session once."""
    engine = create_engine(url)
    try:
        metadata.drop_all(engine)
        metadata.create_all(engine)
        now = datetime.now(UTC)
        with OrmSession(engine) as orm:
            rows = {
                p: Project(
                    host="bench", working_dir=p, name=os.path.basename(p), sessions_dir=p, created_at=now
                )
                for p in project_paths(files)
            }
            orm.add_all(rows.values())
            orm.commit()
            ids = {os.path.join(p, SESSIONS_SUBDIR): row.id for p, row in rows.items()}
        for session in files:
            naive_upsert(engine, ids[os.path.dirname(os.path.dirname(session.path))], session.path)
        return ids
    finally:
        engine.dispose()


class NaiveHandler(FileSystemEventHandler):
    """Mirrors every event naming a state.json at once. It also notes when every row holds the
    final content: polling its database instead would hold SQLite's lock against its writes."""

    def __init__(self, engine: Engine, ids: dict[str, int], shared: dict[str, Any], sessions: int) -> None:
        self.engine = engine
        self.ids = ids
        self.shared = shared
        self.sessions = sessions
        self.finals: set[str] = set()

    def on_any_event(self, event: FileSystemEvent) -> None:
        path = state_path(event)
        if path is None:
            return
        try:
            description = naive_upsert(self.engine, self.ids[os.path.dirname(os.path.dirname(path))], path)
        except Exception:
            # An exception would end watchdog's dispatcher thread, and the mirror with it.
            with self.shared["errors"].get_lock():
                self.shared["errors"].value += 1
            return
        with self.shared["writes"].get_lock():
            self.shared["writes"].value += 1
        if description == FINAL:
            self.finals.add(path)
            if len(self.finals) == self.sessions and not self.shared["converged"].value:
                self.shared["converged"].value = time.monotonic()  # system-wide clock: comparable


def naive_main(url: str, ids: dict[str, int], shared: dict[str, Any], sessions: int) -> None:
    """The naive mirror process: a stock watchdog observer (default event mask, stock rename
    pairing) on every sessions folder, until told to stop; then it counts what it left undone."""
    engine = create_engine(url)
    observer = Observer()
    handler = NaiveHandler(engine, ids, shared, sessions)
    for sessions_dir in ids:
        observer.schedule(handler, sessions_dir, recursive=True)
    observer.start()
    shared["ready"].set()
    shared["stop"].wait()
    queue = observer.event_queue
    with queue.mutex:
        shared["queued"].value = sum(1 for entry in queue.queue if state_path(entry[0]) is not None)
    observer.stop()
    observer.join()
    engine.dispose()


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Report:
    """The printed figures, by step: the steps run in another order than they are reported."""

    sections: dict[int, list[str]] = field(default_factory=dict)
    current: int = 0
    rows: list[Row] = field(default_factory=list)  # the figures of issue #13's table, for bench.speed

    def section(self, step: int) -> None:
        self.current = step
        self.sections.setdefault(step, [])

    def add(self, line: str = "") -> None:
        self.sections.setdefault(self.current, []).append(line)

    def lines(self) -> list[str]:
        return [line for step in sorted(self.sections) for line in self.sections[step]]

    def target(self, label: str, value: str, goal: str, ok: bool) -> None:
        self.add(f"    {label:<34} {value:>14}   target {goal:<22} {mark(ok)}")

    def info(self, label: str, value: str) -> None:
        self.add(f"    {label:<34} {value:>14}")

    def print(self, headline: str, started: float, start_load: str, failure: str) -> int:
        """Print the run's headline (its title line and what it ran on, then the machine), every
        figure, and why it stopped early if it did; the exit status."""
        print()
        print(headline)
        print(
            f"  Python {platform.python_version()}, {os.cpu_count()} CPU(s); load average at start "
            f"{start_load}, at end {load()}; run took {time.monotonic() - started:.0f} s"
        )
        for line in self.lines():
            print(line)
        if self.rows:
            print()
            for line in render(self.rows):
                print(line)
        if failure:
            print(f"\nstopped early: {failure}")
            return 1
        return 0


def latency_lines(report: Report, label: str, result: Latency, writes: int) -> tuple[float, float] | None:
    """One side's latency figures; its (p50, p99) in ms, None when no write was measured."""
    ms = [s * 1000 for s in result.seconds]
    report.add(f"   {label} ({result.elapsed:.0f} s, load {load()}):")
    if not ms:
        report.add("    no write reached the database: FAIL")
        return None
    p50, p99 = pct(ms, 50), pct(ms, 99)
    report.target("p50", f"{p50:.1f} ms", f"<= {LATENCY_P50_MS} ms", p50 <= LATENCY_P50_MS)
    report.info("p95", f"{pct(ms, 95):.1f} ms")
    report.target("p99", f"{p99:.1f} ms", f"<= {LATENCY_P99_MS} ms", p99 <= LATENCY_P99_MS)
    report.info("max / min / mean", f"{max(ms):.1f} / {min(ms):.1f} / {statistics.fmean(ms):.1f} ms")
    report.target("writes measured", f"{len(ms):,}/{writes:,}", "all", len(ms) == writes)
    report.info("timed out (> 10 s) / wrong content", f"{result.timeouts} / {result.mismatches}")
    return p50, p99


def floor_database(db: Database, files: Sequence[SessionFile]) -> tuple[str, list[tuple[str, str, int]]]:
    """The floor loop's fresh database, migrated, its projects registered (its rows it writes
    itself); with (project, session folder, project id) for each session."""
    url = db.fresh("floor")
    engine = make_engine(url)
    try:
        upgrade(engine)
        found = [ProjectPath(p, os.path.join(p, SESSIONS_SUBDIR)) for p in project_paths(files)]
        refs = register(Store(engine, host="bench"), found)
    finally:
        engine.dispose()
    return url, [(f.project, os.path.dirname(f.path), refs[f.project].id) for f in files]


def measure_floor(
    workdir: Path, db: Database, files: Sequence[SessionFile], args: argparse.Namespace, quiet_s: float
) -> Latency:
    """The same isolated saves, mirrored by the minimal loop (bench/floor_loop.py) in its own process."""
    url, sessions = floor_database(db, files)
    socket_path = str(workdir / "floor.sock")
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    process = ctx.Process(
        target=floor_loop.serve, args=(url, sessions, socket_path, ready, stop), name="floor"
    )
    process.start()
    engine = reader(url)
    try:
        if not ready.wait(60):
            raise SystemExit("the latency floor loop did not start")
        stream = EventStream(Path(socket_path))
        try:
            return measure_latency(stream, engine, files, args.plan.latency_writes, args.inflight, quiet_s)
        finally:
            stream.close()
    finally:
        stop.set()
        process.join(30)
        if process.is_alive():
            process.kill()
            process.join()
        engine.dispose()


def step_latency(
    report: Report,
    daemon: Daemon,
    engine: Engine,
    files: Sequence[SessionFile],
    floor_files: Sequence[SessionFile],
    workdir: Path,
    db: Database,
    args: argparse.Namespace,
) -> None:
    plan: Plan = args.plan
    progress(
        f"1. latency: {plan.latency_writes} writes over {len(files)} sessions, {args.inflight} in flight"
    )
    quiet_s = args.debounce_ms / 1000 + LATENCY_QUIET_MARGIN_S
    stream = EventStream(daemon.socket_path)
    try:
        result = measure_latency(stream, engine, files, plan.latency_writes, args.inflight, quiet_s)
    finally:
        stream.close()
    progress("1. latency: the same saves, mirrored by the minimal inotify -> upsert loop")
    floor = measure_floor(workdir, db, floor_files, args, quiet_s)
    report.section(1)
    report.add(
        f"1. write -> row latency: {plan.latency_writes:,} atomic writes (temp + os.replace) over "
        f"{len(files)} sessions in {len(project_paths(files))} projects"
    )
    report.add(
        f"   {args.inflight} session(s) written at a time, each an isolated save: it waits for its row, and"
    )
    report.add(
        f"   its session has been quiet for debounce_ms + {LATENCY_QUIET_MARGIN_S * 1000:.0f} ms before it"
        " (the leading edge); timed by the control"
    )
    report.add("   event stream, each row checked by one SELECT")
    ours = latency_lines(report, "sessionsync", result, plan.latency_writes)
    if stream.lagged:
        report.add("    the daemon dropped the event stream (lagged): the writes after that timed out")
    least = latency_lines(
        report,
        "floor: minimal inotify -> read -> orjson -> one upsert + commit loop, same saves",
        floor,
        plan.latency_writes,
    )
    if ours is None or least is None:
        return
    for n, (name, target) in enumerate((("p50", LATENCY_P50_MS), ("p99", LATENCY_P99_MS))):
        report.rows.append(
            Row(
                f"isolated save -> row, {name} ({args.db})",
                f"{ours[n]:.1f} ms",
                f"minimal loop {least[n]:.1f} ms",
                ratio(ours[n], least[n]),
                f"<= {target} ms",
                ours[n] <= target,
            )
        )


def step_burst(
    daemon: Daemon, engine: Engine, files: Sequence[SessionFile], args: argparse.Namespace
) -> BurstResult:
    plan = burst_plan(files, args.plan.burst_writes)
    paths = project_paths(files)
    daemon.wait_idle()
    baseline = last_event_id(engine)
    before = daemon.status(STATUS_TIMEOUT_S)["counters"]
    cpu_before = cpu_seconds(daemon.pid)
    progress(f"2. burst: {len(plan):,} writes over {len(files)} sessions")
    burst = run_burst(plan)
    # The final round is the only one to write FINAL: a row holding it mirrors its file's last write.
    converged = poll(
        lambda: count_with_description(engine, paths, FINAL) >= len(files) and time.monotonic(),
        CONVERGE_DEADLINE_S,
        CONVERGE_POLL_S,
    )
    daemon.wait_idle()
    cpu = cpu_seconds(daemon.pid) - cpu_before
    after = daemon.status(STATUS_TIMEOUT_S)["counters"]
    per_session = row_writes(engine, paths, baseline)
    detail = ", ".join(
        f"{name} {after[name] - before[name]:,}"
        for name in ("events", "overflows", "floods", "batches", "rows_written", "resyncs")
    )
    return BurstResult(burst, converged, sum(per_session.values()), cpu, per_session, detail)


def step_naive(db: Database, files: Sequence[SessionFile], args: argparse.Namespace) -> BurstResult:
    url = db.fresh("naive")
    ids = prepare_naive(url, files)
    plan = burst_plan(files, args.plan.burst_writes)
    ctx = multiprocessing.get_context("spawn")
    shared: dict[str, Any] = {
        "ready": ctx.Event(),
        "stop": ctx.Event(),
        "writes": ctx.Value("q", 0),
        "errors": ctx.Value("q", 0),
        "queued": ctx.Value("q", 0),
        "converged": ctx.Value("d", 0.0),
    }
    process = ctx.Process(target=naive_main, args=(url, ids, shared, len(files)), name="naive-mirror")
    process.start()
    try:
        if not shared["ready"].wait(60):
            raise SystemExit("the naive mirror did not start")
        pid = process.pid
        assert pid is not None
        cpu_before = cpu_seconds(pid)
        progress(f"3. naive: the same {len(plan):,} writes, mirrored event by event")
        burst = run_burst(plan)
        converged = poll(lambda: shared["converged"].value, NAIVE_DEADLINE_S, CONVERGE_POLL_S)
        # It reads each file when it handles an event, so it matches the files as soon as it has
        # handled one event per session after the burst; the rest of its backlog rewrites the same
        # rows. Watch it work through that backlog for a while, then count what is left.
        poll(
            lambda: shared["writes"].value + shared["errors"].value >= len(plan),
            burst.ended + NAIVE_DRAIN_S - time.monotonic(),
            CONVERGE_POLL_S,
        )
        done = int(shared["writes"].value)
        drained_for = time.monotonic() - burst.ended
        cpu = cpu_seconds(pid) - cpu_before
    finally:
        shared["stop"].set()
        process.join(60)
        if process.is_alive():
            process.kill()
            process.join()
    queued = int(shared["queued"].value)
    engine = reader(url)
    try:
        matched = count_with_description(engine, project_paths(files), FINAL)
    finally:
        engine.dispose()
    detail = (
        f"{done:,} done {drained_for:.0f} s after the last write, {queued:,} still queued then; "
        f"rows with the final content {matched}/{len(files)}; handler errors {shared['errors'].value}"
    )
    return BurstResult(burst, converged, done + queued, cpu, {}, detail)


def report_burst(
    report: Report,
    alone: Burst,
    daemon_run: BurstResult,
    naive_run: BurstResult,
    sessions_count: int,
    args: argparse.Namespace,
) -> None:
    max_delay_s = max(MAX_DELAY_MS, args.debounce_ms) / 1000
    b = daemon_run.burst
    writes = args.plan.burst_writes
    gaps = [g * 1000 for g in b.gaps()]
    report.section(2)
    report.add(
        f"2. burst: {writes:,} atomic writes, shuffled rounds over {sessions_count} sessions, as fast as "
        f"one thread can: {b.seconds:.2f} s ({writes / b.seconds:,.0f} writes/s);"
    )
    report.add(
        f"   the same writes with nothing watching, just before: {alone.seconds:.2f} s "
        f"({writes / alone.seconds:,.0f} writes/s)"
    )
    report.add(
        f"   gap between two writes of one session: median {pct(gaps, 50):,.0f} ms, "
        f"p10 {pct(gaps, 10):,.0f} ms, p90 {pct(gaps, 90):,.0f} ms (debounce_ms {args.debounce_ms})"
    )
    report.add("   row writes = distinct (session, time) among its created/updated/phase/status events")
    if daemon_run.converged is None:
        report.target(
            "converged after last write",
            f"> {CONVERGE_DEADLINE_S:.0f} s",
            f"<= {CONVERGE_TARGET_MS} ms",
            False,
        )
    else:
        lag = daemon_run.converged - b.ended
        report.target(
            "converged after last write",
            f"{lag * 1000:,.0f} ms",
            f"<= {CONVERGE_TARGET_MS} ms",
            lag * 1000 <= CONVERGE_TARGET_MS,
        )
    per = [daemon_run.per_session.get(s, 0) for s in b.times]
    debounce_s = args.debounce_ms / 1000
    allowed = {s: b.allowed_writes(s, debounce_s, max_delay_s) for s in b.times}
    over = [s for s in b.times if daemon_run.per_session.get(s, 0) > allowed[s]]
    report.info("row writes", f"{daemon_run.writes:,}")
    report.info("writes/session mean / max", f"{statistics.fmean(per):.2f} / {max(per)}")
    report.target(
        f"sessions over 2 + 1 write per {max_delay_s:g} s, per run of writes",
        f"{len(over)}",
        f"0 (allows {sum(allowed.values()):,})",
        not over,
    )
    lag_ms = None if daemon_run.converged is None else (daemon_run.converged - b.ended) * 1000
    lag_text = "not converged" if lag_ms is None else f"{lag_ms:,.0f} ms"
    report.rows.append(
        Row(
            f"burst: {writes:,} writes over {sessions_count} sessions ({args.db})",
            f"{daemon_run.writes:,} row writes ({statistics.fmean(per):.2f}/session), converged {lag_text}"
            " after the last write",
            f"naive: {naive_run.writes:,}",
            "",
            f"<= 2/session + 1 per {max_delay_s:g} s of writing; <= {CONVERGE_TARGET_MS} ms",
            not over and lag_ms is not None and lag_ms <= CONVERGE_TARGET_MS,
        )
    )
    rule = sum(debounce_fires(t, args.debounce_ms / 1000, max_delay_s) for t in b.times.values())
    # What DESIGN.md's per-key rule (quiet period, ceiling) alone makes of the writes as they came:
    # at or under it, the daemon's flood rule (see daemon/debounce.py) is at work.
    report.info("per-key rule alone would write", f"{rule:,}")
    report.info("daemon CPU, burst to idle", f"{daemon_run.cpu:.2f} s")
    report.add(f"    (daemon counters: {daemon_run.detail})")
    n = naive_run.burst
    report.section(3)
    report.add(
        "3. naive mirror: the same burst on folders of its own, in its own process: a stock watchdog "
        "observer,"
    )
    report.add(
        "   per state.json event an ORM select + insert/update + commit, no debounce; "
        f"its burst took {n.seconds:.2f} s ({writes / n.seconds:,.0f} writes/s)"
    )
    if naive_run.converged is None:
        report.info("converged after last write", f"> {NAIVE_DEADLINE_S:.0f} s")
    else:
        report.info("converged after last write", f"{(naive_run.converged - n.ended) * 1000:,.0f} ms")
    report.info("row writes (done + queued)", f"{naive_run.writes:,}")
    report.info("naive CPU, burst to stop", f"{naive_run.cpu:.2f} s")
    report.add(f"    ({naive_run.detail})")
    ratio = naive_run.writes / daemon_run.writes if daemon_run.writes else float("inf")
    report.target("naive / daemon row writes", f"{ratio:,.1f}x", ">= 10x", ratio >= 10)


def step_idle(report: Report, daemon: Daemon, seconds: float) -> None:
    daemon.wait_idle()
    progress(f"4. idle: {seconds:.0f} s")
    loads = os.getloadavg()
    before, started = cpu_seconds(daemon.pid), time.monotonic()
    threading.Event().wait(seconds)
    used, elapsed = cpu_seconds(daemon.pid) - before, time.monotonic() - started
    share = used / elapsed * 100
    report.section(4)
    report.add(
        f"4. idle CPU over {elapsed:.0f} s (utime + stime from /proc, {os.sysconf('SC_CLK_TCK')} ticks/s; "
        f"load before {' '.join(f'{x:.2f}' for x in loads)})"
    )
    report.info("CPU seconds", f"{used:.2f} s")
    report.target("share of one core", f"{share:.2f} %", "< 1 %", share < 1.0)


def step_memory(report: Report, workdir: Path, db: Database, args: argparse.Namespace) -> None:
    plan: Plan = args.plan
    progress(f"5. memory: building {plan.memory_sessions:,} sessions in {plan.memory_projects} projects")
    files = build_sessions(workdir / "tree", "many", plan.memory_sessions, plan.memory_projects)
    paths = project_paths(files)
    url = db.fresh("daemon")
    report.section(5)
    report.add(f"5. {plan.memory_sessions:,} sessions in {plan.memory_projects} projects watched")
    engine = reader(url)
    try:
        for n, label in enumerate(("cold start (empty database)", "warm restart (rows already there)")):
            progress(f"5. memory: {label}")
            with running_daemon(workdir, f"many-{n}", url, paths, args.debounce_ms) as (daemon, startup_s):
                # READY=1 comes before the start-up reconcile (DESIGN.md): its summary line says done.
                daemon.wait_started(timeout=READY_TIMEOUT_S)
                reconciled_s = time.monotonic() - daemon.started_at
                rows = count_with_description(engine, paths, "initial")
                report.add(f"   {label}:")
                report.target(
                    "rows after the start-up reconcile",
                    f"{rows:,}",
                    f"{plan.memory_sessions:,}",
                    rows == plan.memory_sessions,
                )
                report.info("start-up to READY=1", f"{startup_s:.2f} s")
                report.info("start-up to reconciled", f"{reconciled_s:.2f} s")
                report.info("VmRSS, reconciled", f"{proc_status_kb(daemon.pid, 'VmRSS') / 1024:.1f} MiB")
                report.info("VmHWM (peak)", f"{proc_status_kb(daemon.pid, 'VmHWM') / 1024:.1f} MiB")
                report.info("inotify watches", f"{inotify_watches(daemon.pid):,}")
                report.info("threads", f"{proc_status_kb(daemon.pid, 'Threads')}")
    finally:
        engine.dispose()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument(
        "--pg-url",
        default="postgresql+psycopg://postgres@127.0.0.1/bench",
        help="PostgreSQL database for the daemon (created if missing, its sessionsync tables dropped); "
        "the naive mirror uses <name>_naive next to it. Never 'test'.",
    )
    parser.add_argument("--debounce-ms", type=int, default=200, help="the daemon's watch.debounce_ms")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (about a tenth of the work)")
    parser.add_argument(
        "--inflight",
        type=int,
        default=4,
        help="sessions with a latency write under way at once (1: strictly one write at a time, "
        "about 4 minutes for that step alone at 200 ms)",
    )
    parser.add_argument(
        "--steps",
        type=lambda text: [step.strip() for step in text.split(",") if step.strip()],
        default=list(STEPS),
        help=f"comma-separated steps to run, of {','.join(STEPS)} (default all)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the folders, databases and daemon logs")
    args = parser.parse_args(argv)
    args.plan = QUICK if args.quick else FULL
    unknown = set(args.steps) - set(STEPS)
    if unknown or not args.steps:
        parser.error(f"--steps: {', '.join(sorted(unknown)) or 'none given'}; known: {', '.join(STEPS)}")
    if not 1 <= args.inflight <= args.plan.latency_sessions:
        parser.error(f"--inflight must be between 1 and {args.plan.latency_sessions}")
    if not 0 <= args.debounce_ms <= 60_000:
        parser.error("--debounce-ms must be between 0 and 60000")
    return args


STEPS = ("latency", "burst", "idle", "memory")


def run(args: argparse.Namespace) -> tuple[Report, str, str]:
    """The steps `args.steps` names; the report, the headline, and why it stopped early if it did."""
    steps = set(args.steps)
    workdir = Path(tempfile.mkdtemp(prefix="sessionsync-live-")).resolve()
    db = Database(args.db, args.pg_url, workdir)
    report = Report()
    failure = ""
    try:
        progress(f"building session folders under {workdir}")
        latency_files = build_sessions(workdir / "tree", "lat", args.plan.latency_sessions, 5)
        floor_files = build_sessions(workdir / "tree", "floor", args.plan.latency_sessions, 5)
        burst_files = build_sessions(workdir / "tree", "burst", args.plan.burst_sessions, 10)
        naive_files = build_sessions(workdir / "tree", "naive", args.plan.burst_sessions, 10)
        alone_files = build_sessions(workdir / "tree", "alone", args.plan.burst_sessions, 10)
        if steps & {"latency", "burst", "idle"}:
            url = db.fresh("daemon")
            engine = reader(url)
            try:
                watched = project_paths(latency_files) + project_paths(burst_files)
                with running_daemon(workdir, "live", url, watched, args.debounce_ms) as (daemon, _):
                    if "latency" in steps:
                        step_latency(report, daemon, engine, latency_files, floor_files, workdir, db, args)
                    if "burst" in steps:
                        # The writer's own speed on this machine, now: folders nobody watches.
                        progress("2. burst: the writes alone, on folders nobody watches")
                        alone = run_burst(burst_plan(alone_files, args.plan.burst_writes))
                        daemon_burst = step_burst(daemon, engine, burst_files, args)
                    if "idle" in steps:
                        step_idle(report, daemon, args.plan.idle_s)
            finally:
                engine.dispose()
        if "burst" in steps:
            naive_burst = step_naive(db, naive_files, args)
            report_burst(report, alone, daemon_burst, naive_burst, len(burst_files), args)
        if "memory" in steps:
            step_memory(report, workdir, db, args)
    except SystemExit as exc:
        failure = str(exc)  # a step could not run: still print what the others measured
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    headline = (
        f"sessionsync live benchmark: {args.db}{' (quick)' if args.quick else ''}, "
        f"debounce_ms={args.debounce_ms}, max_delay_ms={max(MAX_DELAY_MS, args.debounce_ms)}, "
        f"workers 2 x 256 (defaults)\n  {db.description}"
    )
    return report, headline, failure


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, start_load = time.monotonic(), load()
    report, headline, failure = run(args)
    return report.print(headline, started, start_load, failure)


if __name__ == "__main__":
    sys.exit(main())

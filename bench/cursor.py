"""The event cursor: what `subscribe` with `since` replays per second, and what the cursor costs
the writes.

Replay: a database holding `--events` committed events (100,000 by default) and a real daemon on
it; a client subscribes with `since: 0` and the clock runs until the last event line arrives.

Write cost: the same writes timed on this code and on a baseline checkout without the cursor
(`--baseline`, by default the commit before migration 0004 was added), each run in a process of
its own, alternating, median of `--repeat`: a cold reconcile of `--sessions` sessions (pipelined
on PostgreSQL) and the same sessions created by 5 threads writing batches of 10 (the live
workers' path, several transactions in flight at once). Both sides hand their events to a hub with
one subscriber, as the daemon does. Target: the cursor within 5 % of the baseline, on the process's
CPU time for SQLite (all its work is in-process) and on wall time for PostgreSQL.

    .venv/bin/python -m bench.cursor --db sqlite
    .venv/bin/python -m bench.cursor --pg-url postgresql+psycopg://postgres@127.0.0.1/bench_cursor

PostgreSQL: the database's sessionsync tables are dropped and recreated, so give it one of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sessionsync.client import Client
from sessionsync.daemon.db import make_engine
from sessionsync.daemon.migrate import upgrade
from sessionsync.models.tables import projects, session_events, sessions
from tests.support.databases import SqliteFiles, empty_postgres_database
from tests.support.runner import Daemon

REPO = Path(__file__).resolve().parent.parent
TARGET_COST = 0.05

# Runs inside the process being timed, on this code or the baseline's: only APIs both have.
WORKLOAD = r"""
import inspect, json, os, sys, tempfile, threading, time
from pathlib import Path
from bench.reconcile import build_tree
from sessionsync.daemon.batch import sync_batch
from sessionsync.daemon.db import make_engine
from sessionsync.daemon.hub import EventHub
from sessionsync.daemon.migrate import upgrade
from sessionsync.daemon.reconcile import freeze_long_lived, reconcile, register
from sessionsync.daemon.store import Store
from sessionsync.models.keys import SessionKey
from tests.support.databases import empty_postgres_database

args = json.loads(sys.argv[1])
tree = build_tree(Path(tempfile.mkdtemp(dir=args["tmp"])), args["sessions"], 10)
cursor = "hub" in inspect.signature(Store).parameters

def fresh(name):
    if args["pg_url"]:
        empty_postgres_database(args["pg_url"])
        url = args["pg_url"]
    else:
        url = f"sqlite:///{args['tmp']}/{name}-{time.monotonic_ns()}.db"
    engine = make_engine(url)
    upgrade(engine)
    hub = EventHub()
    hub.subscribe(maxsize=10**7)
    store = Store(engine, host="bench", hub=hub) if cursor else Store(engine, host="bench")
    # The daemon hands committed events to the hub (the cursor's store does it at commit).
    publish = (lambda events: None) if cursor else hub.publish_many
    return engine, store, register(store, tree.projects), publish

freeze_long_lived()
figures = {}
engine, store, refs, publish = fresh("reconcile")
started, cpu = time.perf_counter(), time.process_time()
reconcile(store, list(refs.values()), 1 << 20, 256, on_batch=lambda r: publish(r.events))
figures["reconcile"] = (time.perf_counter() - started, time.process_time() - cpu)
engine.dispose()

engine, store, refs, publish = fresh("workers")
keys = [SessionKey(p.path, s) for p in tree.projects for s in sorted(os.listdir(p.sessions_dir))]
def work(mine):
    for i in range(0, len(mine), 10):
        publish(sync_batch(store, refs, mine[i : i + 10], 1 << 20).events)
threads = [threading.Thread(target=work, args=(keys[w::5],)) for w in range(5)]
started, cpu = time.perf_counter(), time.process_time()
for t in threads:
    t.start()
for t in threads:
    t.join()
figures["workers"] = (time.perf_counter() - started, time.process_time() - cpu)
engine.dispose()
print(json.dumps(figures))
"""


def baseline_ref() -> str:
    added = subprocess.run(
        [
            "git",
            "-C",
            str(REPO),
            "log",
            "--format=%H",
            "--diff-filter=A",
            "--",
            "models/migrations/versions/0004_event_ids.py",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if not added:
        raise SystemExit("migration 0004 is not committed; give --baseline")
    return f"{added[-1]}^"


def export(ref: str, into: Path) -> Path:
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_workload(root: Path, args: dict[str, Any]) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", WORKLOAD, json.dumps(args)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise SystemExit(f"the workload failed in {root}:\n{out.stderr[-3000:]}")
    figures: dict[str, list[float]] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def write_cost(label: str, pg_url: str, sessions: int, repeat: int, ref: str, tmp: Path) -> bool:
    """Judged on this process's CPU time on SQLite (all of its work is in-process, and other load
    on the machine moves wall time by more than 5 %), on wall time on PostgreSQL (the server's
    work is in another process)."""
    base = export(ref, tmp / f"baseline-{label}")
    runs: dict[str, dict[str, list[tuple[float, float]]]] = {"baseline": {}, "cursor": {}}
    for _ in range(repeat):
        for side, root in (("baseline", base), ("cursor", REPO)):
            figures = run_workload(root, {"sessions": sessions, "pg_url": pg_url, "tmp": str(tmp)})
            for name, (wall, cpu) in figures.items():
                runs[side].setdefault(name, []).append((wall, cpu))
    judged = 1 if label == "sqlite" else 0
    ok = True
    for name in runs["cursor"]:
        before = [statistics.median(x[i] for x in runs["baseline"][name]) for i in (0, 1)]
        after = [statistics.median(x[i] for x in runs["cursor"][name]) for i in (0, 1)]
        cost = after[judged] / before[judged] - 1
        passed = cost <= TARGET_COST
        ok &= passed
        print(
            f"{label:8} write cost, {name:9} {sessions} sessions: wall {before[0]:.3f} -> {after[0]:.3f} s, "
            f"cpu {before[1]:.3f} -> {after[1]:.3f} s; {('wall', 'cpu')[judged]} {cost:+.1%} "
            f"(target <= +{TARGET_COST:.0%}) {'PASS' if passed else 'FAIL'}"
        )
    return ok


def fill_events(url: str, count: int) -> Path:
    """A database holding `count` committed events of 100 sessions of one project; its folder."""
    engine = make_engine(url)
    upgrade(engine)
    folder = Path(tempfile.mkdtemp(prefix="bench-cursor-"))
    now = datetime.now(UTC)
    with engine.begin() as conn:
        project_id = conn.execute(
            projects.insert()
            .values(
                host=socket.gethostname(),
                working_dir=str(folder),
                name="bench",
                sessions_dir=str(folder / "agents/sessions"),
                created_at=now,
            )
            .returning(projects.c.id)
        ).scalar_one()
        ids = (
            conn.execute(
                sessions.insert().returning(sessions.c.id, sort_by_parameter_order=True),
                [
                    {"project_id": project_id, "slug": f"s{n}", "first_seen_at": now, "synced_at": now}
                    for n in range(100)
                ],
            )
            .scalars()
            .all()
        )
        rows = [
            {"session_id": ids[n % 100], "at": now, "kind": "updated", "from_value": None, "to_value": None}
            for n in range(count)
        ]
        for start in range(0, count, 10_000):
            conn.execute(session_events.insert(), rows[start : start + 10_000])
    engine.dispose()
    (folder / "agents/sessions").mkdir(parents=True)
    return folder


def replay(label: str, url: str, count: int, tmp: Path) -> None:
    folder = fill_events(url, count)
    try:
        home = tmp / f"daemon-{label}"
        home.mkdir()
        # Its start-up reconcile tombstones the 100 sessions (no folders): ids after the replay's.
        with Daemon(home, url, projects=[folder]) as daemon:
            daemon.wait_started(timeout=120)
            started = time.perf_counter()
            got = 0
            with Client(daemon.socket_path) as client:
                for event in client.subscribe(since=0):
                    got += 1
                    if event.id == count:
                        break
            seconds = time.perf_counter() - started
            daemon.stop()
        print(f"{label:8} replay of {got} events since 0: {seconds:.2f} s, {got / seconds:,.0f} events/s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1/bench_cursor")
    parser.add_argument("--sessions", type=int, default=3000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", help="git ref of the code without the cursor")
    parser.add_argument("--skip-replay", action="store_true")
    args = parser.parse_args()
    ref = args.baseline or baseline_ref()
    print(f"baseline {ref}; load average {os.getloadavg()[0]:.2f}")
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-cursor-") as name:
        tmp = Path(name)
        files = SqliteFiles(tmp / "db")
        if args.db in ("sqlite", "both"):
            if not args.skip_replay:
                replay("sqlite", files.fresh("replay"), args.events, tmp)
            ok &= write_cost("sqlite", "", args.sessions, args.repeat, ref, tmp)
        if args.db in ("postgres", "both"):
            if not args.skip_replay:
                empty_postgres_database(args.pg_url)
                replay("postgres", args.pg_url, args.events, tmp)
            ok &= write_cost("postgres", args.pg_url, args.sessions, args.repeat, ref, tmp)
    print("PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()

"""Scale benchmark: what the real daemon (`sessionsync run`) holds as projects and sessions grow.

Measures, from /proc of the daemon process: inotify watches (against projects x 2 + sessions, with
a deep research/ tree inside some sessions), threads at 100 and 1,000 projects (a fixed number is
the target), resident memory (VmRSS, and the peak VmHWM) at 10,000 and 100,000 sessions, and what
the imports alone cost (a daemon with no project). Memory is taken once the start-up reconcile is
done and nothing is pending, on a cold start (empty database) and on a warm restart (rows there).
Prints every figure with its target and PASS/FAIL; exits 0 whatever the figures (1 only when a
step could not run at all).
Run (from the repository root):
     .venv/bin/python -m bench.scale [--db sqlite|postgres] [--tree DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.live import (
    Database,
    Report,
    inotify_watches,
    load,
    proc_status_kb,
    progress,
    running_daemon,
)
from bench.table import Row
from tests.support.runner import Daemon

SESSIONS_SUBDIR = os.path.join("agents", "sessions")
THREAD_PROJECTS = (100, 1000)
RSS_TARGETS_MIB = {10_000: 60.0, 100_000: 120.0}
SETTLE_TIMEOUT_S = 600.0
# A few sessions carry a research/ tree three levels deep (8 x 8 x 8 folders): it must cost no watch.
DEEP_SESSIONS = 4
DEEP_FANOUT = 8


@dataclass(frozen=True)
class Scale:
    """One size: `sessions` spread over `projects`."""

    sessions: int
    projects: int


FULL = (Scale(10_000, 100), Scale(100_000, 1000))
QUICK = (Scale(1000, 10), Scale(10_000, 100))


def small_state(slug: str) -> bytes:
    return json.dumps(
        {
            "session_id": slug,
            "topic": f"Scale session {slug}",
            "status": "active",
            "current_phase": "build",
            "phase_history": {"spec_started_at": "2026-02-20T13:00:00+00:00"},
            "build_progress": {"checkpoints_total": 4, "checkpoints_completed": [1]},
        }
    ).encode()


def build(root: Path, scale: Scale) -> list[str]:
    """`scale.sessions` session folders over `scale.projects` projects under `root`, built once:
    a folder already complete (its marker written last) is used as it is. The projects' paths."""
    marker = root / "complete.json"
    projects = [str(root / f"p{n:04d}") for n in range(scale.projects)]
    if marker.exists() and json.loads(marker.read_text()) == [scale.sessions, scale.projects]:
        return projects
    shutil.rmtree(root, ignore_errors=True)
    progress(f"building {scale.sessions:,} sessions in {scale.projects:,} projects under {root}")
    for n in range(scale.sessions):
        slug = f"2026-02-20_s{n:06d}"
        folder = os.path.join(projects[n % scale.projects], SESSIONS_SUBDIR, slug)
        os.makedirs(folder)
        with open(os.path.join(folder, "state.json"), "wb") as f:
            f.write(small_state(slug))
        if n < DEEP_SESSIONS:
            for a in range(DEEP_FANOUT):
                for b in range(DEEP_FANOUT):
                    for c in range(DEEP_FANOUT):
                        os.makedirs(os.path.join(folder, "research", f"a{a}", f"b{b}", f"c{c}"))
    marker.write_text(json.dumps([scale.sessions, scale.projects]))
    return projects


def figures(pid: int) -> tuple[int, int, float, float]:
    """(watches, threads, VmRSS MiB, VmHWM MiB) of a process."""
    return (
        inotify_watches(pid),
        proc_status_kb(pid, "Threads"),
        proc_status_kb(pid, "VmRSS") / 1024,
        proc_status_kb(pid, "VmHWM") / 1024,
    )


def settle(daemon: Daemon) -> None:
    """Wait for the start-up summary line, logged once the start-up reconcile has written every
    session: on folders nobody writes to, nothing is pending after it. (Not `status`: at 1,000
    projects its reply outgrows the protocol's 64 KiB line.)"""
    daemon.wait_started(timeout=SETTLE_TIMEOUT_S)


def step_imports(report: Report, workdir: Path, db: Database) -> tuple[float, int]:
    """The empty daemon's RSS and threads."""
    progress("1. imports alone: a daemon with no project")
    url = db.fresh("daemon")
    with running_daemon(workdir, "empty", url, [], 200) as (daemon, _):
        settle(daemon)
        watches, threads, rss, hwm = figures(daemon.pid)
    report.section(1)
    report.add("1. a daemon with no project (what the imports and the set-up cost)")
    report.info("VmRSS / VmHWM", f"{rss:.1f} / {hwm:.1f} MiB")
    report.info("threads", f"{threads}")
    report.info("inotify watches", f"{watches}")
    return rss, threads


def step_threads(report: Report, workdir: Path, db: Database, tree: Path, empty_threads: int) -> None:
    report.section(2)
    report.add(f"2. threads as projects grow (2 sessions each; the empty daemon has {empty_threads})")
    for n in THREAD_PROJECTS:
        projects = build(tree / f"threads-{n}", Scale(2 * n, n))
        progress(f"2. threads: {n:,} projects")
        url = db.fresh("daemon")
        with running_daemon(workdir, f"threads-{n}", url, projects, 200) as (daemon, _):
            settle(daemon)
            watches, threads, _, _ = figures(daemon.pid)
        report.target(
            f"threads at {n:,} projects", f"{threads}", f"{empty_threads}", threads == empty_threads
        )
        report.rows.append(
            Row(
                f"threads, {n:,} projects ({db.kind})",
                f"{threads}",
                f"no project: {empty_threads}",
                target="fixed (= no project)",
                ok=threads == empty_threads,
            )
        )
        report.target(f"inotify watches at {n:,} projects", f"{watches:,}", f"{4 * n:,}", watches == 4 * n)


def step_scale(
    report: Report, workdir: Path, db: Database, tree: Path, scale: Scale, imports_rss: float
) -> float | None:
    """Watches, threads and memory at one size; the warm RSS."""
    projects = build(tree / f"sessions-{scale.sessions}", scale)
    expected = scale.projects * 2 + scale.sessions
    deep = DEEP_SESSIONS * DEEP_FANOUT * (1 + DEEP_FANOUT + DEEP_FANOUT**2)
    report.add(
        f"   {scale.sessions:,} sessions in {scale.projects:,} projects "
        f"({deep:,} more folders below {DEEP_SESSIONS} of them, in research/):"
    )
    url = db.fresh("daemon")
    target = RSS_TARGETS_MIB.get(scale.sessions)
    warm_rss = None
    for label in ("cold start (empty database)", "warm restart (rows already there)"):
        progress(f"3. {scale.sessions:,} sessions: {label}")
        started = time.monotonic()
        with running_daemon(workdir, f"s{scale.sessions}-{label[:4]}", url, projects, 200) as (
            daemon,
            ready_s,
        ):
            settle(daemon)
            settled_s = time.monotonic() - started
            watches, threads, rss, hwm = figures(daemon.pid)
        report.add(
            f"     {label}: READY=1 after {ready_s:.2f} s, reconciled and idle after {settled_s:.1f} s"
        )
        report.target(
            "inotify watches", f"{watches:,}", f"{expected:,} (projects x 2 + sessions)", watches == expected
        )
        report.info("threads", f"{threads}")
        if target is None:
            report.info("VmRSS (VmHWM)", f"{rss:.1f} MiB ({hwm:.1f})")
        else:
            report.target(
                "VmRSS (VmHWM)", f"{rss:.1f} MiB ({hwm:.1f})", f"<= {target:.0f} MiB", rss <= target
            )
        report.info(
            "per session above the empty daemon", f"{(rss - imports_rss) * 1024 / scale.sessions:.2f} KiB"
        )
        warm_rss = rss
        size = f"{scale.sessions // 1000}k"
        kind = label.split(" (")[0]
        report.rows.append(
            Row(
                f"resident memory, {size} sessions watched, {kind} ({db.kind})",
                f"{rss:.1f} MiB",
                f"no project: {imports_rss:.1f} MiB",
                f"{(rss - imports_rss) * 1024 / scale.sessions:.2f} KiB/session",
                "" if target is None else f"<= {target:.0f} MiB",
                None if target is None else rss <= target,
            )
        )
        report.rows.append(
            Row(
                f"inotify watches, {size} sessions, deep research/ trees, {kind} ({db.kind})",
                f"{watches:,}",
                f"projects x 2 + sessions = {expected:,}",
                target=f"{expected:,}",
                ok=watches == expected,
            )
        )
    return warm_rss


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument(
        "--pg-url",
        default="postgresql+psycopg://postgres@127.0.0.1/bench",
        help="PostgreSQL database for the daemon (created if missing, its sessionsync tables dropped); "
        "never 'test'",
    )
    parser.add_argument(
        "--tree",
        type=Path,
        help="where the session folders are built, and kept for the next run (default: a temporary "
        "folder, removed at the end); /dev/shm builds faster",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run at 1,000 and 10,000 sessions")
    parser.add_argument("--keep", action="store_true", help="keep the run folders, databases and daemon logs")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, scales: Sequence[Scale]) -> tuple[Report, str, str]:
    """Every step at these sizes; the report, the headline, and why it stopped early if it did."""
    workdir = Path(tempfile.mkdtemp(prefix="sessionsync-scale-")).resolve()
    tree = args.tree.resolve() if args.tree else workdir / "tree"
    tree.mkdir(parents=True, exist_ok=True)
    db = Database(args.db, args.pg_url, workdir)
    report = Report()
    failure = ""
    warm: dict[int, float] = {}
    try:
        imports_rss, empty_threads = step_imports(report, workdir, db)
        step_threads(report, workdir, db, tree, empty_threads)
        report.section(3)
        report.add("3. watches, threads and memory as sessions grow")
        for scale in scales:
            rss = step_scale(report, workdir, db, tree, scale, imports_rss)
            if rss is not None:
                warm[scale.sessions] = rss
        if len(warm) == 2:
            (small, rss_small), (big, rss_big) = sorted(warm.items())
            report.section(4)
            report.add("4. what each session costs (warm)")
            report.info(
                f"VmRSS {big:,} - {small:,} sessions, per session",
                f"{(rss_big - rss_small) * 1024 / (big - small):.2f} KiB",
            )
            report.info("the empty daemon", f"{imports_rss:.1f} MiB")
    except (SystemExit, AssertionError) as exc:  # a daemon that did not start, or not in time
        failure = str(exc)
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    headline = (
        f"sessionsync scale benchmark: {args.db}{' (quick)' if args.quick else ''}, defaults otherwise\n"
        f"  {db.description}; session folders in {tree}"
    )
    return report, headline, failure


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started, start_load = time.monotonic(), load()
    report, headline, failure = run(args, QUICK if args.quick else FULL)
    return report.print(headline, started, start_load, failure)


if __name__ == "__main__":
    sys.exit(main())

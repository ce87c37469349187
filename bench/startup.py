"""Start-up benchmark: the one-shot CLI's own cost, and the daemon's time to READY.

1. `sessionsync reconcile` with nothing to do, as a user runs it: the venv's entry point, a fresh
   HOME and XDG folders, the config file in $XDG_CONFIG_HOME, a SQLite file already mirroring one
   project of 10 sessions. Wall time of the whole process, median of --runs (target < 0.3 s),
   next to anchors run in the same rounds: `python -c pass`, and the imports the CLI could pay for.
2. The daemon (`sessionsync run`, as systemd starts it) on N sessions (--sessions, default 10,000;
   100,000 with --large), READY=1 timed from the exec: on an empty database (READY as soon as the
   control socket answers; `status` sampled until the start-up reconcile is done, which must show
   its progress), then restarted on the now mirrored database, median of 3 (target <= 2 s).
Run (from the repository root):
     .venv/bin/python -m bench.startup [--db sqlite|postgres|both] [--large] [--tree DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.live import Database, build_sessions, progress, running_daemon
from bench.scale import Scale, build
from bench.table import Row, load, median, ratio, render, seconds, versions

SESSIONSYNC = Path(sys.executable).parent / "sessionsync"
CLI_TARGET_S = 0.3
READY_TARGET_S = 2.0
CLI_SESSIONS = 10
WARM_STARTS = 3
# How often `status` is asked while the start-up reconcile runs: a handful of samples a second.
STATUS_EVERY_S = 0.25
RECONCILE_DEADLINE_S = 900.0
# The anchors: what the interpreter alone costs, and the imports a reconcile could pay for.
ANCHORS = (
    ("python -c pass", "pass"),
    ("python -c 'import sqlalchemy'", "import sqlalchemy"),
    ("python -c 'import pydantic'", "import pydantic"),
    ("python -c 'import psycopg'", "import psycopg"),
    ("python -c 'import sessionsync.daemon.cli'", "import sessionsync.daemon.cli"),
)


# --- 1. the one-shot CLI ----------------------------------------------------------------------


def user_env(home: Path) -> dict[str, str]:
    """A fresh user: HOME and every XDG folder under `home`, no SESSIONSYNC_* variable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SESSIONSYNC_", "XDG_")) and k != "NOTIFY_SOCKET"
    }
    env["HOME"] = str(home)
    for name, sub in (
        ("XDG_CONFIG_HOME", ".config"),
        ("XDG_STATE_HOME", ".local/state"),
        ("XDG_CACHE_HOME", ".cache"),
        ("XDG_RUNTIME_DIR", "run"),
    ):
        folder = home / sub
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        env[name] = str(folder)
    return env


@dataclass
class CliFigures:
    """Seconds per run of the CLI and of each anchor."""

    cli: list[float] = field(default_factory=list)
    anchors: dict[str, list[float]] = field(default_factory=dict)
    summary: str = ""


def wall(command: Sequence[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    """Wall time of one whole process, and its output; it must exit 0."""
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return elapsed, done.stdout.strip()


def measure_cli(workdir: Path, runs: int) -> CliFigures:
    """The CLI and the anchors, one of each per round, in a rotating order."""
    home = workdir / "user"
    env = user_env(home)
    files = build_sessions(home / "code", "cli", CLI_SESSIONS, 1)
    project = files[0].project
    config = Path(env["XDG_CONFIG_HOME"]) / "sessionsync" / "config.toml"
    config.parent.mkdir(parents=True)
    database = Path(env["XDG_STATE_HOME"]) / "sessionsync" / "sessions.db"
    config.write_text(
        f'[database]\nurl = "sqlite:///{database}"\n\n[watch]\nprojects = ["{project}"]\nroots = []\n'
    )
    _, first = wall([str(SESSIONSYNC), "reconcile"], env, home)
    if f"{CLI_SESSIONS} written" not in first:
        raise SystemExit(f"the first `sessionsync reconcile` did not mirror the project: {first}")
    figures = CliFigures(anchors={label: [] for label, _ in ANCHORS})
    commands: list[tuple[str, list[str]]] = [
        ("cli", [str(SESSIONSYNC), "reconcile"]),
        *((label, [sys.executable, "-c", code]) for label, code in ANCHORS),
    ]
    for run in range(runs):
        shift = run % len(commands)
        for label, command in commands[shift:] + commands[:shift]:
            elapsed, out = wall(command, env, home)
            if label == "cli":
                if " 0 written" not in out:
                    raise SystemExit(f"`sessionsync reconcile` had something to do: {out}")
                figures.cli.append(elapsed)
                figures.summary = out
            else:
                figures.anchors[label].append(elapsed)
        progress(f"1. cli round {run + 1}/{runs}: reconcile {figures.cli[-1] * 1000:.0f} ms")
    return figures


def cli_rows(figures: CliFigures) -> list[Row]:
    cli = median(figures.cli)
    bare = median(figures.anchors[ANCHORS[0][0]])
    out = [
        Row(
            "`sessionsync reconcile` with nothing to do, whole process",
            seconds(cli),
            f"python -c pass {seconds(bare)}",
            ratio(cli, bare),
            f"< {seconds(CLI_TARGET_S)}",
            cli < CLI_TARGET_S,
        )
    ]
    out += [Row(f"  anchor: {label}", seconds(median(runs))) for label, runs in figures.anchors.items()]
    return out


# --- 2. the daemon to READY -------------------------------------------------------------------


@dataclass
class ReadyFigures:
    """The daemon's start-up on one database: empty, then already mirrored."""

    db: str
    sessions: int
    description: str = ""
    empty_ready: float = 0.0
    mirrored_after: float = 0.0  # from the exec to the start-up reconcile's end, empty database
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (s after exec, seen, total)
    warm_ready: list[float] = field(default_factory=list)


def watch_reconcile(status: Callable[[], dict[str, Any]], started_at: float, figures: ReadyFigures) -> None:
    """Sample `status` until the start-up reconcile has finished; record its progress."""
    deadline = time.monotonic() + RECONCILE_DEADLINE_S
    tick = threading.Event()
    while time.monotonic() < deadline:
        reply = status()
        running = reply.get("reconcile")
        now = time.monotonic() - started_at
        if running:
            figures.samples.append((now, int(running["seen"]), int(running["total"])))
        elif reply.get("last_reconcile_at"):
            figures.mirrored_after = now
            return
        tick.wait(STATUS_EVERY_S)
    raise SystemExit(f"the start-up reconcile did not finish within {RECONCILE_DEADLINE_S:.0f} s")


def measure_ready(workdir: Path, db: Database, projects: list[str], sessions: int) -> ReadyFigures:
    figures = ReadyFigures(db.kind, sessions)
    url = db.fresh("daemon")
    figures.description = db.description
    progress(f"2. {db.kind}: daemon start on an empty database, {sessions:,} sessions")
    with running_daemon(workdir, f"{db.kind}-empty", url, projects, 200) as (daemon, ready_s):
        figures.empty_ready = ready_s
        watch_reconcile(lambda: daemon.status(30.0), daemon.started_at, figures)
    progress(
        f"2. {db.kind}: READY after {ready_s:.2f} s, mirrored after {figures.mirrored_after:.1f} s; "
        f"{len(figures.samples)} status sample(s) showed the reconcile running"
    )
    for n in range(WARM_STARTS):
        with running_daemon(workdir, f"{db.kind}-warm-{n}", url, projects, 200) as (daemon, ready_s):
            figures.warm_ready.append(ready_s)
            # Let its start-up reconcile end before SIGTERM, so each start finds the same database.
            watch_reconcile(lambda: daemon.status(30.0), daemon.started_at, ReadyFigures(db.kind, sessions))
        progress(
            f"2. {db.kind}: restart on the mirrored database {n + 1}/{WARM_STARTS}: READY {ready_s:.2f} s"
        )
    return figures


def ready_rows(figures: ReadyFigures) -> list[Row]:
    size = f"{figures.sessions // 1000}k" if figures.sessions % 1000 == 0 else f"{figures.sessions:,}"
    warm = median(figures.warm_ready)
    shown = figures.samples
    if shown:
        at, seen, total = shown[len(shown) // 2]
        how_far = f"{seen:,}/{total:,}" if total else "listing folders"
        anchor = f"status at {at:.1f} s: {how_far}; mirrored at {figures.mirrored_after:.1f} s"
    else:
        anchor = f"no status showed progress; mirrored at {figures.mirrored_after:.1f} s"
    return [
        Row(
            f"daemon start, {size} already mirrored ({figures.db}), to READY",
            seconds(warm),
            target=f"<= {seconds(READY_TARGET_S)}",
            ok=warm <= READY_TARGET_S,
        ),
        Row(
            f"daemon start, {size}, empty database ({figures.db}), to READY",
            seconds(figures.empty_ready),
            anchor,
            target="READY before the reconcile ends; status shows it",
            ok=bool(shown) and figures.empty_ready < figures.mirrored_after,
        ),
    ]


# --- the run ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument(
        "--pg-url",
        default="postgresql+psycopg://postgres@127.0.0.1/bench",
        help="PostgreSQL database for the daemon (created if missing, its sessionsync tables dropped); "
        "never 'test'",
    )
    parser.add_argument("--runs", type=int, default=9, help="runs of the CLI and each anchor (default 9)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--sessions", type=int, default=10_000, help="sessions the daemon starts on")
    size.add_argument("--large", action="store_true", help="100,000 sessions")
    parser.add_argument("--projects", type=int, default=100, help="projects they are spread over")
    parser.add_argument(
        "--tree", type=Path, help="where the session folders are built and kept for the next run"
    )
    parser.add_argument("--skip-cli", action="store_true", help="only the daemon's start-up")
    parser.add_argument("--skip-daemon", action="store_true", help="only the CLI's start-up")
    args = parser.parse_args(argv)
    if args.large:
        args.sessions = 100_000
    if args.runs < 1 or args.sessions < 1 or args.projects < 1:
        parser.error("--runs, --sessions and --projects must be at least 1")
    return args


def run(args: argparse.Namespace, workdir: Path) -> list[Row]:
    """Every figure the arguments ask for, as table rows."""
    out: list[Row] = []
    if not args.skip_cli:
        out += cli_rows(measure_cli(workdir, args.runs))
    if not args.skip_daemon:
        tree = args.tree.resolve() if args.tree else workdir / "tree"
        projects = build(
            tree / f"startup-{args.sessions}", Scale(args.sessions, min(args.projects, args.sessions))
        )
        for kind in ("sqlite", "postgres") if args.db == "both" else (args.db,):
            db = Database(kind, args.pg_url, workdir)
            out += ready_rows(measure_ready(workdir, db, projects, args.sessions))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="sessionsync-startup-")).resolve()
    started, start_load = time.monotonic(), load()
    try:
        rows = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(
        f"sessionsync start-up benchmark: CLI median of {args.runs}, daemon restarts median of {WARM_STARTS}"
    )
    print(f"  {versions()}")
    print(
        f"  load average at start {start_load}, at end {load()}; run took {time.monotonic() - started:.0f} s"
    )
    print()
    for line in render(rows):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

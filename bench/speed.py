"""Issue #13's table in one run: every figure, its floor or anchor measured in the same run, the
ratio, the target and PASS/FAIL, with the load average and the versions.

It runs the other benchmarks' parts in this process, one after the other (each stays runnable on
its own, and prints more): bench.live (latency against the minimal inotify -> upsert loop, and
the burst), bench.reconcile (warm and cold against their floors, and the naive ORM), bench.startup
(the one-shot CLI, the daemon to READY) and bench.scale (memory, threads, watches). At 10,000
sessions by default; --large adds 100,000 (reconcile, READY, memory).
Run (from the repository root):
     .venv/bin/python -m bench.speed [--large] [--db sqlite|postgres|both] [--pg-url URL]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import live, reconcile, scale, startup
from bench.table import Row, load, render, versions

PARTS = ("live", "reconcile", "startup", "scale")
LARGE = 100_000
QUICK = 1000


def base(args: argparse.Namespace) -> int:
    return QUICK if args.quick else 10_000


def kinds(db: str) -> tuple[str, ...]:
    return ("sqlite", "postgres") if db == "both" else (db,)


def part_live(args: argparse.Namespace, _workdir: Path) -> list[Row]:
    rows = []
    for kind in kinds(args.db):
        report, _, failure = live.run(
            live.parse_args(
                ["--db", kind, "--pg-url", args.pg_url, "--steps", "latency,burst"]
                + (["--quick"] if args.quick else [])
            )
        )
        if failure:
            raise SystemExit(f"bench.live on {kind}: {failure}")
        rows += report.rows
    return rows


def part_reconcile(args: argparse.Namespace, workdir: Path) -> list[Row]:
    sizes = [base(args), LARGE] if args.large else [base(args)]
    figures, _ = reconcile.run(sizes, args.db, args.pg_url, args.repeat, 10_000, 100, workdir / "reconcile")
    return [row for f in figures for row in reconcile.rows(f)]


def part_startup(args: argparse.Namespace, workdir: Path) -> list[Row]:
    argv = ["--db", args.db, "--pg-url", args.pg_url, "--sessions", str(LARGE if args.large else base(args))]
    if args.tree:
        argv += ["--tree", str(args.tree)]
    return startup.run(startup.parse_args(argv), workdir / "startup")


def part_scale(args: argparse.Namespace, _workdir: Path) -> list[Row]:
    argv = ["--db", "sqlite"] + (["--tree", str(args.tree)] if args.tree else [])
    small = scale.Scale(base(args), base(args) // 100)
    sizes = (small, scale.Scale(LARGE, 1000)) if args.large else (small,)
    report, _, failure = scale.run(scale.parse_args(argv), sizes)
    if failure:
        raise SystemExit(f"bench.scale: {failure}")
    return report.rows


RUNNERS: dict[str, Callable[[argparse.Namespace, Path], list[Row]]] = {
    "live": part_live,
    "reconcile": part_reconcile,
    "startup": part_startup,
    "scale": part_scale,
}

# The order of #13's table: the first prefix a figure starts with places it.
ORDER = (
    "isolated save",
    "warm reconcile",
    "`sessionsync reconcile`",
    "  anchor",
    "cold reconcile",
    "daemon start",
    "resident memory",
    "threads",
    "inotify watches",
    "burst",
)


def ordered(rows: Sequence[Row]) -> list[Row]:
    def place(row: Row) -> int:
        return next((n for n, prefix in enumerate(ORDER) if row.figure.startswith(prefix)), len(ORDER))

    # sorted() is stable: within one place the rows keep the order their benchmark gave them.
    return sorted(rows, key=place)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--large", action="store_true", help=f"add the {LARGE:,}-session figures")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run at {QUICK:,} sessions")
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument(
        "--pg-url",
        default="postgresql+psycopg://postgres@127.0.0.1/bench",
        help="PostgreSQL database every part uses in turn (created if missing, its sessionsync tables "
        "dropped; bench.live also uses <name>_floor and <name>_naive); never 'test'",
    )
    parser.add_argument("--repeat", type=int, default=3, help="bench.reconcile's runs per figure")
    parser.add_argument(
        "--tree", type=Path, help="where bench.scale and bench.startup keep their session folders"
    )
    parser.add_argument(
        "--parts",
        type=lambda text: [p.strip() for p in text.split(",") if p.strip()],
        default=list(PARTS),
        help=f"comma-separated parts to run, of {','.join(PARTS)} (default all)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.parts) - set(PARTS)
    if unknown or not args.parts:
        parser.error(f"--parts: {', '.join(sorted(unknown)) or 'none given'}; known: {', '.join(PARTS)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="sessionsync-speed-")).resolve()
    started, start_load = time.monotonic(), load()
    rows: list[Row] = []
    took: list[str] = []
    failures: list[str] = []
    try:
        for part in args.parts:
            part_started = time.monotonic()
            (workdir / part).mkdir()
            try:
                rows += RUNNERS[part](args, workdir)
            except SystemExit as exc:  # a part that could not run: the others still report
                failures.append(f"{part}: {exc}")
            took.append(f"{part} {time.monotonic() - part_started:.0f} s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(
        f"sessionsync speed (issue #13): {base(args):,}{f' and {LARGE:,}' if args.large else ''} sessions, "
        f"databases: {', '.join(kinds(args.db))}"
    )
    print(f"  {versions()}")
    print(
        f"  load average at start {start_load}, at end {load()}; run took "
        f"{time.monotonic() - started:.0f} s ({', '.join(took)})"
    )
    print()
    for line in render(ordered(rows)):
        print(line)
    for failure in failures:
        print(f"\nnot measured: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

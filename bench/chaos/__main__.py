"""Chaos run: the real daemon under a seeded workload of file changes and bad input, interleaved
with faults (kill -9, SIGTERM mid-burst, SIGSTOP, the database cut off or slow, an inotify queue
overflow, running out of inotify watches). Once the faults are healed, every row must match an
independent reading of the files.

Every decision comes from `random.Random(seed)`, and faults are spaced and healed by operation
counts, not by time: a seed replays the same operations and faults (timing jitter aside). The last
15 % of a run is calm (faults healed, daemon started, writes go on), so the check also proves the
live path, not only the reconcile of a restart.
The overflow and watch-limit faults lower the daemon's own inotify limits through the watcher's
test seam (stand-in files for the sysctls); `--real-sysctl` lowers the machine's fs.inotify
sysctls instead (root; for a moment, under every process on the machine).
Run (from the repository root):
      .venv/bin/python -m bench.chaos --seed 7 --seconds 60 --db postgres
      .venv/bin/python -m bench.chaos --seeds 1-20 --seconds 60 --db sqlite
Exits 1 on any divergence (a row that differs from the files) or daemon error (a wrong exit
code, a traceback in its log), each printed with the command that reproduces it.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path
from types import FrameType

from bench.chaos.record import Outcome
from bench.chaos.run import Chaos
from tests.support.databases import postgres_schema

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1/chaos"


def run_seed(
    seed: int,
    seconds: float,
    db: str,
    pg_url: str,
    keep: bool,
    fault_gap: tuple[int, int],
    max_ops: int | None,
    real_sysctl: bool = False,
) -> Outcome:
    """One seed in a fresh folder and database; the folder is removed unless it diverged."""
    work = Path(tempfile.mkdtemp(prefix=f"chaos-{db}-{seed}-", dir="/tmp"))
    outcome = Outcome(seed, db, seconds)

    def kept() -> bool:  # the schema too, when asked or when the run diverged
        return keep or outcome.failed

    try:
        if db == "sqlite":
            chaos = Chaos(
                seed, seconds, f"sqlite:///{work / 'sessions.db'}", work, fault_gap, max_ops, real_sysctl
            )
            outcome = chaos.out
            chaos.run()
        else:
            with postgres_schema(pg_url, f"chaos_{seed}_", create_database=True, keep=kept) as schema:
                try:
                    chaos = Chaos(seed, seconds, schema.url, work, fault_gap, max_ops, real_sysctl)
                    outcome = chaos.out
                    chaos.run()
                finally:
                    if kept():
                        print(f"  kept schema {schema.name} in {schema.database} for inspection")
    except Exception as exc:
        # The run itself broke (a harness problem, a daemon that never started): reported as a
        # daemon error, and the next seed still runs.
        traceback.print_exc()
        outcome.errors.append(f"the chaos run failed: {exc!r}")
    if keep or outcome.failed:
        print(f"  kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return outcome


def _seeds(args: argparse.Namespace) -> list[int]:
    if args.seeds:
        first, _, last = args.seeds.partition("-")
        return list(range(int(first), int(last or first) + 1))
    return [args.seed]


def _terminate(_sig: int, _frame: FrameType | None) -> None:
    raise SystemExit(143)  # so `finally` puts the sysctls back and stops the daemon


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seeds", help="a range of consecutive seeds, e.g. 1-20")
    parser.add_argument("--seconds", type=float, default=60.0, help="workload duration per seed")
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help="a database of its own (created if missing)")
    parser.add_argument("--keep", action="store_true", help="keep the folders and schemas")
    parser.add_argument("--fault-gap", default="120-400", help="operations between two faults, a range")
    parser.add_argument("--max-ops", type=int, help="stop after this many operations (or --seconds)")
    parser.add_argument(
        "--real-sysctl",
        action="store_true",
        help="overflow and watch_limit lower the machine's fs.inotify sysctls (root), not the daemon's own",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _terminate)
    outcomes = []
    for seed in _seeds(args):
        low, _, high = args.fault_gap.partition("-")
        gap = (int(low), int(high or low))
        outcome = run_seed(
            seed, args.seconds, args.db, args.pg_url, args.keep, gap, args.max_ops, args.real_sysctl
        )
        outcomes.append(outcome)
        print(outcome.line(), flush=True)
        for problem in outcome.divergences:
            print(f"  DIVERGENCE (seed {seed}, reproduce: {outcome.reproduce()}): {problem}")
        for problem in outcome.errors:
            print(f"  DAEMON ERROR (seed {seed}, reproduce: {outcome.reproduce()}): {problem}")
        for note in outcome.notes:
            print(f"  note: {note}")
        story = ", ".join(f"{k} {v}" for k, v in sorted(outcome.log_story.items()))
        print(f"  faults: {dict(Counter(outcome.faults))}; most log lines in one fault window: {story}")
    if len(outcomes) > 1:
        times = [o.converge_s for o in outcomes if o.converge_s is not None]
        print(
            f"summary ({args.db}): {len(outcomes)} seeds, {sum(o.ops for o in outcomes)} ops, "
            f"{sum(len(o.faults) for o in outcomes)} faults, "
            f"{sum(len(o.divergences) for o in outcomes)} divergences, "
            f"{sum(len(o.errors) for o in outcomes)} daemon errors, "
            f"worst convergence {max(times, default=float('nan')):.1f} s"
        )
    return 1 if any(o.failed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())

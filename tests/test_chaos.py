"""A short chaos run in the suite: the seeded workload of bench/chaos/ (writes of every kind, bad
input, sessions moved and removed, projects appearing) with its faults (kill -9, SIGTERM mid-burst,
SIGSTOP, database cut, slow or stalled, a revoked privilege, a deleted SQLite file, inotify
overflow, out of watches) for about 15 s, on SQLite and
PostgreSQL. Afterwards every row must match an independent reading of the files. The overflow and
the watch limit are the daemon's own (the watcher's seam): the machine's sysctls are left alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import Chaos

# Faults come closer together than in the bench's 60 s runs and the run is a fixed number of
# operations (the deadline is only a guard), so its sequence is the same every time, and long
# enough to deal every kind of fault at least once.
SEED = 11
OPS = 800
FAULT_GAP = (35, 80)
DEADLINE_S = 40.0
KINDS = {"kill9", "sigterm", "sigstop", "overflow", "watch_limit"}


@pytest.mark.timeout(120)
def test_seeded_chaos_ends_with_no_divergence(db_url: str, tmp_path: Path) -> None:
    chaos = Chaos(SEED, DEADLINE_S, db_url, tmp_path, fault_gap=FAULT_GAP, max_ops=OPS)
    outcome = chaos.run()
    report = "\n".join(
        [outcome.line(), *outcome.divergences, *outcome.errors, f"reproduce: {outcome.reproduce()}"]
    )
    assert not outcome.failed, report
    assert outcome.ops == OPS, report
    database = {"db_cut", "db_slow", "db_stall", "db_revoke"} if chaos.postgres else {"db_lock", "db_delete"}
    assert set(outcome.faults) >= KINDS | database, report
    assert outcome.converge_s is not None, report

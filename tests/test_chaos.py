"""A short chaos run in the suite: the seeded workload of bench/chaos/ (writes of every kind, bad
input, sessions moved and removed, projects appearing) with its faults (kill -9, SIGTERM mid-burst,
SIGSTOP, database cut, slow or stalled, a revoked privilege, a deleted SQLite file, inotify
overflow, out of watches, a folder name that is not UTF-8, an unreadable sessions folder) for
about 15 s, on SQLite and PostgreSQL. Afterwards every row must match an independent reading of
the files. The overflow and the watch limit are the daemon's own (the watcher's seam): the
machine's sysctls are left alone. Run as root, the daemon runs as an unprivileged uid (the
unreadable folder would not bite root), so its folder is one of ours in /tmp, which that uid can
reach (pytest's are private to root).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.chaos import Chaos

# Faults come closer together than in the bench's 60 s runs and the run is a fixed number of
# operations (the deadline is only a guard), so its sequence is the same every time, and long
# enough to deal every kind of fault at least once.
SEED = 11
OPS = 800
FAULT_GAP = (30, 60)
DEADLINE_S = 40.0
KINDS = {"kill9", "sigterm", "sigstop", "overflow", "watch_limit", "poison_name"}


@pytest.fixture
def work() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="chaos-test-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


@pytest.mark.timeout(120)
def test_seeded_chaos_ends_with_no_divergence(db_url: str, work: Path) -> None:
    if db_url.startswith("sqlite"):
        db_url = f"sqlite:///{work / 'sessions.db'}"  # in the folder handed to the daemon's uid
    chaos = Chaos(SEED, DEADLINE_S, db_url, work, fault_gap=FAULT_GAP, max_ops=OPS)
    outcome = chaos.run()
    report = "\n".join(
        [
            outcome.line(),
            *outcome.divergences,
            *outcome.errors,
            *outcome.notes,
            f"reproduce: {outcome.reproduce()}",
        ]
    )
    assert not outcome.failed, report
    assert outcome.ops == OPS, report
    database = {"db_cut", "db_slow", "db_stall", "db_revoke"} if chaos.postgres else {"db_lock", "db_delete"}
    folders = set() if chaos.daemon_uid is None else {"unreadable"}
    assert set(outcome.faults) >= KINDS | database | folders, report
    assert outcome.converge_s is not None, report

"""The chaos run's checks: once the faults are healed, every row must match an independent
reading of the files (tests.support.oracle), also once the daemon is idle; and the daemon's log
must hold no traceback, and says in how many lines each fault told its story."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import select

from bench.chaos.record import MARKER, Outcome
from bench.chaos.workload import MAX_STATE_BYTES
from sessionsync.models.tables import projects as projects_table
from tests.support.oracle import converged
from tests.support.runner import Daemon
from tests.support.snapshot import engine, rows
from tests.support.waiting import poll

CONVERGE_DEADLINE_S = 30.0

# Lines the workload causes whatever the fault: a session's story (created, changed, deleted), a
# bad file, a project or sessions folder that comes or goes (and the reconcile that follows).
# Left out of the count of a fault's lines.
_WORKLOAD_LINES = (
    "] session created, phase ",
    "] session deleted: ",
    "] session restored: ",
    "] phase ",
    "] status ",
    "state.json is valid again",
    "state.json has fields of the wrong type",
    "state.json is invalid",
    "new project",
    "is gone",
    "appeared; watching",
    "(new project",
    "(project vanished",
    "(sessions folder",
)
# The warning about the n-th poison_name folder (caf\xe9-n, logged escaped), said once by each
# start of the daemon that sees it: its first saying is that fault's, wherever it falls (the
# daemon may be stopped, or its database away, when the folder appears); the others are repeats.
_POISON_LINE = re.compile(r"caf\\udce9-(\d+)\] session folder name is not valid UTF-8")


def problems(db_url: str, project_dirs: Iterable[Path]) -> list[str]:
    """Everything wrong with the database now, compared with the files of these projects."""
    projects = sorted(project_dirs)
    found = list(converged(db_url, projects, MAX_STATE_BYTES).problems)
    try:
        rows(db_url)  # raises on two rows for one session
    except AssertionError as exc:
        found.append(str(exc))
    with engine(db_url).connect() as conn:
        folders = set(conn.execute(select(projects_table.c.working_dir)).scalars())
    paths = {str(p) for p in projects}
    found += [f"project row for {f}, which is not a project" for f in sorted(folders - paths)]
    return found


def check(out: Outcome, daemon: Daemon, db_url: str, project_dirs: Iterable[Path]) -> None:
    """Poll until the database equals the files (deadline), then once more when idle, so a
    stale write landing after convergence is caught too."""
    projects = list(project_dirs)
    found: list[str] = []

    def settled() -> bool:
        found[:] = problems(db_url, projects)
        return not found

    started = time.monotonic()
    if not poll(settled, CONVERGE_DEADLINE_S, interval=0.1):
        out.divergences += found
        return
    out.converge_s = time.monotonic() - started
    daemon.wait_idle(CONVERGE_DEADLINE_S)
    out.divergences += [f"after convergence: {p}" for p in problems(db_url, projects)]


def read_log(out: Outcome, daemon: Daemon) -> None:
    """How many daemon lines each fault tells its story in (from its start to the next fault or
    the final check; lines about what the workload did aside), and every traceback: a bug."""
    windows: list[tuple[str, int]] = []
    poisons: dict[int, int] = {}  # the n-th poison_name -> its window, until its line is found
    warnings = 0
    for line in daemon.log().splitlines():
        if line.startswith(MARKER):
            label = line.split(": ", 2)[-1]
            if not label.startswith("heal "):
                windows.append((label, 0))
            if label == "fault poison_name":
                poisons[len(poisons) + 1] = len(windows) - 1
            continue
        if "Traceback" in line:
            near = windows[-1][0] if windows else "start"
            out.errors.append(f"a traceback in the daemon log (after: {near}); see {daemon.log_path}")
        if "RuntimeWarning" in line:
            warnings += 1
        logged = line[:4].isdigit()  # a log line, not a traceback's or a warning's continuation
        poison = _POISON_LINE.search(line)
        if poison:
            window = poisons.pop(int(poison[1]), None)
            if window is not None:
                windows[window] = (windows[window][0], windows[window][1] + 1)
            continue
        if windows and logged and not any(w in line for w in _WORKLOAD_LINES):
            windows[-1] = (windows[-1][0], windows[-1][1] + 1)
    if warnings:
        out.notes.append(f"{warnings} RuntimeWarning line(s) from watchdog on the daemon's stderr")
    floods = out.faults.count("overflow")
    if floods:
        lost = daemon.log_count("events were lost")
        out.notes.append(f"{lost} inotify queue overflow(s) logged for {floods} flood(s)")
    for label, count in windows:
        if label.startswith("fault "):
            kind = label.removeprefix("fault ")
            out.log_story[kind] = max(out.log_story.get(kind, 0), count)

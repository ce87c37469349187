"""The independent file oracle: what the database must hold once the session folders stop
changing, read straight from the files by the state.json contract (never through daemon code),
and `converged()`, which compares that with the rows.

    wait_for(lambda: converged(db_url, [project]), timeout=5)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sessionsync.daemon.config import Config
from tests.support.snapshot import Key, session_rows

SESSIONS_SUBDIR = "agents/sessions"
MAX_STATE_BYTES = Config().watch.max_state_bytes  # the default limit, as the daemon's


@dataclass(frozen=True)
class Expectation:
    """What one session folder says, read straight from its files (never through daemon code)."""

    valid: bool
    title: str | None = None
    current_phase: str | None = None
    status: str | None = None
    why: str = ""  # for an invalid one
    checkpoints_total: int | None = None
    checkpoints_completed: int | None = None
    # Whether spec.md / plan.json exist; None where state.json was not read (a link), not compared.
    spec_exists: bool | None = None
    plan_exists: bool | None = None


def expected_from_files(
    project_dirs: Iterable[Path | str], max_state_bytes: int = MAX_STATE_BYTES
) -> dict[Key, Expectation]:
    """Every session folder holding a state.json, by (project folder, slug); folders without one
    (or gone) are absent, so their rows must be tombstoned. Links are never followed: a linked
    folder or state.json is invalid, as the contract says. A folder whose name is not valid
    UTF-8 has no row at all (no text column can hold its name): absent too."""
    expected: dict[Key, Expectation] = {}
    for project in project_dirs:
        base = Path(project) / SESSIONS_SUBDIR
        try:
            folders = sorted(base.iterdir())
        except FileNotFoundError:
            continue
        for folder in folders:
            key = (str(project), folder.name)
            if folder.name.startswith(".") or not _storable(folder.name):
                continue
            if folder.is_symlink():
                expected[key] = Expectation(False, why="the session folder is a symbolic link")
                continue
            if not folder.is_dir():
                continue
            state = folder / "state.json"
            if state.is_symlink() or (state.exists() and not state.is_file()):
                expected[key] = Expectation(False, why="state.json is a link or not a regular file")
                continue
            try:
                data = state.read_bytes()
            except FileNotFoundError:
                continue
            found = _expect(data, max_state_bytes)
            expected[key] = replace(
                found,
                spec_exists=(folder / "spec.md").exists(),
                plan_exists=(folder / "plan.json").exists(),
            )
    return expected


def _storable(name: str) -> bool:
    """Whether a folder name is valid UTF-8 (one that is not reaches Python surrogate-escaped)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _expect(data: bytes, max_state_bytes: int) -> Expectation:
    if len(data) > max_state_bytes:
        return Expectation(False, why=f"{len(data)} bytes, over the limit")
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as exc:
        return Expectation(False, why=str(exc))
    if not isinstance(doc, dict):
        return Expectation(False, why=f"a JSON {type(doc).__name__}, not an object")
    v2 = "phase_history" in doc or "build_progress" in doc
    total, completed = _checkpoints(doc.get("build_progress" if v2 else "plan_state"))

    def text(name: str, default: str | None) -> str | None:
        # The contract: absent or null takes the default, a wrong type is stored as NULL.
        value = doc.get(name)
        if value is None:
            return default
        return value if isinstance(value, str) else None

    return Expectation(
        True,
        title=text("topic", None),
        current_phase=text("current_phase", "spec"),
        status=text("status", "active") if v2 else "active",  # v1 has no status: active
        checkpoints_total=total,
        checkpoints_completed=completed,
    )


def _checkpoints(progress: Any) -> tuple[int | None, int | None]:
    """(checkpoints_total, checkpoints_completed) from v2 `build_progress` or v1 `plan_state`:
    absent or null takes 0; a wrong type (a bool is not a count) or a section that is not an
    object is NULL; a total beyond 32 bits is NULL too."""
    if progress is None:
        return 0, 0
    if not isinstance(progress, dict):
        return None, None
    total = progress.get("checkpoints_total")
    if total is not None and not (
        isinstance(total, int) and not isinstance(total, bool) and -(2**31) <= total < 2**31
    ):
        total = None
    elif total is None:
        total = 0
    done = progress.get("checkpoints_completed")
    return total, (0 if done is None else len(done) if isinstance(done, list) else None)


class Convergence:
    """The outcome of `converged()`: truthy when the database equals the folders; its repr lists
    every difference, so `wait_for` failing on it says what is still wrong."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)

    def __bool__(self) -> bool:
        return not self.problems

    def __repr__(self) -> str:
        if not self.problems:
            return "<converged>"
        shown = "\n  ".join(self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        return f"<{len(self.problems)} difference(s):\n  {shown}{more}>"


def converged(
    url: str, project_dirs: Iterable[Path | str], max_state_bytes: int = MAX_STATE_BYTES
) -> Convergence:
    """Every valid session has exactly one live row whose fields match its file; every invalid one
    a live row marked invalid with a sync_error; every other row (vanished, no state.json, or of
    another project) is tombstoned."""
    expected = expected_from_files(project_dirs, max_state_bytes)
    problems: list[str] = []
    live: dict[Key, list[dict[str, Any]]] = {}
    tombstoned: set[Key] = set()
    for row in session_rows(url):
        key = (row["project"], row["slug"])
        if row["deleted_at"] is None:
            live.setdefault(key, []).append(row)
        else:
            tombstoned.add(key)
    for key, found in sorted(live.items()):
        if key not in expected:
            problems.append(f"{key}: live row, but the folder or its state.json is gone")
        elif len(found) > 1:
            problems.append(f"{key}: {len(found)} live rows")
    for key, want in sorted(expected.items()):
        if key not in live:
            problems.append(
                f"{key}: tombstoned, but its state.json is there" if key in tombstoned else f"{key}: no row"
            )
            continue
        row = live[key][0]
        for name in ("spec_exists", "plan_exists"):
            on_disk = getattr(want, name)
            if on_disk is not None and row[name] != on_disk:
                problems.append(f"{key}: {name} is {row[name]} in the database, {on_disk} on disk")
        if not want.valid:
            if not row["invalid"] or not row["sync_error"]:
                problems.append(
                    f"{key}: file is invalid ({want.why}) but row has invalid={row['invalid']}, "
                    f"sync_error={row['sync_error']!r}"
                )
            continue
        if row["invalid"]:
            problems.append(f"{key}: row is invalid ({row['sync_error']}) but the file is valid")
        for name in ("title", "current_phase", "status", "checkpoints_total", "checkpoints_completed"):
            if row[name] != getattr(want, name):
                problems.append(
                    f"{key}: {name} is {row[name]!r} in the database, {getattr(want, name)!r} in the file"
                )
    return Convergence(problems)


# -- phase times (for the session_phases view) --------------------------------------------------------

# The one form of a phase time the contract reads (docs/database.md, "session_phases"): naive is UTC.
_PHASE_TIME = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?(?:(Z)|([+-])(\d\d):(\d\d))?"
)

PhaseTimes = dict[str, tuple[datetime | None, datetime | None]]  # phase -> (started, completed)


def phase_time(value: Any) -> datetime | None:
    """A phase time as the contract reads it, in UTC; None for anything not in its form."""
    if not isinstance(value, str):
        return None
    match = _PHASE_TIME.fullmatch(value)
    if match is None:
        return None
    y, mo, d, h, mi, s, frac, _z, sign, oh, om = match.groups()
    if (oh is not None and int(oh) > 23) or (om is not None and int(om) > 59):
        return None
    try:
        naive = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), int((frac or "0").ljust(6, "0")))
    except ValueError:
        return None
    offset = timedelta(hours=int(oh or 0), minutes=int(om or 0)) * (-1 if sign == "-" else 1)
    return naive.replace(tzinfo=UTC) - offset


def phase_times(doc: dict[str, Any]) -> PhaseTimes:
    """Every phase of a readable document with a started or completed time: v2 `phase_history`
    (any `<phase>_started_at` / `<phase>_completed_at` key), or v1 `phases.{spec,plan,build}`
    (`finalized_at` completes spec and plan, `completed_at` build). A section of the wrong type has none."""
    times: dict[str, list[datetime | None]] = {}
    if "phase_history" in doc or "build_progress" in doc:
        history = doc.get("phase_history")
        for key, value in history.items() if isinstance(history, dict) else ():
            found = re.fullmatch(r"(.+)_(started|completed)_at", key)
            if found:
                times.setdefault(found[1], [None, None])[found[2] == "completed"] = phase_time(value)
    else:
        phases = doc.get("phases")
        if phases is not None and not _v1_phases_ok(phases):
            return {}
        for phase, done in (("spec", "finalized_at"), ("plan", "finalized_at"), ("build", "completed_at")):
            entry = (phases or {}).get(phase) or {}
            times[phase] = [phase_time(entry.get("started_at")), phase_time(entry.get(done))]
    return {phase: (s, c) for phase, (s, c) in times.items() if s is not None or c is not None}


def _v1_phases_ok(phases: Any) -> bool:
    if not isinstance(phases, dict):
        return False
    for name in ("spec", "plan", "build"):
        entry = phases.get(name)
        if entry is None:
            continue
        if not isinstance(entry, dict):
            return False
        for key in ("started_at", "finalized_at", "completed_at"):
            if entry.get(key) is not None and not isinstance(entry.get(key), str):
                return False
    return True


def expected_from_bytes(data: bytes, max_state_bytes: int = MAX_STATE_BYTES) -> Expectation:
    """What one state.json content says (for a session whose last good content is known)."""
    return _expect(data, max_state_bytes)

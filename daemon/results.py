"""What a batch, a write and a reconcile did: counts for summaries, logs and metrics, and the
events a batch committed. Plain data, so that a command that only reports them (a one-shot
reconcile with nothing to do) imports nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from sessionsync.models.keys import SessionKey


@dataclass
class WriteResult:
    """What one batch wrote: row counts by action and the stream events it committed."""

    written: int = 0
    touched: int = 0
    tombstoned: int = 0
    invalid: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class BatchResult(WriteResult):
    """What the store wrote, plus what was skipped without writing: counts for summaries."""

    unchanged: int = 0
    no_state: int = 0
    unstorable: int = 0  # folder names the database cannot hold (not UTF-8): never written
    # Sessions whose state.json may be half-written (Verdict.UNSETTLED): nothing was written for
    # them, and the caller must have them looked at again once the settle time has passed.
    recheck: list[SessionKey] = field(default_factory=list)
    # Sessions that could not be looked at for a reason not their own (Retry: out of file
    # descriptors...), with that reason: nothing was written; the caller tries them again later.
    retry: list[tuple[SessionKey, str]] = field(default_factory=list)
    # Projects whose sessions folder could not be searched (Verdict.UNLISTED): nothing was written
    # for their sessions; the caller reconciles those projects, which skips them until readable.
    unlisted: list[str] = field(default_factory=list)

    def add(self, other: WriteResult) -> None:
        for name in (f.name for f in fields(other) if f.name != "events"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.events.extend(other.events)


@dataclass
class ReconcileSummary:
    """What a reconcile saw and did; `line()` is the one-paragraph summary users read."""

    projects: int = 0
    seen: int = 0
    seconds: float = 0.0
    totals: BatchResult = field(default_factory=BatchResult)
    unreadable: dict[str, str] = field(default_factory=dict)  # project -> why its folder cannot be listed

    def line(self) -> str:
        t = self.totals
        return (
            f"reconciled {self.projects} project(s): {self.seen} session(s) seen, {t.written} written, "
            f"{t.unchanged + t.touched} unchanged, {t.invalid} invalid, {t.tombstoned} tombstoned, "
            f"{t.no_state} without state.json"
            + (f", {t.unstorable} skipped (folder name not UTF-8)" if t.unstorable else "")
            + (f", {len(self.unreadable)} project(s) skipped (unreadable)" if self.unreadable else "")
            + (
                f", {len(t.retry)} not read for now ({t.retry[0][1]}; nothing written for them: run it again)"
                if t.retry
                else ""
            )
            + f", in {self.seconds * 1000:.0f} ms"
        )

    def as_dict(self) -> dict[str, int | float]:
        t = self.totals
        return {
            "projects": self.projects,
            "sessions": self.seen,
            "changed": t.written + t.tombstoned,
            "written": t.written,
            "unchanged": t.unchanged + t.touched,
            "invalid": t.invalid,
            "tombstoned": t.tombstoned,
            "no_state": t.no_state,
            "unstorable": t.unstorable,
            "unreadable_projects": len(self.unreadable),
            "not_read_for_now": len(t.retry),
            "ms": round(self.seconds * 1000),
        }

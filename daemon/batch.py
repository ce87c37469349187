"""A batch of session keys -> inspect each folder -> one store transaction.

The one write path: live workers come through `sync_batch`; a reconcile uses its two halves,
`inspect_batch` and `write_changes` (daemon/writer.py, which on PostgreSQL pipelines them), so
the skip checks, events and error handling are the same whichever way a change is found.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from sqlalchemy import exc as sa_exc

from sessionsync.daemon.logs import session_log
from sessionsync.daemon.store import ProjectRef, Store, WriteResult, is_transient
from sessionsync.daemon.sync import Action, Change, Known, Verdict, inspect
from sessionsync.models.keys import SessionKey


@dataclass
class BatchResult(WriteResult):
    """What the store wrote, plus what was skipped without writing: counts for summaries."""

    unchanged: int = 0
    no_state: int = 0

    def add(self, other: WriteResult) -> None:
        for name in (f.name for f in fields(other) if f.name != "events"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.events.extend(other.events)


def sync_batch(
    store: Store,
    projects: Mapping[str, ProjectRef],
    keys: Sequence[SessionKey],
    max_bytes: int,
    known: Mapping[SessionKey, Known] | None = None,
) -> BatchResult:
    """Sync these sessions now; keys of unknown projects are ignored. Transient database errors
    propagate (the caller retries the whole batch); anything else is isolated to its session."""
    if known is None:
        known = load_known(store, projects, keys)
    result, changes = inspect_batch(projects, keys, max_bytes, known)
    result.add(write_changes(store, changes, known))
    return result


def inspect_batch(
    projects: Mapping[str, ProjectRef],
    keys: Sequence[SessionKey],
    max_bytes: int,
    known: Mapping[SessionKey, Known],
) -> tuple[BatchResult, list[tuple[ProjectRef, Change]]]:
    """What each session of the batch needs: the changes to write, and the skips counted."""
    result = BatchResult()
    changes: list[tuple[ProjectRef, Change]] = []
    for key in keys:
        project = projects.get(key.project)
        if project is None:
            continue
        outcome = inspect(key, project.sessions_dir, known.get(key), max_bytes)
        if outcome is Verdict.UNCHANGED:
            result.unchanged += 1
        elif outcome is Verdict.NO_STATE:
            result.no_state += 1
        elif isinstance(outcome, Change):
            changes.append((project, outcome))
    return result, changes


def write_changes(
    store: Store, changes: Sequence[tuple[ProjectRef, Change]], known: Mapping[SessionKey, Known]
) -> WriteResult:
    """One transaction for the batch; if the database refuses one of its rows, one per session."""
    result = BatchResult()
    try:
        result.add(store.write(changes, known))
    except Exception as exc:
        if is_transient(exc) or len(changes) <= 1 or not isinstance(exc, sa_exc.SQLAlchemyError):
            raise
        # A row the database refuses (a value it cannot store) must not hold back the others:
        # write one by one and let only the refused session carry the error.
        for one in changes:
            result.add(_write_alone(store, one, known))
    report_invalid(changes)
    return result


def report_invalid(changes: Sequence[tuple[ProjectRef, Change]]) -> None:
    """A warning for each session whose state.json turned out unreadable (once it is written)."""
    for project, change in changes:
        if change.invalid:
            session_log(project.path, change.key.slug).warning(
                "state.json is invalid ({}); keeping the last good mirror", change.error
            )


def _write_alone(
    store: Store, one: tuple[ProjectRef, Change], known: Mapping[SessionKey, Known]
) -> WriteResult:
    project, change = one
    try:
        return store.write([one], known)
    except Exception as exc:
        if is_transient(exc) or not isinstance(exc, sa_exc.SQLAlchemyError):
            raise
        cause = getattr(exc, "orig", None) or exc
        reason = f"the database refused this state ({type(cause).__name__}: {cause})"
        session_log(project.path, change.key.slug).error("{}", reason)
        refused = Change(change.key, Action.WRITE, change.probe, change.state_hash, None, None, reason[:2000])
        return store.write([(project, refused)], known)


def load_known(
    store: Store, projects: Mapping[str, ProjectRef], keys: Sequence[SessionKey]
) -> dict[SessionKey, Known]:
    """What the database holds for these keys, one query per project."""
    by_project: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        by_project[key.project].append(key.slug)
    known: dict[SessionKey, Known] = {}
    for path, slugs in by_project.items():
        project = projects.get(path)
        if project is not None:
            for slug, row in store.known(project.id, slugs).items():
                known[SessionKey(path, slug)] = row
    return known

"""A batch of session keys -> inspect each folder -> one store transaction.

The one write path: live workers come through `sync_batch`; a reconcile uses its two halves,
`inspect_batch` and `write_changes` (daemon/writer.py, which on PostgreSQL pipelines them), so
the skip checks, events and error handling are the same whichever way a change is found.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import exc as sa_exc

from sessionsync.daemon.inspection import Action, Change, Known, Retry, Verdict, inspect
from sessionsync.daemon.logs import session_log
from sessionsync.daemon.results import BatchResult, WriteResult
from sessionsync.daemon.store import (
    DatabaseFault,
    ProjectRef,
    Store,
    is_row_fault,
    is_transient,
)
from sessionsync.models.keys import SessionKey


def sync_batch(
    store: Store,
    projects: Mapping[str, ProjectRef],
    keys: Sequence[SessionKey],
    max_bytes: int,
    known: Mapping[SessionKey, Known] | None = None,
    settle_s: float = 0.0,
    on_commit: Callable[[Sequence[tuple[ProjectRef, Change]]], None] | None = None,
) -> BatchResult:
    """Sync these sessions now; keys of unknown projects are ignored. Transient database errors
    propagate (the caller retries the whole batch); anything else is isolated to its session.
    With `settle_s`, a just-modified state.json that does not parse is not recorded but put in
    `result.recheck` (see daemon/inspection.py), and the caller owes it a look after settle_s.
    `on_commit` sees the changes once committed (the write -> row latency metric)."""
    if known is None:
        known = load_known(store, projects, keys)
    result, changes = inspect_batch(projects, keys, max_bytes, known, settle_s)
    result.add(write_changes(store, changes, known))
    if on_commit is not None:
        on_commit(changes)
    return result


def inspect_batch(
    projects: Mapping[str, ProjectRef],
    keys: Sequence[SessionKey],
    max_bytes: int,
    known: Mapping[SessionKey, Known],
    settle_s: float = 0.0,
) -> tuple[BatchResult, list[tuple[ProjectRef, Change]]]:
    """What each session of the batch needs: the changes to write, and the skips counted."""
    settle_ns = int(settle_s * 1e9)
    result = BatchResult()
    changes: list[tuple[ProjectRef, Change]] = []
    for key in keys:
        project = projects.get(key.project)
        if project is None:
            continue
        if not _storable(key, project):
            result.unstorable += 1
            continue
        outcome = inspect(key, project.sessions_dir, known.get(key), max_bytes, settle_ns)
        if outcome is Verdict.UNCHANGED:
            result.unchanged += 1
        elif outcome is Verdict.UNSETTLED:
            result.recheck.append(key)
        elif isinstance(outcome, Retry):
            result.retry.append((key, outcome.reason))
        elif outcome is Verdict.UNLISTED:
            result.unlisted.append(key.project)
        elif outcome is Verdict.NO_STATE:
            result.no_state += 1
        elif isinstance(outcome, Change):
            changes.append((project, outcome))
    return result, changes


def write_changes(
    store: Store, changes: Sequence[tuple[ProjectRef, Change]], known: Mapping[SessionKey, Known]
) -> WriteResult:
    """One transaction for the batch; if the database refuses it, one per session (see
    `_write_one_by_one`). A fault of the database (`is_transient`) propagates: the caller retries."""
    result = BatchResult()
    try:
        result.add(store.write(changes, known))
    except Exception as exc:
        if is_transient(exc) or not isinstance(exc, sa_exc.SQLAlchemyError):
            raise
        result.add(_write_one_by_one(store, changes, known))
    report_invalid(changes)
    return result


def _write_one_by_one(
    store: Store, changes: Sequence[tuple[ProjectRef, Change]], known: Mapping[SessionKey, Known]
) -> BatchResult:
    """Each session in a transaction of its own, so that a row the database refuses (a value it
    cannot store) does not hold back the others: only the refused session carries the error. When
    every row is refused, and not for a value of its own, the statement is what the database
    refuses (privileges, a missing column...): a `DatabaseFault`, retried, blamed on no session."""
    result = BatchResult()
    refused: list[tuple[tuple[ProjectRef, Change], Exception]] = []
    for one in changes:
        try:
            result.add(store.write([one], known))
        except Exception as exc:
            if is_transient(exc) or not isinstance(exc, sa_exc.SQLAlchemyError):
                raise
            refused.append((one, exc))
    if refused and len(refused) == len(changes) and not all(is_row_fault(exc) for _, exc in refused):
        raise DatabaseFault(f"the database refuses every write: {_cause(refused[0][1])}") from refused[0][1]
    for (project, change), error in refused:
        reason = f"the database refused this state ({_cause(error)})"
        session_log(project.path, change.key.slug, folder_of(project, change.key.slug)).error("{}", reason)
        stored = Change(change.key, Action.WRITE, change.probe, change.state_hash, None, None, reason[:2000])
        result.add(store.write([(project, stored)], known))
    return result


def _cause(exc: Exception) -> str:
    cause = getattr(exc, "orig", None) or exc
    first = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {first[0] if first else ''}"


def report_invalid(changes: Sequence[tuple[ProjectRef, Change]]) -> None:
    """A warning for each session whose state.json turned out unreadable or to have fields of the
    wrong type, once it is written: a content is written once, so this is once per content."""
    for project, change in changes:
        if not change.error or change.action is not Action.WRITE:
            continue
        say = session_log(project.path, change.key.slug, folder_of(project, change.key.slug))
        if change.invalid:
            say.warning("state.json is invalid ({}); keeping the last good mirror", change.error)
        else:
            say.warning("state.json has fields of the wrong type, stored as NULL: {}", change.error)


# Sessions already reported as unstorable, so that each says so once per run, not on every pass.
_unstorable_reported: set[SessionKey] = set()


def _encodable(slug: str) -> bool:
    try:
        slug.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _storable(key: SessionKey, project: ProjectRef) -> bool:
    """Whether the database can hold this session's name. A folder name that is not UTF-8
    (`mkdir $'caf\\xe9'`) reaches us surrogate-escaped; no text column can store it, and binding it
    would fail the whole batch, every other session with it. Such a session is skipped and said
    once; renaming the folder brings it in."""
    if _encodable(key.slug):
        return True
    if key not in _unstorable_reported:
        _unstorable_reported.add(key)
        session_log(key.project, key.slug, folder_of(project, key.slug)).warning(
            "session folder name is not valid UTF-8: not mirrored; rename the folder to mirror it"
        )
    return False


def folder_of(project: ProjectRef, slug: str) -> str:
    """The session's folder, as logs, `errors`, `sync` and the event stream name it."""
    return os.path.join(project.sessions_dir, slug)


def load_known(
    store: Store, projects: Mapping[str, ProjectRef], keys: Sequence[SessionKey]
) -> dict[SessionKey, Known]:
    """What the database holds for these keys, one query per project."""
    by_project: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        if _encodable(key.slug):  # the others are skipped by inspect_batch, which says why
            by_project[key.project].append(key.slug)
    known: dict[SessionKey, Known] = {}
    for path, slugs in by_project.items():
        project = projects.get(path)
        if project is not None:
            for slug, row in store.known(project.id, slugs).items():
                known[SessionKey(path, slug)] = row
    return known


# How each committed change reads in the log; `session.invalid` is the warning report_invalid
# gave when the content was written.
_STORY = {
    "session.created": ("INFO", "session created, phase {to}"),
    "session.deleted": ("INFO", "session deleted: its folder or state.json is gone; row tombstoned"),
    "session.restored": ("INFO", "session restored: its state.json is back"),
    "session.phase_changed": ("INFO", "phase {from} -> {to}"),
    "session.status_changed": ("INFO", "status {from} -> {to}"),
    "session.recovered": ("INFO", "state.json is valid again; mirrored"),
    "session.updated": ("DEBUG", "updated"),
}


def log_changes(events: Sequence[Mapping[str, Any]]) -> None:
    """One line per committed change of a session, naming its folder: a session's story."""
    for event in events:
        story = _STORY.get(event["kind"])
        if story is None:
            continue
        level, text = story
        say = session_log(event["project"], event["slug"], event["path"])
        say.log(level, text.format_map({"from": event.get("from") or "-", "to": event.get("to") or "-"}))

"""Full reconcile: make the database equal to the session folders of the given projects.

For each project: list the session folders, load what the database knows, and run every
folder plus every live row through the batch path (`inspect_batch` skips what is unchanged; the
writer writes what changed, tombstones what vanished and restores what came back), in batches
of `batch_size`. On PostgreSQL the writer pipelines: the server commits one batch while the
next one's files are read (daemon/writer.py).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import replace
from datetime import UTC, datetime

from loguru import logger

from sessionsync.daemon.batch import inspect_batch, load_known, sync_batch
from sessionsync.daemon.discovery import ProjectPath, list_slugs
from sessionsync.daemon.inspection import Stat, gone, to_inspect
from sessionsync.daemon.results import BatchResult, ReconcileSummary
from sessionsync.daemon.store import ProjectRef, Store
from sessionsync.daemon.writer import BatchWriter, Submitted, open_writer
from sessionsync.models.keys import SessionKey

# Projects whose sessions folder could not be listed, and why: said once when it starts, once
# when it ends, not on every pass.
_unreadable_reported: dict[str, str] = {}
# The reason of the reconcile that looks again at such a project (no event says it is readable).
RESYNC_UNREADABLE = "sessions folder unreadable"


def unreadable_projects() -> set[str]:
    """The projects whose sessions folder could not be listed at their latest reconcile."""
    return set(_unreadable_reported)


def _listed(project: ProjectRef, summary: ReconcileSummary) -> list[str] | None:
    """The project's session folders, or None when its sessions folder cannot be listed: that
    project is skipped (its rows kept as they are, nothing tombstoned) and the others go on."""
    try:
        slugs = list_slugs(project.sessions_dir)
    except OSError as exc:
        reason = f"cannot list {project.sessions_dir}: {exc.strerror or exc}"
        summary.unreadable[project.path] = reason
        if _unreadable_reported.get(project.path) != reason:
            _unreadable_reported[project.path] = reason
            logger.bind(project=project.path).warning(
                "{}; skipping this project (its rows are kept) until it can be read", reason
            )
        return None
    if _unreadable_reported.pop(project.path, None) is not None:
        logger.bind(project=project.path).info("{} can be read again", project.sessions_dir)
    return slugs


def freeze_long_lived() -> None:
    """Take every object alive now (modules, config, engine, caches) out of the garbage collector's
    view for good. A reconcile allocates a document tree per session, which sets off full
    collections; frozen, those walk only the young objects instead of the whole heap (a cold
    reconcile of 10,000 sessions paid three full collections of about 60 ms each). Called by
    the daemon once it is set up, and by a one-shot command run in-process (daemon/cli.py's
    `_set_up`; started by `main()`, it freezes without collecting: collection was off)."""
    gc.collect()
    gc.freeze()


def register(store: Store, found: Iterable[ProjectPath]) -> dict[str, ProjectRef]:
    """Project rows for these folders, created where new."""
    known = {p.path: p for p in store.known_projects()}
    refs = {}
    for project in found:
        ref = known.get(project.path)
        if ref is None or ref.sessions_dir != project.sessions_dir:
            ref = store.ensure_project(project.path, project.sessions_dir)
        refs[project.path] = ref
    return refs


# Projects whose rows one query loads ahead of a reconcile: few round trips (each costs three on
# PostgreSQL: BEGIN, SELECT, ROLLBACK), and only one group's rows alive at a time, so a pass does
# not hold enough objects to set off a full garbage collection of the process.
PRELOAD_GROUP = 20

Claim = Callable[[Sequence[SessionKey]], AbstractContextManager[object]]


def reconcile(
    store: Store,
    projects: Sequence[ProjectRef],
    max_bytes: int,
    batch_size: int,
    claim: Claim | None = None,
    on_batch: Callable[[BatchResult], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ReconcileSummary:
    """One full pass over `projects`; marks each project reconciled once its batches commit.

    `claim` (the daemon's work queue) holds each batch's keys so no worker writes them at the
    same time; `on_batch` sees each committed batch (the daemon publishes its events);
    `on_progress(done, total)` is told after each batch how many sessions are done of how many
    (the folders on disk, counted first; rows whose folder vanished may take `done` past it)."""
    started = time.perf_counter()
    summary = ReconcileSummary(projects=len(projects))
    refs = {p.path: p for p in projects}
    hold = claim or (lambda _keys: nullcontext())
    total = _count_folders(projects) if on_progress is not None else 0
    done_keys = 0

    def finish(done: list[Submitted]) -> None:
        for batch in done:
            # A batch the pipeline could not vouch for is synced again, still under its claim.
            result = sync_batch(store, refs, batch.keys, max_bytes) if batch.redo else batch.result
            batch.release.close()
            if on_batch is not None:
                on_batch(result)
            # The summary counts; it keeps no events (a cold pass over 100,000 sessions would hold
            # every one of them until the daemon's next reconcile).
            summary.totals.add(replace(result, events=[]))
            if on_progress is not None:
                nonlocal done_keys
                done_keys += len(batch.keys)
                on_progress(done_keys, max(total, done_keys))

    def skipped(count: int) -> None:
        summary.totals.unchanged += count
        if on_progress is not None and count:
            nonlocal done_keys
            done_keys += count
            on_progress(done_keys, max(total, done_keys))

    with ExitStack() as claims, ExitStack() as writing:
        writer: BatchWriter | None = None  # opened with the first batch: a warm pass has none
        for chunk, with_rows in _batches(store, projects, batch_size, summary, skipped):
            release = claims.enter_context(ExitStack())
            release.enter_context(hold(chunk))
            # Under a claim, every row is read inside it: a worker may have written one a moment before.
            known = load_known(store, refs, chunk if claim is not None else with_rows)
            result, changes = inspect_batch(refs, chunk, max_bytes, known)
            if writer is None:
                writer = writing.enter_context(open_writer(store))
            finish(writer.submit(Submitted(chunk, changes, known, result, release)))
        if writer is not None:
            finish(writer.drain())
    store.mark_reconciled([p.id for p in projects if p.path not in summary.unreadable], datetime.now(UTC))
    summary.seconds = time.perf_counter() - started
    return summary


def _count_folders(projects: Sequence[ProjectRef]) -> int:
    """The session folders of these projects, for progress; one that cannot be listed counts 0."""
    total = 0
    for project in projects:
        with contextlib.suppress(OSError):  # the pass itself says so
            total += len(list_slugs(project.sessions_dir))
    return total


def _batches(
    store: Store,
    projects: Sequence[ProjectRef],
    batch_size: int,
    summary: ReconcileSummary,
    skipped: Callable[[int], None],
) -> Iterator[tuple[list[SessionKey], list[SessionKey]]]:
    """The sessions to inspect, in batches that span projects (fewer, fuller transactions), each
    with the keys of it that have a row; listed one project at a time, so that only one batch's
    keys are alive at once.

    One query per PRELOAD_GROUP projects reads every row's stat; a folder whose stat matches its
    row (`inspection.not_unchanged`: two lstat calls) is counted through `skipped` and goes no further.
    The rest, and every live row whose folder is not listed, are inspected."""
    chunk: list[SessionKey] = []
    with_rows: list[SessionKey] = []
    group: dict[int, dict[str, Stat]] = {}
    for n, project in enumerate(projects):
        if n % PRELOAD_GROUP == 0:
            group = store.stats_by_project([p.id for p in projects[n : n + PRELOAD_GROUP]])
        on_disk = _listed(project, summary)
        if on_disk is None:
            continue
        summary.seen += len(on_disk)
        rows = group[project.id]
        todo = to_inspect(project.sessions_dir, on_disk, rows)
        skipped(len(on_disk) - len(todo))
        todo.extend(gone(rows, on_disk))
        for slug in sorted(todo):
            key = SessionKey(project.path, slug)
            chunk.append(key)
            if slug in rows:
                with_rows.append(key)
            if len(chunk) == batch_size:
                yield chunk, with_rows
                chunk, with_rows = [], []
    if chunk:
        yield chunk, with_rows

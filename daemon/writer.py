"""How a reconcile's batches reach the database: one by one, or on PostgreSQL pipelined.

`DirectWriter` writes each batch as it is handed over (SQLite). On PostgreSQL the writer is
daemon/pipeline.py's `PipelinedWriter`, imported only then (with psycopg).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from typing import Protocol

from sessionsync.daemon.batch import write_changes
from sessionsync.daemon.inspection import Change, Known
from sessionsync.daemon.results import BatchResult
from sessionsync.daemon.store import ProjectRef, Store
from sessionsync.models.keys import SessionKey


@dataclass
class Submitted:
    """A batch handed to a writer: what inspection found, and what the write added once settled."""

    keys: Sequence[SessionKey]
    changes: list[tuple[ProjectRef, Change]]
    known: Mapping[SessionKey, Known]
    result: BatchResult  # the skips counted by inspection; the write's counts join when settled
    release: ExitStack  # the batch's claim on its keys, closed by whoever finishes the batch
    redo: bool = False  # not known to be written: sync these keys again from scratch


class BatchWriter(Protocol):
    def submit(self, batch: Submitted) -> list[Submitted]:
        """Take a batch; returns the batches settled meanwhile, in the order they were submitted."""

    def drain(self) -> list[Submitted]:
        """Settle every batch still in flight."""


class DirectWriter:
    """Each batch written when it is submitted, in one transaction of its own."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def submit(self, batch: Submitted) -> list[Submitted]:
        batch.result.add(write_changes(self.store, batch.changes, batch.known))
        return [batch]

    def drain(self) -> list[Submitted]:
        return []


def open_writer(store: Store) -> AbstractContextManager[BatchWriter]:
    """The fastest writer the database allows."""
    if store.dialect == "postgresql":
        from sessionsync.daemon.pipeline import PipelinedWriter, pipelining

        if pipelining():
            return PipelinedWriter(store)
    return nullcontext(DirectWriter(store))

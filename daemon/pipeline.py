"""The reconcile's writer on PostgreSQL: `PipelinedWriter` sends a batch's whole transaction
(BEGIN, the upserts, the events, NOTIFY, COMMIT) through psycopg's pipeline mode and returns at
once: the server writes batch N while this process reads the files of batch N+1, so a cold
reconcile costs about the larger of the two instead of their sum. Batch N is settled (its COMMIT
answered) before batch N+1 is sent, so at most one transaction is in flight; its keys stay
claimed and its events unpublished until then.

A database error in the pipeline ends pipelining for the pass. The batch it hit may or may not
have committed (a connection can drop after COMMIT left), so it is handed back to be synced
again from the files and the rows as they now are (`redo`); later batches are written directly.
Either way every write goes through the same fallbacks as a worker's (`write_changes`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import psycopg
from loguru import logger
from psycopg import pq
from sqlalchemy import Connection

from sessionsync.daemon.batch import report_invalid
from sessionsync.daemon.hub import Ticket
from sessionsync.daemon.store import Store, WritePlan
from sessionsync.daemon.writer import DirectWriter, Submitted


def pipelining() -> bool:
    """Whether this libpq can pipeline (14 and later)."""
    return psycopg.Pipeline.is_supported()


@dataclass
class _InFlight:
    """The batch whose transaction is in the pipeline: its plan, the cursor that will hold its
    event ids (None: no events), and its place among the hub's events."""

    batch: Submitted
    plan: WritePlan
    events: psycopg.Cursor[Any] | None
    ticket: Ticket | None


class PipelinedWriter(AbstractContextManager["PipelinedWriter"]):
    """Batches sent through one PostgreSQL connection in pipeline mode, one transaction in flight."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._direct = DirectWriter(store)
        self._stack = ExitStack()  # the pooled connection, given back as it was lent
        self._raw: psycopg.Connection[Any] | None = None  # None once pipelining has stopped
        self._pipeline: AbstractContextManager[psycopg.Pipeline] | None = None
        self._sync: Callable[[], None] = lambda: None  # the pipeline's sync
        self._in_flight: _InFlight | None = None

    def __enter__(self) -> PipelinedWriter:
        conn = self._stack.enter_context(self.store.engine.connect())
        self._stack.callback(self._release, conn)
        raw = _driver_connection(conn)
        raw.rollback()  # the pool's pre-ping may have opened a transaction
        # Each batch brings its own BEGIN and COMMIT; autocommit keeps psycopg from adding any.
        raw.autocommit = True
        self._pipeline = raw.pipeline()
        self._sync = self._pipeline.__enter__().sync
        self._raw = raw
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._raw is not None:
            self._leave_pipeline()
        self._stack.close()

    def submit(self, batch: Submitted) -> list[Submitted]:
        done = self._settle()
        if self._raw is None:
            return [*done, *self._direct.submit(batch)]
        plan = self.store.plan(batch.changes, batch.known)
        if plan.empty:
            return [*done, batch]
        hub = self.store.hub
        ticket = hub.ticket() if hub is not None and plan.event_rows else None
        try:
            cursor = self._raw.cursor()
            cursor.execute("BEGIN")
            for bulk, rows in plan.steps:
                bulk.send(cursor, rows)
            # The events' statement on a cursor of its own, which holds their ids once the
            # pipeline syncs: nothing waits for them here.
            events = None
            if plan.event_rows:
                inserts = self.store.event_insert
                events = self._raw.cursor()
                events.execute(inserts.sql, inserts.ready(plan.event_rows, plan.result.events))
            cursor.execute("COMMIT")
        except psycopg.Error as error:
            if ticket is not None:
                ticket.uncertain()
            self._stop(error)
            batch.redo = True
            return [*done, batch]
        self._in_flight = _InFlight(batch, plan, events, ticket)
        return done

    def drain(self) -> list[Submitted]:
        return self._settle()

    def _settle(self) -> list[Submitted]:
        if self._in_flight is None:
            return []
        flight = self._in_flight
        self._in_flight = None
        batch, ticket = flight.batch, flight.ticket
        try:
            self._sync()
            ids = (
                []
                if flight.events is None
                else self.store.event_insert.ids(flight.events, len(flight.plan.event_rows))
            )
        except psycopg.Error as error:
            if ticket is not None:
                ticket.uncertain()  # its COMMIT was sent
            self._stop(error)
            batch.redo = True
        else:
            events = flight.plan.numbered(ids)
            if ticket is not None:
                ticket.known([event["id"] for event in events])
                ticket.committed(events)
            batch.result.add(flight.plan.result)
            report_invalid(batch.changes)
        return [batch]

    def _stop(self, error: psycopg.Error) -> None:
        """Leave pipeline mode for good after an error; later batches are written directly."""
        logger.debug("pipelined writes stopped ({}: {}); writing batch by batch", type(error).__name__, error)
        self._leave_pipeline()

    def _leave_pipeline(self) -> None:
        """Sync and leave pipeline mode with no transaction left open (an aborted BEGIN stays open)."""
        raw, pipeline = self._raw, self._pipeline
        self._raw = self._pipeline = None
        assert raw is not None
        assert pipeline is not None
        try:
            pipeline.__exit__(None, None, None)
        except psycopg.Error as error:
            logger.debug("leaving the write pipeline: {}", error)  # the error that stopped it, again
        if not raw.closed and raw.info.transaction_status != pq.TransactionStatus.IDLE:
            with suppress(psycopg.Error):  # the connection is gone: _release has the pool drop it
                raw.execute("ROLLBACK")

    @staticmethod
    def _release(conn: Connection) -> None:
        """Give the connection back to the pool as it was lent (or have the pool drop it)."""
        raw = _driver_connection(conn)
        if raw.closed or raw.broken or raw.info.transaction_status != pq.TransactionStatus.IDLE:
            conn.invalidate()
        else:
            raw.autocommit = False


def _driver_connection(conn: Connection) -> psycopg.Connection[Any]:
    raw = conn.connection.driver_connection
    assert isinstance(raw, psycopg.Connection)
    return raw

"""The database side: projects, known rows, and one transaction per batch of changes.

Writes use the dialect's `INSERT ... ON CONFLICT DO UPDATE` through `executemany`, rows sorted
by key so two writers never deadlock; an event row per meaningful change; on PostgreSQL a
`NOTIFY sessionsync` in the same transaction, so listeners only ever see committed changes.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any

from sqlalchemy import (
    Boolean,
    Connection,
    Dialect,
    Engine,
    String,
    Table,
    Text,
    bindparam,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.sql.expression import TextClause, UpdateBase

from sessionsync.daemon.checkpoint import checkpointer
from sessionsync.daemon.errors import SchemaMissing
from sessionsync.daemon.hub import EventHub
from sessionsync.daemon.inspection import Action, Change, Known, Stat
from sessionsync.daemon.results import WriteResult
from sessionsync.daemon.sqlite_db import sqlite_time
from sessionsync.models.events import (
    NOTIFY_CHANNEL,
    SessionEventKind,
    notify_payload,
    session_event,
)
from sessionsync.models.jsontext import dumps
from sessionsync.models.keys import SessionKey
from sessionsync.models.tables import JSONDoc, UTCDateTime, projects, session_events, sessions

_MIRRORED = (
    "session_id",
    "title",
    "description",
    "session_type",
    "status",
    "current_phase",
    "phase_history",
    "git_branch",
    "git_worktree",
    "git_base_branch",
    "checkpoints_total",
    "checkpoints_completed",
    "checkpoints_completed_list",
    "current_checkpoint",
    "commits",
    "artifacts",
    "schema_version",
    "created_at",
    "updated_at",
    "raw_state",
)
_STAT = (
    "state_hash",
    "state_size",
    "state_mtime",
    "state_mtime_ns",
    "spec_exists",
    "plan_exists",
    "dir_mtime_ns",
)
# An event row finds its session by key inside the same statement (no id round trip) and
# returns its id: the id is the event's place in the stream (daemon/hub.py).
_EVENT_COLUMNS = ["session_id", "at", "kind", "from_value", "to_value", "detail"]
_EVENT_VALUES = (
    bindparam("e_at", type_=UTCDateTime()),
    bindparam("e_kind", type_=String()),
    bindparam("e_from", type_=Text()),
    bindparam("e_to", type_=Text()),
    bindparam("e_detail", type_=JSONDoc),
)
_SESSION_BY_KEY = (sessions.c.project_id == bindparam("e_project"), sessions.c.slug == bindparam("e_slug"))
# SQLite: the batch's rows at once, their ids known from the sequence (see _EventInsert); one
# row per statement, returning its id, when the count says a session was not there.
_INSERT_EVENT_ROWS = session_events.insert().from_select(
    _EVENT_COLUMNS, select(sessions.c.id, *_EVENT_VALUES).where(*_SESSION_BY_KEY)
)
_INSERT_EVENT = _INSERT_EVENT_ROWS.returning(session_events.c.id)
# The id AUTOINCREMENT gives after the current rows: one past the highest ever handed out.
_SQLITE_LAST_EVENT_ID = (
    "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'session_events'), 0),"
    " coalesce((SELECT max(id) FROM session_events), 0))"
)
# PostgreSQL: the whole batch in one statement that inserts the events, returns their ids and
# sends their NOTIFYs with the id in each payload, so a pipelined reconcile never waits for ids
# mid-batch. The rows travel as one JSON array (`n` is each row's place in it). Ids are taken
# from the sequence in the order of the INSERT's SELECT (ORDER BY n): the k-th smallest id
# returned is the k-th row inserted, as SQLAlchemy's own sorted multi-row RETURNING relies on.
# A row whose session is not there inserts nothing, and its `n` is not returned.
_INSERT_EVENTS_PG = (
    """
WITH r AS (
  SELECT r.n, r.at, r.kind, r.f, r.t, r.detail, r.payload, s.id AS session_id
  FROM json_to_recordset(CAST(%(rows)s AS json))
       AS r(n int, project int, slug text, at timestamptz, kind text, f text, t text, detail jsonb,
            payload text)
  JOIN sessions s ON s.project_id = r.project AND s.slug = r.slug
), ins AS (
  INSERT INTO session_events (session_id, at, kind, from_value, to_value, detail)
  SELECT session_id, at, kind, f, t, COALESCE(detail, 'null'::jsonb) FROM r ORDER BY n
  RETURNING id
), numbered AS (
  SELECT id, row_number() OVER (ORDER BY id) AS k FROM ins
), payloads AS (
  SELECT n, payload, row_number() OVER (ORDER BY n) AS k FROM r
)
SELECT numbered.id, payloads.n,
       pg_notify('"""
    + NOTIFY_CHANNEL
    + """', '{"id":' || numbered.id || ',' || substr(payloads.payload, 2))
FROM numbered JOIN payloads USING (k) ORDER BY numbered.id
"""
)
_STATUS = ("synced_at", "deleted_at", "invalid", "sync_error", "sync_error_at")
_BY_KEY = (sessions.c.project_id == bindparam("b_project_id"), sessions.c.slug == bindparam("b_slug"))
_TOUCH = update(sessions).where(*_BY_KEY).values({c: bindparam(f"b_{c}") for c in _STAT})
_TOMBSTONE = (
    update(sessions)
    .where(*_BY_KEY, sessions.c.deleted_at.is_(None))
    .values(deleted_at=bindparam("b_now"), synced_at=bindparam("b_now"))
)


class _Bulk:
    """A statement with the parameters of many rows, run at once (`executemany`) as its compiled
    SQL text with ready parameters, skipping SQLAlchemy's per-row bind processing, which costs
    more than the database does for these rows (a cold reconcile of 10,000 sessions on SQLite
    spent a fifth of its time there).

    On PostgreSQL the parameters are the rows as they are (named; the statements that use this
    hold no JSON, and the session upserts are a `_RecordsetUpsert`); the same text goes through
    the reconcile's pipeline (daemon/writer.py). On SQLite they are positional tuples, each value
    as SQLAlchemy's processing would bind it: times as naive UTC text, JSON as text (None as JSON
    null, as SQLAlchemy's JSON type stores it); a type this class has no converter for keeps
    SQLAlchemy's own processor."""

    def __init__(
        self,
        statement: UpdateBase | TextClause,
        dialect: Dialect,
        keys: Sequence[str] | None = None,
    ):
        compiled = statement.compile(dialect=dialect, column_keys=None if keys is None else list(keys))
        self.sql = str(compiled)
        self._sqlite = dialect.name == "sqlite"
        if self._sqlite:
            order = tuple(compiled.positiontup or ())
            self._values = itemgetter(*order) if len(order) > 1 else lambda row: (row[order[0]],)
            self._convert = [
                (n, convert)
                for n, name in enumerate(order)
                if (convert := _sqlite_converter(compiled.binds[name].type, dialect)) is not None
            ]

    def positional(self, rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        """SQLite's parameters: a tuple per row, in the statement's order."""
        values, convert = self._values, self._convert
        if not convert:
            return [values(row) for row in rows]
        ready: list[tuple[Any, ...]] = []
        for row in rows:
            one = list(values(row))
            for n, to_sql in convert:
                one[n] = to_sql(one[n])
            ready.append(tuple(one))
        return ready

    def run(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        # Through the Connection, so that errors come wrapped as SQLAlchemy's (see is_transient).
        conn.exec_driver_sql(self.sql, self.positional(rows) if self._sqlite else rows)

    def send(self, cursor: Any, rows: list[dict[str, Any]]) -> None:
        """Queue the statement on a psycopg cursor (the reconcile's pipeline)."""
        cursor.executemany(self.sql, rows)


class _RecordsetUpsert:
    """PostgreSQL's upsert of a batch of session rows as one statement with one parameter: the rows
    as a JSON array, read by jsonb_populate_recordset with the table's own column types. An
    executemany sends and the driver adapts every value of every row (in a cold reconcile that
    cost more than the server's work); here the whole batch is one orjson call. The array is
    parsed once, as jsonb, so that each JSONB column takes its value as it is (from `json`, the
    server parsed every JSON value a second time, raw_state the most: a cold reconcile's upserts
    took about a quarter longer on the server). Rows are inserted in the array's order (key
    order: no two writers deadlock). A JSON null in a JSON column becomes JSON null, as
    SQLAlchemy's JSON type stores None, not SQL NULL."""

    def __init__(self, keys: Sequence[str], update: Sequence[str]) -> None:
        json_columns = {c.name for c in sessions.columns if isinstance(c.type, JSONDoc)}
        values = ", ".join(f"COALESCE(r.{k}, 'null'::jsonb)" if k in json_columns else f"r.{k}" for k in keys)
        self.sql = (
            f"INSERT INTO sessions ({', '.join(keys)}) SELECT {values}"
            " FROM jsonb_populate_recordset(NULL::sessions, %(rows)s::jsonb) WITH ORDINALITY AS r"
            " ORDER BY r.ordinality"
            " ON CONFLICT (project_id, slug) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in update)
        )

    def ready(self, rows: list[dict[str, Any]]) -> dict[str, str]:
        return {"rows": dumps(rows)}

    def run(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        conn.exec_driver_sql(self.sql, self.ready(rows))

    def send(self, cursor: Any, rows: list[dict[str, Any]]) -> None:
        """Queue the statement on a psycopg cursor (the reconcile's pipeline)."""
        cursor.execute(self.sql, self.ready(rows))


class _SqliteTime:
    """`sqlite_time` for one column of a statement, remembering its last value. A batch stamps every
    row with the same moment (synced_at, first_seen_at, an event's at), so the text of the last
    value is reused while the same object comes again; (value, text) is replaced as one, so
    threads sharing it are safe."""

    def __init__(self) -> None:
        self._last: tuple[datetime | None, str | None] = (None, None)

    def __call__(self, value: datetime | None) -> str | None:
        if value is None:
            return None
        last = self._last
        if value is last[0]:
            return last[1]
        text = sqlite_time(value)
        self._last = (value, text)
        return text


def _sqlite_json(value: Any) -> str:
    """JSON as SQLAlchemy's JSON type binds it on SQLite: None as JSON null."""
    return "null" if value is None else dumps(value)


def _sqlite_converter(type_: Any, dialect: Dialect) -> Callable[[Any], Any] | None:
    """How a value of `type_` is bound on SQLite (None: as it is)."""
    if isinstance(type_, UTCDateTime):
        return _SqliteTime()
    if isinstance(type_, JSONDoc):
        return _sqlite_json
    if isinstance(type_, Boolean):
        return None  # sqlite3 binds True and False as 1 and 0, as SQLAlchemy's int() would
    processor: Callable[[Any], Any] | None = type_.dialect_impl(dialect).bind_processor(dialect)
    return processor


class _EventInsert:
    """The event rows of a batch, inserted with their ids returned in row order; on PostgreSQL
    the same statement sends their NOTIFYs (see _INSERT_EVENTS_PG).

    On PostgreSQL one statement for the batch. On SQLite one executemany: the transaction holds
    the write lock (BEGIN IMMEDIATE), so AUTOINCREMENT numbers the rows on from the highest id
    ever given, with no gap; the count of rows inserted and the sequence afterwards confirm it.
    When they do not (a row's session was not there, so it inserted nothing), the rows go again
    one by one, each returning its id."""

    def __init__(self, dialect: Dialect) -> None:
        self._postgresql = dialect.name == "postgresql"
        if self._postgresql:
            self.sql = _INSERT_EVENTS_PG
            return
        self._rows = _Bulk(_INSERT_EVENT_ROWS, dialect)
        self._one = _Bulk(_INSERT_EVENT, dialect)

    def ready(self, rows: list[dict[str, Any]], stream: list[dict[str, Any]]) -> dict[str, str]:
        """PostgreSQL's parameter: the rows, with each NOTIFY payload, as one JSON array."""
        return {
            "rows": dumps(
                [
                    {
                        "n": n,
                        "project": row["e_project"],
                        "slug": row["e_slug"],
                        "at": row["e_at"].isoformat(),
                        "kind": row["e_kind"],
                        "f": row["e_from"],
                        "t": row["e_to"],
                        "detail": row["e_detail"],
                        "payload": notify_payload(event),
                    }
                    for n, (row, event) in enumerate(zip(rows, stream, strict=True))
                ]
            )
        }

    @staticmethod
    def ids(cursor: Any, count: int) -> list[int | None]:
        """The ids PostgreSQL's statement returned, by row (None: its session was not there)."""
        ids: list[int | None] = [None] * count
        for event_id, n, _ in cursor.fetchall():
            ids[n] = int(event_id)
        return ids

    def run(
        self, conn: Connection, rows: list[dict[str, Any]], stream: list[dict[str, Any]]
    ) -> list[int | None]:
        if self._postgresql:
            raw = conn.connection.driver_connection
            assert raw is not None
            with raw.cursor() as cursor:
                cursor.execute(self.sql, self.ready(rows, stream))
                return self.ids(cursor, len(rows))
        params = self._rows.positional(rows)
        last = int(conn.exec_driver_sql(_SQLITE_LAST_EVENT_ID).scalar_one())
        savepoint = conn.begin_nested()
        inserted = conn.exec_driver_sql(self._rows.sql, params).rowcount
        if (
            inserted == len(rows)
            and conn.exec_driver_sql(_SQLITE_LAST_EVENT_ID).scalar_one() == last + inserted
        ):
            savepoint.commit()
            return list(range(last + 1, last + 1 + inserted))
        savepoint.rollback()
        ids: list[int | None] = []
        for one in params:
            found = conn.exec_driver_sql(self._one.sql, one).scalar()
            ids.append(None if found is None else int(found))
        return ids


@dataclass
class WritePlan:
    """One batch's transaction before it runs: the statements with their rows, the event rows,
    and what it will have done once committed (counts and stream events, which get their ids
    from `numbered`)."""

    steps: list[tuple[_Bulk | _RecordsetUpsert, list[dict[str, Any]]]]
    result: WriteResult
    event_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.steps and not self.event_rows

    def numbered(self, ids: Sequence[int | None]) -> list[dict[str, Any]]:
        """Give each stream event its row's id (id first); an event whose row was not inserted
        (its session was not there) is left out. The events are stored in `result` too."""
        events = [{"id": i, **e} for i, e in zip(ids, self.result.events, strict=True) if i is not None]
        self.result.events = events
        return events


class DatabaseFault(Exception):
    """Every row of a batch refused, each alone, for the same reason: the database's fault (what it
    allows, what it holds), not the sessions'. Retried with backoff like an outage."""


# SQLSTATEs (whole classes by their first two characters) that refuse a statement whatever its rows
# hold: the connection, a read-only or failed transaction, privileges, missing tables or columns,
# resources (disk full, out of memory), the operator (shutdown, statement timeout), the server.
_DATABASE_WIDE = (
    "08", "25", "28", "3D", "3F", "40", "53", "54", "55", "57", "58", "XX",
    "42501", "42P01", "42703", "42883", "42704",
)  # fmt: skip
# Classes of a value the database rejects: that row's own fault (a NUL byte, a number too large).
_ROW_FAULT = ("22", "23")


def sqlstate(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE of a database error, when it has one."""
    code = getattr(getattr(exc, "orig", None) or exc, "sqlstate", None)
    return code if isinstance(code, str) else None


def is_transient(exc: BaseException) -> bool:
    """The database's fault, not a row's: connection lost, database locked or gone, a statement it
    refuses for every row (privileges, read-only, disk full, a missing table). Worth retrying with
    backoff, shown as an outage; never stored as a session's error."""
    if isinstance(exc, DatabaseFault):
        return True
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    code = sqlstate(exc)
    if code is not None and code.startswith(_DATABASE_WIDE):
        return True
    if _missing_parent(exc):
        return True
    return isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError))


def _missing_parent(exc: BaseException) -> bool:
    """A foreign key violation: the project (or session) row a write refers to is not there. No
    state.json chooses those ids, the daemon does, so it is never the session's fault: the rows
    went away under us (a SQLite file rebuilt while a batch was on its way, a project dropped)."""
    if sqlstate(exc) == "23503":
        return True
    orig = getattr(exc, "orig", None) or exc
    return getattr(orig, "sqlite_errorname", None) == "SQLITE_CONSTRAINT_FOREIGNKEY"


def is_row_fault(exc: BaseException) -> bool:
    """A value the database rejects in this row: only that session's fault."""
    if _missing_parent(exc):
        return False
    code = sqlstate(exc)
    if code is not None:
        return code.startswith(_ROW_FAULT)
    return isinstance(exc, (sa_exc.IntegrityError, sa_exc.DataError))


# What `Store.known_by_project` reads, built once: a worker reads a handful of rows per batch, and
# building the statement each time cost as much as running it on SQLite. Columns in the order of
# Known's fields after (project_id, slug): rows are unpacked by position (a reconcile reads every
# row, and attribute access per column costs).
_KNOWN = select(
    sessions.c.project_id,
    sessions.c.slug,
    sessions.c.id,
    sessions.c.state_size,
    sessions.c.state_mtime_ns,
    sessions.c.state_hash,
    sessions.c.spec_exists,
    sessions.c.plan_exists,
    sessions.c.deleted_at.is_not(None),
    sessions.c.invalid,
    sessions.c.current_phase,
    sessions.c.status,
    sessions.c.dir_mtime_ns,
).where(sessions.c.project_id.in_(bindparam("ids", expanding=True)))
_KNOWN_SLUGS = _KNOWN.where(sessions.c.slug.in_(bindparam("slugs", expanding=True)))

# What `Store.stats_by_project` reads, in Stat's column order; built once (a reconcile runs it once
# per preload group, and building the statement cost as much as running it on an empty group).
_STATS_QUERY = select(
    sessions.c.project_id,
    sessions.c.slug,
    sessions.c.state_size,
    sessions.c.state_mtime_ns,
    sessions.c.dir_mtime_ns,
    sessions.c.deleted_at.is_not(None),
).where(sessions.c.project_id.in_(bindparam("ids", expanding=True)))


@dataclass(frozen=True, slots=True)
class ProjectRef:
    id: int
    path: str
    sessions_dir: str


def _dialect_insert(dialect: str) -> Callable[[Table], Any]:
    """The dialect's INSERT with ON CONFLICT, imported for the dialect in use only."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert


class Store:
    """All database access of the daemon and the one-shot commands goes through here."""

    def __init__(self, engine: Engine, host: str | None = None, hub: EventHub | None = None) -> None:
        self.engine = engine
        self.host = host or socket.gethostname()
        self.dialect = engine.dialect.name
        self._insert = _dialect_insert(self.dialect)
        dialect = engine.dialect
        self._upsert_valid = self._upsert(_MIRRORED + _STAT + _STATUS)
        self._upsert_invalid = self._upsert(_STAT + _STATUS)
        self._touch = _Bulk(_TOUCH, dialect)
        self._tombstone = _Bulk(_TOMBSTONE, dialect)
        self.event_insert = _EventInsert(dialect)
        self.hub = hub
        database = engine.url.database if self.dialect == "sqlite" else None
        # The SQLite file and which file it was when last checked (see `file_replaced`).
        self.file = os.path.abspath(database) if database and database != ":memory:" else None
        if self.file is not None:
            checkpointer.start()
        self._file_id = self._identity()

    def _identity(self) -> tuple[int, int] | None:
        if self.file is None:
            return None
        try:
            st = os.stat(self.file)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def release_memory(self) -> None:
        """After a full pass: of the pool's idle SQLite connections, the first hands back the pages
        the pass left in its cache (`PRAGMA shrink_memory`; SQLite keeps up to 2 MiB per connection)
        and stays open, so that a daemon short of file descriptors needs no new one for its next
        batch; the others are closed, with their caches and prepared statements, and reopened when
        needed. Nothing to do on PostgreSQL, whose pages live in the server."""
        if self.file is None:
            return
        idle: list[Any] = []
        try:
            for _ in range(getattr(self.engine.pool, "checkedin", lambda: 0)()):
                idle.append(self.engine.raw_connection())  # the idle ones come first, oldest first
            if idle:
                idle[0].driver_connection.execute("PRAGMA shrink_memory")
        finally:
            for n, conn in enumerate(idle):
                if n:
                    conn.invalidate()
                conn.close()  # back to the pool, the first one ahead of the others

    def remember_file(self) -> None:
        """Take the SQLite file as it is now as the one the mirror lives in."""
        self._file_id = self._identity()

    def file_replaced(self) -> bool:
        """Whether the SQLite file was deleted or replaced since `remember_file` (its open
        connections would go on writing into the unlinked one, which nobody can read)."""
        return self.file is not None and self._identity() != self._file_id

    def _upsert(self, columns: tuple[str, ...]) -> _Bulk | _RecordsetUpsert:
        if self.dialect == "postgresql":
            return _RecordsetUpsert(("project_id", "slug", "first_seen_at", *columns), columns)
        insert = self._insert(sessions)
        upsert = insert.on_conflict_do_update(
            index_elements=["project_id", "slug"], set_={c: insert.excluded[c] for c in columns}
        )
        return _Bulk(upsert, self.engine.dialect, ("project_id", "slug", "first_seen_at", *columns))

    # -- projects -------------------------------------------------------------------------

    def ensure_project(self, path: str, sessions_dir: str) -> ProjectRef:
        """The project's row, created on first sight (safe against a concurrent creator)."""
        with self.engine.begin() as conn:
            stmt = self._insert(projects).values(
                host=self.host,
                working_dir=path,
                name=path.rstrip("/").rsplit("/", 1)[-1] or path,
                sessions_dir=sessions_dir,
                created_at=datetime.now(UTC),
            )
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["host", "working_dir"], set_={"sessions_dir": sessions_dir}
                )
            )
            row_id = conn.execute(
                select(projects.c.id).where(projects.c.host == self.host, projects.c.working_dir == path)
            ).scalar_one()
        return ProjectRef(row_id, path, sessions_dir)

    def known_projects(self) -> list[ProjectRef]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(projects.c.id, projects.c.working_dir, projects.c.sessions_dir).where(
                    projects.c.host == self.host
                )
            )
            return [ProjectRef(r.id, r.working_dir, r.sessions_dir) for r in rows]

    def mark_reconciled(self, project_ids: Collection[int], at: datetime) -> None:
        if not project_ids:
            return
        with self._one_statement() as conn:  # one statement: atomic by itself
            conn.execute(
                update(projects).where(projects.c.id.in_(list(project_ids))).values(last_reconciled_at=at)
            )
            conn.commit()

    def last_full_reconcile(self) -> datetime | None:
        """The oldest last_reconciled_at among this host's projects (None if any never was)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(
                    func.count(),
                    func.count(projects.c.last_reconciled_at),
                    func.min(projects.c.last_reconciled_at),
                ).where(projects.c.host == self.host)
            ).one()
        total, reconciled, oldest = row
        if not total or reconciled < total:
            return None
        return oldest if isinstance(oldest, datetime) else None

    # -- sessions -------------------------------------------------------------------------

    def known(self, project_id: int, slugs: Collection[str] | None = None) -> dict[str, Known]:
        """What the database holds for these slugs of a project (all of them when None)."""
        return self.known_by_project([project_id], slugs)[project_id]

    def known_by_project(
        self, project_ids: Collection[int], slugs: Collection[str] | None = None
    ) -> dict[int, dict[str, Known]]:
        """What the database holds for these projects, by project id and slug, in one query."""
        params: dict[str, list[Any]] = {"ids": list(project_ids)}
        query = _KNOWN
        if slugs is not None:
            query, params["slugs"] = _KNOWN_SLUGS, list(slugs)
        known: dict[int, dict[str, Known]] = {project_id: {} for project_id in project_ids}
        with self._one_statement() as conn:
            # The driver's own rows, not SQLAlchemy's: a reconcile reads one per session, and no
            # column here needs a result processor (SQLite's booleans come as 0 and 1, which
            # compare equal to False and True).
            result = conn.execute(query, params)
            for project_id, slug, *rest in result.cursor.fetchall():
                known[project_id][slug] = Known._make(rest)
            result.close()
        return known

    def stats_by_project(self, project_ids: Collection[int]) -> dict[int, dict[str, Stat]]:
        """Every row of these projects, deleted ones too, as far as `inspection.not_unchanged`
        needs it, by project id and slug, in one query: what a reconcile compares each folder with."""
        rows: dict[int, dict[str, Stat]] = {project_id: {} for project_id in project_ids}
        with self._one_statement() as conn:
            result = conn.execute(_STATS_QUERY, {"ids": list(project_ids)})
            # The driver's own rows, kept as they come (a reconcile reads one per session): they are
            # Stat's plain tuples already.
            for row in result.cursor.fetchall():
                rows[row[0]][row[1]] = row
            result.close()
        return rows

    def _one_statement(self) -> Connection:
        """A connection for statements that each stand alone. On PostgreSQL in autocommit, where
        one costs one round trip instead of three (BEGIN, the statement, COMMIT or ROLLBACK); the
        checkout's ping stays, so a connection the server dropped is replaced, not used."""
        conn = self.engine.connect()
        if self.dialect == "postgresql":
            conn.execution_options(isolation_level="AUTOCOMMIT")
        return conn

    def count_live_sessions(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(sessions.join(projects))
                    .where(projects.c.host == self.host, sessions.c.deleted_at.is_(None))
                ).scalar_one()
            )

    def live_sessions_by_project(self) -> dict[str, int]:
        """Live sessions of this host's projects, by project folder (every project, 0 included)."""
        s, p = sessions.c, projects.c
        live = func.count(s.id).filter(s.deleted_at.is_(None))
        query = (
            select(p.working_dir, live).select_from(projects.outerjoin(sessions)).where(p.host == self.host)
        )
        with self.engine.connect() as conn:
            return {path: int(n) for path, n in conn.execute(query.group_by(p.working_dir))}

    def database_bytes(self) -> int:
        """The database's size: SQLite's pages, or PostgreSQL's pg_database_size."""
        sql = (
            "SELECT pg_database_size(current_database())"
            if self.dialect == "postgresql"
            else "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()"
        )
        with self.engine.connect() as conn:
            return int(conn.execute(text(sql)).scalar_one())

    def invalid_sessions(self) -> list[dict[str, Any]]:
        """Live sessions with a problem, and why: `kind` is "invalid" (state.json could not be
        read; the last good mirror is kept) or "fields" (fields of the wrong type stored as NULL);
        `path` is the session folder."""
        s, p = sessions.c, projects.c
        query = (
            select(
                p.working_dir.label("project"),
                p.sessions_dir,
                s.slug,
                s.invalid,
                s.sync_error,
                s.sync_error_at,
            )
            .join(projects, s.project_id == p.id)
            .where(p.host == self.host, s.sync_error.is_not(None), s.deleted_at.is_(None))
            .order_by(s.invalid.desc(), p.working_dir, s.slug)
        )
        with self.engine.connect() as conn:
            return [
                {
                    "project": r.project,
                    "slug": r.slug,
                    "path": os.path.join(r.sessions_dir, r.slug),
                    "kind": "invalid" if r.invalid else "fields",
                    "sync_error": r.sync_error,
                    "sync_error_at": r.sync_error_at,
                }
                for r in conn.execute(query)
            ]

    def check_schema(self) -> None:
        """Raise SchemaMissing when the tables are not there (auto_migrate off, never upgraded)."""
        with self.engine.connect() as conn:
            if not sa_inspect(conn).has_table(sessions.name):
                raise SchemaMissing(
                    "the database has no sessionsync tables yet",
                    "run `sessionsync db upgrade` (database.auto_migrate is off)",
                )

    def live_slugs(self, project_id: int) -> set[str]:
        with self.engine.connect() as conn:
            return set(
                conn.execute(
                    select(sessions.c.slug).where(
                        sessions.c.project_id == project_id, sessions.c.deleted_at.is_(None)
                    )
                ).scalars()
            )

    def write(
        self,
        changes: Sequence[tuple[ProjectRef, Change]],
        known: Mapping[SessionKey, Known],
        now: datetime | None = None,
    ) -> WriteResult:
        """Apply a batch of changes in one transaction; returns counts and committed events.

        With a hub, the events reach its subscribers once committed, in id order (daemon/hub.py)."""
        plan = self.plan(changes, known, now)
        if plan.empty:
            return plan.result
        ticket = self.hub.ticket() if self.hub is not None and plan.event_rows else None
        with self.engine.connect() as conn:
            transaction = conn.begin()
            try:
                for bulk, rows in plan.steps:
                    bulk.run(conn, rows)
                if plan.event_rows:
                    ids = self.event_insert.run(conn, plan.event_rows, plan.result.events)
                    if ticket is not None:
                        ticket.known([i for i in ids if i is not None])
                    plan.numbered(ids)
            except BaseException:
                if ticket is not None:
                    ticket.rolled_back()  # COMMIT was never sent
                raise
            try:
                transaction.commit()
            except BaseException:
                if ticket is not None:
                    ticket.uncertain()  # COMMIT was sent: it may have happened
                raise
            if ticket is not None:
                ticket.committed(plan.result.events)
            if self.file is not None:
                checkpointer.committed(self.file, conn.connection.driver_connection)
        return plan.result

    def plan(
        self,
        changes: Sequence[tuple[ProjectRef, Change]],
        known: Mapping[SessionKey, Known],
        now: datetime | None = None,
    ) -> WritePlan:
        """The statements that apply a batch of changes, in key order (so that two writers never
        deadlock), with the counts and events they stand for."""
        now = now or datetime.now(UTC)
        plan = WritePlan([], WriteResult())
        ordered = sorted(changes, key=lambda pc: (pc[0].id, pc[1].key.slug))
        self._plan_rows(plan, ordered, now)
        events = self._events(ordered, known, now)
        plan.event_rows = [row for row, _ in events]
        plan.result.events = [stream for _, stream in events]
        return plan

    def _plan_rows(
        self, plan: WritePlan, ordered: Sequence[tuple[ProjectRef, Change]], now: datetime
    ) -> None:
        valid, invalid, touch, tomb = [], [], [], []
        for project, change in ordered:
            if change.action is Action.TOMBSTONE:
                tomb.append({"b_project_id": project.id, "b_slug": change.key.slug, "b_now": now})
                continue
            probe = change.probe
            # One dict per row, filled in place: a cold reconcile plans one for every session.
            row = (
                {} if change.mapped is None or change.action is not Action.WRITE else change.mapped.columns()
            )
            row["project_id"] = project.id
            row["slug"] = change.key.slug
            row["state_hash"] = change.state_hash
            if probe is None:
                row.update(state_size=None, state_mtime_ns=None, state_mtime=None, dir_mtime_ns=None)
                row.update(spec_exists=False, plan_exists=False)
            else:
                row["state_size"] = probe.size
                row["state_mtime_ns"] = probe.mtime_ns
                row["state_mtime"] = (
                    datetime.fromtimestamp(probe.mtime_ns / 1e9, UTC) if probe.mtime_ns else None
                )
                row["spec_exists"] = probe.spec_exists
                row["plan_exists"] = probe.plan_exists
                row["dir_mtime_ns"] = probe.dir_mtime_ns
            if change.action is Action.TOUCH:
                touch.append({f"b_{k}": v for k, v in row.items()})
                continue
            row["synced_at"] = row["first_seen_at"] = now
            row["deleted_at"] = None
            row["sync_error"] = change.error
            if change.mapped is None:
                row["invalid"] = True
                row["sync_error_at"] = now
                invalid.append(row)
            else:
                row["raw_state"] = change.raw_state
                row["invalid"] = False
                row["sync_error_at"] = now if change.error else None
                valid.append(row)
        steps = (
            (self._upsert_valid, valid),
            (self._upsert_invalid, invalid),
            (self._touch, touch),
            (self._tombstone, tomb),
        )
        plan.steps.extend((bulk, rows) for bulk, rows in steps if rows)
        result = plan.result
        result.written = len(valid) + len(invalid)
        result.invalid = len(invalid)
        result.touched = len(touch)
        result.tombstoned = len(tomb)

    @staticmethod
    def _events(
        ordered: Sequence[tuple[ProjectRef, Change]], known: Mapping[SessionKey, Known], now: datetime
    ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(event row parameters, stream event) for each meaningful change of the batch."""
        events = []
        for project, change in ordered:
            if change.action is Action.TOUCH:
                continue
            for kind, old, new, detail in _event_kinds(change, known.get(change.key)):
                row = {
                    "e_project": project.id,
                    "e_slug": change.key.slug,
                    "e_at": now,
                    "e_kind": kind.value,
                    "e_from": old,
                    "e_to": new,
                    "e_detail": detail,
                }
                events.append(
                    (
                        row,
                        session_event(
                            kind,
                            project.path,
                            change.key.slug,
                            os.path.join(project.sessions_dir, change.key.slug),
                            now,
                            old,
                            new,
                            detail,
                        ),
                    )
                )
        return events

    def last_event_id(self) -> int:
        """The highest session_events id (0 when there is none)."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.coalesce(func.max(session_events.c.id), 0))).scalar_one())

    def events_between(
        self,
        after: int,
        upto: int,
        kinds: Collection[str] | None = None,
        project_paths: Collection[str] | None = None,
        window: int = 2000,
    ) -> Iterator[dict[str, Any]]:
        """The stream form of this host's committed events with `after < id <= upto`, in id
        order. `kinds` are stream kinds (`session.created`), `project_paths` project folders.

        Read a window of ids at a time: each query is a range of the primary key (however the
        planner judges the tables), and a replay of 100,000 events holds one window in memory."""
        e, s, p = session_events.c, sessions.c, projects.c
        query = (
            select(
                e.id, e.kind, e.at, e.from_value, e.to_value, e.detail, s.slug, p.working_dir, p.sessions_dir
            )
            .select_from(session_events.join(sessions).join(projects))
            .where(p.host == self.host)
            .order_by(e.id)
        )
        if kinds is not None:
            bare = [k.removeprefix("session.") for k in kinds if k.startswith("session.")]
            query = query.where(e.kind.in_(bare))
        if project_paths is not None:
            query = query.where(p.working_dir.in_(list(project_paths)))
        while after < upto:
            top = min(after + window, upto)
            with self.engine.connect() as conn:
                rows = conn.execute(query.where(e.id > after, e.id <= top)).all()
            for row in rows:
                event = session_event(
                    SessionEventKind(row.kind),
                    row.working_dir,
                    row.slug,
                    os.path.join(row.sessions_dir, row.slug),
                    row.at,
                    row.from_value,
                    row.to_value,
                    row.detail,
                )
                yield {"id": row.id, **event}
            after = top

    def purge_tombstones(self, older_than: timedelta, now: datetime | None = None) -> int:
        """Delete this host's tombstoned rows (and their events) deleted more than `older_than` ago."""
        cutoff = (now or datetime.now(UTC)) - older_than
        mine = select(projects.c.id).where(projects.c.host == self.host)
        doomed = select(sessions.c.id).where(sessions.c.deleted_at < cutoff, sessions.c.project_id.in_(mine))
        with self.engine.begin() as conn:
            conn.execute(delete(session_events).where(session_events.c.session_id.in_(doomed)))
            return conn.execute(delete(sessions).where(sessions.c.id.in_(doomed))).rowcount

    def query_sessions(
        self,
        project: str | None = None,
        phase: str | None = None,
        status: str | None = None,
        include_deleted: bool = False,
    ) -> list[dict[str, Any]]:
        s, p = sessions.c, projects.c
        query = (
            select(
                p.working_dir.label("project"),
                s.slug,
                s.title,
                s.current_phase,
                s.status,
                s.checkpoints_completed,
                s.checkpoints_total,
                s.updated_at,
                s.deleted_at,
                s.invalid,
                s.sync_error,
            )
            .join(projects, s.project_id == p.id)
            .order_by(p.working_dir, s.slug)
        )
        if project is not None:
            query = query.where(p.working_dir == project)
        if phase is not None:
            query = query.where(s.current_phase == phase)
        if status is not None:
            query = query.where(s.status == status)
        if not include_deleted:
            query = query.where(s.deleted_at.is_(None))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]


def _event_kinds(
    change: Change, before: Known | None
) -> list[tuple[SessionEventKind, str | None, str | None, dict[str, Any] | None]]:
    """The meaningful changes one write makes, compared with what the row held before."""
    kind = SessionEventKind
    if change.action is Action.TOMBSTONE:
        return [(kind.DELETED, None, None, None)]
    mapped = change.mapped
    kinds: list[tuple[SessionEventKind, str | None, str | None, dict[str, Any] | None]] = []
    if before is None:
        kinds.append((kind.CREATED, None, mapped.current_phase if mapped else None, None))
    elif before.deleted:
        # A tombstone keeps the last mirror: what the session came back as is compared with it.
        kinds.append((kind.RESTORED, before.current_phase, mapped.current_phase if mapped else None, None))
    if mapped is None:
        # Each distinct bad content is written once (its hash is kept), so this fires once per content.
        return [*kinds, (kind.INVALID, None, None, {"reason": change.error})]
    if before is not None:
        if before.invalid and not before.deleted:
            kinds.append((kind.RECOVERED, None, None, None))
        if before.current_phase != mapped.current_phase:
            kinds.append((kind.PHASE_CHANGED, before.current_phase, mapped.current_phase, None))
        if before.status != mapped.status:
            kinds.append((kind.STATUS_CHANGED, before.status, mapped.status, None))
        if not kinds:
            kinds.append((kind.UPDATED, None, None, None))
    if change.error:
        # Every event of a write that stored fields as NULL says which: that problem is current.
        return [(k, old, new, {**(detail or {}), "fields": change.error}) for k, old, new, detail in kinds]
    return kinds

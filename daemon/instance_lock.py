"""One daemon per database and host: the single-instance lock is held where the data is.

Two daemons mirroring one host's sessions into one database race each other's tombstones and
events (`deadlock detected`, every event twice), whatever their runtime folders. So the lock is:

- SQLite: an exclusive flock on `<database>.lock` beside the database file;
- PostgreSQL: a session-level advisory lock keyed by host and schema, held on a connection of
  its own for the daemon's lifetime (see PostgresLock for what happens when it drops);
- and beside the control socket, `control.sock.lock`, so that two daemons started at once on
  one socket cannot both replace it.

The kernel or the server drops the lock when the process dies, so a `kill -9` leaves nothing to
clean up. Each lock names its holder (pid and control socket), so the one refused can say who.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import select
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from loguru import logger

from sessionsync.daemon.backoff import Backoff
from sessionsync.daemon.errors import AlreadyRunning, ConfigError

_HOLDER_BYTES = 4096
_CHECK_S = 5.0  # how often the PostgreSQL lock's connection is looked at when nothing woke us
_RECONNECT_BACKOFF_S = (1.0, 30.0)


class InstanceLock(Protocol):
    def acquire(self) -> None: ...

    def release(self) -> None: ...


def holder_text(socket_path: Path) -> str:
    """How a daemon names itself in its locks: what a refused one needs to find it."""
    return f"pid {os.getpid()}, control socket {socket_path}"


class StaleLock(Exception):
    """The lock is held by a database session whose daemon is gone (or is this one's own, from a
    connection it dropped): the server has not ended that session yet (a peer that vanished behind
    a stalled network is noticed late). Waited out like an outage, never a reason to exit."""


def _holder_pid(holder: str) -> int | None:
    found = re.match(r"pid (\d+),", holder)
    return int(found[1]) if found else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _refused(holder: str, where: str) -> AlreadyRunning:
    return AlreadyRunning(
        f"another sessionsync daemon ({holder}) is already running on {where}",
        "stop it first (`sessionsync status` on its control socket shows it), or give this one "
        "another database: two daemons on one database duplicate every event",
    )


def check_folder(folder: Path) -> None:
    """Refuse a folder another user could plant files in: owned by someone else, or writable by
    others without the sticky bit. Its files are then safe to create and lock."""
    try:
        st = os.stat(folder)
    except OSError as exc:
        raise ConfigError(f"cannot use the folder {folder}: {exc.strerror}") from None
    problem = ""
    if not stat.S_ISDIR(st.st_mode):
        problem = "is not a folder"
    elif st.st_uid not in (os.getuid(), 0):
        problem = f"is owned by uid {st.st_uid}, not by this daemon's uid {os.getuid()}"
    elif st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        problem = f"is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    if problem:
        raise ConfigError(
            f"the folder {folder} {problem}; sessionsync keeps its lock files only in a private folder",
            "use a folder only you can write (mode 0700)",
        )


class LockFile:
    """An exclusive flock on the file `path`, which holds the holder's `holder_text`.

    The file is opened without following links and checked (a regular file of ours, one link)
    before anything is written to it: a link planted at its path never redirects a write.
    """

    def __init__(self, path: Path, holder: str, where: str) -> None:
        self.path = path
        self._holder = holder
        self._where = where
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise AlreadyRunning naming the holder, ConfigError for a bad path."""
        if self._fd is not None:
            return
        check_folder(self.path.parent)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            what = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be opened: {exc.strerror}"
            raise ConfigError(
                f"the lock file {self.path} {what}; refusing to use it",
                "remove it (sessionsync never makes a link there), then start again",
            ) from None
        try:
            self._check(fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, _HOLDER_BYTES, 0).decode(errors="replace").strip() or "pid unknown"
            os.close(fd)
            raise _refused(holder, self._where) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self._holder}\n".encode(), 0)
        self._fd = fd

    def _check(self, fd: int) -> None:
        st = os.fstat(fd)
        problem = ""
        if not stat.S_ISREG(st.st_mode):
            problem = "is not a regular file"
        elif st.st_uid != os.getuid():
            problem = f"is owned by uid {st.st_uid}, not by this daemon's uid {os.getuid()}"
        elif st.st_nlink != 1:
            problem = f"has {st.st_nlink} hard links"
        if problem:
            raise ConfigError(
                f"the lock file {self.path} {problem}; refusing to use it",
                "remove it (sessionsync makes it as a private file of its own), then start again",
            )

    def release(self) -> None:
        # The file stays: unlinked, a daemon that had just opened it could lock the orphan while
        # another one creates and locks a new file of the same name.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# The holder's description, as its lock connection's last statement shows it in pg_stat_activity.
_HOLDER_QUERY = re.compile(r"SELECT '(?P<holder>(?:[^']|'')*)' AS sessionsync_holder")


class PostgresLock:
    """`pg_try_advisory_lock` on a connection of its own, keyed by this host and the schema.

    The connection is watched; when it drops (a server restart, a network cut), the daemon keeps
    working while it takes the lock again as soon as the database answers, which is no risk: its
    writes fail meanwhile just the same. Should another daemon have taken the lock in that gap,
    this one calls `on_lost` (the service stops without writing anything more): never two writers
    for long, and never silently, since both say so in their logs.
    """

    def __init__(self, engine: Any, holder: str, on_lost: Callable[[], None]) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self._holder = holder
        self._on_lost = on_lost
        self._engine = create_engine(
            engine.url,
            poolclass=NullPool,
            isolation_level="AUTOCOMMIT",
            # Seen in pg_stat_activity by whoever is refused; the keepalives notice a dead peer.
            connect_args={
                "application_name": f"sessionsync pid {os.getpid()}"[:63],
                "connect_timeout": 5,
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
            },
        )
        self._conn: Any = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()  # wakes the watcher out of select() at release
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock (AlreadyRunning naming the holder); connection errors propagate as they
        are (SQLAlchemy's), for the caller's wait-for-the-database loop."""
        if self._conn is not None:
            return
        self._conn = self._take()
        self._thread = threading.Thread(target=self._watch, name="instance-lock", daemon=True)
        self._thread.start()

    def _take(self) -> Any:
        from sqlalchemy import text

        conn = self._engine.connect()
        try:
            schema = conn.execute(text("SELECT current_schema()")).scalar_one()
            key = _key(f"sessionsync:{socket.gethostname()}:{schema}")
            if not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar_one():
                holder = self._holder_of(conn, key)
                # The key names this host, so the holder's pid is one of this host's processes.
                pid = _holder_pid(holder)
                if pid == os.getpid() or (pid is not None and not _running(pid)):
                    whose = "this daemon's own earlier connection" if pid == os.getpid() else "gone"
                    raise StaleLock(
                        f"the single-instance lock is still held by the database session of {holder} "
                        f"({whose}); waiting for the server to end that session"
                    )
                raise _refused(holder, f"this database (schema {schema}) for host {socket.gethostname()}")
            self._announce(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _announce(self, conn: Any) -> None:
        from sqlalchemy import text

        # A literal, not a parameter: pg_stat_activity shows a parameter as $1.
        quoted = self._holder.replace("'", "''")
        conn.execute(text(f"SELECT '{quoted}' AS sessionsync_holder").execution_options(no_parameters=True))

    @staticmethod
    def _holder_of(conn: Any, key: int) -> str:
        from sqlalchemy import text

        row = conn.execute(
            text(
                "SELECT a.pid, a.application_name, a.query FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
                "AND l.classid = :hi AND l.objid = :lo AND l.database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF},
        ).first()
        if row is None:
            return "it just stopped, or holds the lock through another role"
        found = _HOLDER_QUERY.search(row.query or "")
        if found:
            return found["holder"].replace("''", "'")
        # Another role's statements are hidden from us; its application name is not.
        return f"{row.application_name or 'unnamed'}, server process {row.pid}"

    def _watch(self) -> None:
        while not self._stop.is_set():
            conn = self._conn
            try:
                fd = conn.connection.dbapi_connection.fileno()
                # Readable with nothing asked means the server hung up; otherwise look every few s.
                select.select([fd, self._wake_r], [], [], _CHECK_S)
                if self._stop.is_set():
                    return
                self._announce(conn)
            except Exception as exc:
                if self._stop.is_set():
                    return
                if not self._retake(exc):
                    return

    def _retake(self, exc: Exception) -> bool:
        """Take the lock again on a new connection; False when another daemon has it."""
        with contextlib.suppress(Exception):
            self._conn.close()
        logger.warning(
            "lost the database connection that holds the single-instance lock ({}); taking it again",
            type(exc).__name__,
        )
        backoff = Backoff(*_RECONNECT_BACKOFF_S)
        while not self._stop.wait(backoff.next()):
            try:
                self._conn = self._take()
            except AlreadyRunning as refused:
                logger.error("{}: this daemon stops, the other one goes on", refused.message)
                self._on_lost()
                return False
            except Exception as still_down:
                # The outage itself is the workers' to log, once; here only its detail.
                logger.debug("single-instance lock not taken yet: {}", type(still_down).__name__)
                continue
            logger.info("took the single-instance lock again")
            return True
        return False

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(_CHECK_S + 1)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._engine.dispose()


def _key(name: str) -> int:
    """A signed 64-bit advisory lock key for `name`."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def database_lock(engine: Any, holder: str, on_lost: Callable[[], None]) -> InstanceLock | None:
    """The lock for the database `engine` writes to; None for an in-memory SQLite database."""
    if engine.url.get_backend_name() == "sqlite":
        database = engine.url.database or ""
        if not database or database == ":memory:":
            return None
        path = Path(os.path.abspath(database))
        return LockFile(path.with_name(path.name + ".lock"), holder, f"the database {path}")
    return PostgresLock(engine, holder, on_lost)

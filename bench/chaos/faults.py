"""The chaos run's faults, dealt and healed by operation counts: kill -9, SIGTERM mid-burst and
SIGSTOP (the process channel); the database cut off, slow or stalled (bytes stop, the connection
stays open) behind the proxy, or the daemon's role losing INSERT and UPDATE (PostgreSQL), or
SQLite's write lock held, or its file deleted (the database channel); a project's sessions
folder made unreadable (chmod 000, the folder channel); a session folder whose name is not UTF-8
(it stays to the end of the run); an inotify queue overflow and running out of watches.

At most one fault per channel is open at a time. An unreadable folder only bites a daemon that
is not root: the run then starts it as uid DAEMON_UID (see run.py), and without that the kind is
not dealt. The inotify limits are the daemon's own, through the watcher's test seam (stand-in
files), or with `real_sysctl` the machine's fs.inotify sysctls.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from bench.chaos.record import Outcome, mark
from bench.chaos.workload import SESSIONS, Workload
from sessionsync.daemon.errors import SessionSyncError
from tests.support.inotify_limits import Sysctl, SysctlStandIn, watches_in_use
from tests.support.proxy import TcpProxy
from tests.support.runner import Daemon
from tests.support.waiting import poll

DAEMON_UID = 65534  # nobody: the daemon's uid when the run is root (permission bits bind it)
EXIT_DEADLINE_S = 60.0  # SIGTERM drains for up to 30 s while the database is away
START_DEADLINE_S = 30.0


@dataclass
class _Fault:
    kind: str
    heal_at: int  # the op count at which it is healed
    lock: sqlite3.Connection | None = None  # db_lock: the connection holding SQLite's write lock
    folder: Path | None = None  # unreadable: the sessions folder made unreadable
    mode: int = 0  # unreadable: its mode before
    inode: int = 0  # unreadable: so that heal leaves a folder made anew since alone


class Faults:
    """Starts and heals the faults of one run on its daemon, its database (through `proxy` on
    PostgreSQL) and its inotify limits (stand-in files in `stand_ins`, unless `real_sysctl`)."""

    def __init__(
        self,
        rng: random.Random,
        out: Outcome,
        workload: Workload,
        daemon: Daemon,
        db_url: str,
        proxy: TcpProxy | None,
        stand_ins: Path,
        real_sysctl: bool,
        role: str | None = None,
        daemon_uid: int | None = None,
    ) -> None:
        self.rng = rng
        self.out = out
        self.workload = workload
        self.daemon = daemon
        self.db_url = db_url
        self.proxy = proxy
        self.postgres = proxy is not None  # the proxy stands in front of PostgreSQL only
        self.stand_ins = stand_ins
        self.real_sysctl = real_sysctl
        self.role = role  # PostgreSQL: the daemon's own login role, whose privileges db_revoke takes
        # The daemon's uid when it is not ours (root's): files made for it are handed to it.
        self.daemon_uid = daemon_uid
        self.deck: list[str] = []
        self.proc_fault: _Fault | None = None  # process channel: kill9, sigterm, sigstop
        self.db_fault: _Fault | None = None  # database channel: db_cut, db_slow, db_lock
        self.folder_fault: _Fault | None = None  # folder channel: unreadable
        self.poisoned = 0  # poison_name folders made: the n-th is named caf\xe9-n

    def start(self) -> None:
        """Deal the next fault and start it."""
        if not self.deck:
            # Dealt from a shuffled deck holding every kind: any run of that many faults meets
            # them all, in an order (and with overlaps) the seed decides.
            self.deck = ["kill9", "kill9", "sigterm", "sigstop", "overflow", "watch_limit", "poison_name"]
            if self.daemon_uid is not None:
                self.deck.append("unreadable")
            if self.postgres:
                self.deck += ["db_cut", "db_cut", "db_slow", "db_stall", "db_revoke"]
            else:
                self.deck += ["db_lock", "db_lock", "db_delete"]
            self.rng.shuffle(self.deck)
        kind = self.deck.pop()
        heal_at = self.out.ops + self.rng.randint(10, 150)
        self.out.faults.append(kind)
        if kind in ("overflow", "watch_limit"):
            # Both restart the daemon and wait for its watches: nothing else may be broken then.
            self.heal_proc()
            self.heal_db()
            self.heal_folder()
            self._mark(f"fault {kind}")
            (self._overflow if kind == "overflow" else self._watch_limit)()
            return
        if kind == "poison_name":
            self._mark(f"fault {kind}")
            self._poison()
            return
        if kind == "unreadable":
            self.heal_folder()
            self._mark(f"fault {kind}")
            self.folder_fault = self._unreadable(heal_at)
            return
        if kind.startswith("db_"):
            self.heal_db()
            self._mark(f"fault {kind}")
            self.db_fault = _Fault(kind, heal_at)
            if kind == "db_cut":
                self._proxy().cut()
            elif kind == "db_slow":
                self._proxy().slow(self.rng.uniform(0.02, 0.15))
            elif kind == "db_stall":
                self._proxy().stall()
            elif kind == "db_revoke":
                self._privileges("REVOKE INSERT, UPDATE ON ALL TABLES IN SCHEMA {} FROM {}")
            elif kind == "db_delete":
                # Nothing to heal: the daemon must notice, rebuild the file and mirror everything.
                database = Path(make_url(self.db_url).database or "")
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{database}{suffix}").unlink(missing_ok=True)
            else:
                self.db_fault.lock = self._sqlite_lock()
            return
        self.heal_proc()
        self._mark(f"fault {kind}")
        self.proc_fault = _Fault(kind, heal_at)
        if kind == "kill9":
            self.daemon.kill()
        elif kind == "sigstop":
            os.kill(self.daemon.pid, signal.SIGSTOP)
        else:
            self.workload.burst(on_half=self._sigterm)

    def heal_due(self) -> None:
        """Heal the open faults whose operation count has come."""
        if self.proc_fault is not None and self.out.ops >= self.proc_fault.heal_at:
            self.heal_proc()
        if self.db_fault is not None and self.out.ops >= self.db_fault.heal_at:
            self.heal_db()
        if self.folder_fault is not None and self.out.ops >= self.folder_fault.heal_at:
            self.heal_folder()

    def heal_proc(self) -> None:
        fault, self.proc_fault = self.proc_fault, None
        if fault is None:
            return
        self._mark(f"heal {fault.kind}")
        if fault.kind == "sigstop":
            os.kill(self.daemon.pid, signal.SIGCONT)
            return
        if fault.kind == "sigterm":
            # Its drain waits for the database: heal that first, or this would wait out the drain.
            self.heal_db()
            code = self.daemon.wait_exit(EXIT_DEADLINE_S)
            if code != 0:
                self._error(f"SIGTERM mid-burst: the daemon exited with {code}, not 0")
        self.daemon.start()

    def heal_db(self) -> None:
        fault, self.db_fault = self.db_fault, None
        if fault is None:
            return
        self._mark(f"heal {fault.kind}")
        if fault.kind in ("db_cut", "db_stall"):
            self._proxy().restore()
        elif fault.kind == "db_revoke":
            self._privileges("GRANT INSERT, UPDATE ON ALL TABLES IN SCHEMA {} TO {}")
        elif fault.kind == "db_slow":
            self._proxy().slow(0)
        elif fault.lock is not None:
            fault.lock.rollback()
            fault.lock.close()

    def heal_folder(self) -> None:
        """The sessions folder gets its mode back, unless it was removed (or made anew) since."""
        fault, self.folder_fault = self.folder_fault, None
        if fault is None or fault.folder is None:
            return
        self._mark(f"heal {fault.kind}")
        with contextlib.suppress(FileNotFoundError):
            if fault.folder.stat().st_ino == fault.inode:
                fault.folder.chmod(fault.mode)

    def heal_all(self) -> None:
        self.heal_proc()
        self.heal_db()
        self.heal_folder()
        self.watch_for_crash()

    def watch_for_crash(self) -> None:
        """A daemon that exited without being told to is a bug; note it and start it again."""
        daemon = self.daemon
        down = self.proc_fault is not None and self.proc_fault.kind in ("kill9", "sigterm")
        if not down and not daemon.running:
            code = daemon.proc and daemon.proc.returncode
            last = "\n    ".join(daemon.log_tail(5).splitlines())  # what it said before it went
            self._error(f"the daemon exited by itself with {code}:\n    {last}")
            daemon.start()

    # -- the parts --------------------------------------------------------------------------------

    def _mark(self, text: str) -> None:
        mark(self.daemon, self.out.ops, text)

    def _error(self, problem: str) -> None:
        self.out.errors.append(problem)

    def _proxy(self) -> TcpProxy:
        assert self.proxy is not None
        return self.proxy

    def _privileges(self, statement: str) -> None:
        """Run a GRANT or REVOKE `statement` ({schema}, {role}) on the daemon's role, as an admin."""
        import psycopg

        from tests.support.databases import libpq_url

        assert self.role is not None
        schema = str(make_url(self.db_url).query["options"]).split("=", 1)[1]
        with psycopg.connect(libpq_url(self.db_url), autocommit=True) as conn:
            conn.execute(statement.format(schema, self.role).encode())

    def _poison(self) -> None:
        """A session folder named in bytes that are not UTF-8, holding a valid state.json, in a
        live project: never mirrored (no row can hold its name), and no other session may stop."""
        self.poisoned += 1
        sessions = os.fsencode(self.rng.choice(self.workload.live_projects()) / SESSIONS)
        folder = Path(os.fsdecode(os.path.join(sessions, b"caf\xe9-%d" % self.poisoned)))
        folder.mkdir()
        (folder / "state.json").write_text(json.dumps({"topic": "poison", "phase_history": {}}))

    def _unreadable(self, heal_at: int) -> _Fault:
        """A live project's sessions folder made unreadable (chmod 000): the daemon skips that
        project and keeps its rows; the workload, root, goes on changing it meanwhile."""
        folder = self.rng.choice(self.workload.live_projects()) / SESSIONS
        st = folder.stat()
        folder.chmod(0)
        return _Fault("unreadable", heal_at, folder=folder, mode=stat.S_IMODE(st.st_mode), inode=st.st_ino)

    def _sqlite_lock(self) -> sqlite3.Connection:
        """Another writer holding SQLite's write lock: the daemon's writes wait (busy timeout)."""
        database = make_url(self.db_url).database or ""
        if self.daemon_uid is not None:
            # After db_delete the file may not be there yet: made as the daemon makes it (0600,
            # empty), and the daemon's, or root's connection would leave it a file the daemon
            # cannot write. SQLite hands its -wal and -shm to the database file's owner itself.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                os.chown(database, self.daemon_uid, self.daemon_uid)
        conn = sqlite3.connect(database, timeout=30, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        return conn

    def _sigterm(self) -> None:
        if self._wait_catches(signal.SIGTERM):
            os.kill(self.daemon.pid, signal.SIGTERM)

    def _wait_catches(self, sig: int) -> bool:
        """Wait until the daemon handles `sig` (a signal sent before Python installs its handler
        kills the process instead); False, with a daemon error, if it exits first."""
        daemon = self.daemon

        def handled() -> str:
            if not daemon.running:
                return "exited"
            return "caught" if _catches(daemon.pid, sig) else ""

        outcome = poll(handled, START_DEADLINE_S, interval=0.005)
        if outcome == "caught":
            return True
        if outcome == "exited":
            self._error(f"the daemon exited ({daemon.proc and daemon.proc.returncode}) while starting")
        else:
            self._error(f"the daemon did not install its {signal.Signals(sig).name} handler in time")
        return False

    def _knob(self, name: str) -> Sysctl | SysctlStandIn:
        """The inotify limit `name` as the faults lower it: the daemon's stand-in, or the machine's."""
        return Sysctl(name) if self.real_sysctl else SysctlStandIn(self.stand_ins, name)

    def _restart_with(self, sysctl: Sysctl | SysctlStandIn, value: Callable[[], str]) -> dict[str, Any]:
        """kill -9, then start with `sysctl` lowered from the moment the daemon's run() begins
        (before it watches anything) until every project has its watch state; returns the status.
        The lowered window stays short: a real sysctl is the whole machine's, and the daemon
        reads the limits as the kernel does (the queue size per new inotify instance, the watch
        limit at each watch added), so the healing that follows is the same with either."""
        daemon = self.daemon
        daemon.kill()
        daemon.start()
        status: dict[str, Any] = {}

        def watching() -> str:
            if not daemon.running:
                return "exited"
            with contextlib.suppress(SessionSyncError):
                latest = daemon.status()
                status.clear()
                status.update(latest)
                if status["watch"] and len(status["watch"]) == status["projects"]:
                    return "watching"
            return ""

        try:
            if not self._wait_catches(signal.SIGTERM):
                return status
            sysctl.set(value())
            if poll(watching, START_DEADLINE_S, interval=0.01) != "watching":
                self._error(f"after a restart the watches were not all set within {START_DEADLINE_S} s")
            return status
        finally:
            sysctl.restore()

    def _overflow(self) -> None:
        """A tiny inotify queue for the restarted daemon, then a flood while it is frozen."""
        with self._knob("fs.inotify.max_queued_events") as queue:
            self._restart_with(queue, lambda: "16")
        os.kill(self.daemon.pid, signal.SIGSTOP)
        try:
            self.workload.burst()
            self.workload.burst()
        finally:
            os.kill(self.daemon.pid, signal.SIGCONT)

    def _watch_limit(self) -> None:
        """Fewer inotify watches than the daemon needs: about half its projects cannot be watched
        and must be scanned periodically instead (the limit is put back at once after). The seam
        counts the daemon's watches only; the machine's limit counts every process's."""
        projects = self.workload.live_projects()
        need = [1 + sum(1 for _ in os.walk(p / SESSIONS)) for p in projects]
        budget = sum(need[: len(need) // 2])
        in_use: Callable[[], int] = watches_in_use if self.real_sysctl else lambda: 0
        with self._knob("fs.inotify.max_user_watches") as watches:
            status = self._restart_with(watches, lambda: str(in_use() + budget))
        fallback = sum(w["state"] == "fallback" for w in status.get("watch", []))
        self.out.notes.append(
            f"watch limit: {fallback} of {len(status.get('watch', []))} project(s) fell back"
        )


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler installed for `sig` (SigCgt in /proc/<pid>/status)."""
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(next(x for x in status.splitlines() if x.startswith("SigCgt:")).split()[1], 16)
        return bool(caught >> (sig - 1) & 1)
    return False

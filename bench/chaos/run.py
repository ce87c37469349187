"""One seeded chaos run: the real daemon on the run's session tree, the workload's operations
interleaved with faults, then a calm tail and the checks. `Chaos(...).run()` returns the Outcome."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.engine import make_url

from bench.chaos import checks
from bench.chaos.faults import DAEMON_UID, EXIT_DEADLINE_S, START_DEADLINE_S, Faults
from bench.chaos.record import Outcome, mark
from bench.chaos.workload import MAX_STATE_BYTES, Workload
from sessionsync.daemon.testing_hooks import FALLBACK_SCAN_ENV
from tests.support.databases import libpq_url
from tests.support.inotify_limits import stand_in_env
from tests.support.proxy import TcpProxy, proxied_url, url_target
from tests.support.runner import SESSIONSYNC, Daemon, as_uid

DEFAULT_FAULT_GAP = (120, 400)
CALM_FROM = 0.85  # the last 15 % of a run (of its seconds, or its --max-ops) has no faults


@contextlib.contextmanager
def _own_role(url: str, seed: int) -> Iterator[str]:
    """A login role for the daemon, working in the run's schema: one whose privileges can be
    taken away (a superuser's cannot). Dropped, with what it owns, afterwards."""
    import psycopg

    schema = str(make_url(url).query["options"]).split("=", 1)[1]
    role = f"chaos_{seed}_{uuid.uuid4().hex[:8]}"
    admin = libpq_url(url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN".encode())
        conn.execute(f"GRANT USAGE, CREATE ON SCHEMA {schema} TO {role}".encode())
    try:
        yield role
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"REASSIGN OWNED BY {role} TO CURRENT_USER".encode())
            conn.execute(f"DROP OWNED BY {role}".encode())
            conn.execute(f"DROP ROLE {role}".encode())


def _why_not_unprivileged(work: Path, db_url: str) -> str:
    """Why the daemon cannot run as DAEMON_UID on `work` ("" when it can): `work` is handed to it,
    so a SQLite file must be in there, and the folders above must let it through."""
    if os.geteuid() != 0:
        return "the run is not root, so it cannot start the daemon as another uid"
    if shutil.which("setpriv") is None:
        return "setpriv(1) is not installed"
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite" and Path(url.database or "").resolve().parent != work:
        return f"the SQLite file is not in the work folder {work}"
    # That uid must be able to run the daemon at all: the interpreter may live in a private folder.
    probe = subprocess.run(
        [*as_uid(DAEMON_UID), str(SESSIONSYNC), "--version"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if probe.returncode != 0:
        said = probe.stderr.strip().splitlines() or [f"exit code {probe.returncode}"]
        return f"uid {DAEMON_UID} cannot run {SESSIONSYNC}: {said[-1]}"
    for folder in work.parents:
        if not folder.stat().st_mode & stat.S_IXOTH:
            return f"uid {DAEMON_UID} cannot reach the work folder through {folder}"
    return ""


class Chaos:
    """One seeded run against one database; `run()` returns the Outcome. Owns the daemon, the
    proxy (PostgreSQL) and the inotify limits it lowers (the daemon's own through the seam, or
    with `real_sysctl` the machine's), and puts them all back."""

    def __init__(
        self,
        seed: int,
        seconds: float,
        db_url: str,
        workdir: Path,
        fault_gap: tuple[int, int] = DEFAULT_FAULT_GAP,
        max_ops: int | None = None,
        real_sysctl: bool = False,
    ) -> None:
        # The one source of every choice, workload's and faults' alike: a seed replays a run.
        self.rng = random.Random(seed)
        self.seed = seed
        self.seconds = seconds
        self.db_url = db_url
        self.postgres = make_url(db_url).get_backend_name() == "postgresql"
        self.out = Outcome(seed, "postgres" if self.postgres else "sqlite", seconds)
        self.work = workdir.resolve()
        self.fault_gap = fault_gap  # operations between two faults, drawn in this range
        if fault_gap != DEFAULT_FAULT_GAP:
            self.out.options += f" --fault-gap {fault_gap[0]}-{fault_gap[1]}"
        if max_ops is not None:
            self.out.options += f" --max-ops {max_ops}"
        self.max_ops = max_ops  # stop before `seconds` when reached: the test's fixed sequence
        self.real_sysctl = real_sysctl
        if real_sysctl:
            self.out.options += " --real-sysctl"
        self.stand_ins = self.work / "inotify-sysctl"  # read by the daemon's seam (unless real_sysctl)
        self.workload = Workload(self.rng, self.work)
        # Root ignores permission bits: for an unreadable folder to bite, the daemon runs as
        # another uid, which needs setpriv(1) and a work folder it can reach.
        self.daemon_uid: int | None = None
        why_not = _why_not_unprivileged(self.work, db_url)
        if why_not:
            self.out.notes.append(f"no unreadable fault: {why_not}")
        else:
            self.daemon_uid = DAEMON_UID

    def run(self) -> Outcome:
        self.workload.populate()
        daemon_url = self.db_url
        proxy: TcpProxy | None = None
        with contextlib.ExitStack() as stack:
            role: str | None = None
            if self.postgres:
                role = stack.enter_context(_own_role(self.db_url, self.seed))
                host, port = url_target(self.db_url)
                proxy = stack.enter_context(TcpProxy(host, port))
                own = make_url(self.db_url).set(username=role, password=None)
                daemon_url = proxied_url(own.render_as_string(hide_password=False), proxy.host, proxy.port)
            debounce = self.rng.choice((20, 50, 200))
            daemon = stack.enter_context(
                Daemon(
                    self.work,
                    daemon_url,
                    projects=[self.workload.explicit],
                    roots=[self.workload.root],
                    env={
                        FALLBACK_SCAN_ENV: "1",
                        **({} if self.real_sysctl else stand_in_env(self.stand_ins)),
                    },
                    debounce_ms=debounce,
                    max_delay_ms=debounce * 10,
                    threads=self.rng.choice((1, 2, 4)),
                    batch_size=self.rng.choice((1, 8, 256)),
                    discover_interval_s=1,
                    discover_depth=3,
                    max_state_bytes=MAX_STATE_BYTES,
                    timeout_s=3,  # a stalled connection is dropped after 3 s, not 20
                    uid=self.daemon_uid,  # work is its own then: the SQLite file, -wal, -shm
                )
            )
            faults = Faults(
                self.rng,
                self.out,
                self.workload,
                daemon,
                self.db_url,
                proxy,
                self.stand_ins,
                self.real_sysctl,
                role,
                self.daemon_uid,
            )
            self._operate(daemon, faults)
            faults.heal_all()
            mark(daemon, self.out.ops, "check")
            checks.check(self.out, daemon, self.db_url, self.workload.all_projects)
            code = daemon.stop(EXIT_DEADLINE_S)
            if code != 0:
                self.out.errors.append(f"final SIGTERM: the daemon exited with {code}, not 0")
            checks.read_log(self.out, daemon)
        return self.out

    def _operate(self, daemon: Daemon, faults: Faults) -> None:
        """Operations with faults, then a calm tail: the faults healed, the daemon started, more
        operations. Without it a restart's reconcile just before the check would mirror every
        change and hide a watcher that misses them."""
        started = time.monotonic()
        deadline = started + self.seconds
        calm = False
        next_fault = self.rng.randint(*self.fault_gap) // 2
        while time.monotonic() < deadline and self.out.ops != self.max_ops:
            if self.max_ops is None:
                calm_due = time.monotonic() >= started + CALM_FROM * self.seconds
            else:
                calm_due = self.out.ops >= CALM_FROM * self.max_ops
            if calm_due and not calm:
                calm = True
                faults.heal_all()
                mark(daemon, self.out.ops, "calm")
                daemon.wait_started(START_DEADLINE_S)
            if not calm:
                faults.heal_due()
                faults.watch_for_crash()
                if self.out.ops >= next_fault:
                    faults.start()
                    next_fault = self.out.ops + self.rng.randint(*self.fault_gap)
            self.workload.one_op()
            self.out.ops += 1
            time.sleep(self.rng.uniform(0, 0.015))  # the pace of agents, part of the scenario

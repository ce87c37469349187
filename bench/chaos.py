"""Chaos run: the real daemon under a seeded workload of file changes and bad input, interleaved
with faults (kill -9, SIGTERM mid-burst, SIGSTOP, the database cut off or slow, an inotify queue
overflow, running out of inotify watches). Once the faults are healed, every row must match an
independent reading of the files.

Every decision comes from `random.Random(seed)`, and faults are spaced and healed by operation
counts, not by time: a seed replays the same operations and faults (timing jitter aside). The last
15 % of a run is calm (faults healed, daemon started, writes go on), so the check also proves the
live path, not only the reconcile of a restart.
The overflow and watch-limit faults lower the daemon's own inotify limits through the watcher's
test seam (stand-in files for the sysctls); `--real-sysctl` lowers the machine's fs.inotify
sysctls instead (root; for a moment, under every process on the machine).
Run:  .venv/bin/python bench/chaos.py --seed 7 --seconds 60 --db postgres
      .venv/bin/python bench/chaos.py --seeds 1-20 --seconds 60 --db sqlite
Exits 1 on any divergence (a row that differs from the files) or daemon error (a wrong exit
code, a traceback in its log), each printed with the command that reproduces it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `python bench/chaos.py` puts bench/ on the path, not the repo

import psycopg  # noqa: E402
from sqlalchemy import select  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from sessionsync.daemon.errors import SessionSyncError  # noqa: E402
from sessionsync.daemon.testing_hooks import FALLBACK_SCAN_ENV  # noqa: E402
from sessionsync.models.tables import projects as projects_table  # noqa: E402
from tests.daemon_harness import (  # noqa: E402
    Daemon,
    Sysctl,
    SysctlStandIn,
    converged,
    engine,
    proxied_url,
    rows,
    stand_in_env,
    url_target,
    watches_in_use,
)
from tests.tcp_proxy import TcpProxy  # noqa: E402

SESSIONS = Path("agents") / "sessions"
MAX_STATE_BYTES = 16_384
CONVERGE_DEADLINE_S = 30.0
EXIT_DEADLINE_S = 60.0  # SIGTERM drains for up to 30 s while the database is away
START_DEADLINE_S = 30.0
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1/chaos"
PHASES = ("spec", "plan", "build", "docs", "retro")  # retro: unknown, stored as it is
STATUSES = ("active", "complete", "failed", "blocked")
# Slugs are drawn from a small pool, so deleted sessions come back (restored rows) and moved
# ones often keep their name in the other project.
SLUG_POOL = (
    *(f"s{i:02d}" for i in range(36)),
    "with space",
    "ünïcødé-slug",
    "UPPER-case",
    "long-" + "x" * 90,
)
MARKER = "--- chaos:"
DEFAULT_FAULT_GAP = (120, 400)
CALM_FROM = 0.85  # the last 15 % of a run (of its seconds, or its --max-ops) has no faults


@dataclass
class Outcome:
    """One seed's run: what was done, what went wrong, how long convergence took."""

    seed: int
    db: str
    seconds: float
    ops: int = 0
    faults: list[str] = field(default_factory=list)
    divergences: list[str] = field(default_factory=list)  # the database differs from the files
    errors: list[str] = field(default_factory=list)  # the daemon misbehaved: exit codes, tracebacks
    converge_s: float | None = None
    notes: list[str] = field(default_factory=list)
    log_story: dict[str, int] = field(default_factory=dict)  # fault kind -> most daemon lines in one
    options: str = ""  # command-line options beyond the defaults, for `reproduce()`

    def line(self) -> str:
        took = "did not converge" if self.converge_s is None else f"converged in {self.converge_s:.1f} s"
        errors = f", {len(self.errors)} daemon errors" if self.errors else ""
        return (
            f"seed {self.seed}: {self.ops} ops, {len(self.faults)} faults, "
            f"{len(self.divergences)} divergences, {took}{errors}"
        )

    @property
    def failed(self) -> bool:
        return bool(self.divergences or self.errors)

    def reproduce(self) -> str:
        run = f".venv/bin/python bench/chaos.py --seed {self.seed} --seconds {self.seconds:g} --db {self.db}"
        return run + self.options


@dataclass
class _Fault:
    kind: str
    heal_at: int  # the op count at which it is healed
    lock: sqlite3.Connection | None = None  # db_lock: the connection holding SQLite's write lock


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
        self.rng = random.Random(seed)
        self.seed = seed
        self.seconds = seconds
        self.db_url = db_url
        self.postgres = make_url(db_url).get_backend_name() == "postgresql"
        self.out = Outcome(seed, "postgres" if self.postgres else "sqlite", seconds)
        self.work = workdir.resolve()
        self.root = self.work / "root"
        self.explicit = self.work / "explicit"
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
        self.deck: list[str] = []
        self.present: dict[Path, bool] = {}  # project -> its sessions folder exists
        self.sessions: dict[Path, set[str]] = {}  # project -> session folders
        self.all_projects: set[Path] = set()
        self.links: dict[Path, set[str]] = {}  # project -> symbolic links where sessions would be
        self.new_projects = 0
        self.staged = 0  # folders prepared outside every project, to move in or link to
        self.writes = 0
        self.proc_fault: _Fault | None = None  # process channel: kill9, sigterm, sigstop
        self.db_fault: _Fault | None = None  # database channel: db_cut, db_slow, db_lock
        self.proxy: TcpProxy | None = None
        self.daemon: Daemon | None = None

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> Outcome:
        self._populate()
        daemon_url = self.db_url
        with contextlib.ExitStack() as stack:
            if self.postgres:
                host, port = url_target(self.db_url)
                self.proxy = stack.enter_context(TcpProxy(host, port))
                daemon_url = proxied_url(self.db_url, self.proxy.host, self.proxy.port)
            debounce = self.rng.choice((20, 50, 200))
            self.daemon = stack.enter_context(
                Daemon(
                    self.work,
                    daemon_url,
                    projects=[self.explicit],
                    roots=[self.root],
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
                )
            )
            self._workload()
            self._heal_all()
            self._marker("check")
            self._check()
            self._stop_daemon()
            self._read_log()
        return self.out

    def _workload(self) -> None:
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
                self._heal_all()
                self._marker("calm")
                self._d().wait_started(START_DEADLINE_S)
            if not calm:
                self._heal_due()
                self._watch_for_crash()
                if self.out.ops >= next_fault:
                    self._start_fault()
                    next_fault = self.out.ops + self.rng.randint(*self.fault_gap)
            self._one_op()
            self.out.ops += 1
            time.sleep(self.rng.uniform(0, 0.015))  # the pace of agents, part of the scenario

    # -- the workload ---------------------------------------------------------------------------

    def _populate(self) -> None:
        """Projects with sessions before the daemon starts, plus folders that are not projects."""
        for project in (self.root / "alpha", self.root / "team" / "beta", self.root / "team" / "gamma"):
            self._add_project(project, self.rng.randint(6, 12))
        self._add_project(self.explicit, self.rng.randint(6, 12))
        (self.work / "staging").mkdir()  # outside every project: sessions are moved out and in
        for _ in range(3):
            self._op_decoy()

    def _add_project(self, project: Path, sessions: int) -> None:
        (project / SESSIONS).mkdir(parents=True, exist_ok=True)
        self.present[project] = True
        self.sessions[project] = set()
        self.links[project] = set()
        self.all_projects.add(project)
        for _ in range(sessions):
            self._create_in(project)

    def _op_weights(self) -> dict[str, float]:
        total = sum(len(s) for s in self.sessions.values())
        have = total > 0
        absent = any(not p for p in self.present.values())
        return {
            "atomic": 30 if have else 0,
            "in_place": 12 if have else 0,
            "slow": 2 if have else 0,
            "invalid": 6 if have else 0,
            "burst": 1.5 if have else 0,
            "artifact": 6 if have else 0,
            "create": 8 if total < 70 else 1,
            "folder_only": 1,
            "delete": 4 if total > 20 else 0.5,
            "delete_state": 2 if have else 0,
            "rename": 4 if have else 0,
            "move": 3 if have and sum(self.present.values()) > 1 else 0,
            "remove_sessions": 0.06 if sum(self.present.values()) > 2 else 0,
            "recreate_sessions": 0.3 if absent else 0,  # gone for a few seconds, often more
            "new_project": 0.04 if self.new_projects < 3 else 0,
            "decoy": 0.2,
            "link": 1.5 if have else 0,
            "move_in": 1,
            "move_out": 1 if have else 0,
        }

    def _one_op(self) -> None:
        weights = self._op_weights()
        name = self.rng.choices(list(weights), list(weights.values()))[0]
        getattr(self, f"_op_{name}")()

    def _pick(self) -> tuple[Path, str]:
        choices = [(p, s) for p in sorted(self.sessions) for s in sorted(self.sessions[p])]
        return self.rng.choice(choices)

    def _live_projects(self) -> list[Path]:
        return sorted(p for p, here in self.present.items() if here)

    def _free_slug(self, project: Path) -> str:
        taken = self.sessions[project] | self.links[project]
        free = [s for s in SLUG_POOL if s not in taken]
        return self.rng.choice(free) if free else f"extra-{self.rng.getrandbits(32):08x}"

    def _folder(self, project: Path, slug: str) -> Path:
        return project / SESSIONS / slug

    def _doc(self, slug: str) -> dict[str, Any]:
        """A v2 (or, one time in five, v1) state.json; now and then with a field of the wrong type."""
        rng = self.rng
        self.writes += 1
        total = rng.randint(0, 6)
        done = sorted(rng.sample(range(1, total + 1), rng.randint(0, total)))
        topic: Any = rng.choice((f"{slug} write {self.writes}", f"ünïcødé {self.writes} ✓", None))
        stamp = f"2025-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T0{rng.randint(0, 9)}:00:00Z"
        commits = [{"sha": f"{rng.getrandbits(40):010x}", "message": f"cp {c}"} for c in done]
        if rng.random() < 0.2:
            progress: Any = {"checkpoints_total": total, "checkpoints_completed": done}
            doc: dict[str, Any] = {
                "session_id": slug,
                "topic": topic,
                "current_phase": rng.choice(PHASES),
                "granularity": "full",
                "phases": {"spec": {"started_at": stamp}},
                "plan_state": progress,
                "commits": [{**c, "checkpoint_id": n} for c, n in zip(commits, done, strict=True)],
                "created_at": stamp,
            }
        else:
            progress = {"checkpoints_total": total, "checkpoints_completed": done, "current_checkpoint": 1}
            doc = {
                "session_id": slug,
                "topic": topic,
                "description": "chaos",
                "session_type": "full",
                "status": rng.choice(STATUSES),
                "current_phase": rng.choice(PHASES),
                "phase_history": {"spec_started_at": stamp},
                "build_progress": progress,
                "git": {"branch": f"feat/{slug}", "base_branch": "main"},
                "commits": [{**c, "checkpoint": n} for c, n in zip(commits, done, strict=True)],
                "created_at": stamp,
                "updated_at": stamp,
            }
        if rng.random() < 0.08:
            # A field of the wrong type: that column NULL (or its default), the rest still mirrored.
            section = "build_progress" if "build_progress" in doc else "plan_state"
            bad: dict[str, Any] = rng.choice(
                (
                    {"topic": 42},
                    {"current_phase": ["build"]},
                    {section: {**progress, "checkpoints_total": "lots"}},
                    {section: {**progress, "checkpoints_completed": {"1": True}}},
                    {section: [1, 2]},
                )
            )
            doc.update(bad)
        return doc

    def _encode(self, doc: dict[str, Any]) -> bytes:
        indent = self.rng.choice((None, 2))
        data = json.dumps(doc, ensure_ascii=self.rng.random() < 0.5, indent=indent).encode()
        return b"\xef\xbb\xbf" + data if self.rng.random() < 0.05 else data  # a BOM is accepted

    def _bad_bytes(self, slug: str) -> bytes:
        kind = self.rng.choice(("cut", "garbage", "list", "empty", "oversized", "nul", "utf8"))
        if kind == "cut":
            data = self._encode(self._doc(slug))
            return data[: self.rng.randint(1, len(data) - 1)]
        if kind == "oversized":
            return json.dumps({**self._doc(slug), "padding": "x" * (MAX_STATE_BYTES + 100)}).encode()
        return {
            "garbage": b"{not json at all",
            "list": b"[1, 2, 3]",
            "empty": b"",
            "nul": b'{"topic": "a\x00b"}',
            "utf8": b'{"topic": "\xff\xfe"}',
        }[kind]

    def _write(self, folder: Path, data: bytes, how: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "state.json"
        if how == "atomic":
            tmp = folder / "state.json.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, target)
        elif how == "slow":
            with target.open("wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                time.sleep(self.rng.uniform(0.05, 0.4))  # a writer pausing mid-file is the scenario
                f.write(data[len(data) // 2 :])
        else:
            target.write_bytes(data)

    def _create_in(self, project: Path) -> None:
        slug = self._free_slug(project)
        self._write(self._folder(project, slug), self._encode(self._doc(slug)), "atomic")
        self.sessions[project].add(slug)

    def _op_atomic(self) -> None:
        project, slug = self._pick()
        self._write(self._folder(project, slug), self._encode(self._doc(slug)), "atomic")

    def _op_in_place(self) -> None:
        project, slug = self._pick()
        self._write(self._folder(project, slug), self._encode(self._doc(slug)), "in_place")

    def _op_slow(self) -> None:
        project, slug = self._pick()
        self._write(self._folder(project, slug), self._encode(self._doc(slug)), "slow")

    def _op_invalid(self) -> None:
        project, slug = self._pick()
        how = self.rng.choice(("atomic", "in_place"))
        self._write(self._folder(project, slug), self._bad_bytes(slug), how)

    def _op_burst(self, on_half: Callable[[], None] | None = None) -> None:
        """Many writes at full speed over a few sessions; `on_half` runs halfway (SIGTERM)."""
        picked = [self._pick() for _ in range(self.rng.randint(2, 8))]
        writes = self.rng.randint(20, 100)
        for i in range(writes):
            if i == writes // 2 and on_half is not None:
                on_half()
            project, slug = picked[i % len(picked)]
            self._write(self._folder(project, slug), self._encode(self._doc(slug)), "atomic")

    def _op_artifact(self) -> None:
        project, slug = self._pick()
        path = self._folder(project, slug) / self.rng.choice(("spec.md", "plan.json"))
        if path.exists():
            path.unlink()
        else:
            path.write_text("# spec\n" if path.suffix == ".md" else "{}")

    def _op_create(self) -> None:
        self._create_in(self.rng.choice(self._live_projects()))

    def _op_folder_only(self) -> None:
        project = self.rng.choice(self._live_projects())
        slug = self._free_slug(project)
        (self._folder(project, slug) / "research").mkdir(parents=True, exist_ok=True)
        self.sessions[project].add(slug)

    def _op_delete(self) -> None:
        project, slug = self._pick()
        shutil.rmtree(self._folder(project, slug))
        self.sessions[project].discard(slug)

    def _op_delete_state(self) -> None:
        project, slug = self._pick()
        (self._folder(project, slug) / "state.json").unlink(missing_ok=True)

    def _op_rename(self) -> None:
        project, slug = self._pick()
        self.sessions[project].discard(slug)
        if self.rng.random() < 0.3:
            # Renamed to a hidden name: no longer a session (trash folders, editors' backups).
            new = f".trash-{self.rng.getrandbits(32):08x}"
        else:
            new = self._free_slug(project)
            self.sessions[project].add(new)
        os.rename(self._folder(project, slug), self._folder(project, new))

    def _op_move(self) -> None:
        project, slug = self._pick()
        others = [p for p in self._live_projects() if p != project]
        if not others:
            return
        dest = self.rng.choice(others)
        new = slug if slug not in self.sessions[dest] | self.links[dest] else self._free_slug(dest)
        os.rename(self._folder(project, slug), self._folder(dest, new))
        self.sessions[project].discard(slug)
        self.sessions[dest].add(new)

    def _op_remove_sessions(self) -> None:
        """The sessions folder removed, or its parent too (a branch without agents/ checked out)."""
        project = self.rng.choice(self._live_projects())
        shutil.rmtree(project / (SESSIONS if self.rng.random() < 0.5 else SESSIONS.parent))
        self.present[project] = False
        self.sessions[project] = set()
        self.links[project] = set()

    def _op_recreate_sessions(self) -> None:
        project = self.rng.choice(sorted(p for p, here in self.present.items() if not here))
        (project / SESSIONS).mkdir(parents=True)
        self.present[project] = True
        for _ in range(self.rng.randint(0, 4)):
            self._create_in(project)

    def _staged_session(self) -> Path:
        """A session folder prepared outside every project (as a tool would, before moving it in)."""
        self.staged += 1
        folder = self.work / "staging" / f"st{self.staged}"
        self._write(folder, self._encode(self._doc(folder.name)), "atomic")
        return folder

    def _op_move_in(self) -> None:
        project = self.rng.choice(self._live_projects())
        slug = self._free_slug(project)
        os.rename(self._staged_session(), self._folder(project, slug))
        self.sessions[project].add(slug)

    def _op_move_out(self) -> None:
        project, slug = self._pick()
        self.staged += 1
        os.rename(self._folder(project, slug), self.work / "staging" / f"out{self.staged}")
        self.sessions[project].discard(slug)

    def _op_link(self) -> None:
        """A symbolic link where a session folder would be (to another session, or outside every
        project) or in place of a state.json: invalid, as links are not followed. Or one removed.
        Links only ever lead inside the run's folder: later writes may go through them."""
        project = self.rng.choice(self._live_projects())
        links = self.links[project]
        if links and self.rng.random() < 0.4:
            name = self.rng.choice(sorted(links))
            (project / SESSIONS / name).unlink()
            links.discard(name)
        elif self.rng.random() < 0.6:
            name = self._free_slug(project)
            target = self._folder(*self._pick()) if self.rng.random() < 0.5 else self._staged_session()
            os.symlink(target, project / SESSIONS / name)
            links.add(name)
        else:
            state = self._folder(*self._pick()) / "state.json"
            link = state.with_name("state.json.link")
            os.symlink(self._staged_session() / "state.json", link)
            os.replace(link, state)

    def _op_new_project(self) -> None:
        self.new_projects += 1
        parent = self.root / "team" if self.rng.random() < 0.5 else self.root
        self._add_project(parent / f"new{self.new_projects}", self.rng.randint(1, 5))

    def _op_decoy(self) -> None:
        """A state.json where no session is: in skipped or hidden folders, below the discovery
        depth, beside the sessions folder, under a hidden slug, nested in a session; or a file
        where a session folder would be."""
        kind = self.rng.choice(("skipped", "deep", "beside", "hidden_slug", "nested", "stray_file"))
        live = self._live_projects()
        project = self.rng.choice(live)
        sessions = project / SESSIONS
        doc = self._encode(self._doc("decoy"))
        if kind == "skipped":
            where = self.rng.choice(("node_modules/pkg", ".hidden/app", "app/.venv/lib"))
            self._write(self.root / where / SESSIONS / "d1", doc, "atomic")
        elif kind == "deep":
            self._write(self.root / "a" / "b" / "c" / "deep" / SESSIONS / "d1", doc, "atomic")
        elif kind == "beside":
            self._write(project / "agents" / "not-sessions" / "d1", doc, "atomic")
        elif kind == "hidden_slug":
            self._write(sessions / f".hidden-{self.rng.randint(0, 3)}", doc, "atomic")
        elif kind == "nested" and self.sessions[project]:
            slug = self.rng.choice(sorted(self.sessions[project]))
            self._write(sessions / slug / "research", doc, "atomic")
        elif kind == "stray_file":
            (sessions / f"stray-{self.rng.randint(0, 3)}.txt").write_text("not a session")

    # -- faults ----------------------------------------------------------------------------------

    def _marker(self, text: str) -> None:
        """A line in the daemon's log (both append), so the log can be read fault by fault."""
        with self._d().log_path.open("a") as log:
            log.write(f"{MARKER} op {self.out.ops}: {text}\n")

    def _d(self) -> Daemon:
        assert self.daemon is not None
        return self.daemon

    def _start_fault(self) -> None:
        if not self.deck:
            # Dealt from a shuffled deck holding every kind: any run of that many faults meets
            # them all, in an order (and with overlaps) the seed decides.
            self.deck = ["kill9", "kill9", "sigterm", "sigstop", "overflow", "watch_limit"]
            self.deck += ["db_cut", "db_cut", "db_slow"] if self.postgres else ["db_lock", "db_lock"]
            self.rng.shuffle(self.deck)
        kind = self.deck.pop()
        heal_at = self.out.ops + self.rng.randint(10, 150)
        self.out.faults.append(kind)
        if kind in ("overflow", "watch_limit"):
            # Both restart the daemon and wait for its watches: nothing else may be broken then.
            self._heal_proc()
            self._heal_db()
            self._marker(f"fault {kind}")
            (self._overflow if kind == "overflow" else self._watch_limit)()
            return
        if kind.startswith("db_"):
            self._heal_db()
            self._marker(f"fault {kind}")
            self.db_fault = _Fault(kind, heal_at)
            if kind == "db_cut":
                self._proxy().cut()
            elif kind == "db_slow":
                self._proxy().slow(self.rng.uniform(0.02, 0.15))
            else:
                self.db_fault.lock = self._sqlite_lock()
            return
        self._heal_proc()
        self._marker(f"fault {kind}")
        self.proc_fault = _Fault(kind, heal_at)
        if kind == "kill9":
            self._d().kill()
        elif kind == "sigstop":
            os.kill(self._d().pid, signal.SIGSTOP)
        else:
            self._op_burst(on_half=self._sigterm)

    def _proxy(self) -> TcpProxy:
        assert self.proxy is not None
        return self.proxy

    def _sqlite_lock(self) -> sqlite3.Connection:
        """Another writer holding SQLite's write lock: the daemon's writes wait (busy timeout)."""
        conn = sqlite3.connect(make_url(self.db_url).database or "", timeout=30, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        return conn

    def _sigterm(self) -> None:
        if self._wait_catches(signal.SIGTERM):
            os.kill(self._d().pid, signal.SIGTERM)

    def _wait_catches(self, sig: int) -> bool:
        """Wait until the daemon handles `sig` (a signal sent before Python installs its handler
        kills the process instead); False, with a divergence, if it exits first."""
        deadline = time.monotonic() + START_DEADLINE_S
        daemon = self._d()
        while time.monotonic() < deadline:
            if not daemon.running:
                self._error(f"the daemon exited ({daemon.proc and daemon.proc.returncode}) while starting")
                return False
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{daemon.pid}/status").read_text()
                caught = int(next(x for x in status.splitlines() if x.startswith("SigCgt:")).split()[1], 16)
                if caught >> (sig - 1) & 1:
                    return True
            time.sleep(0.005)
        self._error(f"the daemon did not install its {signal.Signals(sig).name} handler in time")
        return False

    def _heal_due(self) -> None:
        if self.proc_fault is not None and self.out.ops >= self.proc_fault.heal_at:
            self._heal_proc()
        if self.db_fault is not None and self.out.ops >= self.db_fault.heal_at:
            self._heal_db()

    def _heal_proc(self) -> None:
        fault, self.proc_fault = self.proc_fault, None
        if fault is None:
            return
        daemon = self._d()
        self._marker(f"heal {fault.kind}")
        if fault.kind == "sigstop":
            os.kill(daemon.pid, signal.SIGCONT)
            return
        if fault.kind == "sigterm":
            # Its drain waits for the database: heal that first, or this would wait out the drain.
            self._heal_db()
            code = daemon.wait_exit(EXIT_DEADLINE_S)
            if code != 0:
                self._error(f"SIGTERM mid-burst: the daemon exited with {code}, not 0")
        daemon.start()

    def _heal_db(self) -> None:
        fault, self.db_fault = self.db_fault, None
        if fault is None:
            return
        self._marker(f"heal {fault.kind}")
        if fault.kind == "db_cut":
            self._proxy().restore()
        elif fault.kind == "db_slow":
            self._proxy().slow(0)
        elif fault.lock is not None:
            fault.lock.rollback()
            fault.lock.close()

    def _heal_all(self) -> None:
        self._heal_proc()
        self._heal_db()
        self._watch_for_crash()

    def _watch_for_crash(self) -> None:
        """A daemon that exited without being told to is a bug; note it and start it again."""
        daemon = self._d()
        down = self.proc_fault is not None and self.proc_fault.kind in ("kill9", "sigterm")
        if not down and not daemon.running:
            self._error(f"the daemon exited by itself with {daemon.proc and daemon.proc.returncode}")
            daemon.start()

    def _knob(self, name: str) -> Sysctl | SysctlStandIn:
        """The inotify limit `name` as the faults lower it: the daemon's stand-in, or the machine's."""
        return Sysctl(name) if self.real_sysctl else SysctlStandIn(self.stand_ins, name)

    def _restart_with(self, sysctl: Sysctl | SysctlStandIn, value: Callable[[], str]) -> dict[str, Any]:
        """kill -9, then start with `sysctl` lowered from the moment the daemon's run() begins
        (before it watches anything) until every project has its watch state; returns the status.
        The lowered window stays short: a real sysctl is the whole machine's, and the daemon
        reads the limits as the kernel does (the queue size per new inotify instance, the watch
        limit at each watch added), so the healing that follows is the same with either."""
        daemon = self._d()
        daemon.kill()
        daemon.start()
        status: dict[str, Any] = {}
        try:
            if not self._wait_catches(signal.SIGTERM):
                return status
            sysctl.set(value())
            deadline = time.monotonic() + START_DEADLINE_S
            while time.monotonic() < deadline and daemon.running:
                with contextlib.suppress(SessionSyncError):
                    status = daemon.status()
                    if status["watch"] and len(status["watch"]) == status["projects"]:
                        return status
                time.sleep(0.01)
            self._error(f"after a restart the watches were not all set within {START_DEADLINE_S} s")
            return status
        finally:
            sysctl.restore()

    def _overflow(self) -> None:
        """A tiny inotify queue for the restarted daemon, then a flood while it is frozen."""
        with self._knob("fs.inotify.max_queued_events") as queue:
            self._restart_with(queue, lambda: "16")
        os.kill(self._d().pid, signal.SIGSTOP)
        try:
            self._op_burst()
            self._op_burst()
        finally:
            os.kill(self._d().pid, signal.SIGCONT)

    def _watch_limit(self) -> None:
        """Fewer inotify watches than the daemon needs: about half its projects cannot be watched
        and must be scanned periodically instead (the limit is put back at once after). The seam
        counts the daemon's watches only; the machine's limit counts every process's."""
        projects = self._live_projects()
        need = [1 + sum(1 for _ in os.walk(p / SESSIONS)) for p in projects]
        budget = sum(need[: len(need) // 2])
        in_use: Callable[[], int] = watches_in_use if self.real_sysctl else lambda: 0
        with self._knob("fs.inotify.max_user_watches") as watches:
            status = self._restart_with(watches, lambda: str(in_use() + budget))
        fallback = sum(w["state"] == "fallback" for w in status.get("watch", []))
        self.out.notes.append(
            f"watch limit: {fallback} of {len(status.get('watch', []))} project(s) fell back"
        )

    # -- the check ---------------------------------------------------------------------------------

    def _error(self, problem: str) -> None:
        self.out.errors.append(problem)

    def _problems(self) -> list[str]:
        """Everything wrong with the database now, compared with the files."""
        problems = list(converged(self.db_url, sorted(self.all_projects), MAX_STATE_BYTES).problems)
        try:
            rows(self.db_url)  # raises on two rows for one session
        except AssertionError as exc:
            problems.append(str(exc))
        with engine(self.db_url).connect() as conn:
            folders = set(conn.execute(select(projects_table.c.working_dir)).scalars())
        problems += [f"project row for {f}, which is not a project" for f in sorted(folders - self._paths())]
        return problems

    def _paths(self) -> set[str]:
        return {str(p) for p in self.all_projects}

    def _check(self) -> None:
        """Poll until the database equals the files (deadline), then once more when idle, so a
        stale write landing after convergence is caught too."""
        started = time.monotonic()
        problems = self._problems()
        while problems and time.monotonic() - started < CONVERGE_DEADLINE_S:
            time.sleep(0.1)
            problems = self._problems()
        if problems:
            self.out.divergences += problems
            return
        self.out.converge_s = time.monotonic() - started
        daemon = self._d()
        deadline = time.monotonic() + CONVERGE_DEADLINE_S
        while time.monotonic() < deadline:
            with contextlib.suppress(SessionSyncError):
                status = daemon.status()
                if status["pending"] == 0 and status["in_flight"] == 0:
                    break
            time.sleep(0.05)
        self.out.divergences += [f"after convergence: {p}" for p in self._problems()]

    def _stop_daemon(self) -> None:
        code = self._d().stop(EXIT_DEADLINE_S)
        if code != 0:
            self._error(f"final SIGTERM: the daemon exited with {code}, not 0")

    def _read_log(self) -> None:
        """How many daemon lines each fault tells its story in (from its start to the next fault or
        the final check; lines about what the workload did aside), and every traceback: a bug."""
        windows: list[tuple[str, int]] = []
        warnings = 0
        for line in self._d().log().splitlines():
            if line.startswith(MARKER):
                label = line.split(": ", 2)[-1]
                if not label.startswith("heal "):
                    windows.append((label, 0))
                continue
            if "Traceback" in line:
                near = windows[-1][0] if windows else "start"
                self._error(f"a traceback in the daemon log (after: {near}); see {self._d().log_path}")
            if "RuntimeWarning" in line:
                warnings += 1
            logged = line[:4].isdigit()  # a log line, not a traceback's or a warning's continuation
            if windows and logged and not any(w in line for w in _WORKLOAD_LINES):
                windows[-1] = (windows[-1][0], windows[-1][1] + 1)
        if warnings:
            self.out.notes.append(f"{warnings} RuntimeWarning line(s) from watchdog on the daemon's stderr")
        floods = self.out.faults.count("overflow")
        if floods:
            lost = self._d().log_count("events were lost")
            self.out.notes.append(f"{lost} inotify queue overflow(s) logged for {floods} flood(s)")
        for label, count in windows:
            if label.startswith("fault "):
                kind = label.removeprefix("fault ")
                self.out.log_story[kind] = max(self.out.log_story.get(kind, 0), count)


# Lines the workload causes whatever the fault: a bad file, a project or sessions folder that
# comes or goes (and the reconcile that follows). Left out of the count of a fault's lines.
_WORKLOAD_LINES = (
    "state.json is invalid",
    "new project",
    "is gone",
    "appeared; watching",
    "(new project",
    "(project vanished",
    "(sessions folder",
)


# -- databases -------------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_schema(base: str, seed: int, keep: Callable[[], bool]) -> Iterator[str]:
    """A new schema in `base`'s database (created when missing) for one seed; dropped after,
    unless `keep()` says the run diverged."""
    libpq = make_url(base).set(drivername="postgresql").render_as_string(hide_password=False)
    name = make_url(base).database
    admin = make_url(libpq).set(database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    schema = f"chaos_{seed}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        if keep():
            print(f"  kept schema {schema} in {name} for inspection")
        else:
            with psycopg.connect(libpq, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")


def run_seed(
    seed: int,
    seconds: float,
    db: str,
    pg_url: str,
    keep: bool,
    fault_gap: tuple[int, int],
    max_ops: int | None,
    real_sysctl: bool = False,
) -> Outcome:
    """One seed in a fresh folder and database; the folder is removed unless it diverged."""
    work = Path(tempfile.mkdtemp(prefix=f"chaos-{db}-{seed}-", dir="/tmp"))
    outcome = Outcome(seed, db, seconds)
    try:
        if db == "sqlite":
            chaos = Chaos(
                seed, seconds, f"sqlite:///{work / 'sessions.db'}", work, fault_gap, max_ops, real_sysctl
            )
            outcome = chaos.out
            chaos.run()
        else:
            with postgres_schema(pg_url, seed, lambda: keep or outcome.failed) as url:
                chaos = Chaos(seed, seconds, url, work, fault_gap, max_ops, real_sysctl)
                outcome = chaos.out
                chaos.run()
    except Exception as exc:
        # The run itself broke (a harness problem, a daemon that never started): reported as a
        # daemon error, and the next seed still runs.
        traceback.print_exc()
        outcome.errors.append(f"the chaos run failed: {exc!r}")
    if keep or outcome.failed:
        print(f"  kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return outcome


def _seeds(args: argparse.Namespace) -> list[int]:
    if args.seeds:
        first, _, last = args.seeds.partition("-")
        return list(range(int(first), int(last or first) + 1))
    return [args.seed]


def _terminate(_sig: int, _frame: FrameType | None) -> None:
    raise SystemExit(143)  # so `finally` puts the sysctls back and stops the daemon


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seeds", help="a range of consecutive seeds, e.g. 1-20")
    parser.add_argument("--seconds", type=float, default=60.0, help="workload duration per seed")
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help="a database of its own (created if missing)")
    parser.add_argument("--keep", action="store_true", help="keep the folders and schemas")
    parser.add_argument("--fault-gap", default="120-400", help="operations between two faults, a range")
    parser.add_argument("--max-ops", type=int, help="stop after this many operations (or --seconds)")
    parser.add_argument(
        "--real-sysctl",
        action="store_true",
        help="overflow and watch_limit lower the machine's fs.inotify sysctls (root), not the daemon's own",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _terminate)
    outcomes = []
    for seed in _seeds(args):
        low, _, high = args.fault_gap.partition("-")
        gap = (int(low), int(high or low))
        outcome = run_seed(
            seed, args.seconds, args.db, args.pg_url, args.keep, gap, args.max_ops, args.real_sysctl
        )
        outcomes.append(outcome)
        print(outcome.line(), flush=True)
        for problem in outcome.divergences:
            print(f"  DIVERGENCE (seed {seed}, reproduce: {outcome.reproduce()}): {problem}")
        for problem in outcome.errors:
            print(f"  DAEMON ERROR (seed {seed}, reproduce: {outcome.reproduce()}): {problem}")
        for note in outcome.notes:
            print(f"  note: {note}")
        story = ", ".join(f"{k} {v}" for k, v in sorted(outcome.log_story.items()))
        print(f"  faults: {dict(Counter(outcome.faults))}; most log lines in one fault window: {story}")
    if len(outcomes) > 1:
        times = [o.converge_s for o in outcomes if o.converge_s is not None]
        print(
            f"summary ({args.db}): {len(outcomes)} seeds, {sum(o.ops for o in outcomes)} ops, "
            f"{sum(len(o.faults) for o in outcomes)} faults, "
            f"{sum(len(o.divergences) for o in outcomes)} divergences, "
            f"{sum(len(o.errors) for o in outcomes)} daemon errors, "
            f"worst convergence {max(times, default=float('nan')):.1f} s"
        )
    return 1 if any(o.failed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())

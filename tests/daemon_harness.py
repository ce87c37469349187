"""Drive the real daemon from end-to-end tests: `sessionsync run` as a subprocess with its own
config, sealed environment and log file, plus database snapshots and an independent model of
what the database must hold once the session folders stop changing.

    with Daemon(tmp_path, db_url, projects=[project], debounce_ms=50) as daemon:
        daemon.wait_started()  # or wait_ready(): the control socket answers
        write_state(project, "s1", {...})
        wait_for(lambda: converged(db_url, [project]), timeout=5)

A test that fails inside the `with` gets the end of the daemon's log attached to its error.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import Engine, create_engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from sessionsync.daemon.config import Config
from sessionsync.daemon.control.client import request as control_request
from sessionsync.daemon.errors import SessionSyncError
from sessionsync.daemon.inotify_faults import INOTIFY_SYSCTL_ENV
from sessionsync.models.tables import projects, session_events, sessions
from tests.conftest import sysctl_lock_path

SESSIONSYNC = Path(sys.executable).parent / "sessionsync"
SESSIONS_SUBDIR = "agents/sessions"
LOG_TAIL_LINES = 60
STARTED_LINE = "sessionsync started:"  # the start-up summary, logged after the first reconcile

Key = tuple[str, str]  # (project folder, slug); SessionKey compares equal to it

# Variables a systemd service or a developer's shell may set that change where things go.
_SERVICE_VARS = frozenset(
    {
        "STATE_DIRECTORY",
        "RUNTIME_DIRECTORY",
        "NOTIFY_SOCKET",
        "JOURNAL_STREAM",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
    }
)

# Each config key belongs to exactly one section, so tests pass keys flat: debounce_ms=50.
_DEFAULTS = Config()
MAX_STATE_BYTES = _DEFAULTS.watch.max_state_bytes
_SECTION_OF: dict[str, str] = {
    key: section
    for section in Config.model_fields
    if section != "source"
    for key in type(getattr(_DEFAULTS, section)).model_fields
}


class Daemon:
    """One `sessionsync run` on a config written into `tmp`; restartable with `start()`.

    Keyword overrides are config keys by their bare name (`debounce_ms=50`,
    `discover_interval_s=1`); `env` adds variables to the daemon's sealed environment;
    `command_prefix` runs it through a wrapper that execs it (a user namespace, say).
    As a context manager: started on entry, killed on exit, and on a failure inside the block
    the log's last lines are attached to the error.
    """

    def __init__(
        self,
        tmp: Path,
        db_url: str,
        *,
        projects: Iterable[Path | str] = (),
        roots: Iterable[Path | str] = (),
        env: Mapping[str, str] | None = None,
        command_prefix: Sequence[str] = (),
        **overrides: Any,
    ) -> None:
        self.tmp = tmp
        # Run through this first (e.g. `unshare --user ...`); it must exec the command it is given.
        self.command_prefix = list(command_prefix)
        self.db_url = db_url
        self.config_path = tmp / "sessionsync.toml"
        self.log_path = tmp / "daemon.log"
        # sockaddr_un holds 107 bytes; pytest's tmp paths can be longer than that with the socket
        # name added, so the runtime folder is a short one of our own.
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="ssd-", dir="/tmp"))
        self.socket_path = self.runtime_dir / "control.sock"
        sections: dict[str, dict[str, Any]] = {
            "database": {"url": db_url},
            "watch": {"projects": [str(p) for p in projects], "roots": [str(r) for r in roots]},
            "control": {"socket": str(self.socket_path)},
        }
        for key, value in overrides.items():
            if key not in _SECTION_OF:
                raise TypeError(f"unknown config key {key!r}; known: {', '.join(sorted(_SECTION_OF))}")
            sections.setdefault(_SECTION_OF[key], {})[key] = value
        self.config_path.write_text(_toml(sections))
        self.env = _sealed_env(tmp, env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._started_lines = 0  # start-up summaries in the log before the latest start

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Daemon:
        """Start the daemon (again, after a stop or kill); its output is appended to the log."""
        if self.running:
            raise RuntimeError(f"the daemon (pid {self.pid}) is still running")
        # Counted, not assumed one per start: a start killed before its summary line logs none.
        self._started_lines = self.log_count(STARTED_LINE)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.command_prefix, str(SESSIONSYNC), "run", "--config", str(self.config_path)],
                env=self.env,
                cwd=self.tmp,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        return self

    def wait_ready(self, timeout: float = 15.0) -> dict[str, Any]:
        """Wait until the control socket answers `ping`; fails at once if the daemon exits."""
        deadline = time.monotonic() + timeout
        while True:
            proc = self._proc()
            if proc.poll() is not None:
                raise AssertionError(f"the daemon exited with {proc.returncode} before answering ping")
            try:
                return self.request({"cmd": "ping"}, timeout=2.0)
            except SessionSyncError as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the daemon did not answer ping within {timeout} s: {exc}") from exc
            time.sleep(0.02)

    def wait_started(self, timeout: float = 15.0) -> None:
        """Wait for the start-up summary line of the latest start: the watches are armed and the
        start-up reconcile is done, so a change made now is the watcher's to see."""
        deadline = time.monotonic() + timeout
        while self.log_count(STARTED_LINE) <= self._started_lines:
            proc = self._proc()
            if proc.poll() is not None:
                raise AssertionError(f"the daemon exited with {proc.returncode} before it started")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {STARTED_LINE!r} line within {timeout} s")
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit; returns the exit code (the drain may take a moment)."""
        proc = self._proc()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> int:
        """SIGKILL (a crash: no drain, no clean-up) and reap; returns the exit code."""
        proc = self._proc()
        if proc.poll() is None:
            proc.kill()
        return proc.wait()

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self._proc().wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the daemon (pid {self.pid}) did not exit within {timeout} s") from None

    def close(self) -> None:
        """Kill the daemon if it still runs and remove the runtime folder. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(
        self, _type: type[BaseException] | None, exc: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()
        if exc is not None:
            exc.add_note(
                f"--- daemon log, last {LOG_TAIL_LINES} lines ({self.log_path}) ---\n{self.log_tail()}"
            )

    @property
    def pid(self) -> int:
        return self._proc().pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _proc(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise RuntimeError("the daemon was never started")
        return self.proc

    # -- talking to it ------------------------------------------------------------------------

    def request(self, payload: Mapping[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """One control request; an error reply raises ControlError, as for the CLI."""
        return control_request(self.socket_path, payload, timeout)

    def status(self) -> dict[str, Any]:
        return self.request({"cmd": "status"})

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run another `sessionsync` command on the same config and environment (stdout+stderr)."""
        return subprocess.run(
            [str(SESSIONSYNC), *args, "--config", str(self.config_path)],
            env=self.env,
            cwd=self.tmp,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def log_count(self, text: str) -> int:
        """How many log lines contain `text`."""
        return sum(text in line for line in self.log().splitlines())


def _sealed_env(tmp: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """No SESSIONSYNC_* or systemd variables, every XDG folder (and HOME) inside `tmp`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SESSIONSYNC_") and k not in _SERVICE_VARS and not k.startswith("XDG_")
    }
    home = tmp / "home"
    for name, sub in (
        ("XDG_CONFIG_HOME", "config"),
        ("XDG_STATE_HOME", "state"),
        ("XDG_DATA_HOME", "data"),
        ("XDG_CACHE_HOME", "cache"),
        ("XDG_RUNTIME_DIR", "xdg-run"),
    ):
        (tmp / sub).mkdir(mode=0o700, exist_ok=True)
        env[name] = str(tmp / sub)
    home.mkdir(exist_ok=True)
    env["HOME"] = str(home)
    # Every line reaches the log file even when the daemon is killed with SIGKILL.
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """The few TOML value types a config needs; JSON's string escapes are valid TOML."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"no TOML for {v!r}")

    out = []
    for name, keys in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{key} = {value(v)}" for key, v in keys.items())
        out.append("")
    return "\n".join(out)


def proxied_url(url: str, host: str, port: int) -> str:
    """`url` with its server replaced by host:port (a TcpProxy in front of PostgreSQL)."""
    return make_url(url).set(host=host, port=port).render_as_string(hide_password=False)


def url_target(url: str) -> tuple[str, int]:
    """The (host, port) a PostgreSQL URL connects to."""
    parsed = make_url(url)
    return parsed.host or "127.0.0.1", parsed.port or 5432


# -- the database as it is ------------------------------------------------------------------------

_engines: dict[str, Engine] = {}


def engine(url: str) -> Engine:
    """A shared engine for reading `url` in tests; NullPool, so nothing stays connected between
    polls and a test's PostgreSQL schema can be dropped."""
    if url not in _engines:
        _engines[url] = create_engine(url, poolclass=NullPool)
    return _engines[url]


_engine = engine  # the name tests/test_control_e2e.py imports


def rows(url: str) -> dict[Key, dict[str, Any]]:
    """Every session row, tombstoned ones too, by (project folder, slug)."""
    found: dict[Key, dict[str, Any]] = {}
    for row in _session_rows(url):
        key = (row["project"], row["slug"])
        if key in found:
            raise AssertionError(f"two session rows for {key}: {found[key]} and {row}")
        found[key] = row
    return found


def _session_rows(url: str) -> list[dict[str, Any]]:
    query = select(projects.c.working_dir.label("project"), sessions).join(
        projects, sessions.c.project_id == projects.c.id
    )
    with engine(url).connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def events(url: str) -> list[dict[str, Any]]:
    """Every session event, oldest first, with its project folder and slug."""
    query = (
        select(
            session_events,
            projects.c.working_dir.label("project"),
            sessions.c.slug.label("slug"),
        )
        .join(sessions, session_events.c.session_id == sessions.c.id)
        .join(projects, sessions.c.project_id == projects.c.id)
        .order_by(session_events.c.id)
    )
    with engine(url).connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


# -- the database as it should be ---------------------------------------------------------------


@dataclass(frozen=True)
class Expectation:
    """What one session folder says, read straight from its files (never through daemon code)."""

    valid: bool
    title: str | None = None
    current_phase: str | None = None
    status: str | None = None
    why: str = ""  # for an invalid one
    checkpoints_total: int | None = None
    checkpoints_completed: int | None = None
    # Whether spec.md / plan.json exist; None where state.json was not read (a link), not compared.
    spec_exists: bool | None = None
    plan_exists: bool | None = None


def expected_from_files(
    project_dirs: Iterable[Path | str], max_state_bytes: int = MAX_STATE_BYTES
) -> dict[Key, Expectation]:
    """Every session folder holding a state.json, by (project folder, slug); folders without one
    (or gone) are absent, so their rows must be tombstoned. Links are never followed: a linked
    folder or state.json is invalid, as the contract says."""
    expected: dict[Key, Expectation] = {}
    for project in project_dirs:
        base = Path(project) / SESSIONS_SUBDIR
        try:
            folders = sorted(base.iterdir())
        except FileNotFoundError:
            continue
        for folder in folders:
            key = (str(project), folder.name)
            if folder.name.startswith("."):
                continue
            if folder.is_symlink():
                expected[key] = Expectation(False, why="the session folder is a symbolic link")
                continue
            if not folder.is_dir():
                continue
            state = folder / "state.json"
            if state.is_symlink() or (state.exists() and not state.is_file()):
                expected[key] = Expectation(False, why="state.json is a link or not a regular file")
                continue
            try:
                data = state.read_bytes()
            except FileNotFoundError:
                continue
            found = _expect(data, max_state_bytes)
            expected[key] = replace(
                found,
                spec_exists=(folder / "spec.md").exists(),
                plan_exists=(folder / "plan.json").exists(),
            )
    return expected


def _expect(data: bytes, max_state_bytes: int) -> Expectation:
    if len(data) > max_state_bytes:
        return Expectation(False, why=f"{len(data)} bytes, over the limit")
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as exc:
        return Expectation(False, why=str(exc))
    if not isinstance(doc, dict):
        return Expectation(False, why=f"a JSON {type(doc).__name__}, not an object")
    v2 = "phase_history" in doc or "build_progress" in doc
    total, completed = _checkpoints(doc.get("build_progress" if v2 else "plan_state"))

    def text(name: str, default: str | None) -> str | None:
        # The contract: absent or null takes the default, a wrong type is stored as NULL.
        value = doc.get(name)
        if value is None:
            return default
        return value if isinstance(value, str) else None

    return Expectation(
        True,
        title=text("topic", None),
        current_phase=text("current_phase", "spec"),
        status=text("status", "active") if v2 else "active",  # v1 has no status: active
        checkpoints_total=total,
        checkpoints_completed=completed,
    )


def _checkpoints(progress: Any) -> tuple[int | None, int | None]:
    """(checkpoints_total, checkpoints_completed) from v2 `build_progress` or v1 `plan_state`:
    absent or null takes 0; a wrong type (a bool is not a count) or a section that is not an
    object is NULL; a total beyond 32 bits is NULL too."""
    if progress is None:
        return 0, 0
    if not isinstance(progress, dict):
        return None, None
    total = progress.get("checkpoints_total")
    if total is not None and not (
        isinstance(total, int) and not isinstance(total, bool) and -(2**31) <= total < 2**31
    ):
        total = None
    elif total is None:
        total = 0
    done = progress.get("checkpoints_completed")
    return total, (0 if done is None else len(done) if isinstance(done, list) else None)


class Convergence:
    """The outcome of `converged()`: truthy when the database equals the folders; its repr lists
    every difference, so `wait_for` failing on it says what is still wrong."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)

    def __bool__(self) -> bool:
        return not self.problems

    def __repr__(self) -> str:
        if not self.problems:
            return "<converged>"
        shown = "\n  ".join(self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        return f"<{len(self.problems)} difference(s):\n  {shown}{more}>"


def converged(
    url: str, project_dirs: Iterable[Path | str], max_state_bytes: int = MAX_STATE_BYTES
) -> Convergence:
    """Every valid session has exactly one live row whose fields match its file; every invalid one
    a live row marked invalid with a sync_error; every other row (vanished, no state.json, or of
    another project) is tombstoned."""
    expected = expected_from_files(project_dirs, max_state_bytes)
    problems: list[str] = []
    live: dict[Key, list[dict[str, Any]]] = {}
    tombstoned: set[Key] = set()
    for row in _session_rows(url):
        key = (row["project"], row["slug"])
        if row["deleted_at"] is None:
            live.setdefault(key, []).append(row)
        else:
            tombstoned.add(key)
    for key, found in sorted(live.items()):
        if key not in expected:
            problems.append(f"{key}: live row, but the folder or its state.json is gone")
        elif len(found) > 1:
            problems.append(f"{key}: {len(found)} live rows")
    for key, want in sorted(expected.items()):
        if key not in live:
            problems.append(
                f"{key}: tombstoned, but its state.json is there" if key in tombstoned else f"{key}: no row"
            )
            continue
        row = live[key][0]
        for name in ("spec_exists", "plan_exists"):
            on_disk = getattr(want, name)
            if on_disk is not None and row[name] != on_disk:
                problems.append(f"{key}: {name} is {row[name]} in the database, {on_disk} on disk")
        if not want.valid:
            if not row["invalid"] or not row["sync_error"]:
                problems.append(
                    f"{key}: file is invalid ({want.why}) but row has invalid={row['invalid']}, "
                    f"sync_error={row['sync_error']!r}"
                )
            continue
        if row["invalid"]:
            problems.append(f"{key}: row is invalid ({row['sync_error']}) but the file is valid")
        for name in ("title", "current_phase", "status", "checkpoints_total", "checkpoints_completed"):
            if row[name] != getattr(want, name):
                problems.append(
                    f"{key}: {name} is {row[name]!r} in the database, {getattr(want, name)!r} in the file"
                )
    return Convergence(problems)


def watches_in_use() -> int:
    """inotify watches held by every process on the machine (all of them are root's here)."""
    count = 0
    for info in glob.glob("/proc/[0-9]*/fdinfo/*"):
        with contextlib.suppress(OSError):
            count += Path(info).read_text().count("inotify wd:")
    return count


class Sysctl:
    """A kernel setting under /proc/sys (root only), changed by `set` and put back by `restore`
    (idempotent, and always on leaving the `with` block). Machine-wide: only for tests marked
    `sysctl` and for bench/chaos.py when asked; everything else uses SysctlStandIn.

    Several test runs may share the machine: from the first `set` to `restore`, an exclusive lock
    file per setting is held, so no other run reads our lowered value as its "original" (and
    leaves it behind) or lowers it under us; the session guard in conftest reads under it too."""

    def __init__(self, name: str) -> None:
        self.path = Path("/proc/sys") / name.replace(".", "/")
        self._lock_path = sysctl_lock_path(name)
        self._lock_fd: int | None = None
        self.original = self.path.read_text().strip()

    def set(self, value: str) -> None:
        if self._lock_fd is None:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits for another run to put its value back
            self._lock_fd = fd
            self.original = self.path.read_text().strip()
        self.path.write_text(value)

    def restore(self) -> None:
        if self._lock_fd is None:
            return
        try:
            self.path.write_text(self.original)
        finally:
            os.close(self._lock_fd)  # closing releases the lock
            self._lock_fd = None

    def __enter__(self) -> Sysctl:
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _exc: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.restore()


class SysctlStandIn:
    """A file standing in for one inotify sysctl (`fs.inotify.max_queued_events` or
    `fs.inotify.max_user_watches`) for a daemon started with `stand_in_env(folder)`: the watcher's
    test seam (InotifyFaults) reads it as the kernel reads the real one, so the limit applies to that
    daemon alone and nothing on the machine changes. Same API as Sysctl."""

    def __init__(self, folder: Path, name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / name.rsplit(".", 1)[-1]
        self.original = ""

    def set(self, value: str) -> None:
        self.path.write_text(value)

    def restore(self) -> None:
        self.path.unlink(missing_ok=True)  # no file: the kernel's own limit

    def __enter__(self) -> SysctlStandIn:
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _exc: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.restore()


def stand_in_env(folder: Path) -> dict[str, str]:
    """The daemon environment that makes it read its inotify limits from SysctlStandIn files in `folder`."""
    return {INOTIFY_SYSCTL_ENV: str(folder)}


def user_namespace_prefix(max_inotify_watches: int) -> list[str]:
    """A command prefix that runs the daemon in a user namespace of its own whose inotify watch
    limit (/proc/sys/user/max_inotify_watches, per namespace) is `max_inotify_watches`: a real
    ENOSPC from the kernel, counting only the daemon's watches, with nothing changed outside."""
    script = f'echo {max_inotify_watches} > /proc/sys/user/max_inotify_watches && exec "$@"'
    return ["unshare", "--user", "--map-root-user", "sh", "-c", script, "sh"]


def user_namespaces_usable() -> str:
    """Empty when `unshare --user` works here, else why not."""
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True, check=False)
    return "" if probe.returncode == 0 else f"cannot create a user namespace: {probe.stderr.decode().strip()}"

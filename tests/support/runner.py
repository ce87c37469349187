"""Run the real daemon: `sessionsync run` as a subprocess with its own config, sealed
environment, control socket and log file, for end-to-end tests and the benchmarks alike.

    with Daemon(tmp_path, db_url, projects=[project], debounce_ms=50) as daemon:
        daemon.wait_started()  # or wait_ready(): the control socket answers
        write_state(project, "s1", {...})
        wait_for(lambda: converged(db_url, [project]), timeout=5)  # tests.support.oracle

A test that fails inside the `with` gets the end of the daemon's log attached to its error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from sessionsync.daemon.config import Config
from sessionsync.daemon.control.client import request as control_request
from sessionsync.daemon.errors import SessionSyncError
from tests.support.waiting import poll

SESSIONSYNC = Path(sys.executable).parent / "sessionsync"
LOG_TAIL_LINES = 60
STARTED_LINE = "sessionsync started:"  # the start-up summary, logged after the first reconcile

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
    `command_prefix` runs it through a wrapper that execs it (a user namespace, say); `uid`
    runs it as that uid and gid (root only, with setpriv(1)), `tmp` and the folders made for it
    handed to that uid.
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
        uid: int | None = None,
        **overrides: Any,
    ) -> None:
        self.tmp = tmp
        # Run through this first (e.g. `unshare --user ...`); it must exec the command it is given.
        self.command_prefix = list(command_prefix)
        if uid is not None:
            self.command_prefix[:0] = as_uid(uid)
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
        if uid is not None:
            for folder in (tmp, self.runtime_dir, *(self.env[k] for k in _FOLDER_VARS)):
                os.chown(folder, uid, uid)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.started_at = 0.0  # time.monotonic() just before the latest start
        self._started_lines = 0  # start-up summaries in the log before the latest start

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Daemon:
        """Start the daemon (again, after a stop or kill); its output is appended to the log."""
        if self.running:
            raise RuntimeError(f"the daemon (pid {self.pid}) is still running")
        # Counted, not assumed one per start: a start killed before its summary line logs none.
        self._started_lines = self.log_count(STARTED_LINE)
        with self.log_path.open("ab") as log:
            self.started_at = time.monotonic()
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
        refused: list[SessionSyncError] = []

        def answered() -> dict[str, Any] | None:
            proc = self._proc()
            if proc.poll() is not None:
                raise AssertionError(f"the daemon exited with {proc.returncode} before answering ping")
            try:
                return self.request({"cmd": "ping"}, timeout=2.0)
            except SessionSyncError as exc:
                refused[:] = [exc]
                return None

        reply = poll(answered, timeout)
        if reply is None:
            last = f": {refused[-1]}" if refused else ""
            raise AssertionError(f"the daemon did not answer ping within {timeout} s{last}")
        return reply

    def wait_started(self, timeout: float = 15.0) -> None:
        """Wait for the start-up summary line of the latest start: the watches are armed and the
        start-up reconcile is done, so a change made now is the watcher's to see."""

        def started() -> bool:
            if self.log_count(STARTED_LINE) > self._started_lines:
                return True
            proc = self._proc()
            if proc.poll() is not None:
                raise AssertionError(f"the daemon exited with {proc.returncode} before it started")
            return False

        if not poll(started, timeout):
            raise AssertionError(f"no {STARTED_LINE!r} line within {timeout} s")

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until nothing is pending (debouncer or queue) and no batch is in flight; False at
        the deadline. A daemon that does not answer meanwhile (stopped, restarting) is not idle."""

        def idle() -> bool:
            with contextlib.suppress(SessionSyncError):
                status = self.status()
                return status["pending"] == 0 and status["in_flight"] == 0
            return False

        return bool(poll(idle, timeout, interval=0.05))

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

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        return self.request({"cmd": "status"}, timeout)

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


def as_uid(uid: int) -> list[str]:
    """The command prefix that runs a command as `uid` (and as that gid, with no other group)."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


_FOLDER_VARS = (
    "HOME",
    "XDG_CONFIG_HOME",
    "XDG_STATE_HOME",
    "XDG_DATA_HOME",
    "XDG_CACHE_HOME",
    "XDG_RUNTIME_DIR",
)


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

"""A new user, as the front-door tests meet one: a fresh HOME and XDG_RUNTIME_DIR, no config
file, the real `sessionsync` command in subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sessionsync.daemon.control.client import request
from sessionsync.daemon.errors import SessionSyncError
from tests.support.waiting import wait_for

SESSIONSYNC = Path(sys.executable).parent / "sessionsync"
# Variables a systemd service or a developer's shell may set that change where things go.
_LEAKY = ("STATE_DIRECTORY", "RUNTIME_DIRECTORY", "NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC")


class NewUser:
    """A user with a fresh home: HOME and XDG_RUNTIME_DIR set, as a login session sets them, and
    nothing else of ours (no SESSIONSYNC_*, no XDG_CONFIG_HOME or XDG_STATE_HOME)."""

    def __init__(self, tmp: Path) -> None:
        self.home = tmp / "home"
        self.home.mkdir()
        # sockaddr_un holds 107 bytes: a short runtime folder, as /run/user/1000 is.
        self.runtime = Path(tempfile.mkdtemp(prefix="ssfd-", dir="/tmp"))
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SESSIONSYNC_", "XDG_", "PYTEST_")) and k not in _LEAKY
        }
        self.env.update(HOME=str(self.home), XDG_RUNTIME_DIR=str(self.runtime), PYTHONUNBUFFERED="1")
        self.socket = self.runtime / "sessionsync" / "control.sock"
        self.database = self.home / ".local" / "state" / "sessionsync" / "sessions.db"
        self.procs: list[subprocess.Popen[str]] = []

    def project(self, name: str = "app") -> Path:
        project = self.home / "code" / name
        (project / "agents" / "sessions").mkdir(parents=True, exist_ok=True)
        return project

    def run(self, *args: str, cwd: Path | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SESSIONSYNC), *args],
            env={**self.env, **kw.pop("env", {})},
            cwd=cwd or self.home,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            **kw,
        )

    def start(self, argv: list[str], cwd: Path | None = None, env: Mapping[str, str] | None = None) -> Any:
        proc = subprocess.Popen(
            argv,
            env={**self.env, **(env or {})},
            cwd=cwd or self.home,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def daemon(self, *args: str, socket: Path | None = None) -> subprocess.Popen[str]:
        """`sessionsync [ARGS] run`, exactly as typed, and wait until it answers."""
        proc = self.start([str(SESSIONSYNC), *args, "run"])
        self.wait_answering(proc, socket)
        return proc

    def wait_answering(
        self, proc: subprocess.Popen[str], socket: Path | None = None, *, running: bool = True
    ) -> dict[str, Any]:
        """The daemon's status once its socket answers and, with `running`, once it is up (the
        socket answers earlier, while it waits for the database or reconciles at start-up)."""

        def answered() -> dict[str, Any] | None:
            assert proc.poll() is None, f"the daemon exited with {proc.returncode}: {self.output(proc)}"
            try:
                status = request(socket or self.socket, {"cmd": "status"}, timeout=2)
            except SessionSyncError:
                return None
            return status if status["state"] == "running" or not running else None

        status: dict[str, Any] = wait_for(answered, timeout=30)
        return status

    def stop(self, proc: subprocess.Popen[str]) -> tuple[int, str]:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        return code, self.output(proc)

    @staticmethod
    def output(proc: subprocess.Popen[str]) -> str:
        if proc.poll() is None or proc.stdout is None:
            return ""
        return proc.stdout.read()

    def rows(self) -> dict[str, dict[str, Any]]:
        """The sessions table by slug; empty until the daemon has created it (its socket answers
        before the database is set up)."""
        if not self.database.exists():
            return {}
        with sqlite3.connect(f"file:{self.database}?mode=ro", uri=True) as conn:
            conn.row_factory = sqlite3.Row
            query = "SELECT slug, title, current_phase, status, invalid, deleted_at FROM sessions"
            try:
                return {r["slug"]: dict(r) for r in conn.execute(query)}
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return {}
                raise

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        shutil.rmtree(self.runtime, ignore_errors=True)

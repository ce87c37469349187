"""Progress on long work: `sessionsync reconcile` and `resync --wait` draw it on a terminal (a real
pseudo-terminal here) and print nothing extra on a pipe; the daemon logs a long reconcile's progress."""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import re
import socket
import struct
import subprocess
import termios
from pathlib import Path

from sessionsync.daemon.testing_hooks import PROGRESS_EVERY_ENV
from tests.support.runner import SESSIONSYNC, Daemon
from tests.support.sessions import fixture_doc, write_state

SESSIONS = 300
BAR = re.compile(r"(\d+)/(\d+) \[[^\]]*sessions/s\]")  # tqdm: "120/300 [00:01<00:01, 150 sessions/s]"


def _many(project: Path, n: int = SESSIONS) -> None:
    doc = fixture_doc("v2-spec")
    for i in range(n):
        write_state(project, f"s{i:04d}", doc)


def _on_terminal(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run with stdout and stderr on a pseudo-terminal; everything it wrote there, and its exit code."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # as a terminal window
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError as exc:  # EIO: the child closed the terminal's last slave end
            if exc.errno != errno.EIO:
                raise
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def test_one_shot_reconcile_shows_progress_on_a_terminal_and_nothing_extra_on_a_pipe(
    tmp_path: Path, db_url: str, project: Path
) -> None:
    _many(project)
    daemon = Daemon(tmp_path, db_url, projects=[project], batch_size=10)  # only its config and env
    argv = [str(SESSIONSYNC), "reconcile", "--config", str(daemon.config_path)]
    code, screen = _on_terminal(argv, daemon.env, tmp_path)
    assert code == 0, screen
    counts = [(int(a), int(b)) for a, b in BAR.findall(screen)]
    assert counts, screen
    assert counts[-1] == (SESSIONS, SESSIONS)  # the last count is drawn before the bar goes
    assert f"reconciled 1 project(s): {SESSIONS} session(s) seen" in screen
    piped = subprocess.run(argv, env=daemon.env, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert piped.returncode == 0
    assert piped.stderr == ""
    assert piped.stdout.count("\n") == 1
    assert piped.stdout.startswith("reconciled 1 project(s)")


def test_resync_wait_shows_the_daemons_progress_on_a_terminal(
    tmp_path: Path, db_url: str, project: Path
) -> None:
    _many(project)
    env = {PROGRESS_EVERY_ENV: "0.001"}  # progress lines as often as batches end
    with Daemon(tmp_path, db_url, projects=[project], batch_size=2, env=env) as daemon:
        daemon.wait_started()
        # The daemon logged the start-up reconcile's progress (the hook makes "long" 1 ms).
        assert re.search(rf"reconciling \(start-up\): \d+/{SESSIONS} sessions \(\d+ %\)", daemon.log())
        argv = [str(SESSIONSYNC), "resync", "--all", "--wait", "--config", str(daemon.config_path)]
        code, screen = _on_terminal(argv, daemon.env, tmp_path)
        assert code == 0, screen
        assert BAR.search(screen), screen
        assert f"{SESSIONS} session(s), 0 changed" in screen
        piped = daemon.cli("resync", "--all", "--wait")
        assert piped.returncode == 0
        assert piped.stdout.count("\n") == 1, piped.stdout  # stdout and stderr together: one line
        assert piped.stdout.startswith("resynced 1 project(s)")


def test_an_old_client_waiting_without_progress_gets_only_the_reply(
    tmp_path: Path, db_url: str, project: Path
) -> None:
    _many(project, 50)
    with Daemon(
        tmp_path, db_url, projects=[project], batch_size=2, env={PROGRESS_EVERY_ENV: "0.001"}
    ) as daemon:
        daemon.wait_started()
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(str(daemon.socket_path))
            sock.sendall(b'{"cmd":"reconcile","wait":true}\n')
            data = b""
            while not data.endswith(b"\n"):
                data += sock.recv(65536)
        assert data.count(b"\n") == 1
        assert data.startswith(b'{"ok":true,"result":{"projects":1')

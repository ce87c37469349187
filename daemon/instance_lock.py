"""One daemon per database on this machine: an exclusive flock on a lock file named after the database.

Two daemons mirroring into one database would race each other's tombstones and events. The
kernel drops the lock when the process dies, so a `kill -9` leaves nothing to clean up.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

from sessionsync.daemon.errors import AlreadyRunning


class InstanceLock:
    """The lock file in `folder` for the database `identity` (its URL, secrets masked); holds the
    pid of the daemon that has it, so that the one refused can name it."""

    def __init__(self, folder: Path, identity: str) -> None:
        self.path = folder / f"daemon-{hashlib.sha256(identity.encode()).hexdigest()[:12]}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise AlreadyRunning naming the holder's pid and the lock file."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(
                f"another sessionsync daemon (pid {holder}) is already running on this database",
                f"stop it first (lock file {self.path})",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        # The file stays: unlinked, a daemon that had just opened it could lock the orphan while
        # another one creates and locks a new file of the same name.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

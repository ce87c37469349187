"""The kernel's inotify limits, lowered for a moment in three ways: the machine's own sysctls
(`Sysctl`, root, every process on the machine feels it), a stand-in file the daemon's test seam
reads instead (`SysctlStandIn`), or a user namespace of the daemon's own. Plus reading every
setting safely while other runs on the machine may have one lowered (`inotify_sysctls`).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from sessionsync.daemon.inotify_faults import INOTIFY_SYSCTL_ENV
from tests.support.waiting import poll

# The machine-wide inotify settings. fs.inotify.max_user_{watches,instances} and
# user.max_inotify_{watches,instances} are two names for one value each (the initial user
# namespace's); both are read, and both names' locks are taken.
INOTIFY_SYSCTL_GLOBS = ("/proc/sys/fs/inotify/*", "/proc/sys/user/max_inotify_*")
SETTLE_LOCK_S = 300.0


def sysctl_lock_path(name: str) -> Path:
    """The lock file a run holds (exclusively) while it has lowered the setting `name`
    (`fs.inotify.max_queued_events`), so that no other run reads the lowered value as the original."""
    return Path(tempfile.gettempdir()) / f"sessionsync-sysctl-{name}.lock"


def _sysctl_name(path: str) -> str:
    return path.removeprefix("/proc/sys/").replace("/", ".")


def inotify_sysctls() -> dict[str, str]:
    """Every inotify setting under /proc/sys, by path, read while no run of ours has one lowered
    (shared locks on every setting's lock, waiting up to SETTLE_LOCK_S for a holder to put it back)."""
    paths = sorted(p for pattern in INOTIFY_SYSCTL_GLOBS for p in glob.glob(pattern))
    with contextlib.ExitStack() as stack:
        for path in paths:
            fd = os.open(sysctl_lock_path(_sysctl_name(path)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            stack.callback(os.close, fd)
            if not poll(lambda fd=fd: _try_lock(fd, fcntl.LOCK_SH), SETTLE_LOCK_S, interval=0.05):
                raise RuntimeError(f"{path} stayed locked (lowered by another run) for {SETTLE_LOCK_S} s")
        return {path: Path(path).read_text().strip() for path in paths}


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


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
    `sysctl` and for the chaos run when asked; everything else uses SysctlStandIn.

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

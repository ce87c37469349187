"""Test seam: the kernel's inotify limits lowered for one process, not for the machine.

Tests (and the chaos benchmark) reach queue overflow and the watch limit through it, so that they
never lower the machine's fs.inotify sysctls under every other process. The inotify adapter
(inotify_source.py) applies it where the kernel would: reading events and adding a watch.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# Test seam (see InotifyFaults): a folder standing in for /proc/sys/fs/inotify, for a daemon subprocess.
INOTIFY_SYSCTL_ENV = "SESSIONSYNC_TEST_INOTIFY_SYSCTL_DIR"


@dataclass
class InotifyFaults:
    """Test seam: the kernel's inotify limits, lowered for this process only, so that tests reach
    queue overflow and ENOSPC without changing the machine's sysctls under every other process.

    `max_queued_events`: a read from an inotify instance that returns more events than this means a
    queue of that size would have overflowed: the rest are dropped and IN_Q_OVERFLOW (wd -1) takes
    their place, as the kernel delivers it. Read when an instance is created, like the sysctl.
    `max_user_watches`: adding a watch while this process holds that many fails with ENOSPC. Read at
    each watch added, like the sysctl. `fail_watch(path)`: called before each watch is added; it may
    raise OSError. `sysctl_dir`: a folder whose files `max_queued_events` and `max_user_watches`, when
    present, give those two values instead (re-read each time, so a test can lower and restore them
    while a daemon runs); `from_env` takes it from $SESSIONSYNC_TEST_INOTIFY_SYSCTL_DIR. Its file
    `max_user_instances` is read by `sessionsync doctor` only (`user_instances`); nothing applies it.
    """

    max_queued_events: int | None = None
    max_user_watches: int | None = None
    fail_watch: Callable[[str], None] | None = None
    sysctl_dir: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> InotifyFaults | None:
        folder = env.get(INOTIFY_SYSCTL_ENV, "")
        return cls(sysctl_dir=folder) if folder else None

    def queued_events(self) -> int | None:
        return self._value("max_queued_events", self.max_queued_events)

    def user_watches(self) -> int | None:
        return self._value("max_user_watches", self.max_user_watches)

    def user_instances(self) -> int | None:
        return self._value("max_user_instances", None)

    def before_watch(self, path: bytes) -> None:
        """Raise what the kernel (or the test) would for adding a watch on `path` now."""
        if self.fail_watch is not None:
            self.fail_watch(os.fsdecode(path))
        limit = self.user_watches()
        if limit is not None and watches_held() >= limit:
            raise OSError(errno.ENOSPC, "inotify watch limit reached")

    def _value(self, name: str, given: int | None) -> int | None:
        if self.sysctl_dir is None:
            return given
        try:
            with open(os.path.join(self.sysctl_dir, name), encoding="ascii") as f:
                text = f.read().strip()
        except FileNotFoundError:
            return given
        return int(text) if text else given


def watches_held() -> int:
    """inotify watches this process holds, counted by the kernel (one `inotify wd:` line each in
    the fdinfo of every inotify descriptor), as the limit counts them."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
                count += f.read().count("inotify wd:")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor, or another thread's)
    return count

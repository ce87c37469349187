"""Test hooks: every way the test suite and the chaos benchmark reach into a daemon subprocess.

Each is an environment variable that production never sets, read once when the service is built,
so that the rest of the daemon holds no test-only code paths but these few calls.

    SESSIONSYNC_TEST_WEDGE_SLUG          a worker that meets this slug blocks for good
    SESSIONSYNC_TEST_FALLBACK_SCAN_S     how often an unwatchable project is rescanned
    SESSIONSYNC_TEST_INOTIFY_SYSCTL_DIR  stand-ins for the inotify sysctls (inotify_faults.py)
    SESSIONSYNC_TEST_CONTROL_IDLE_S      how long a silent control connection is kept
    SESSIONSYNC_TEST_PROGRESS_EVERY_S    how often a long reconcile logs its progress
    SESSIONSYNC_TEST_SUBSCRIBER_QUEUE    how many events a subscriber may fall behind
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from loguru import logger

from sessionsync.daemon.inotify_faults import InotifyFaults
from sessionsync.daemon.progress import LOG_EVERY_S
from sessionsync.models.keys import SessionKey

# A wedged worker: lets a test see WATCHDOG=1 stop while the other threads still run.
WEDGE_ENV = "SESSIONSYNC_TEST_WEDGE_SLUG"
# The watcher rescans a project it cannot watch (inotify watch limit) every 30 s; a chaos run that
# exhausts the watches needs the rescan within its deadline.
FALLBACK_SCAN_ENV = "SESSIONSYNC_TEST_FALLBACK_SCAN_S"
DEFAULT_FALLBACK_SCAN_S = 30.0
# Idle control connections are hung up on after 300 s; a test waits for that in seconds.
CONTROL_IDLE_ENV = "SESSIONSYNC_TEST_CONTROL_IDLE_S"
# A reconcile logs progress every 5 s once it has lasted that long; tests need no 5 s pass.
PROGRESS_EVERY_ENV = "SESSIONSYNC_TEST_PROGRESS_EVERY_S"
# A subscriber is dropped 10,000 events behind; a test makes one lag with a handful.
SUBSCRIBER_QUEUE_ENV = "SESSIONSYNC_TEST_SUBSCRIBER_QUEUE"


@dataclass(frozen=True)
class Hooks:
    """The hooks this process was started with; `Hooks()` is production: none of them."""

    wedge_slug: str = ""
    fallback_scan_s: float = DEFAULT_FALLBACK_SCAN_S
    inotify_faults: InotifyFaults | None = None
    control_idle_s: float | None = None  # None: the server's own default
    progress_every_s: float = LOG_EVERY_S
    subscriber_queue: int | None = None  # None: the server's own default

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Hooks:
        return cls(
            wedge_slug=env.get(WEDGE_ENV, ""),
            fallback_scan_s=float(env.get(FALLBACK_SCAN_ENV) or DEFAULT_FALLBACK_SCAN_S),
            inotify_faults=InotifyFaults.from_env(env),
            control_idle_s=float(env[CONTROL_IDLE_ENV]) if env.get(CONTROL_IDLE_ENV) else None,
            progress_every_s=float(env.get(PROGRESS_EVERY_ENV) or LOG_EVERY_S),
            subscriber_queue=int(env[SUBSCRIBER_QUEUE_ENV]) if env.get(SUBSCRIBER_QUEUE_ENV) else None,
        )

    def wedge_if_named(self, keys: Sequence[SessionKey]) -> None:
        """Block the calling worker forever if the batch holds the wedge slug."""
        if self.wedge_slug and any(k.slug == self.wedge_slug for k in keys):
            logger.warning("test hook: wedging a worker on {}", self.wedge_slug)
            threading.Event().wait()

"""The systemd notify protocol (sd_notify), written straight to `$NOTIFY_SOCKET`.

No libsystemd: a notification is one datagram of newline-separated `KEY=VALUE` fields. Outside
systemd every call is a no-op, so the service calls it unconditionally.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping

from loguru import logger

# A stalled service manager must not wedge the caller (the watchdog thread, or shutdown).
_SEND_TIMEOUT_S = 2.0
_JOIN_TIMEOUT_S = 5.0

_NEWLINES = re.compile(r"\s*[\r\n]+\s*")


def _one_line(field: str) -> str:
    """A newline would start a new field, so a value spanning lines is folded into one."""
    return _NEWLINES.sub(" ", field).strip()


def _socket_address(value: str) -> str | None:
    """The sendto() address for a `$NOTIFY_SOCKET` value, or None when there is none we can use."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]  # Linux abstract namespace
    if value:
        # systemd also passes vsock: addresses to VMs; a dev-box daemon does not run there.
        logger.warning("NOTIFY_SOCKET={} is not a Unix socket; systemd notifications are off", value)
    return None


class Notifier:
    """sd_notify without libsystemd: a no-op outside systemd; plain and abstract ('@') sockets."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self._lock = threading.Lock()
        self._failing = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> None:
        """Send one notification, e.g. send("READY=1", "STATUS=watching 3 projects"); never raises.

        A failure is logged when sending starts failing and when it works again, not per call:
        the watchdog thread sends every few seconds.
        """
        if self._address is None or not fields:
            return
        # "replace": a folder name that is not UTF-8 (surrogate-escaped) must not make this raise.
        payload = "\n".join(_one_line(field) for field in fields).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(_SEND_TIMEOUT_S)
                sock.sendto(payload, self._address)
        except OSError as exc:
            self._note_outcome(exc)
        else:
            self._note_outcome(None)

    def _note_outcome(self, error: OSError | None) -> None:
        with self._lock:
            changed = self._failing != (error is not None)
            self._failing = error is not None
        if not changed:
            return
        if error is not None:
            logger.warning(
                "cannot notify systemd at {}: {}; status and watchdog messages are lost until it works again",
                self._address.replace("\0", "@") if self._address else "",
                error,
            )
        else:
            logger.info("systemd notifications work again")

    def ready(self, status: str) -> None:
        """Startup is done (or a reload is): systemd marks the unit active."""
        self.send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        """The one-line summary `systemctl status` shows; newlines are collapsed."""
        self.send(f"STATUS={text}")

    def reloading(self) -> None:
        """A reload began; call ready() when it is done. systemd >= 253 wants MONOTONIC_USEC with it."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={now_usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for `seconds` more before systemd gives up on the current start or stop."""
        self.send(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def watchdog_interval(self) -> float | None:
        """How often to send WATCHDOG=1: half of `$WATCHDOG_USEC`, as sd_watchdog_enabled advises.

        None when there is no watchdog, or it is meant for another process (`$WATCHDOG_PID`).
        """
        if self._address is None:
            return None
        try:
            usec = int(self._watchdog_usec)
            pid = int(self._watchdog_pid) if self._watchdog_pid else os.getpid()
        except ValueError:
            return None
        if usec <= 0 or pid != os.getpid():
            return None
        return usec / 2 / 1_000_000


class WatchdogPinger:
    """Sends WATCHDOG=1 every interval, but only while `healthy()` returns True.

    Withholding the ping is the point: when the watcher or the workers are wedged, systemd
    restarts the daemon after WatchdogSec instead of the watchdog being fed by a thread that
    merely still runs.
    """

    def __init__(self, notifier: Notifier, interval_s: float, healthy: Callable[[], bool]) -> None:
        if interval_s <= 0:
            raise ValueError(f"watchdog interval must be positive, not {interval_s}")
        self._notifier = notifier
        self._interval_s = interval_s
        self._healthy = healthy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._was_healthy = True

    def start(self) -> None:
        """Ping now and then every interval, from a daemon thread; a second start() is a no-op."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="systemd-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """No ping is sent after stop() returns, unless healthy() hangs for longer than the join limit."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=_JOIN_TIMEOUT_S)

    def _run(self) -> None:
        while True:
            if self._check():
                self._notifier.send("WATCHDOG=1")
            if self._stop.wait(self._interval_s):
                return

    def _check(self) -> bool:
        """healthy(), logged when the answer changes; a check that raises counts as unhealthy."""
        error: Exception | None = None
        try:
            ok = bool(self._healthy())
        except Exception as exc:
            ok, error = False, exc
        if ok != self._was_healthy:
            self._was_healthy = ok
            if ok:
                logger.info("daemon healthy again; watchdog pings resumed")
            else:
                logger.opt(exception=error).warning(
                    "daemon unhealthy; withholding watchdog pings, so systemd restarts it after WatchdogSec"
                )
        return ok

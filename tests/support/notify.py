"""A stand-in for systemd's notify socket: a bound AF_UNIX datagram socket at a path or, for an
address starting with "@", in the abstract namespace, as `$NOTIFY_SOCKET` names it.

Read it as the test needs (`receive`, `until`, `during`, `pending`), or, for a daemon that runs
for minutes, let a thread drain it (`drain`): once net.unix.max_dgram_qlen datagrams (10 by
default) wait unread, the daemon's sends would time out.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

DEADLINE_S = 10.0


class FakeSystemd:
    """The notify socket systemd owns; `close()` closes it (a path is the caller's to remove)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.ready = threading.Event()  # set by the drain thread at the first READY=1
        self.ready_at = 0.0  # time.monotonic() when it came
        self._drainer: threading.Thread | None = None

    def env(self, watchdog_usec: int | None = None) -> dict[str, str]:
        """The variables systemd sets for the service: where to notify, and the watchdog interval."""
        env = {"NOTIFY_SOCKET": self.address}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def receive(self, timeout: float = DEADLINE_S) -> list[str]:
        """The next datagram's fields; TimeoutError when none comes in time."""
        self.sock.settimeout(max(timeout, 0.001))
        return self.sock.recv(65536).decode().split("\n")

    def pending(self) -> list[list[str]]:
        """Every datagram already queued, without waiting."""
        self.sock.setblocking(False)
        found: list[list[str]] = []
        while True:
            try:
                found.append(self.sock.recv(65536).decode().split("\n"))
            except BlockingIOError:
                return found

    def until(self, field: str, count: int = 1, timeout: float = DEADLINE_S) -> list[list[str]]:
        """Receive until `count` datagrams holding `field` have come; returns all received meanwhile."""
        deadline = time.monotonic() + timeout
        got: list[list[str]] = []
        while sum(field in fields for fields in got) < count:
            try:
                got.append(self.receive(deadline - time.monotonic()))
            except TimeoutError:
                raise AssertionError(
                    f"{count} x {field} not received within {timeout} s; got {got}"
                ) from None
        return got

    def during(self, seconds: float) -> list[list[str]]:
        """Everything received within `seconds`: for asserting that something has stopped coming."""
        deadline = time.monotonic() + seconds
        got: list[list[str]] = []
        while True:
            try:
                got.append(self.receive(deadline - time.monotonic()))
            except TimeoutError:
                return got

    def drain(self) -> None:
        """Read every datagram from now on in a thread, noting when READY=1 first came."""
        self._drainer = threading.Thread(target=self._drain, name="fake-systemd", daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        self.sock.settimeout(None)
        while True:
            try:
                message = self.sock.recv(4096)
            except OSError:
                return
            if not message:
                return  # shut down by close()
            if b"READY=1" in message.split(b"\n") and not self.ready.is_set():
                self.ready_at = time.monotonic()
                self.ready.set()

    def close(self) -> None:
        # shutdown() wakes a drain thread blocked in recv(), which then ends.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        if self._drainer is not None:
            self._drainer.join(timeout=5)

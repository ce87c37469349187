"""A TCP proxy a test controls, to put a database outage or latency between the daemon and PostgreSQL.

The daemon's database URL points at the proxy's port (`proxied_url`). `cut()` breaks every open
connection and refuses new ones (accepted, then closed at once) until `restore()`; `slow(seconds)`
delays every chunk forwarded in either direction; `stall()` stops forwarding while keeping every
connection open (new ones are accepted and stall too), as a network that stops moving bytes
does, until `restore()`. Threads only: one accepting, two pumps per
connection.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

from sqlalchemy.engine import make_url

_CHUNK = 65536


class _Pair:
    """One proxied connection: the client's socket and the upstream one."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self._lock = threading.Lock()
        self._open_pumps = 2

    def shutdown(self) -> None:
        """Break both directions now; the pumps see it and end."""
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def pump_ended(self) -> bool:
        """Count a pump out; True for the last one, which closes the sockets."""
        with self._lock:
            self._open_pumps -= 1
            last = self._open_pumps == 0
        if last:
            self.client.close()
            self.upstream.close()
        return last


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port` until `close()`; also a context manager."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server((listen_host, 0))
        self.host = listen_host
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._cut = False
        self._delay = 0.0
        self._flowing = threading.Event()  # cleared while stalled
        self._flowing.set()
        self._closed = threading.Event()
        self.accepted = 0  # connections accepted, refused ones included
        self.refused = 0  # connections closed at once because the proxy was cut
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"tcp-proxy-{self.port}", daemon=True
        )
        self._acceptor.start()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _exc: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()

    def cut(self) -> None:
        """Drop every current connection (both directions) and refuse new ones until `restore()`."""
        with self._lock:
            self._cut = True
            pairs = list(self._pairs)
        for pair in pairs:
            pair.shutdown()

    def stall(self) -> None:
        """Stop forwarding in both directions, keeping the connections open, until `restore()`."""
        self._flowing.clear()

    def restore(self) -> None:
        """Let connections through again (after a cut or a stall)."""
        with self._lock:
            self._cut = False
        self._flowing.set()

    def slow(self, seconds: float) -> None:
        """Delay each forwarded chunk by `seconds` (0 for none), in both directions."""
        with self._lock:
            self._delay = max(0.0, seconds)

    def connections(self) -> int:
        """Connections currently open through the proxy."""
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        """Stop accepting, break every connection and end the threads. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        # shutdown() wakes the thread blocked in accept() on Linux; close() alone would not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join(timeout=5)
        self._flowing.set()  # wake stalled pumps, which see the proxy closed
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.shutdown()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was shut down by close()
            with self._lock:
                self.accepted += 1
                refuse = self._cut
                if refuse:
                    self.refused += 1
            if refuse:
                _hang_up(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _hang_up(client)
                continue
            upstream.settimeout(None)
            pair = _Pair(client, upstream)
            with self._lock:
                if self._cut or self._closed.is_set():
                    # cut() ran while we connected upstream: it did not see this pair.
                    pair.shutdown()
                self._pairs.add(pair)
            for src, dst, name in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(
                    target=self._pump,
                    args=(pair, src, dst),
                    name=f"tcp-proxy-{self.port}-{name}",
                    daemon=True,
                ).start()

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                with self._lock:
                    delay = self._delay
                # Latency is the feature here; the wait ends early when the proxy closes.
                if delay and self._closed.wait(delay):
                    break
                # Stalled: hold what came (the sender's kernel saw it acknowledged) and send nothing.
                while not self._flowing.wait(0.05):
                    if self._closed.is_set():
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # Either side ending ends the connection: PostgreSQL has no use for half-closed ones.
            pair.shutdown()
            if pair.pump_ended():
                with self._lock:
                    self._pairs.discard(pair)


def _hang_up(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def proxied_url(url: str, host: str, port: int) -> str:
    """`url` with its server replaced by host:port (a TcpProxy in front of PostgreSQL)."""
    return make_url(url).set(host=host, port=port).render_as_string(hide_password=False)


def url_target(url: str) -> tuple[str, int]:
    """The (host, port) a PostgreSQL URL connects to."""
    parsed = make_url(url)
    return parsed.host or "127.0.0.1", parsed.port or 5432

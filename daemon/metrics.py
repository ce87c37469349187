"""Prometheus metrics: the daemon's counters read at scrape time, in the text exposition format.

Most values already exist for `status`; the collector (metrics_text.py, with prometheus_client,
both imported only once metrics are asked for) reads them when scraped instead of counting
twice. What status does not have is kept here: session outcomes per write path (`Tally`) and
the histogram of write -> row latency (`Latency`), observed when a batch commits. The
exposition is served three ways: the `metrics` control command, an optional HTTP listener and
an optional node_exporter textfile.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from loguru import logger

from sessionsync.daemon.config import MetricsConfig, split_listen
from sessionsync.daemon.inspection import Action, Change
from sessionsync.daemon.results import BatchResult

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

PREFIX = "sessionsync_"
# Write -> row latency: the leading edge answers in milliseconds, the trailing edge after
# debounce_ms (200 ms), the ceiling after max_delay_ms (2 s); an outage can take minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
SOURCES = ("live", "reconcile", "sync")  # the write paths: workers, reconcile passes, `sync`
LIVE_SESSIONS = f"{PREFIX}live_sessions"
LATENCY = "write_to_row_seconds"


@dataclass
class DatabaseFacts:
    """What only the database knows: live sessions per project, and its size."""

    live_by_project: Mapping[str, int]
    size_bytes: int


class MetricsSource(Protocol):
    """What the collector reads from the service: the status reply and a few extras."""

    def status(self) -> dict[str, Any]: ...

    def metric_extras(self) -> dict[str, float]:
        """keys_debounced and database_outage_seconds (with the current outage so far)."""

    def database_facts(self) -> DatabaseFacts | None:
        """None while the database cannot be asked."""


@dataclass
class _Outcomes:
    batches: int = 0
    rows: int = 0  # written or tombstoned
    unchanged: int = 0
    invalid: int = 0


@dataclass
class Tally:
    """Session outcomes per write path, counted as each batch commits (status has no such counts)."""

    by_source: dict[str, _Outcomes] = field(default_factory=lambda: {s: _Outcomes() for s in SOURCES})
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, source: str, result: BatchResult) -> None:
        with self._lock:
            o = self.by_source[source]
            o.batches += 1
            o.rows += result.written + result.tombstoned
            o.unchanged += result.unchanged + result.touched
            o.invalid += result.invalid

    def snapshot(self) -> dict[str, _Outcomes]:
        with self._lock:
            return {s: _Outcomes(**vars(o)) for s, o in self.by_source.items()}


class Latency:
    """The write -> row latency histogram's counts: one per bucket of LATENCY_BUCKETS and one
    above them, and the sum."""

    DOC = "From a state.json's mtime to the commit of its row (live writes and `sync`, not reconciles)."

    def __init__(self) -> None:
        self._counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        i = bisect.bisect_left(LATENCY_BUCKETS, seconds)  # a bucket holds what is <= its bound
        with self._lock:
            self._counts[i] += 1
            self._sum += seconds

    def snapshot(self) -> tuple[list[int], float]:
        with self._lock:
            return list(self._counts), self._sum


class Metrics:
    """The counts kept here, the registry (made on first use), and the HTTP and textfile outlets."""

    def __init__(self, source: MetricsSource) -> None:
        self._source = source
        self.tally = Tally()
        self.latency = Latency()
        self._registry: CollectorRegistry | None = None
        self._registry_lock = threading.Lock()
        self._http: Any = None
        self._textfile: _TextfileWriter | None = None

    def observe_commit(self, changes: Sequence[tuple[object, Change]]) -> None:
        """A batch just committed: its content writes' age, from file mtime to now."""
        now_ns = time.time_ns()
        for _, change in changes:
            probe = change.probe
            if change.action is Action.WRITE and probe is not None and probe.read_mtime_ns:
                self.latency.observe(max(0, now_ns - probe.read_mtime_ns) / 1e9)

    @property
    def registry(self) -> CollectorRegistry:
        with self._registry_lock:
            if self._registry is None:
                from sessionsync.daemon.metrics_text import registry

                self._registry = registry(self._source, self.tally, self.latency)
            return self._registry

    def exposition(self, keep: int | None = None) -> str:
        """The text exposition; with `keep`, only the `keep` largest projects' series."""
        from sessionsync.daemon.metrics_text import render

        return render(self.registry, keep)

    def for_control(self, max_line: int) -> dict[str, Any]:
        """The `metrics` reply: the exposition, with the per-project series trimmed (and said so)
        when the whole would not fit in one protocol line."""
        text = self.exposition()
        keep = projects = text.count(LIVE_SESSIONS + "{")
        while _reply_bytes(text) > max_line and keep > 0:
            keep //= 2
            text = self.exposition(keep)
        reply: dict[str, Any] = {"text": text}
        if keep < projects:
            reply["projects_left_out"] = projects - keep
        return reply

    # -- outlets ---------------------------------------------------------------------------

    def start(self, cfg: MetricsConfig) -> None:
        """Open the HTTP listener and start the textfile writer, as configured. A listener that
        cannot bind is logged and skipped: mirroring goes on without it."""
        if cfg.listen:
            from prometheus_client import start_http_server

            host, port = split_listen(cfg.listen)
            try:
                self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
            except OSError as exc:
                logger.error(
                    "metrics: cannot listen on {}: {}; set [metrics] listen to a free address",
                    cfg.listen,
                    exc.strerror or exc,
                )
            else:
                bound = self._http.server_address
                logger.info("metrics: serving http://{}/metrics", _host_port(bound[0], bound[1]))
        if cfg.textfile:
            self._textfile = _TextfileWriter(cfg.textfile, cfg.textfile_interval_s, self.exposition)
            self._textfile.start()

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._textfile is not None:
            self._textfile.stop()
            self._textfile = None


def _reply_bytes(text: str) -> int:
    return len(json.dumps({"ok": True, "result": {"text": text}}, separators=(",", ":")).encode())


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _TextfileWriter:
    """Rewrites the textfile every `interval_s` on a thread of its own: the exposition goes to a
    new temp file in the same folder (O_EXCL | O_NOFOLLOW: never through a planted link), which
    is renamed over the target, so node_exporter never reads half a file."""

    def __init__(self, path: str, interval_s: float, render: Callable[[], str]) -> None:
        self.path = path
        self._interval_s = interval_s
        self._render = render
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-textfile", daemon=True)
        self._failing = ""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        while True:
            self._write_once()
            if self._stop.wait(self._interval_s):
                return

    def _write_once(self) -> None:
        try:
            write_atomically(self.path, self._render().encode("utf-8"))
        except Exception as exc:  # the thread must outlive any one failure
            problem = f"{getattr(exc, 'strerror', None) or exc}"
            if problem != self._failing:  # one line when it starts failing, not one per interval
                logger.error("metrics: cannot write the textfile {}: {}", self.path, problem)
                self._failing = problem
            return
        if self._failing:
            logger.info("metrics: writing the textfile {} again", self.path)
            self._failing = ""


def write_atomically(path: str, data: bytes) -> None:
    """Write `data` to `path` by a rename from a temp file beside it; mode 0644, since
    node_exporter usually runs as another user."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileExistsError:
        os.unlink(tmp)  # left by a run of ours that was killed mid-write (a link is unlinked, not followed)
        fd = os.open(tmp, flags, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

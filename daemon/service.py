"""The daemon: wires the parts, starts them in order and stops them in reverse.

Start: single-instance lock, control socket, database (migrated), discovery, workers,
debouncer, watcher, READY=1, the schedule and the watchdog pings. The start-up reconcile runs
after READY=1, on the reconciler's thread: the watcher is already collecting, so nothing written
during it is missed, and `status` says "starting: start-up reconcile" until it is done.
Stop (SIGTERM/SIGINT): stop the schedule and the watcher, flush pending keys, drain the queue
within a time limit, stop the control socket, close the database, one summary line.
Signal handlers only set flags; the main thread does the work. The control socket's handlers
see only the facade at the end of Service (status, pause, resume, resync, reconcile, sync, errors).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

from loguru import logger

from sessionsync.daemon import malloc
from sessionsync.daemon.backoff import Backoff
from sessionsync.daemon.batch import log_changes, sync_batch
from sessionsync.daemon.config import Config, load_config
from sessionsync.daemon.control.protocol import MAX_LINE
from sessionsync.daemon.db import make_engine
from sessionsync.daemon.dburl import mask_url
from sessionsync.daemon.debounce import Debouncer, DebounceThread
from sessionsync.daemon.discovery import ProjectPath, discover
from sessionsync.daemon.early_signals import EarlySignals
from sessionsync.daemon.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ConfigError,
    ControlError,
    SessionSyncError,
)
from sessionsync.daemon.hub import EventHub
from sessionsync.daemon.instance_lock import StaleLock, database_lock, holder_text
from sessionsync.daemon.logs import mask_secrets, set_level, setup_logging
from sessionsync.daemon.metrics import DatabaseFacts, Metrics
from sessionsync.daemon.migrate import current_revision, upgrade
from sessionsync.daemon.migrate_child import upgrade_in_child
from sessionsync.daemon.progress import LogProgress
from sessionsync.daemon.project_registry import ProjectRegistry
from sessionsync.daemon.recent_errors import RecentErrors
from sessionsync.daemon.reconcile import (
    RESYNC_UNREADABLE,
    freeze_long_lived,
    reconcile,
    register,
    unreadable_projects,
)
from sessionsync.daemon.reconcile_queue import ReconcileJob, ReconcileQueue, Reconciler
from sessionsync.daemon.results import BatchResult, ReconcileSummary
from sessionsync.daemon.scheduler import Schedule, is_overdue, zone
from sessionsync.daemon.sqlite_db import make_private
from sessionsync.daemon.store import Store, is_transient
from sessionsync.daemon.systemd import Notifier, WatchdogPinger
from sessionsync.daemon.testing_hooks import Hooks
from sessionsync.daemon.version import version
from sessionsync.daemon.watcher import RESYNC_FALLBACK, SessionWatcher
from sessionsync.daemon.workers import DatabaseHealth, Workers, WorkQueue
from sessionsync.models.events import PROJECT_RESYNCED, RECONCILE_FINISHED
from sessionsync.models.keys import SessionKey
from sessionsync.models.migrations import HEAD

Progress = Callable[[dict[str, Any]], None]  # hears `resync --wait` progress lines
DRAIN_TIMEOUT_S = 30.0
# Waiting at start-up for a database that cannot be reached: 1 s, doubling up to 30 s.
DATABASE_WAIT_BACKOFF_S = (1.0, 30.0)
WAIT_LIMIT_S = 600.0  # the longest a control request waits for its reconcile
PROGRESS_EVERY_S = 0.5  # how often a waiting `resync --wait` client may hear of progress
ERRORS_LIMIT = 100  # invalid sessions listed by `errors`; a reply line holds at most 64 KiB
# How each event kind changes the number of live sessions shown by `status`.
_LIVE_DELTA = {"session.created": 1, "session.restored": 1, "session.deleted": -1}


class Service:
    """The running daemon. `run()` blocks until SIGTERM/SIGINT and returns the exit code; the
    control commands are its other public methods."""

    def __init__(self, cfg: Config, config_arg: str | None, env: Mapping[str, str] | None = None) -> None:
        self.cfg = cfg
        self._config_arg = config_arg
        self._env = dict(os.environ if env is None else env)
        self.started_at = time.time()
        self.notifier = Notifier(self._env)
        self.engine = make_engine(
            cfg.database_url(self._env), own_folder=not cfg.database.url, timeout_s=cfg.database.timeout_s
        )
        self.hub = EventHub()
        self.store = Store(self.engine, hub=self.hub)
        self.queue = WorkQueue()
        self.health = DatabaseHealth()
        self.registry = ProjectRegistry()
        self._counts = dict.fromkeys(("resyncs", "reconciles", "events_published", "discoveries"), 0)
        self._recent_errors = RecentErrors()
        self._recent_errors.attach()
        self.last_reconcile_at: datetime | None = None
        self._running: ReconcileJob | None = None  # the reconcile under way (status shows its progress)
        self.live_sessions = 0
        self._live_lock = threading.Lock()
        self._rebuild_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._reload = threading.Event()
        self._sigints = 0
        # Reconciles wait while writes are paused, like the work queue's keys.
        self._reconciles = ReconcileQueue(held=lambda: self.queue.paused)
        self._hooks = Hooks.from_env(self._env)
        self.workers = Workers(
            self.queue,
            self._process,
            self._publish,
            cfg.workers.threads,
            cfg.workers.batch_size,
            self.health,
        )
        # A flood is more keys pending than one batch holds (see debounce.py).
        self.debouncer: Debouncer[SessionKey] = Debouncer(
            cfg.watch.debounce_ms / 1000, cfg.watch.max_delay_ms / 1000, flood_keys=cfg.workers.batch_size
        )
        self.debounce = DebounceThread(self.debouncer, self.queue.submit)
        self.watcher = SessionWatcher(
            on_key=self.debounce.touch,
            on_resync=self._resync_soon,
            fallback_scan_s=self._hooks.fallback_scan_s,
            faults=self._hooks.inotify_faults,
        )
        self.schedule = Schedule(nightly=self._nightly, discover=self.rediscover)
        self._reconciler = Reconciler(
            self._reconciles,
            self._run_reconcile,
            on_outage=lambda exc: self.health.failed(exc, self.queue.pending()),
            stop=self._stop,
            on_done=lambda _job: self._wake.set(),
        )
        self.socket_path = cfg.socket_path(self._env)
        # One daemon per database and host (instance_lock.py); losing it to another stops this one.
        self._instance_lock = database_lock(self.engine, holder_text(self.socket_path), self._lost_lock)
        self._exit_code = EXIT_OK
        self.control: Any = None
        self.state = "starting"  # what `status` says until the start-up reconcile is done
        self.pinger: WatchdogPinger | None = None
        self.metrics = Metrics(self)

    # -- lifecycle ------------------------------------------------------------------------

    def run(self, early: EarlySignals | None = None) -> int:
        previous = self._install_signals()
        if early is not None:
            self._replay(early)
        started = time.monotonic()
        try:
            # The socket comes first, so that `status` answers ("starting: waiting for the
            # database") while the database, and the instance lock held there, is out of reach.
            self._start_control()
            self.state = "starting: waiting for the database"
            try:
                waited = self._wait_for_database()
            except BaseException:
                self._close()
                raise
            if not waited:
                self._close()
                return EXIT_OK
            self.state = "starting: start-up reconcile"
            self.metrics.start(self.cfg.metrics)  # once the schema is there to be asked
            self.workers.start()
            self.debounce.start()
            self.watcher.start()
            for ref in self.registry.refs().values():
                self.watcher.watch(ref.path, ref.sessions_dir)
            self._reconciler.start()
            freeze_long_lived()
            startup = self._startup_reconcile()
            self.notifier.ready(self.status_line())
            if startup is None:
                self._started(started)
            else:
                logger.info(
                    "ready in {:.2f} s: watching {} project(s); the start-up reconcile runs now",
                    time.monotonic() - started,
                    len(self.registry),
                )
            self.schedule.start(
                self.cfg.schedule.reconcile_cron,
                self.cfg.schedule.timezone,
                self.cfg.schedule.discover_interval_s,
            )
            interval = self.notifier.watchdog_interval()
            if interval:
                # A batch running for 2 x WatchdogSec (4 intervals) is a wedged worker: 60 s with the
                # shipped unit, well past SQLite's 30 s busy timeout, yet scaled down under test.
                self.pinger = WatchdogPinger(self.notifier, interval, lambda: self.healthy(4 * interval))
                self.pinger.start()
            self._main_loop(startup, started)
            return self._shutdown(started)
        finally:
            self._restore_signals(previous)

    def _started(self, started: float) -> None:
        """The start-up reconcile is over (or was not needed): the summary line, and "running"."""
        self.state = "running"
        logger.info(
            "sessionsync started: version {}, {} project(s), {} session(s), database {}, config {}, "
            "roots {}, in {:.2f} s",
            version(),
            len(self.registry),
            self.live_sessions,
            self._database_label,
            str(self.cfg.source) if self.cfg.source else "built-in defaults",
            ", ".join(self.cfg.watch.roots) or "none",
            time.monotonic() - started,
        )

    def _main_loop(self, startup: ReconcileJob | None, started: float) -> None:
        """Until stopped: reloads, the STATUS= line, and the end of the start-up reconcile (the
        reconciler wakes this loop when a job ends)."""
        last_status = ""
        while not self._stop.is_set():
            self._wake.wait(5.0)
            self._wake.clear()
            if startup is not None and startup.done.is_set():
                self._started(started)
                startup = None
            if self._reload.is_set():
                self._reload.clear()
                self._apply_reload()
            try:
                self._check_database_file()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self.health.failed(exc, self.queue.pending())
            line = self.status_line()
            if line != last_status:
                self.notifier.status(line)
                last_status = line

    def _shutdown(self, started: float) -> int:
        self.notifier.stopping()
        logger.info("stopping: draining {} pending session(s)", self.queue.pending() + len(self.debouncer))
        if self.pinger is not None:
            self.pinger.stop()
        self.schedule.stop()
        self.watcher.stop()
        self.debounce.stop(flush=True)
        self._reconciles.wake()
        drained = self.queue.join(DRAIN_TIMEOUT_S) if not self.queue.paused else False
        left = self.queue.pending() + self.queue.busy()
        self.workers.stop(timeout=5.0)
        self.metrics.stop()
        self._close()
        if not drained and left:
            logger.warning(
                "stopped with {} session(s) not written (database down or paused); "
                "the next start-up reconcile picks them up",
                left,
            )
        logger.info(
            "sessionsync stopped after {:.0f} s: {} batch(es), {} row(s) written",
            time.monotonic() - started,
            self.workers.batches,
            self.workers.written,
        )
        return self._exit_code

    def _close(self) -> None:
        if self.control is not None:
            self.control.stop()
        if self._instance_lock is not None:
            self._instance_lock.release()
        self.engine.dispose()
        self._recent_errors.detach()

    def _lost_lock(self) -> None:
        """Another daemon took the instance lock while ours was down: stop without writing more."""
        self._exit_code = EXIT_FAILURE
        self.queue.pause()  # a paused queue is not drained at shutdown
        self.request_stop()

    # -- signals ----------------------------------------------------------------------------

    def _install_signals(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        for sig, handler in (
            (signal.SIGTERM, self._on_term),
            (signal.SIGINT, self._on_int),
            (signal.SIGHUP, self._on_hup),
        ):
            previous[sig] = signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signals(previous: Mapping[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _replay(self, early: EarlySignals) -> None:
        """What came before our handlers: a stop is a stop; a reload waits until we are up."""
        if early.received & {signal.SIGTERM, signal.SIGINT}:
            logger.info("stop requested during start-up")
            self.request_stop()
        if signal.SIGHUP in early.received:
            logger.info("reload requested during start-up: applied once started")
            self._reload.set()
            self._wake.set()

    def _on_term(self, _sig: int, _frame: FrameType | None) -> None:
        self.request_stop()

    def _on_int(self, _sig: int, _frame: FrameType | None) -> None:
        self._sigints += 1
        if self._sigints > 1:
            os._exit(EXIT_INTERRUPTED)  # a second Ctrl-C: the user wants out now
        self.request_stop()

    def _on_hup(self, _sig: int, _frame: FrameType | None) -> None:
        self._reload.set()
        self._wake.set()

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # -- database and control socket ----------------------------------------------------------

    def _wait_for_database(self) -> bool:
        """Migrate (or just connect), then register the projects; while the database is unreachable
        or refuses every write (a privilege taken away), wait with backoff, as a running daemon
        does: a fault of the database at start-up is no reason to exit."""
        backoff = Backoff(*DATABASE_WAIT_BACKOFF_S)
        while not self._stop.is_set():
            try:
                # Before the migration: a second daemon must not upgrade the first one's schema.
                if self._instance_lock is not None:
                    self._instance_lock.acquire()
                if self.cfg.database.auto_migrate:
                    before, after = self._upgrade()
                    if before != after:
                        logger.info("database schema upgraded from {} to {}", before or "empty", after)
                self.store.check_schema()
                self.store.remember_file()
                self.hub.resume_after(self.store.last_event_id())
                self._refresh_projects(initial=True)
                self.health.succeeded()
                return True
            except Exception as exc:
                if not (is_transient(exc) or isinstance(exc, StaleLock)):
                    raise
                self.health.failed(exc, 0)
                self.notifier.status(f"waiting for the database: {self.health.last_error}")
                self._stop.wait(backoff.next())
        return False

    def _upgrade(self) -> tuple[str | None, str | None]:
        """Bring the schema to head, in a child process when there is anything to do (see
        migrate_child.py); in-process should the child fail, so that its error is the real one."""
        with self.engine.connect() as conn:
            at = current_revision(conn)
        if at == HEAD:
            return at, at
        cfg = self.cfg
        url = cfg.database_url(self._env)
        done = upgrade_in_child(url, not cfg.database.url, cfg.database.timeout_s, self._env)
        return upgrade(self.engine) if done is None else done

    def _check_database_file(self) -> None:
        """A SQLite file deleted (or replaced) under the running daemon: its schema is rebuilt in
        a new file, the projects registered again and everything mirrored by a full reconcile."""
        if not self.store.file_replaced():
            return
        with self._rebuild_lock:
            if not self.store.file_replaced() or self.store.file is None:
                return
            logger.warning(
                "the database file {} was deleted or replaced under the running daemon: "
                "rebuilding its schema and mirroring every session again",
                self.store.file,
            )
            self.engine.dispose()
            make_private(self.store.file, own_folder=not self.cfg.database.url)
            self._upgrade()
            self.store.remember_file()
            self.hub.restart(self.store.last_event_id())  # subscribers resume from the new file's start
            found = [ProjectPath(r.path, r.sessions_dir) for r in self.registry.refs().values()]
            self.registry.add(register(self.store, found))
            self._request_reconcile(None, "database file replaced")

    def _start_control(self) -> None:
        from sessionsync.daemon.control.handlers import build_handlers
        from sessionsync.daemon.control.server import ControlServer

        self.control = ControlServer(
            self.socket_path,
            build_handlers(self),
            self.hub,
            idle_timeout_s=self._hooks.control_idle_s,
            replay=self.store.events_between,
            subscriber_queue=self._hooks.subscriber_queue,
        )
        self.control.start()

    # -- projects ---------------------------------------------------------------------------

    def _refresh_projects(self, initial: bool = False) -> None:
        """Discover; register and watch new projects, unwatch and tombstone vanished ones."""
        w = self.cfg.watch
        found = discover(w.projects, w.roots, w.discover_depth, w.sessions_subdir)
        if initial:
            # A project an earlier run mirrored that is no longer found (removed, or its sessions
            # folder gone, while the daemon was down) still has live rows: it joins the registry
            # so that it is tombstoned below like a project vanishing while running.
            paths = {p.path for p in found}
            stale = [r for r in self.store.known_projects() if r.path not in paths]
            self.registry.add({r.path: r for r in stale if self.store.live_slugs(r.id)})
        current = self.registry.refs()
        new = [p for p in found if p.path not in current]
        gone = [path for path in current if path not in {p.path for p in found}]
        if new:
            refs = register(self.store, new)
            self.registry.add(refs)
            if not initial:
                for ref in refs.values():
                    self.watcher.watch(ref.path, ref.sessions_dir)
                    logger.info("new project {}: watching and reconciling", ref.path)
                self._request_reconcile(set(refs), "new project")
        if gone:
            for path in gone:
                self.watcher.unwatch(path)
                logger.info("project {} is gone: unwatching and tombstoning its sessions", path)
            # Reconciling a project whose folder vanished tombstones every session it had.
            self._request_reconcile(set(gone), "project vanished", forget=set(gone))
        self._counts["discoveries"] += 1

    def rediscover(self) -> None:
        """Discovery now (schedule, SIGHUP, `resync --all`); a database outage only postpones it.
        A project whose sessions folder could not be listed is looked at again: a chmod that
        makes it readable raises no inotify event."""
        stuck = unreadable_projects() & set(self.registry.refs())
        if stuck:
            self._request_reconcile(stuck, RESYNC_UNREADABLE)
        try:
            self._refresh_projects()
        except Exception as exc:
            if not is_transient(exc):
                raise
            self.health.failed(exc, self.queue.pending())

    # -- reconcile ----------------------------------------------------------------------------

    def _request_reconcile(
        self, projects: set[str] | str | None, reason: str, forget: set[str] | None = None
    ) -> ReconcileJob:
        """Queue a reconcile of these projects (None: all); merged with one not yet started."""
        return self._reconciles.request(projects, reason, forget or ())

    def _resync_soon(self, project: str, reason: str) -> None:
        self._request_reconcile(project, reason)

    def _run_reconcile(self, job: ReconcileJob) -> ReconcileSummary:
        self._running = job
        try:
            return self._reconcile_job(job)
        finally:
            self._running = None

    def _reconcile_job(self, job: ReconcileJob) -> ReconcileSummary:
        self._check_database_file()
        refs = self.registry.refs()
        chosen = [r for path, r in sorted(refs.items()) if job.projects is None or path in job.projects]
        log_progress = LogProgress(f"reconciling ({job.reason})", self._hooks.progress_every_s)

        def progress(done: int, total: int) -> None:
            job.progress = (done, total)  # what `resync --wait` shows (control/handlers.py)
            log_progress(done, total)

        summary = reconcile(
            self.store,
            chosen,
            self.cfg.watch.max_state_bytes,
            self.cfg.workers.batch_size,
            claim=self.queue.claim,
            on_batch=self._reconciled_batch,
            on_progress=progress,
        )
        self.health.succeeded()
        self.registry.remove(sorted(job.forget))
        self._counts["reconciles" if job.projects is None else "resyncs"] += 1
        now = datetime.now(UTC)
        # A project without an inotify watch is scanned every half minute, one that cannot be
        # listed at every discovery: only a scan that found something is worth a line at INFO.
        looks = (RESYNC_FALLBACK, RESYNC_UNREADABLE)
        routine = job.reason in looks and not summary.as_dict()["changed"]
        logger.log("DEBUG" if routine else "INFO", "{} ({})", summary.line(), job.reason)
        events: list[dict[str, Any]] = [
            {"kind": PROJECT_RESYNCED, "project": r.path, "at": now.isoformat(), "reason": job.reason}
            for r in chosen
        ]
        if job.projects is None:
            self.last_reconcile_at = now
            events.append({"kind": RECONCILE_FINISHED, "at": now.isoformat(), **summary.as_dict()})
            # Every full reconcile purges, as the design has it (start-up, nightly, on request): a
            # laptop that sleeps through every night still drops its old tombstones.
            days = self.cfg.retention.tombstone_days
            purged = self.store.purge_tombstones(timedelta(days=days))
            if purged:
                logger.info("purged {} tombstone(s) older than {} day(s)", purged, days)
        self._publish(events)
        self._count_sessions()
        if job.projects is None:
            # A full pass leaves pages in the SQLite connections' caches, garbage the collector has
            # not reached yet, and freed pages inside the heap that glibc keeps for later: all of it
            # goes back, once its last query is done.
            self.store.release_memory()
            gc.collect()
            malloc.trim()
        return summary

    def _startup_reconcile(self) -> ReconcileJob | None:
        """Queue the start-up reconcile, unless it is off and not overdue; its job."""
        s = self.cfg.schedule
        last = self.store.last_full_reconcile()
        self.last_reconcile_at = last
        overdue = is_overdue(s.reconcile_cron, zone(s.timezone), last, datetime.now(zone(s.timezone)))
        if not (s.reconcile_on_start or overdue):
            self._count_sessions()
            return None
        return self._request_reconcile(None, "start-up" if s.reconcile_on_start else "overdue at start-up")

    def _nightly(self) -> None:
        self._request_reconcile(None, "nightly")

    # -- work ---------------------------------------------------------------------------------

    def _process(self, keys: Sequence[SessionKey]) -> BatchResult:
        self._check_database_file()
        self._hooks.wedge_if_named(keys)
        # A state.json that may be half-written waits out one quiet period, then is looked at again.
        settle_s = self.debouncer.debounce_s
        result = sync_batch(
            self.store,
            self.registry.refs(),
            keys,
            self.cfg.watch.max_state_bytes,
            settle_s=settle_s,
            on_commit=self.metrics.observe_commit,
        )
        self.metrics.tally.add("live", result)
        self.debounce.later(result.recheck)
        self._skip_unlisted(result)
        return result

    def _reconciled_batch(self, result: BatchResult) -> None:
        self.metrics.tally.add("reconcile", result)
        self._published_batch(result)

    def _published_batch(self, result: BatchResult) -> None:
        if result.retry:  # not readable now for a reason not their own: the workers try again
            self.queue.submit(key for key, _ in result.retry)
        self._skip_unlisted(result)
        if result.events:
            self._publish(result.events)

    def _skip_unlisted(self, result: BatchResult) -> None:
        """A sessions folder that may not be searched: its project is reconciled, which skips it
        (its rows kept, one line) and looks again at every discovery until it can be read."""
        if result.unlisted:
            self._request_reconcile(set(result.unlisted), RESYNC_UNREADABLE)

    def _publish(self, events: list[dict[str, Any]]) -> None:
        log_changes(events)
        self._recent_errors.forget_fixed(events)
        # Session events (with an id) reached the hub as they committed, in id order (store.py).
        self.hub.publish_many([e for e in events if "id" not in e])
        self._counts["events_published"] += len(events)
        # Between reconciles (which recount exactly), the status count follows the events.
        delta = sum(_LIVE_DELTA.get(e["kind"], 0) for e in events)
        if delta:
            with self._live_lock:
                self.live_sessions += delta

    def _sync_now(self, key: SessionKey) -> BatchResult:
        """Sync one session immediately (the control `sync` command), as its only writer."""
        with self.queue.claim([key]):
            result = sync_batch(
                self.store,
                self.registry.refs(),
                [key],
                self.cfg.watch.max_state_bytes,
                on_commit=self.metrics.observe_commit,
            )
        self.metrics.tally.add("sync", result)
        self._published_batch(result)
        return result

    def _count_sessions(self) -> None:
        try:
            self.live_sessions = self.store.count_live_sessions()
        except Exception as exc:
            if not is_transient(exc):
                raise

    # -- health and status --------------------------------------------------------------------

    @property
    def _database_label(self) -> str:
        return mask_url(self.cfg.database_url(self._env))

    def _counters(self) -> dict[str, int]:
        c = self._counts
        return {
            "resyncs": c["resyncs"],
            "reconciles": c["reconciles"],
            "reconcile_failures": self._reconciler.failures,
            "events_published": c["events_published"],
            "discoveries": c["discoveries"],
        }

    def healthy(self, stall_after_s: float) -> bool:
        """Alive and making progress: what WATCHDOG=1 vouches for. An idle worker is healthy; one
        busy on a batch for longer than `stall_after_s` is not, even while the others run."""
        stalled = self.workers.longest_batch_s() > stall_after_s
        return (
            self.watcher.is_alive()
            and self.workers.alive()
            and self.debounce.is_alive()
            and self._reconciler.is_alive()
            and not stalled
        )

    def status_line(self) -> str:
        db = "ok" if self.health.ok else "DOWN"
        paused = ", PAUSED" if self.queue.paused else ""
        starting = "" if self.state == "running" else f"{self.state}; "
        running = self._running
        if running is not None and running.progress[1]:
            starting += f"reconciling {running.progress[0]:,}/{running.progress[1]:,} session(s); "
        return (
            f"{starting}{len(self.registry)} project(s), {self.live_sessions} session(s), "
            f"{self.queue.pending() + len(self.debouncer)} pending, database {db}{paused}"
        )

    # -- the control commands: all that daemon/control/handlers.py calls ---------------------

    def status(self) -> dict[str, Any]:
        """The status reply: the contract's keys plus watch, database and error details."""
        watch = self.watcher.projects()
        health = self.health
        nightly = self.schedule.next_nightly()
        states: dict[str, int] = {}
        for state in watch.values():
            states[state] = states.get(state, 0) + 1
        return fit_watch_list(
            {
                "version": version(),
                "state": self.state,
                "pid": os.getpid(),
                "config": str(self.cfg.source) if self.cfg.source else None,
                "uptime_s": round(time.time() - self.started_at),
                "next_reconcile_at": nightly.isoformat() if nightly else None,
                "projects": len(self.registry),
                "sessions": self.live_sessions,
                "pending": self.queue.pending() + len(self.debouncer),
                "in_flight": self.queue.busy(),
                "database_ok": health.ok,
                "database": {
                    "url": self._database_label,
                    "ok": health.ok,
                    "outages": health.outages,
                    "last_error": health.last_error or None,
                },
                "paused": self.queue.paused,
                "last_reconcile_at": self.last_reconcile_at.isoformat() if self.last_reconcile_at else None,
                "reconcile": self._reconcile_status(),
                "watch": [{"project": path, "state": state} for path, state in sorted(watch.items())],
                "watch_states": dict(sorted(states.items())),
                "counters": {
                    **self._counters(),
                    **self.watcher.counters(),
                    "batches": self.workers.batches,
                    "rows_written": self.workers.written,
                    "batch_failures": self.workers.failures,
                    "floods": self.debouncer.floods,
                    "database_outages": health.outages,
                    "subscribers": self.hub.subscriber_count(),
                },
                "recent_errors": self._recent_errors.entries(),
            }
        )

    def _reconcile_status(self) -> dict[str, Any] | None:
        """The reconcile running now, if any: why, and how far (sessions seen of how many; total
        is 0 until its listing is done)."""
        job = self._running
        if job is None:
            return None
        seen, total = job.progress
        return {"reason": job.reason, "seen": seen, "total": total}

    def metric_extras(self) -> dict[str, float]:
        """What the metrics add to status's counters (daemon/metrics.py)."""
        health = self.health
        ongoing = 0.0 if health.ok else time.monotonic() - health.since
        return {"keys_debounced": self.debounce.delivered, "database_outage_seconds": health.down_s + ongoing}

    def database_facts(self) -> DatabaseFacts | None:
        """Live sessions per project and the database's size; None while it cannot be asked."""
        if not self.health.ok:
            return None  # a scrape must not wait out a connect timeout
        try:
            return DatabaseFacts(self.store.live_sessions_by_project(), self.store.database_bytes())
        except Exception as exc:
            if not is_transient(exc):
                raise
            return None

    def metrics_reply(self, max_line: int) -> dict[str, Any]:
        """The `metrics` command: the Prometheus text exposition."""
        return self.metrics.for_control(max_line)

    def pause(self) -> dict[str, Any]:
        """Hold database writes; changes seen meanwhile stay queued."""
        self.queue.pause()
        return {"paused": True, "pending": self.queue.pending()}

    def resume(self) -> dict[str, Any]:
        self.queue.resume()
        self._reconciles.wake()  # a reconcile asked for while paused may start now
        return {"paused": False, "pending": self.queue.pending()}

    def resync(
        self, projects: Sequence[str] | None, *, wait: bool, progress: Progress | None = None
    ) -> dict[str, Any]:
        """Rescan these project folders, or (None) rediscover projects and rescan every one.
        With `progress`, a waiting request is told the pass's progress now and then."""
        if projects is None:
            self.rediscover()
            return self._answer(self._request_reconcile(None, "resync --all"), wait, progress)
        unknown = self.registry.unknown(projects)
        if unknown:
            raise ControlError("not_found", f"no project at {', '.join(unknown)}")
        wanted = {os.path.realpath(p) for p in projects}
        return self._answer(self._request_reconcile(wanted, "resync requested"), wait, progress)

    def reconcile(self, *, wait: bool, progress: Progress | None = None) -> dict[str, Any]:
        return self._answer(self._request_reconcile(None, "reconcile requested"), wait, progress)

    def sync(self, folder: str) -> dict[str, Any]:
        """Sync one session folder now; written (or found unchanged) before the reply."""
        found = self.registry.session_at(folder)
        if found is None:
            raise ControlError("not_found", f"{folder} is not a session folder of any known project")
        key, path = found
        if not os.path.lexists(os.path.normpath(folder)):
            # A hook naming a folder that is not there has the wrong path. Should the session
            # just have been removed, its row is tombstoned the ordinary way.
            self.queue.submit([key])
            raise ControlError("not_found", f"no session folder at {folder}")
        if self.queue.paused:
            self.queue.submit([key])
            raise ControlError("unavailable", "writes are paused; the session will sync on resume")
        try:
            result = self._sync_now(key)
        except Exception as exc:
            if not is_transient(exc):
                raise
            self.queue.submit([key])
            raise ControlError("unavailable", "database unavailable; the session stays queued") from None
        return {
            "project": key.project,
            "slug": key.slug,
            "path": path,
            "written": result.written + result.tombstoned,
            "invalid": result.invalid,
            "unchanged": result.unchanged + result.touched,
        }

    def errors(self) -> dict[str, Any]:
        """Sessions whose state.json is invalid, and why: the first ERRORS_LIMIT, and how many more."""
        try:
            rows = self.store.invalid_sessions()
        except Exception as exc:
            if not is_transient(exc):
                raise
            raise ControlError("unavailable", "database unavailable") from None
        return {
            "errors": [
                {
                    **row,
                    "sync_error": (row["sync_error"] or "")[:300],
                    "sync_error_at": row["sync_error_at"].isoformat() if row["sync_error_at"] else None,
                }
                for row in rows[:ERRORS_LIMIT]
            ],
            "more": max(0, len(rows) - ERRORS_LIMIT),
        }

    def _answer(self, job: ReconcileJob, wait: bool, progress: Progress | None = None) -> dict[str, Any]:
        """The reply to a resync or reconcile: queued, or once `wait`ed for, its summary; while
        waiting, `progress` gets `{"kind": "progress", "seen", "total"}` each time it moved."""
        if not wait:
            return {"queued": True}
        if self.queue.paused:
            raise ControlError("unavailable", "writes are paused; run `sessionsync resume` first")
        deadline = time.monotonic() + WAIT_LIMIT_S
        told = (0, 0)
        every = min(PROGRESS_EVERY_S, self._hooks.progress_every_s) if progress else WAIT_LIMIT_S
        while not job.done.wait(every):
            if progress is not None and job.progress != told:
                told = job.progress
                progress({"kind": "progress", "seen": told[0], "total": told[1]})
            if time.monotonic() >= deadline:
                raise ControlError("unavailable", f"the reconcile did not finish within {WAIT_LIMIT_S:.0f} s")
        if job.summary is None:
            raise ControlError("unavailable", f"the reconcile failed: {job.error}; it will be retried")
        return dict(job.summary.as_dict())

    # -- reload -------------------------------------------------------------------------------

    def _apply_reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_config(self._config_arg, self._env)
        except ConfigError as exc:
            logger.error("configuration reload refused, keeping the running one: {}", exc)
            self.notifier.ready(self.status_line())
            return
        old, self.cfg = self.cfg, new
        setup_logging(new.log.level, new.log.format, new.log.file, self._env, sql=new.log.sql)
        set_level(new.log.level)
        self.debounce.set_timing(
            new.watch.debounce_ms / 1000, new.watch.max_delay_ms / 1000, new.workers.batch_size
        )
        self.workers.set_batch_size(new.workers.batch_size)
        self.schedule.reschedule(
            new.schedule.reconcile_cron, new.schedule.timezone, new.schedule.discover_interval_s
        )
        needs_restart = [
            name
            for name, a, b in (
                ("[database] url", old.database_url(self._env), new.database_url(self._env)),
                ("[database] timeout_s", old.database.timeout_s, new.database.timeout_s),
                ("[workers] threads", old.workers.threads, new.workers.threads),
                ("[control] socket", old.control.socket, new.control.socket),
                ("[metrics]", old.metrics, new.metrics),
            )
            if a != b
        ]
        if needs_restart:
            logger.warning("{} changed: takes effect at the next restart", ", ".join(needs_restart))
        self.rediscover()
        logger.info("configuration reloaded from {}", new.source or "built-in defaults")
        self.notifier.ready(self.status_line())


def run_daemon(cfg: Config, config_arg: str | None, early: EarlySignals | None = None) -> int:
    """`sessionsync run`: set up logging, run until stopped; `config_arg` is reread on SIGHUP.
    `early` holds the signals that came before the service could install its own handlers."""
    setup_logging(cfg.log.level, cfg.log.format, cfg.log.file, sql=cfg.log.sql)
    try:
        return Service(cfg, config_arg).run(early)
    except SessionSyncError:
        raise
    except Exception as exc:
        if is_transient(exc):
            from sessionsync.daemon.errors import DatabaseUnavailable

            raise DatabaseUnavailable(f"database error: {mask_secrets(str(exc))}") from None
        raise


def fit_watch_list(reply: dict[str, Any], max_line: int = MAX_LINE) -> dict[str, Any]:
    """The status reply made to fit one protocol line: with a thousand projects or so the `watch`
    list alone outgrows it. Then live projects are left out from the end of the list, and only
    after them the others, until it fits; `watch_left_out` says how many (`watch_states` still
    counts every project)."""
    # Measured as ASCII JSON: never shorter than the line the server sends.
    size = len(json.dumps({"ok": True, "result": reply}, separators=(",", ":")))
    if size <= max_line:
        return reply
    watch = reply["watch"]
    excess = size - max_line + len(',"watch_left_out":') + len(str(len(watch)))
    dropped: set[int] = set()
    for live_only in (True, False):
        for i in reversed(range(len(watch))):
            if excess <= 0:
                break
            if i not in dropped and (watch[i]["state"] == "live" or not live_only):
                dropped.add(i)
                excess -= len(json.dumps(watch[i], separators=(",", ":"))) + 1
    return {
        **reply,
        "watch": [entry for i, entry in enumerate(watch) if i not in dropped],
        "watch_left_out": len(dropped),
    }

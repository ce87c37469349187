"""The live daemon end to end: `sessionsync run` as a real subprocess on real inotify, SQLite and
PostgreSQL, with real signals. After every change the database must equal the folders
(`converged`, an independent reading of the files) within a few seconds.

Small debounce timings keep the file fast; outages go through a TCP proxy, so they are
PostgreSQL-only. Inotify limits are lowered for the daemon alone (the watcher's seam, or a user
namespace); the variants that lower the machine's sysctl are marked `sysctl`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from watchdog.events import FileClosedNoWriteEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from tests.support.inotify_limits import (
    Sysctl,
    SysctlStandIn,
    stand_in_env,
    user_namespace_prefix,
    user_namespaces_usable,
)
from tests.support.oracle import converged
from tests.support.proxy import TcpProxy, proxied_url, url_target
from tests.support.runner import Daemon
from tests.support.sessions import fixture_doc, remove_session, write_state
from tests.support.snapshot import events, rows
from tests.support.waiting import wait_for

FAST: dict[str, Any] = {"debounce_ms": 50, "max_delay_ms": 500}
SETTLE_S = 5.0


def doc(topic: str, phase: str = "build", status: str = "active") -> dict[str, Any]:
    """A realistic v2 state.json with the fields the convergence check compares."""
    d = fixture_doc("v2-build")
    d.update(topic=topic, current_phase=phase, status=status)
    return d


def settle(url: str, projects: list[Path], timeout: float = SETTLE_S) -> None:
    wait_for(lambda: converged(url, projects), timeout=timeout)


def sessions_dir(project: Path) -> Path:
    return project / "agents" / "sessions"


def burst(project: Path, writes: range, sessions: int = 30) -> None:
    """Rewrite `sessions` sessions round-robin, as fast as possible, the way agents do."""
    for i in writes:
        write_state(
            project, f"b{i % sessions:02d}", doc(f"round {i // sessions}", phase=("plan", "build")[i % 2])
        )


# -- single changes ----------------------------------------------------------------------------


def test_created_sessions_are_mirrored(db_url: str, tmp_path: Path, project: Path) -> None:
    with Daemon(tmp_path, db_url, projects=[project], **FAST) as daemon:
        daemon.wait_started()
        write_state(project, "s1", doc("first"))
        write_state(project, "legacy", fixture_doc("v1-build"))
        write_state(project, "broken", b'{"topic": ')
        settle(db_url, [project])
        by_slug = {e["slug"]: e["kind"] for e in events(db_url) if e["kind"] in ("created", "invalid")}
        assert by_slug == {"s1": "created", "legacy": "created", "broken": "invalid"}


def _in_place(project: Path) -> None:
    write_state(project, "s1", doc("rewritten", phase="docs", status="complete"), atomic=False)


def _atomic(project: Path) -> None:
    write_state(project, "s1", doc("replaced", phase="plan", status="failed"))


def _delete_state(project: Path) -> None:
    (sessions_dir(project) / "s1" / "state.json").unlink()


def _delete_folder(project: Path) -> None:
    remove_session(project, "s1")


def _rename_folder(project: Path) -> None:
    os.rename(sessions_dir(project) / "s1", sessions_dir(project) / "s1-renamed")


@pytest.mark.parametrize(
    "change",
    [_in_place, _atomic, _delete_state, _delete_folder, _rename_folder],
    ids=["in-place-write", "atomic-replace", "delete-state-json", "delete-folder", "rename-folder"],
)
def test_change_to_a_mirrored_session_converges(
    db_url: str, tmp_path: Path, project: Path, change: Callable[[Path], None]
) -> None:
    write_state(project, "s1", doc("original"))
    write_state(project, "s2", doc("bystander"))
    with Daemon(tmp_path, db_url, projects=[project], **FAST) as daemon:
        daemon.wait_started()
        settle(db_url, [project])  # by the start-up reconcile
        change(project)
        settle(db_url, [project])
        s1 = rows(db_url)[(str(project), "s1")]
        gone = not (sessions_dir(project) / "s1" / "state.json").exists()
        assert (s1["deleted_at"] is not None) == gone
        assert daemon.stop() == 0


def test_slow_write_ends_valid(db_url: str, tmp_path: Path, project: Path) -> None:
    write_state(project, "old", doc("before"))
    with Daemon(tmp_path, db_url, projects=[project], **FAST) as daemon:
        daemon.wait_started()
        settle(db_url, [project])
        # An existing session rewritten in place and a new one created, both slowly: the new one
        # is seen half-written (created, then invalid) and must end valid like the other.
        payloads = {
            "old": json.dumps(doc("after", phase="docs")).encode(),
            "new": json.dumps(doc("brand new", phase="spec")).encode(),
        }
        (sessions_dir(project) / "new").mkdir()
        files = {slug: (sessions_dir(project) / slug / "state.json").open("wb") for slug in payloads}
        try:
            for slug, f in files.items():
                f.write(payloads[slug][: len(payloads[slug]) // 2])
                f.flush()
            time.sleep(0.3)  # the writer pausing mid-file is the scenario, not a wait for a condition
            for slug, f in files.items():
                f.write(payloads[slug][len(payloads[slug]) // 2 :])
        finally:
            for f in files.values():
                f.close()
        settle(db_url, [project])


class ReadSpy(FileSystemEventHandler):
    """Sees the daemon read a state.json: an inotify close-without-write on it by another process
    (this test only writes it). Lets a test act right after a leading-edge read, without timing."""

    def __init__(self, path: Path) -> None:
        self.path = os.fspath(path)
        self.read = threading.Event()
        self._observer = Observer()
        self._observer.schedule(self, os.path.dirname(self.path))

    def on_closed_no_write(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileClosedNoWriteEvent) and os.fsdecode(event.src_path) == self.path:
            self.read.set()

    def __enter__(self) -> ReadSpy:
        self._observer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._observer.stop()
        self._observer.join()


@pytest.mark.parametrize("existing", [False, True], ids=["new-session", "mirrored-session"])
def test_half_written_in_place_file_is_not_recorded_invalid(
    db_url: str, tmp_path: Path, project: Path, existing: bool
) -> None:
    """An in-place writer that writes half the file, closes it, then writes the rest and closes it
    again: the first close's leading-edge sync reads half a document. It must not be recorded
    invalid (no `invalid` / `recovered` events, no warning), and the row must end with the final
    content. The quiet period (the settle time) is 1 s so that a loaded machine cannot stretch the
    writer's own gap between its two closes past it."""
    folder = sessions_dir(project) / "half"
    if existing:
        write_state(project, "half", doc("before"))
    else:
        folder.mkdir(parents=True)
    final = json.dumps(doc("after", phase="docs", status="complete")).encode()
    with Daemon(tmp_path, db_url, projects=[project], debounce_ms=1000, max_delay_ms=2000) as daemon:
        daemon.wait_started()
        settle(db_url, [project])
        with ReadSpy(folder / "state.json") as spy:
            with (folder / "state.json").open("wb") as f:
                f.write(final[: len(final) // 2])
            assert spy.read.wait(5), "the daemon never read the half-written file"
            with (folder / "state.json").open("ab") as f:
                f.write(final[len(final) // 2 :])
        settle(db_url, [project])
        assert rows(db_url)[(str(project), "half")]["title"] == "after"
        kinds = [e["kind"] for e in events(db_url) if e["slug"] == "half"]
        assert "invalid" not in kinds and "recovered" not in kinds, kinds
        assert "state.json is invalid" not in daemon.log()
        assert daemon.stop() == 0


def test_half_written_file_that_stays_broken_is_recorded_invalid(
    db_url: str, tmp_path: Path, project: Path
) -> None:
    """The other side of the settle time: a file left half-written is recorded invalid once it
    has been still for the quiet period, exactly once, keeping the last good mirror."""
    write_state(project, "stuck", doc("good"))
    with Daemon(tmp_path, db_url, projects=[project], **FAST) as daemon:
        daemon.wait_started()
        settle(db_url, [project])
        (sessions_dir(project) / "stuck" / "state.json").write_bytes(b'{"topic": "cut sh')
        settle(db_url, [project])  # the oracle wants the row marked invalid, with a sync_error
        row = rows(db_url)[(str(project), "stuck")]
        assert row["title"] == "good"
        assert [e["kind"] for e in events(db_url) if e["slug"] == "stuck"].count("invalid") == 1


# -- volume -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_burst_converges(db_url: str, tmp_path: Path, project: Path) -> None:
    with Daemon(tmp_path, db_url, projects=[project], **FAST) as daemon:
        daemon.wait_started()
        burst(project, range(300))
        write_state(project, "b00", b"{not json")  # ends invalid
        remove_session(project, "b29")  # ends gone
        settle(db_url, [project], timeout=15)
        assert daemon.stop() == 0


@pytest.mark.timeout(60)
def test_kill_9_mid_burst_then_restart_converges(db_url: str, tmp_path: Path, project: Path) -> None:
    with Daemon(tmp_path, db_url, projects=[project], **FAST) as daemon:
        daemon.wait_started()
        burst(project, range(150))
        assert daemon.kill() == -signal.SIGKILL
        # While it is down: more writes, a deletion, a rename. Only the start-up reconcile sees them.
        burst(project, range(150, 300))
        remove_session(project, "b03")
        os.rename(sessions_dir(project) / "b04", sessions_dir(project) / "b04-moved")
        daemon.start()
        daemon.wait_ready()
        settle(db_url, [project], timeout=15)
        assert daemon.stop() == 0


def test_new_project_under_a_root_is_discovered(db_url: str, tmp_path: Path) -> None:
    root = (tmp_path / "code").resolve()
    alpha = root / "alpha"
    write_state(alpha, "s1", doc("in alpha"))
    with Daemon(tmp_path, db_url, roots=[root], discover_interval_s=1, **FAST) as daemon:
        daemon.wait_started()
        settle(db_url, [alpha])
        beta = root / "team" / "beta"
        write_state(beta, "s1", doc("in beta"))
        write_state(beta, "s2", doc("also in beta"))
        settle(db_url, [alpha, beta])
        assert daemon.status()["projects"] == 2
        # Now live-watched like the first: a later change needs no discovery round.
        write_state(beta, "s1", doc("in beta, changed"))
        settle(db_url, [alpha, beta])


# -- outages and lifecycle ----------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.timeout(60)
def test_database_outage_logs_once_and_converges_after(pg_url: str, tmp_path: Path, project: Path) -> None:
    for slug in ("s1", "s2", "s3"):
        write_state(project, slug, doc(slug))
    host, port = url_target(pg_url)
    with TcpProxy(host, port) as proxy:
        daemon_url = proxied_url(pg_url, proxy.host, proxy.port)
        with Daemon(tmp_path, daemon_url, projects=[project], **FAST) as daemon:
            daemon.wait_started()
            settle(pg_url, [project])
            proxy.cut()
            write_state(project, "s1", doc("changed during the outage", phase="docs"))
            write_state(project, "s4", doc("created during the outage"))
            remove_session(project, "s2")
            # Several failed attempts, so that one log line per retry would show.
            wait_for(lambda: daemon.status()["counters"]["batch_failures"] >= 3, timeout=15)
            assert not daemon.status()["database_ok"]
            assert daemon.log_count("database unavailable") == 1
            proxy.restore()
            settle(pg_url, [project], timeout=15)
            wait_for(lambda: daemon.log_count("database back"), timeout=5)
            assert daemon.status()["database_ok"]
            assert daemon.log_count("database unavailable") == 1
            assert daemon.log_count("database back") == 1
            assert daemon.stop() == 0


def test_sigterm_drains_pending_work_and_exits_0(db_url: str, tmp_path: Path, project: Path) -> None:
    # A long quiet period: the changes are still in the debouncer when SIGTERM comes. The folders
    # are there before, so that a session's first event is its state.json's.
    for i in range(5):
        (sessions_dir(project) / f"s{i}").mkdir()
    with Daemon(tmp_path, db_url, projects=[project], debounce_ms=20_000, max_delay_ms=30_000) as daemon:
        daemon.wait_started()
        # Each session's first write is mirrored at once (the leading edge); rewritten within the
        # quiet period, it waits on the trailing edge.
        for i in range(5):
            write_state(project, f"s{i}", doc(f"first {i}"))
        settle(db_url, [project])
        assert daemon.wait_idle()
        for i in range(5):
            write_state(project, f"s{i}", doc(f"pending {i}"))
        wait_for(lambda: daemon.status()["pending"] >= 5, timeout=SETTLE_S)
        assert not converged(db_url, [project])
        assert daemon.stop() == 0
        assert converged(db_url, [project])
        log = daemon.log()
        assert "stopping: draining 5 pending session(s)" in log
        assert re.search(r"sessionsync stopped after \d+ s: \d+ batch\(es\), 10 row\(s\) written", log)
        assert "not written" not in log


def test_second_daemon_on_the_same_config_exits_1_naming_the_first(
    db_url: str, tmp_path: Path, project: Path
) -> None:
    with Daemon(tmp_path, db_url, projects=[project], **FAST) as daemon:
        daemon.wait_ready()
        second = daemon.cli("run", timeout=30)
        assert second.returncode == 1, second.stdout
        assert f"pid {daemon.pid}" in second.stdout
        # The first one is unharmed: its socket still answers and it still mirrors.
        assert daemon.request({"cmd": "ping"})["pid"] == daemon.pid
        write_state(project, "s1", doc("still mirrored"))
        settle(db_url, [project])
        assert daemon.stop() == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("queue", ["seam", pytest.param("sysctl", marks=pytest.mark.sysctl)])
def test_inotify_overflow_resyncs_and_converges(tmp_path: Path, project: Path, queue: str) -> None:
    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    write_state(project, "s0", doc("before the overflow"))
    # The queue limit is read when an inotify instance is created: lowered for the daemon's
    # start only, put back as soon as its watch is live.
    stand_ins = tmp_path / "inotify-sysctl"
    knob: Sysctl | SysctlStandIn = (
        SysctlStandIn(stand_ins, "fs.inotify.max_queued_events")
        if queue == "seam"
        else Sysctl("fs.inotify.max_queued_events")
    )
    with knob as queue_limit:
        queue_limit.set("16")
        with Daemon(tmp_path, url, projects=[project], env=stand_in_env(stand_ins), **FAST) as daemon:
            daemon.wait_ready()
            wait_for(lambda: daemon.status()["watch"] == [{"project": str(project), "state": "live"}])
            queue_limit.restore()
            daemon.wait_started()
            settle(url, [project])
            # Frozen, the daemon reads nothing: far more than 16 events pile up in the kernel queue.
            os.kill(daemon.pid, signal.SIGSTOP)
            try:
                for i in range(40):
                    write_state(project, f"o{i:02d}", doc(f"overflow {i}"))
                write_state(project, "s0", doc("after the overflow", phase="docs"))
            finally:
                os.kill(daemon.pid, signal.SIGCONT)
            settle(url, [project], timeout=10)
            wait_for(lambda: daemon.log_count("(inotify queue overflowed)"), timeout=5)  # the resync
            assert daemon.log_count("inotify queue overflowed, events were lost") >= 1
            idle = wait_for(lambda: (s := daemon.status())["pending"] == 0 and s["in_flight"] == 0 and s)
            overflows, batches = idle["counters"]["overflows"], idle["counters"]["batches"]
            assert overflows >= 1
            # Watching again, and the recovery does not feed itself: one more change reaches a
            # worker (only the watcher hands them keys) and no overflow follows.
            write_state(project, "s0", doc("after the recovery", phase="plan"))
            settle(url, [project])
            wait_for(lambda: daemon.status()["counters"]["batches"] > batches, timeout=SETTLE_S)
            assert daemon.status()["counters"]["overflows"] == overflows
            assert daemon.stop() == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("limit", ["seam", "user-namespace"])
def test_a_project_without_a_watch_is_scanned_and_only_a_scan_that_found_something_logs(
    tmp_path: Path, limit: str
) -> None:
    watched, unwatched = tmp_path / "watched", tmp_path / "unwatched"
    for project in (watched, unwatched):
        write_state(project, "s0", doc("before start"))
    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    scan_s = 0.2
    # Watches for one project (its agents/ folder, its sessions folder and its one session), counted
    # for the daemon alone: by the seam, or by the kernel in a user namespace of its own. The limit
    # stays for the whole test, so the other project stays unwatched; it changes nothing outside.
    env = {"SESSIONSYNC_TEST_FALLBACK_SCAN_S": str(scan_s)}
    prefix: list[str] = []
    if limit == "seam":
        stand_ins = tmp_path / "inotify-sysctl"
        SysctlStandIn(stand_ins, "fs.inotify.max_user_watches").set("3")
        env |= stand_in_env(stand_ins)
    else:
        why_not = user_namespaces_usable()
        if why_not:
            pytest.skip(why_not)
        prefix = user_namespace_prefix(3)
    with Daemon(
        tmp_path, url, projects=[watched, unwatched], env=env, command_prefix=prefix, **FAST
    ) as daemon:
        daemon.wait_ready()
        wait_for(lambda: "fallback" in {w["state"] for w in daemon.status()["watch"]})
        assert sorted(w["state"] for w in daemon.status()["watch"]) == ["fallback", "live"]
        assert daemon.log_count("sudo sysctl fs.inotify.max_user_watches=") == 1
        daemon.wait_started()
        settle(url, [watched, unwatched])
        # Scans that find nothing come and go without a line at INFO. (A scan may have run before
        # the start-up reconcile and mirrored s0: that one found something, and said so.)
        scans_logged = daemon.log_count("(periodic scan (no inotify watch))")
        first = daemon.status()["counters"]["resyncs"]
        wait_for(lambda: daemon.status()["counters"]["resyncs"] >= first + 5, timeout=10)
        assert daemon.log_count("(periodic scan (no inotify watch))") == scans_logged
        # The project without a watch still follows its files, and that scan is logged.
        fallback = next(Path(w["project"]) for w in daemon.status()["watch"] if w["state"] == "fallback")
        write_state(fallback, "s1", doc("seen by a scan"))
        settle(url, [watched, unwatched])
        wait_for(
            lambda: daemon.log_count("(periodic scan (no inotify watch))") == scans_logged + 1, timeout=5
        )
        assert daemon.stop() == 0

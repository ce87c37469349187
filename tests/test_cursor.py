"""The gap-free event cursor: durable event ids (migration 0004), the hub's id-ordered release,
`subscribe` with `since` against the real daemon while writers run, resuming after a lag, and
`watch` resuming across a daemon restart. SQLite and PostgreSQL alike."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from sqlalchemy import Engine, delete, func, select

from sessionsync.daemon.control.client import open_stream
from sessionsync.daemon.db import make_engine
from sessionsync.daemon.hub import EventHub
from sessionsync.daemon.migrate import alembic_config, upgrade
from sessionsync.models.migrations import HEAD
from sessionsync.models.tables import projects, session_events, sessions
from tests.support.databases import libpq_url
from tests.support.runner import SESSIONSYNC, Daemon
from tests.support.sessions import fixture_doc, write_state
from tests.support.waiting import wait_for


def doc(phase: str = "build", status: str = "active", n: int = 0) -> dict[str, Any]:
    content = fixture_doc("v2-build")
    content.update(current_phase=phase, status=status, topic=f"rev {n}")
    return content


def committed(url: str, after: int = 0) -> list[tuple[int, str, str]]:
    """(id, stream kind, slug) of every session_events row after `after`, in id order."""
    engine = make_engine(url)
    try:
        query = (
            select(session_events.c.id, session_events.c.kind, sessions.c.slug)
            .join(sessions)
            .where(session_events.c.id > after)
            .order_by(session_events.c.id)
        )
        with engine.connect() as conn:
            return [(i, f"session.{k}", s) for i, k, s in conn.execute(query)]
    finally:
        engine.dispose()


class Follower:
    """A subscriber in a thread of its own, collecting what the daemon streams."""

    def __init__(self, daemon: Daemon, **request: Any) -> None:
        self.events: list[dict[str, Any]] = []
        # Subscribed before the constructor returns.
        self.reply, self._stream = open_stream(daemon.socket_path, {"cmd": "subscribe", **request})
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for event in self._stream:
            self.events.append(event)

    def session_events(self) -> list[tuple[int, str, str]]:
        return [(e["id"], e["kind"], e["slug"]) for e in list(self.events) if "id" in e]

    def ended(self) -> bool:
        return not self._thread.is_alive()


# -- migration 0004 ----------------------------------------------------------------------------------


def _add_event(engine: Engine) -> int:
    with engine.begin() as conn:
        session_id = conn.execute(select(sessions.c.id)).scalar_one()
        return int(
            conn.execute(
                session_events.insert()
                .values(session_id=session_id, at=func.now(), kind="updated")
                .returning(session_events.c.id)
            ).scalar_one()
        )


def _purge_newest(engine: Engine, event_id: int) -> None:
    with engine.begin() as conn:
        conn.execute(delete(session_events).where(session_events.c.id == event_id))


def _migrate(engine: Engine, direction: str, revision: str) -> None:
    cfg = alembic_config()
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, direction)(cfg, revision)
        conn.commit()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    upgrade(engine)
    with engine.begin() as conn:
        project_id = conn.execute(
            projects.insert()
            .values(
                host="h", working_dir="/p", name="p", sessions_dir="/p/agents/sessions", created_at=func.now()
            )
            .returning(projects.c.id)
        ).scalar_one()
        conn.execute(
            sessions.insert().values(
                project_id=project_id, slug="s", first_seen_at=func.now(), synced_at=func.now()
            )
        )
    yield engine
    engine.dispose()


def test_event_ids_are_never_reused_after_the_newest_are_purged(engine: Engine) -> None:
    _add_event(engine)
    newest = _add_event(engine)
    _purge_newest(engine, newest)
    assert _add_event(engine) > newest


def test_migration_0004_round_trips_keeping_the_events(engine: Engine) -> None:
    kept = _add_event(engine)
    _migrate(engine, "downgrade", "0003")
    newest = _add_event(engine)
    _purge_newest(engine, newest)
    reused = _add_event(engine)
    if engine.dialect.name == "sqlite":
        assert reused == newest  # what 0004 prevents: max(id) + 1 again
    assert upgrade(engine) == ("0003", HEAD)
    with engine.connect() as conn:
        assert list(conn.execute(select(session_events.c.id).order_by(session_events.c.id)).scalars()) == [
            kept,
            reused,
        ]
    _purge_newest(engine, reused)
    assert _add_event(engine) > reused


# -- the hub's release order -------------------------------------------------------------------------


def _ev(event_id: int) -> dict[str, Any]:
    return {"id": event_id, "kind": "session.updated", "project": "/p", "slug": f"s{event_id}"}


def _drained(hub_sub: Any) -> list[int]:
    got = []
    while (event := hub_sub.get(timeout=0)) is not None:
        got.append(event["id"])
    return got


def test_an_id_committed_early_waits_for_the_lower_ids_in_flight() -> None:
    hub = EventHub()
    hub.resume_after(9)
    sub = hub.subscribe()
    slow, fast = hub.ticket(), hub.ticket()
    slow.known([10])
    fast.known([11, 12])
    fast.committed([_ev(11), _ev(12)])
    assert _drained(sub) == []  # 10 may still commit
    assert hub.released == 9
    slow.committed([_ev(10)])
    assert _drained(sub) == [10, 11, 12]
    assert (hub.released, sub.last_id) == (12, 12)


def test_a_ticket_whose_ids_are_unknown_holds_back_ids_learnt_after_it() -> None:
    hub = EventHub()
    sub = hub.subscribe()
    earlier = hub.ticket()
    earlier.known([1])
    pipelined = hub.ticket()  # its INSERT is on its way: its ids may be below anything learnt now
    later = hub.ticket()
    later.known([2])
    earlier.committed([_ev(1)])
    later.committed([_ev(2)])
    assert _drained(sub) == [1]
    pipelined.known([3])
    pipelined.committed([_ev(3)])
    assert _drained(sub) == [2, 3]


def test_a_rolled_back_ticket_lets_the_others_through_and_an_uncertain_one_drops_subscribers() -> None:
    hub = EventHub()
    sub = hub.subscribe()
    lost, kept = hub.ticket(), hub.ticket()
    lost.known([1])
    kept.known([2])
    kept.committed([_ev(2)])
    lost.rolled_back()
    assert _drained(sub) == [2]
    unsure = hub.ticket()
    unsure.known([3])
    unsure.uncertain()
    assert sub.lagged and sub.last_id == 2
    assert hub.subscriber_count() == 0


def test_a_restart_drops_subscribers_to_id_0_and_releases_nothing_of_the_old_file() -> None:
    hub = EventHub()
    hub.resume_after(40)
    sub = hub.subscribe()
    old = hub.ticket()
    old.known([41])
    hub.restart(0)  # the file was deleted: the new one's ids start at 1
    assert sub.lagged and sub.last_id == 0
    after = hub.subscribe()
    old.committed([_ev(41)])  # a transaction on the gone file ends late
    new = hub.ticket()
    new.known([1])
    new.committed([_ev(1)])
    assert _drained(after) == [1]
    assert hub.released == 1


def test_filters_apply_before_the_buffer() -> None:
    hub = EventHub()
    sub = hub.subscribe(maxsize=1, accept=lambda e: e["slug"] == "s2")
    ticket = hub.ticket()
    ticket.known([1, 2, 3])
    ticket.committed([_ev(1), _ev(2), _ev(3)])
    assert (_drained(sub), sub.lagged) == ([2], False)


# -- the daemon: since, writers, lag ------------------------------------------------------------------


def _writers(project: Path, stop: threading.Event, count: int = 5) -> list[threading.Thread]:
    phases = ("spec", "plan", "build", "docs")

    def write(w: int) -> None:
        n = 0
        while not stop.is_set():
            for s in range(3):
                write_state(project, f"w{w}-s{s}", doc(phases[n % 4], n=n))
            n += 1
            stop.wait(0.01)

    threads = [threading.Thread(target=write, args=(w,), daemon=True) for w in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_joining_with_since_while_five_writers_run_sees_every_event_once_in_order(
    db_url: str, tmp_path: Path, project: Path
) -> None:
    with Daemon(tmp_path, db_url, projects=[project], debounce_ms=10, max_delay_ms=50, threads=4) as daemon:
        daemon.wait_started()
        stop = threading.Event()
        threads = _writers(project, stop)
        wait_for(lambda: len(committed(db_url)) >= 60, timeout=20)
        since = committed(db_url)[20][0]
        follower = Follower(daemon, since=since)
        wait_for(lambda: len(committed(db_url, since)) >= 150, timeout=30)
        stop.set()
        for thread in threads:
            thread.join()
        assert daemon.wait_idle()
        expected = committed(db_url, since)
        wait_for(lambda: len(follower.session_events()) >= len(expected), timeout=15)
        assert follower.session_events() == expected
        assert daemon.stop() == 0


def test_a_subscriber_dropped_for_lag_resumes_from_its_last_id_missing_nothing(
    db_url: str, tmp_path: Path, project: Path
) -> None:
    env = {"SESSIONSYNC_TEST_SUBSCRIBER_QUEUE": "2"}
    with Daemon(tmp_path, db_url, projects=[project], env=env) as daemon:
        daemon.wait_started()
        follower = Follower(daemon)
        write_state(project, "first", doc("spec"))
        wait_for(follower.session_events, timeout=10)
        ((seen, _, _),) = follower.session_events()
        # Held while paused, the six are written in one batch: six events at once overflow the
        # queue of two, whatever the timing.
        daemon.request({"cmd": "pause"})
        for n in range(6):
            write_state(project, f"burst-{n}", doc("plan"))
        wait_for(lambda: daemon.status()["pending"] >= 6, timeout=10)
        daemon.request({"cmd": "resume"})
        wait_for(follower.ended, timeout=10)
        assert follower.events[-1] == {"kind": "lagged", "last_id": seen}
        resumed = Follower(daemon, since=seen)
        expected = committed(db_url, seen)
        assert [slug for _, _, slug in expected] == [f"burst-{n}" for n in range(6)]
        wait_for(lambda: len(resumed.session_events()) >= 6, timeout=10)
        assert resumed.session_events() == expected
        assert daemon.stop() == 0


def test_filters_by_kind_and_project_in_replay_and_live(db_url: str, tmp_path: Path, project: Path) -> None:
    other = tmp_path / "other"
    (other / "agents/sessions").mkdir(parents=True)
    with Daemon(tmp_path, db_url, projects=[project, other]) as daemon:
        daemon.wait_started()
        live = Follower(daemon)
        write_state(project, "a", doc("spec"))
        write_state(other, "b", doc("spec"))
        wait_for(lambda: len(committed(db_url)) == 2, timeout=10)
        write_state(project, "a", doc("plan"))
        wait_for(lambda: len(committed(db_url)) == 3, timeout=10)
        follower = Follower(daemon, since=0, kinds=["session.created"], projects=[str(project)])
        write_state(project, "c", doc("spec"))
        write_state(other, "d", doc("spec"))
        wait_for(lambda: len(committed(db_url)) == 5, timeout=10)
        wait_for(lambda: len(follower.session_events()) >= 2, timeout=10)
        assert [(k, s) for _, k, s in follower.session_events()] == [
            ("session.created", "a"),
            ("session.created", "c"),
        ]
        # A replayed event is the live one, field for field.
        wait_for(lambda: len(live.session_events()) == 5, timeout=10)
        assert follower.events[0] == next(e for e in live.events if e.get("id") == follower.events[0]["id"])
        assert daemon.stop() == 0


@pytest.mark.postgres
def test_postgres_notify_payloads_carry_the_row_id(pg_url: str, tmp_path: Path, project: Path) -> None:
    with Daemon(tmp_path, pg_url, projects=[project]) as daemon:
        daemon.wait_started()
        with psycopg.connect(libpq_url(pg_url), autocommit=True) as conn:
            conn.execute("LISTEN sessionsync")
            write_state(project, "n", doc("spec"))
            payloads = []
            for note in conn.notifies(timeout=10):
                payloads.append(json.loads(note.payload))
                if any(p.get("project") == str(project) for p in payloads):
                    break
        mine = [p for p in payloads if p.get("project") == str(project)]
        assert [(p["id"], p["kind"], p["slug"]) for p in mine] == committed(pg_url)
        assert daemon.stop() == 0


# -- watch: like journalctl -f ------------------------------------------------------------------------


class Watch:
    """`sessionsync watch --json` in a subprocess, its lines collected by a thread."""

    def __init__(self, daemon: Daemon, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(SESSIONSYNC), "watch", "--json", *args, "--config", str(daemon.config_path)],
            env=daemon.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def session_events(self) -> list[tuple[int, str, str]]:
        return [(e["id"], e["kind"], e["slug"]) for e in list(self.events) if "id" in e]

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=10)
        self._thread.join(timeout=10)
        return err


def test_watch_resumes_across_a_daemon_restart(db_url: str, tmp_path: Path, project: Path) -> None:
    with Daemon(tmp_path, db_url, projects=[project]) as daemon:
        daemon.wait_started()
        write_state(project, "before", doc("spec"))
        wait_for(lambda: len(committed(db_url)) == 1, timeout=10)
        watch = Watch(daemon, "--since", "0")
        try:
            wait_for(lambda: watch.session_events() == committed(db_url), timeout=10)
            assert daemon.stop() == 0
            # Written while no daemon runs: the start-up reconcile commits it before watch is back.
            write_state(project, "meanwhile", doc("plan"))
            daemon.start()
            daemon.wait_started()
            write_state(project, "after", doc("build"))
            wait_for(
                lambda: [s for _, _, s in committed(db_url)] == ["before", "meanwhile", "after"], timeout=10
            )
            wait_for(lambda: len(watch.session_events()) >= 3, timeout=15)
            assert watch.session_events() == committed(db_url)
            assert watch.proc.poll() is None  # still following
        finally:
            err = watch.stop()
        assert "waiting to resume after id 1" in err
        assert daemon.stop() == 0


def test_watch_with_no_daemon_says_so_and_exits_1(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, f"sqlite:///{tmp_path / 'none.db'}")
    out = daemon.cli("watch", "--since", "3")
    assert out.returncode == 1
    assert "the sessionsync daemon is not running" in out.stdout


def test_a_deleted_sqlite_file_sends_subscribers_back_to_id_0_of_the_new_one(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    for n in range(3):
        write_state(project, f"s{n}", doc(n=n))
    database = tmp_path / "sessions.db"
    url = f"sqlite:///{database}"
    with Daemon(tmp_path, url, projects=[project], debounce_ms=50) as daemon:
        daemon.wait_started()
        before = Follower(daemon, since=0)
        wait_for(lambda: len(before.session_events()) == 3)
        assert before.session_events()[-1][0] == 3
        for suffix in ("", "-wal", "-shm"):
            Path(f"{database}{suffix}").unlink(missing_ok=True)
        write_state(project, "after", doc(n=9))
        wait_for(before.ended, timeout=15)
        assert before.events[-1] == {"kind": "lagged", "last_id": 0}  # its ids name a file that is gone
        wait_for(lambda: len(committed(url)) >= 4, timeout=15)
        again = Follower(daemon, since=0)  # as the lagged line says
        wait_for(lambda: {slug for _, _, slug in again.session_events()} == {"s0", "s1", "s2", "after"})
        assert [event_id for event_id, _, _ in again.session_events()][:4] == [1, 2, 3, 4]
        assert daemon.stop() == 0

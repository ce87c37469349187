"""The schedule: cron arithmetic across zones and DST days, the misfire catch-up rule, and what
the real daemon does with them (the overdue reconcile at start-up, the purge of old tombstones).

The time logic is pure, so no test waits for a night; the daemon tests move
`last_reconciled_at` and `deleted_at` back in the database instead of moving the clock forward.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import create_engine, update
from sqlalchemy.pool import NullPool

from sessionsync.daemon import cli
from sessionsync.daemon.errors import EXIT_USAGE
from sessionsync.daemon.scheduler import Schedule, is_overdue, next_run
from sessionsync.models.tables import projects, sessions
from tests.support.runner import Daemon
from tests.support.sessions import remove_session, write_state
from tests.support.snapshot import events, rows
from tests.support.waiting import wait_for

PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")
TOKYO = ZoneInfo("Asia/Tokyo")
NIGHTLY = "0 3 * * *"


def doc(topic: str) -> dict[str, object]:
    return {"session_id": topic, "topic": topic, "phase_history": [], "status": "active"}


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


# -- next_run -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "tz", "after", "expected"),
    [
        pytest.param(NIGHTLY, UTC, utc(2024, 5, 1, 12), utc(2024, 5, 2, 3), id="nightly"),
        pytest.param(NIGHTLY, UTC, utc(2024, 5, 1, 3), utc(2024, 5, 2, 3), id="strictly-after"),
        pytest.param("*/15 * * * *", UTC, utc(2024, 5, 1, 10, 7), utc(2024, 5, 1, 10, 15), id="step"),
        # 2024-03-10, New York springs forward at 02:00: 03:00 that day is EDT (UTC-4), not EST.
        pytest.param(
            NIGHTLY, NEW_YORK, datetime(2024, 3, 9, 12, tzinfo=NEW_YORK), utc(2024, 3, 10, 7), id="dst-spring"
        ),
        # 2024-10-27, Paris falls back at 03:00 CEST: 03:00 that day is CET (UTC+1), once.
        pytest.param(
            NIGHTLY, PARIS, datetime(2024, 10, 26, 12, tzinfo=PARIS), utc(2024, 10, 27, 2), id="dst-fall"
        ),
        pytest.param(
            "0 0 1 * *", TOKYO, datetime(2024, 1, 15, tzinfo=TOKYO), utc(2024, 1, 31, 15), id="monthly-tokyo"
        ),
        # crontab counts weekdays from Sunday (0 or 7): 2024-05-03 is a Friday.
        pytest.param("0 9 * * 1-5", UTC, utc(2024, 5, 3, 10), utc(2024, 5, 6, 9), id="weekdays"),
        pytest.param("0 3 * * 0", UTC, utc(2024, 5, 1), utc(2024, 5, 5, 3), id="sunday-0"),
        pytest.param("0 3 * * 7", UTC, utc(2024, 5, 1), utc(2024, 5, 5, 3), id="sunday-7"),
        pytest.param("0 3 * * sat", UTC, utc(2024, 5, 1), utc(2024, 5, 4, 3), id="day-name"),
    ],
)
def test_next_run(expr: str, tz: ZoneInfo, after: datetime, expected: datetime) -> None:
    assert next_run(expr, tz, after) == expected


def test_nightly_runs_once_a_day_at_three_local_all_year_across_both_dst_changes() -> None:
    runs = [next_run(NIGHTLY, PARIS, datetime(2023, 12, 31, 12, tzinfo=PARIS))]
    while runs[-1].year == 2024:
        runs.append(next_run(NIGHTLY, PARIS, runs[-1]))
    runs.pop()  # 2025-01-01
    assert len(runs) == 366
    assert {(run.astimezone(PARIS).hour, run.astimezone(PARIS).minute) for run in runs} == {(3, 0)}
    assert len({run.astimezone(PARIS).date() for run in runs}) == 366


def test_a_run_in_the_hour_skipped_by_dst_still_happens_that_day() -> None:
    # 2024-03-31, Paris jumps from 02:00 to 03:00: there is no 02:30 that night.
    run = next_run("30 2 * * *", PARIS, datetime(2024, 3, 30, 12, tzinfo=PARIS))
    assert run.astimezone(PARIS).date() == datetime(2024, 3, 31).date()
    following = next_run("30 2 * * *", PARIS, run)
    assert following.astimezone(PARIS).replace(tzinfo=None) == datetime(2024, 4, 1, 2, 30)


# -- is_overdue (the misfire catch-up) ------------------------------------------------------------


def test_never_reconciled_is_overdue() -> None:
    assert is_overdue(NIGHTLY, PARIS, None, datetime(2024, 5, 1, 12, tzinfo=PARIS))


def test_asleep_through_the_nightly_run_is_overdue() -> None:
    last = datetime(2024, 5, 1, 3, 0, 4, tzinfo=PARIS)  # yesterday's nightly reconcile
    lid_opened = datetime(2024, 5, 2, 8, 30, tzinfo=PARIS)  # the laptop slept through 03:00
    assert is_overdue(NIGHTLY, PARIS, last, lid_opened)


def test_reconciled_since_the_last_scheduled_run_is_not_overdue() -> None:
    last = datetime(2024, 5, 2, 3, 0, 4, tzinfo=PARIS)
    assert not is_overdue(NIGHTLY, PARIS, last, datetime(2024, 5, 2, 23, 59, tzinfo=PARIS))


def test_overdue_from_the_scheduled_instant_on() -> None:
    last = datetime(2024, 5, 1, 15, tzinfo=PARIS)
    due = datetime(2024, 5, 2, 3, tzinfo=PARIS)
    assert not is_overdue(NIGHTLY, PARIS, last, due - timedelta(seconds=1))
    assert is_overdue(NIGHTLY, PARIS, last, due)


def test_the_database_time_in_utc_compares_with_a_local_now() -> None:
    """The store returns UTC; the daemon's now is in the schedule's zone."""
    last = utc(2024, 5, 2, 1, 0, 4)  # 03:00:04 in Paris (CEST)
    assert not is_overdue(NIGHTLY, PARIS, last, datetime(2024, 5, 2, 20, tzinfo=PARIS))
    assert is_overdue(NIGHTLY, PARIS, last - timedelta(minutes=1), datetime(2024, 5, 2, 20, tzinfo=PARIS))


# -- configuration --------------------------------------------------------------------------------


def test_an_invalid_cron_is_a_config_error_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "sessionsync.toml"
    config.write_text('[schedule]\nreconcile_cron = "0 3 * * 8"\n')
    assert cli.run(["check-config", "--config", str(config)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "[schedule] reconcile_cron = '0 3 * * 8'" in err
    assert "day of week 8 is above the maximum value (7)" in err


# -- the real daemon ------------------------------------------------------------------------------


def set_last_reconciled(db_url: str, at: datetime) -> None:
    with create_engine(db_url, poolclass=NullPool).begin() as conn:
        conn.execute(update(projects).values(last_reconciled_at=at))


def start(daemon: Daemon, starts: int) -> None:
    """Start and wait for READY's moment: the summary line logged once the start-up reconcile is
    done (answering ping comes earlier, before that reconcile)."""
    daemon.start()
    wait_for(lambda: daemon.log_count("sessionsync started") == starts)


def titles(db_url: str) -> dict[str, object]:
    return {slug: row["title"] for (_, slug), row in rows(db_url).items()}


def test_an_overdue_reconcile_runs_at_start_up_and_a_fresh_one_does_not(
    tmp_path: Path, project: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'sessions.db'}"
    write_state(project, "s1", doc("before"))
    daemon = Daemon(tmp_path, db_url, projects=[project], reconcile_on_start=False, reconcile_cron=NIGHTLY)
    with daemon:
        # A first start on an empty database: never reconciled, so overdue.
        wait_for(lambda: daemon.log_count("sessionsync started") == 1)
        assert titles(db_url) == {"s1": "before"}
        assert daemon.stop() == 0
        assert daemon.log_count("(overdue at start-up)") == 1

        # Two days down, and a session changed meanwhile: no event will ever say so.
        set_last_reconciled(db_url, datetime.now(UTC) - timedelta(days=2))
        write_state(project, "s1", doc("while down"))
        start(daemon, 2)
        assert titles(db_url) == {"s1": "while down"}  # READY waits for the start-up reconcile
        assert daemon.stop() == 0
        assert daemon.log_count("(overdue at start-up)") == 2

        # Reconciled just now: the start-up reconcile is skipped, so an offline change waits
        # for the nightly run (reconcile_on_start = true is how a user avoids that).
        write_state(project, "s1", doc("not yet"))
        start(daemon, 3)
        assert titles(db_url) == {"s1": "while down"}
        assert daemon.stop() == 0
        assert daemon.log_count("reconciled 1 project(s)") == 2


def test_a_full_reconcile_purges_tombstones_older_than_the_retention(tmp_path: Path, project: Path) -> None:
    """The nightly job is a full reconcile; the control `reconcile` runs the same one, now."""
    db_url = f"sqlite:///{tmp_path / 'sessions.db'}"
    for slug in ("old", "recent", "alive"):
        write_state(project, slug, doc(slug))
    with Daemon(tmp_path, db_url, projects=[project], tombstone_days=7, debounce_ms=20) as daemon:
        wait_for(lambda: daemon.log_count("sessionsync started") == 1)
        remove_session(project, "old")
        remove_session(project, "recent")
        wait_for(lambda: sum(r["deleted_at"] is not None for r in rows(db_url).values()) == 2)
        with create_engine(db_url, poolclass=NullPool).begin() as conn:
            conn.execute(
                update(sessions)
                .where(sessions.c.slug == "old")
                .values(deleted_at=datetime.now(UTC) - timedelta(days=8))
            )

        daemon.request({"cmd": "reconcile", "wait": True})

        left = {slug: row["deleted_at"] is not None for (_, slug), row in rows(db_url).items()}
        assert left == {"recent": True, "alive": False}
        assert {e["slug"] for e in events(db_url)} == {"recent", "alive"}
        assert daemon.log_count("purged 1 tombstone(s) older than 7 day(s)") == 1


@pytest.mark.parametrize(
    "expr",
    [
        "0 3 * * *",
        "*/15 * * * *",
        "0 9 * * 1-5",
        "0 9 * * 7",
        "0 9 * * sun,sat",
        "30 2 1 jan,jul *",
        "0 0 1-31/2 * *",
        "5/10 * * * *",
        "0 0 * * 5/2",
        "0 12 31 2 *",
        "61 * * * *",
        "0 24 * * *",
        "0 0 0 * *",
        "0 0 * 13 *",
        "0 0 * * 8",
        "*/0 * * * *",
        "5-1 * * * *",
        "0 0 * * mon-fry",
        "0 3 * *",
        "0 3 * * * *",
        "x * * * *",
    ],
)
def test_the_config_check_agrees_with_the_scheduler(expr: str) -> None:
    """The config validates cron without APScheduler; it must accept exactly what the daemon runs."""
    from sessionsync.daemon import crontab

    def accepted(check: Any) -> bool:
        try:
            check()
        except ValueError:
            return False
        return True

    def scheduler_check() -> None:
        # APScheduler alone, on the expression as the daemon hands it over (weekday names).
        fields = expr.split()
        if len(fields) == 5:
            fields[4] = crontab.apscheduler_weekdays(fields[4])
        CronTrigger.from_crontab(" ".join(fields), timezone=UTC)

    assert accepted(lambda: crontab.check(expr)) == accepted(scheduler_check)


def test_next_nightly_is_none_while_the_scheduler_starts() -> None:
    # Jobs added but the scheduler not started yet, as `status` may find them during start-up.
    from apscheduler.schedulers.background import BackgroundScheduler

    schedule = Schedule(lambda: None, lambda: None)
    schedule._scheduler = BackgroundScheduler(timezone=UTC)
    schedule._add_jobs(NIGHTLY, UTC, 60)
    assert schedule.next_nightly() is None

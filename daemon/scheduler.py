"""The nightly reconcile and the periodic discovery, on APScheduler 3.x.

The nightly job is coalesced, runs one instance at a time and has a misfire grace of hours,
so a laptop asleep at 03:00 still gets its reconcile when it wakes. The time logic
(`next_run`, `is_overdue`) is pure so it is tested without waiting for a night.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, tzinfo
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from tzlocal import get_localzone

from sessionsync.daemon import crontab

MISFIRE_GRACE_S = 12 * 3600


def zone(name: str) -> tzinfo:
    """`local` is the machine's zone; anything else an IANA name (validated by the config)."""
    if name == "local":
        return get_localzone()
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)


def cron_trigger(expr: str, tz: tzinfo) -> CronTrigger:
    """A standard 5-field crontab expression (weekdays numbered from Sunday) as a trigger."""
    crontab.check(expr)
    fields = expr.split()
    fields[4] = crontab.apscheduler_weekdays(fields[4])
    return CronTrigger.from_crontab(" ".join(fields), timezone=tz)


def next_run(expr: str, tz: tzinfo, after: datetime) -> datetime:
    """The first run of `expr` strictly after `after` (aware)."""
    # Cron fires on whole seconds and the trigger answers ">= now", so a microsecond makes it ">".
    fire: datetime | None = cron_trigger(expr, tz).get_next_fire_time(None, after + timedelta(microseconds=1))
    if fire is None:
        raise ValueError(f"cron expression {expr!r} never fires")
    return fire


def is_overdue(expr: str, tz: tzinfo, last: datetime | None, now: datetime) -> bool:
    """Whether a scheduled run fell between the last full reconcile and now (or there was none)."""
    return last is None or next_run(expr, tz, last) <= now


class Schedule:
    """Owns the background scheduler: the nightly reconcile and the discovery interval."""

    def __init__(self, nightly: Callable[[], None], discover: Callable[[], None]) -> None:
        self._nightly = nightly
        self._discover = discover
        self._scheduler: BackgroundScheduler | None = None

    def start(self, cron: str, timezone: str, discover_interval_s: int) -> None:
        tz = zone(timezone)
        self._scheduler = BackgroundScheduler(timezone=tz)
        self._add_jobs(cron, tz, discover_interval_s)
        self._scheduler.start()

    def reschedule(self, cron: str, timezone: str, discover_interval_s: int) -> None:
        if self._scheduler is not None:
            self._scheduler.remove_all_jobs()
            self._add_jobs(cron, zone(timezone), discover_interval_s)

    def next_nightly(self) -> datetime | None:
        job = self._scheduler.get_job("nightly") if self._scheduler else None
        # A job added before the scheduler has started (status asked during start-up) has no
        # next_run_time attribute yet.
        fire: datetime | None = getattr(job, "next_run_time", None)
        return fire

    def stop(self) -> None:
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def _add_jobs(self, cron: str, tz: tzinfo, discover_interval_s: int) -> None:
        assert self._scheduler is not None
        common: dict[str, Any] = {"coalesce": True, "max_instances": 1, "replace_existing": True}
        self._scheduler.add_job(
            self._nightly,
            cron_trigger(cron, tz),
            id="nightly",
            name="nightly reconcile",
            misfire_grace_time=MISFIRE_GRACE_S,
            **common,
        )
        self._scheduler.add_job(
            self._discover,
            IntervalTrigger(seconds=discover_interval_s, timezone=tz),
            id="discover",
            name="discovery",
            misfire_grace_time=discover_interval_s,
            **common,
        )

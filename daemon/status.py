"""`sessionsync status` for people: the daemon's status reply rendered as a few short lines.

Client side, standard library only: it runs in the short-lived CLI process.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from sessionsync.daemon.paths import shown_path

# Counters in the order and groups a reader scans them; any the daemon adds later go to "other".
_GROUPS = (
    ("activity", ("events", "batches", "rows_written", "events_published", "floods", "subscribers")),
    ("scans", ("reconciles", "resyncs", "discoveries", "reconcile_failures")),
    (
        "faults",
        (
            "database_outages",
            "batch_failures",
            "overflows",
            "observer_restarts",
            "fallbacks",
            "watch_retries",
            "handler_errors",
        ),
    ),
)
RECENT_ERRORS_SHOWN = 5


def duration(seconds: float) -> str:
    """3605 -> "1 h 0 min": the two largest units, for people."""
    s = int(seconds)
    days, s = divmod(s, 86_400)
    hours, s = divmod(s, 3_600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {s} s"
    return f"{s} s"


def _when(iso: str | None, now: datetime) -> str:
    if not iso:
        return "never"
    at = datetime.fromisoformat(iso)
    delta = (now - at).total_seconds()
    shown = at.astimezone().strftime("%Y-%m-%d %H:%M")
    return f"{shown} ({duration(abs(delta))} {'ago' if delta >= 0 else 'from now'})"


def _counters(counters: Mapping[str, int]) -> Iterator[str]:
    left = dict(counters)
    for name, keys in (*_GROUPS, ("other", tuple(sorted(counters)))):
        items = [f"{key.replace('_', ' ')} {left.pop(key)}" for key in keys if key in left]
        if items:
            yield f"  {name:<12} {', '.join(items)}"


def render_status(status: Mapping[str, Any], client_config: str | None, home: str = "") -> Iterator[str]:
    """The lines of `sessionsync status`; `client_config` is the file this command resolved, named
    when it is not the daemon's (the two would then disagree on settings)."""
    now = datetime.now(UTC)
    daemon_config = status.get("config")
    paused = "  PAUSED (writes held; `sessionsync resume`)" if status["paused"] else ""
    state = status.get("state", "running")
    if state != "running":
        paused += f"  ({state})"
    yield (
        f"sessionsync {status.get('version', '?')}, pid {status['pid']}, up {duration(status['uptime_s'])}"
        f"{paused}"
    )
    yield f"  config       {shown_path(daemon_config, home) if daemon_config else 'built-in defaults'}"
    if client_config != daemon_config:
        mine = shown_path(client_config, home) if client_config else "built-in defaults"
        yield f"  note         this command read {mine}; the daemon started with the one above"
    database = status["database"]
    state = "ok" if status["database_ok"] else f"DOWN ({database.get('last_error')})"
    yield f"  database     {database['url']}: {state}"
    watch = status.get("watch", [])
    states: dict[str, int] = status.get("watch_states") or {}
    if not states:  # a daemon from before watch_states
        for entry in watch:
            states[entry["state"]] = states.get(entry["state"], 0) + 1
    by_state = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    yield (
        f"  projects     {status['projects']}{f' ({by_state})' if by_state else ''}, "
        f"sessions {status['sessions']}, pending {status['pending']}"
    )
    yield (
        f"  reconcile    last {_when(status['last_reconcile_at'], now)}, "
        f"next {_when(status.get('next_reconcile_at'), now)}"
    )
    running = status.get("reconcile")
    if running:
        seen, total = running["seen"], running["total"]
        how_far = (
            f"{seen:,} of {total:,} session(s) ({100 * seen // total} %)" if total else "listing folders"
        )
        yield f"  reconciling  {how_far}, {running['reason']}"
    for entry in watch:
        if entry["state"] != "live":
            yield f"  watch {entry['state']:<6} {shown_path(entry['project'], home)}"
    not_live = sum(n for state, n in states.items() if state != "live")
    listed = sum(entry["state"] != "live" for entry in watch)
    if listed < not_live:
        yield f"  watch        and {not_live - listed} more not live (`sessionsync status --json` lists them)"
    yield from _counters(status["counters"])
    for error in status["recent_errors"][-RECENT_ERRORS_SHOWN:]:
        where = error.get("session") or error.get("project")
        prefix = f"[{shown_path(where, home)}] " if where else ""
        at = datetime.fromisoformat(error["at"]).astimezone().strftime("%Y-%m-%d %H:%M:%S")
        yield f"  {error['level'].lower():<8} {at}  {prefix}{error['message']}"

"""Change-event kinds and their stream payloads.

A row in `session_events` has a bare kind (`created`); on the control stream and in PostgreSQL
`NOTIFY sessionsync` the same change is `session.created`, carrying its row `id`, the project
path, the slug, the session folder (`path`), the time and what changed. Payloads carry keys and values, never
whole documents (NOTIFY payloads are limited to 8000 bytes).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sessionsync.models.jsontext import dumps


class SessionEventKind(StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    PHASE_CHANGED = "phase_changed"
    STATUS_CHANGED = "status_changed"
    DELETED = "deleted"
    RESTORED = "restored"
    INVALID = "invalid"
    RECOVERED = "recovered"


PROJECT_RESYNCED = "project.resynced"
RECONCILE_FINISHED = "reconcile.finished"
# Every kind an event on the stream can have; session events carry an `id`, the others are
# live-only (no id: they are not rows and are not replayed).
STREAM_KINDS: tuple[str, ...] = (
    *(f"session.{kind.value}" for kind in SessionEventKind),
    PROJECT_RESYNCED,
    RECONCILE_FINISHED,
)
NOTIFY_CHANNEL = "sessionsync"
NOTIFY_LIMIT = 7900


def session_event(
    kind: SessionEventKind,
    project: str,
    slug: str,
    path: str,
    at: datetime,
    from_value: str | None = None,
    to_value: str | None = None,
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The stream form of a session change: `{"kind": "session.<kind>", "project", "slug", ...}`."""
    event: dict[str, Any] = {
        "kind": f"session.{kind.value}",
        "project": project,
        "slug": slug,
        "path": path,
        "at": at.isoformat(),
    }
    if from_value is not None or to_value is not None:
        event["from"] = from_value
        event["to"] = to_value
    if detail:
        event.update(detail)
    return event


def notify_payload(event: dict[str, Any]) -> str:
    """Compact JSON for NOTIFY; oversized optional fields are dropped to fit the 8 KB limit."""
    payload = dumps(event)
    if len(payload.encode()) <= NOTIFY_LIMIT:
        return payload
    core: dict[str, Any] = {k: event[k] for k in ("kind", "project", "slug", "path", "at") if k in event}
    core["truncated"] = True
    return dumps(core)[:NOTIFY_LIMIT]

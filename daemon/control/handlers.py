"""One handler per control command, each a thin call into the running Service.

A handler gets the validated request model and returns the `result` object of the reply, or
raises ControlError with a protocol error code. `subscribe` is answered by the server itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sessionsync.daemon.errors import ControlError
from sessionsync.daemon.store import is_transient
from sessionsync.daemon.version import version
from sessionsync.models.control import ReconcileRequest, ResyncRequest, SyncRequest
from sessionsync.models.keys import SessionKey

if TYPE_CHECKING:
    from sessionsync.daemon.reconcile_queue import ReconcileJob
    from sessionsync.daemon.service import Service

WAIT_LIMIT_S = 600.0
ERRORS_LIMIT = 100


def build_handlers(service: Service) -> dict[str, Callable[[Any], dict[str, Any]]]:
    def ping(_req: Any) -> dict[str, Any]:
        return {"pong": True, "pid": os.getpid()}

    def status(_req: Any) -> dict[str, Any]:
        return status_of(service)

    def resync(req: ResyncRequest) -> dict[str, Any]:
        if req.all:
            service.rediscover()
            return _answer(service, service.request_resync(None, "resync --all"), req.wait)
        known = service.registry.refs()
        unknown = [p for p in req.projects if os.path.realpath(p) not in known]
        if unknown:
            raise ControlError("not_found", f"no project at {', '.join(unknown)}")
        wanted = {os.path.realpath(p) for p in req.projects}
        return _answer(service, service.request_resync(wanted, "resync requested"), req.wait)

    def reconcile(req: ReconcileRequest) -> dict[str, Any]:
        return _answer(service, service.request_resync(None, "reconcile requested"), req.wait)

    def sync(req: SyncRequest) -> dict[str, Any]:
        folder = os.path.normpath(req.path)
        # Projects are known by their real path; the user's may go through a link (~/code -> /data).
        parent = os.path.realpath(os.path.dirname(folder))
        for ref in service.registry.refs().values():
            if parent == os.path.realpath(ref.sessions_dir):
                key = SessionKey(ref.path, os.path.basename(folder))
                break
        else:
            raise ControlError("not_found", f"{req.path} is not a session folder of any known project")
        path = os.path.join(ref.sessions_dir, key.slug)
        if not os.path.lexists(folder):
            # A hook naming a folder that is not there has the wrong path. Should the session
            # just have been removed, its row is tombstoned the ordinary way.
            service.queue.submit([key])
            raise ControlError("not_found", f"no session folder at {req.path}")
        if service.queue.paused:
            service.queue.submit([key])
            raise ControlError("unavailable", "writes are paused; the session will sync on resume")
        try:
            result = service.sync_now(key)
        except Exception as exc:
            if not is_transient(exc):
                raise
            service.queue.submit([key])
            raise ControlError("unavailable", "database unavailable; the session stays queued") from None
        return {
            "project": key.project,
            "slug": key.slug,
            "path": path,
            "written": result.written + result.tombstoned,
            "invalid": result.invalid,
            "unchanged": result.unchanged + result.touched,
        }

    def pause(_req: Any) -> dict[str, Any]:
        service.queue.pause()
        return {"paused": True, "pending": service.queue.pending()}

    def resume(_req: Any) -> dict[str, Any]:
        service.queue.resume()
        service.wake_reconciler()
        return {"paused": False, "pending": service.queue.pending()}

    def errors(_req: Any) -> dict[str, Any]:
        try:
            rows = service.store.invalid_sessions()
        except Exception as exc:
            if not is_transient(exc):
                raise
            raise ControlError("unavailable", "database unavailable") from None
        # A reply line is limited to 64 KiB: list the first ones and say how many more there are.
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

    return {
        "ping": ping,
        "status": status,
        "resync": resync,
        "reconcile": reconcile,
        "sync": sync,
        "pause": pause,
        "resume": resume,
        "errors": errors,
    }


def _answer(service: Service, request: ReconcileJob, wait: bool) -> dict[str, Any]:
    if not wait:
        return {"queued": True}
    if service.queue.paused:
        raise ControlError("unavailable", "writes are paused; run `sessionsync resume` first")
    if not request.done.wait(WAIT_LIMIT_S):
        raise ControlError("unavailable", f"the reconcile did not finish within {WAIT_LIMIT_S:.0f} s")
    if request.summary is None:
        raise ControlError("unavailable", f"the reconcile failed: {request.error}; it will be retried")
    return dict(request.summary.as_dict())


def status_of(service: Service) -> dict[str, Any]:
    """The status reply: the contract's keys plus watch, database and error details."""
    watch = service.watcher.projects()
    health = service.health
    nightly = service.schedule.next_nightly()
    return {
        "version": version(),
        "pid": os.getpid(),
        "config": str(service.cfg.source) if service.cfg.source else None,
        "uptime_s": round(service.uptime()),
        "next_reconcile_at": nightly.isoformat() if nightly else None,
        "projects": len(service.registry.refs()),
        "sessions": service.live_sessions,
        "pending": service.queue.pending() + len(service.debouncer),
        "in_flight": service.queue.busy(),
        "database_ok": health.ok,
        "database": {
            "url": service.database_label,
            "ok": health.ok,
            "outages": health.outages,
            "last_error": health.last_error or None,
        },
        "paused": service.queue.paused,
        "last_reconcile_at": service.last_reconcile_at.isoformat() if service.last_reconcile_at else None,
        "watch": [{"project": path, "state": state} for path, state in sorted(watch.items())],
        "counters": {
            **service.counters,
            **service.watcher.counters(),
            "batches": service.workers.batches,
            "rows_written": service.workers.written,
            "batch_failures": service.workers.failures,
            "floods": service.debouncer.floods,
            "database_outages": health.outages,
            "subscribers": service.hub.subscriber_count(),
        },
        "recent_errors": service.current_errors(),
    }

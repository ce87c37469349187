"""One handler per control command, each a single call into the running service.

A handler gets the validated request model and returns the `result` object of the reply; the
service raises ControlError with a protocol error code. `subscribe` is answered by the server
itself. The handlers see the service only through `ServiceFacade`, never its parts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sessionsync.daemon.control.protocol import MAX_LINE, Progressing
from sessionsync.models.control import ReconcileRequest, ResyncRequest, SyncRequest

Reply = dict[str, Any]


class ServiceFacade(Protocol):
    """What the control commands may ask of the daemon (daemon/service.py's Service)."""

    def status(self) -> Reply: ...

    def resync(
        self, projects: Sequence[str] | None, *, wait: bool, progress: Callable[[Reply], None] | None = None
    ) -> Reply: ...

    def reconcile(self, *, wait: bool, progress: Callable[[Reply], None] | None = None) -> Reply: ...

    def sync(self, folder: str) -> Reply: ...

    def pause(self) -> Reply: ...

    def resume(self) -> Reply: ...

    def errors(self) -> Reply: ...

    def metrics_reply(self, max_line: int) -> Reply: ...


def build_handlers(service: ServiceFacade) -> dict[str, Callable[[Any], Reply | Progressing]]:
    def ping(_req: Any) -> Reply:
        return {"pong": True, "pid": os.getpid()}

    def status(_req: Any) -> Reply:
        return service.status()

    def resync(req: ResyncRequest) -> Reply | Progressing:
        projects = None if req.all else req.projects
        if req.wait and req.progress:
            return Progressing(lambda send: service.resync(projects, wait=True, progress=send))
        return service.resync(projects, wait=req.wait)

    def reconcile(req: ReconcileRequest) -> Reply | Progressing:
        if req.wait and req.progress:
            return Progressing(lambda send: service.reconcile(wait=True, progress=send))
        return service.reconcile(wait=req.wait)

    def sync(req: SyncRequest) -> Reply:
        return service.sync(req.path)

    def pause(_req: Any) -> Reply:
        return service.pause()

    def resume(_req: Any) -> Reply:
        return service.resume()

    def errors(_req: Any) -> Reply:
        return service.errors()

    def metrics(_req: Any) -> Reply:
        return service.metrics_reply(MAX_LINE)

    return {
        "ping": ping,
        "status": status,
        "resync": resync,
        "reconcile": reconcile,
        "sync": sync,
        "pause": pause,
        "resume": resume,
        "errors": errors,
        "metrics": metrics,
    }

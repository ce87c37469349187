"""Control-socket requests: one strict pydantic model per command, and the error codes a reply carries.

The server validates every request line into one of these models before a handler sees it, so
handlers never re-check types. Unknown fields are rejected so that a typo is an error, not a no-op.
"""

from __future__ import annotations

import posixpath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sessionsync.models.events import STREAM_KINDS

ErrorCode = Literal["bad_request", "unknown_command", "not_found", "unavailable", "internal", "busy"]


def _absolute(path: str) -> str:
    # The daemon's working folder is not the client's: a relative path would silently name
    # another folder, so the client must resolve it before sending.
    if not posixpath.isabs(path):
        raise ValueError(f"must be an absolute path, got {path!r}")
    if "\0" in path:  # no file name holds one; os calls would raise instead of answering
        raise ValueError(f"must not contain a NUL byte, got {path!r}")
    return path


class ControlRequest(BaseModel):
    """Base of every request; strict, so `"wait": "yes"` or `"wait": 1` is a bad_request."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    cmd: str


class PingRequest(ControlRequest):
    cmd: Literal["ping"]


class StatusRequest(ControlRequest):
    cmd: Literal["status"]


class ResyncRequest(ControlRequest):
    """Rescan the named projects (absolute folder paths), or every project with `all`."""

    cmd: Literal["resync"]
    projects: list[str] = []
    all: bool = False
    wait: bool = False
    progress: bool = False  # with wait: progress lines before the reply

    @field_validator("projects")
    @classmethod
    def _projects_absolute(cls, projects: list[str]) -> list[str]:
        return [_absolute(p) for p in projects]

    @model_validator(mode="after")
    def _one_target(self) -> ResyncRequest:
        if bool(self.projects) == self.all:
            raise ValueError("give exactly one of a non-empty 'projects' list or 'all': true")
        return self


class SyncRequest(ControlRequest):
    """Sync one session folder now; `path` is that folder, absolute."""

    cmd: Literal["sync"]
    path: str

    @field_validator("path")
    @classmethod
    def _path_absolute(cls, path: str) -> str:
        return _absolute(path)


class ReconcileRequest(ControlRequest):
    cmd: Literal["reconcile"]
    wait: bool = False
    progress: bool = False  # with wait: progress lines before the reply


class PauseRequest(ControlRequest):
    cmd: Literal["pause"]


class ResumeRequest(ControlRequest):
    cmd: Literal["resume"]


class SubscribeRequest(ControlRequest):
    """Follow the event stream: first every committed session event after id `since` (from the
    database), then live; only the `kinds` and `projects` (absolute folders) listed, if given."""

    cmd: Literal["subscribe"]
    since: int | None = Field(default=None, ge=0)
    kinds: list[str] | None = None
    projects: list[str] | None = None

    @field_validator("kinds")
    @classmethod
    def _kinds_known(cls, kinds: list[str] | None) -> list[str] | None:
        unknown = sorted(set(kinds or ()) - set(STREAM_KINDS))
        if unknown:
            raise ValueError(f"unknown kinds {', '.join(unknown)}; allowed: {', '.join(STREAM_KINDS)}")
        return kinds

    @field_validator("projects")
    @classmethod
    def _projects_absolute(cls, projects: list[str] | None) -> list[str] | None:
        return None if projects is None else [_absolute(p) for p in projects]


class ErrorsRequest(ControlRequest):
    cmd: Literal["errors"]


class MetricsRequest(ControlRequest):
    """The Prometheus text exposition of the daemon's metrics."""

    cmd: Literal["metrics"]


REQUEST_TYPES: dict[str, type[ControlRequest]] = {
    "ping": PingRequest,
    "status": StatusRequest,
    "resync": ResyncRequest,
    "sync": SyncRequest,
    "reconcile": ReconcileRequest,
    "pause": PauseRequest,
    "resume": ResumeRequest,
    "subscribe": SubscribeRequest,
    "errors": ErrorsRequest,
    "metrics": MetricsRequest,
}
COMMANDS: tuple[str, ...] = tuple(REQUEST_TYPES)

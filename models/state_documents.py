"""The two generations of state.json as pydantic models, mapped to `sessions` columns, and the
per-field fallback that keeps a document's good fields when some are of the wrong type.

Imported by `state.map_state` on the first document its plain reading does not vouch for (a
field of the wrong type, or a value it cannot check the way the models do); nothing else imports it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, TypeVar

from pydantic import (
    AliasChoices,
    AliasPath,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from sessionsync.models.state import DEFAULT_ARTIFACTS, MappedState, json_kind, parse_timestamp


def _timestamp(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str) and (moment := parse_timestamp(value)) is not None:
        return moment
    raise PydanticCustomError("iso_timestamp", "an ISO 8601 timestamp")


_Timestamp = Annotated[datetime | None, PlainValidator(_timestamp)]
# Counts land in INTEGER columns (PostgreSQL's is 32-bit); a bigger number is a bad field, not a
# failed transaction for the whole batch.
_Count = Annotated[int | None, Field(ge=-(2**31), le=2**31 - 1)]


class _Strict(BaseModel):
    """JSON types must match exactly: "5" is not a count and true is not 1."""

    # Unknown fields are ignored here; they live on in raw_state. Validators are built on first
    # use (_built), not at import.
    model_config = ConfigDict(strict=True, frozen=True, defer_build=True)


class _V2Commit(_Strict):
    """A v2 commit entry; `checkpoint_id` is read too, for documents converted halfway."""

    sha: str | None = None
    message: str | None = None
    checkpoint: int | None = Field(None, validation_alias=AliasChoices("checkpoint", "checkpoint_id"))
    created_at: str | None = None


class _V1Commit(_V2Commit):
    """A v1 commit entry: the checkpoint is `checkpoint_id`."""

    checkpoint: int | None = Field(None, validation_alias=AliasChoices("checkpoint_id", "checkpoint"))


class _V1Phase(_Strict):
    """One entry of v1 `phases`."""

    started_at: str | None = None
    finalized_at: str | None = None
    completed_at: str | None = None


class _V1Phases(_Strict):
    """v1 `phases`: the source of the phase_history column."""

    spec: _V1Phase | None = None
    plan: _V1Phase | None = None
    build: _V1Phase | None = None


class _Document(_Strict):
    """What both generations share. Field names are column names; aliases are the JSON sources."""

    session_id: str | None = None
    title: str | None = Field(None, validation_alias="topic")
    description: str | None = None
    current_phase: str | None = None
    created_at: _Timestamp = None
    updated_at: _Timestamp = None


class _V2Document(_Document):
    """A v2 document, flattened into columns; sections are typed so a non-object is reported."""

    session_type: str | None = None
    status: str | None = None
    phase_history: dict[str, Any] | None = None
    build_progress: dict[str, Any] | None = None
    checkpoints_total: _Count = Field(None, validation_alias=AliasPath("build_progress", "checkpoints_total"))
    checkpoints_completed_list: list[Any] | None = Field(
        None, validation_alias=AliasPath("build_progress", "checkpoints_completed")
    )
    current_checkpoint: _Count = Field(
        None, validation_alias=AliasPath("build_progress", "current_checkpoint")
    )
    git: dict[str, Any] | None = None
    git_branch: str | None = Field(None, validation_alias=AliasPath("git", "branch"))
    git_worktree: str | None = Field(None, validation_alias=AliasPath("git", "worktree"))
    git_base_branch: str | None = Field(None, validation_alias=AliasPath("git", "base_branch"))
    commits: list[_V2Commit] | None = None
    artifacts: dict[str, Any] | None = None


class _V1Document(_Document):
    """A v1 (legacy) document, flattened into columns where the mapping is one to one."""

    session_type: str | None = Field(None, validation_alias="granularity")
    phases: _V1Phases | None = None
    plan_state: dict[str, Any] | None = None
    checkpoints_total: _Count = Field(None, validation_alias=AliasPath("plan_state", "checkpoints_total"))
    checkpoints_completed_list: list[Any] | None = Field(
        None, validation_alias=AliasPath("plan_state", "checkpoints_completed")
    )
    current_checkpoint: _Count = Field(None, validation_alias=AliasPath("plan_state", "current_checkpoint"))
    commits: list[_V1Commit] | None = None


def map_document(document: dict[str, Any]) -> MappedState:
    """`state.map_state`: v2 when the document has `phase_history` or `build_progress`, else v1."""
    checks = _built()
    if "phase_history" in document or "build_progress" in document:
        try:
            return _map_v2(_V2Document.model_validate(document), frozenset(), ())
        except ValidationError:
            values, failed, errors = _validate_per_field(checks[_V2Document], document)
            return _map_v2(_V2Document.model_construct(**values), failed, errors)
    try:
        return _map_v1(_V1Document.model_validate(document), frozenset(), ())
    except ValidationError:
        values, failed, errors = _validate_per_field(checks[_V1Document], document)
        return _map_v1(_V1Document.model_construct(**values), failed, errors)


def _map_v2(doc: _V2Document, failed: frozenset[str], errors: tuple[str, ...]) -> MappedState:
    completed = _or_default(doc.checkpoints_completed_list, [], "checkpoints_completed_list", failed)
    return MappedState(
        schema_version=2,
        session_id=doc.session_id,
        title=doc.title,
        description=doc.description,
        session_type=_or_default(doc.session_type, "full", "session_type", failed),
        status=_or_default(doc.status, "active", "status", failed),
        current_phase=_or_default(doc.current_phase, "spec", "current_phase", failed),
        phase_history=doc.phase_history,
        git_branch=doc.git_branch,
        git_worktree=doc.git_worktree,
        git_base_branch=doc.git_base_branch,
        checkpoints_total=_or_default(doc.checkpoints_total, 0, "checkpoints_total", failed),
        checkpoints_completed=None if completed is None else len(completed),
        checkpoints_completed_list=completed,
        current_checkpoint=doc.current_checkpoint,
        commits=None if doc.commits is None else [_commit(commit) for commit in doc.commits],
        artifacts=_or_default(doc.artifacts, dict(DEFAULT_ARTIFACTS), "artifacts", failed),
        created_at=doc.created_at,
        updated_at=doc.updated_at,
        field_errors=errors,
    )


def _map_v1(doc: _V1Document, failed: frozenset[str], errors: tuple[str, ...]) -> MappedState:
    completed = _or_default(doc.checkpoints_completed_list, [], "checkpoints_completed_list", failed)
    return MappedState(
        schema_version=1,
        session_id=doc.session_id,
        title=doc.title,
        description=doc.description,
        session_type=_or_default(doc.session_type, "full", "session_type", failed),
        status="active",
        current_phase=_or_default(doc.current_phase, "spec", "current_phase", failed),
        phase_history=None if "phases" in failed else _v1_phase_history(doc.phases),
        git_branch=None,
        git_worktree=None,
        git_base_branch=None,
        checkpoints_total=_or_default(doc.checkpoints_total, 0, "checkpoints_total", failed),
        checkpoints_completed=None if completed is None else len(completed),
        checkpoints_completed_list=completed,
        current_checkpoint=doc.current_checkpoint,
        commits=None if doc.commits is None else [_commit(commit) for commit in doc.commits],
        artifacts=dict(DEFAULT_ARTIFACTS),
        created_at=doc.created_at,
        updated_at=doc.updated_at,
        field_errors=errors,
    )


_T = TypeVar("_T")


def _or_default(value: _T | None, default: _T, name: str, failed: frozenset[str]) -> _T | None:
    # Missing and null take the documented default; a field of the wrong type stays NULL.
    if value is None and name not in failed:
        return default
    return value


def _commit(commit: _V2Commit) -> dict[str, Any]:
    return {
        "sha": commit.sha,
        "message": commit.message,
        "checkpoint": commit.checkpoint,
        "created_at": commit.created_at,
    }


def _v1_phase_history(phases: _V1Phases | None) -> dict[str, Any]:
    spec = (phases and phases.spec) or _V1Phase()
    plan = (phases and phases.plan) or _V1Phase()
    build = (phases and phases.build) or _V1Phase()
    return {
        "spec_started_at": spec.started_at,
        "spec_completed_at": spec.finalized_at,
        "plan_started_at": plan.started_at,
        "plan_completed_at": plan.finalized_at,
        "build_started_at": build.started_at,
        "build_completed_at": build.completed_at,
        "docs_started_at": None,
        "docs_completed_at": None,
    }


# --- the per-field fallback, for documents with at least one bad field ----------------------------

_MISSING: Final = object()  # the key is absent (or its section is null): the field's default
_UNREACHABLE: Final = object()  # the section holding the key is not an object: the column is NULL


@dataclass(frozen=True, slots=True)
class _FieldCheck:
    """How to find and validate one model field on its own."""

    name: str
    path: tuple[str, ...]
    adapter: TypeAdapter[Any]


def _field_checks(model: type[_Document]) -> tuple[_FieldCheck, ...]:
    checks = []
    for name, info in model.model_fields.items():
        alias = info.validation_alias
        path = (
            tuple(str(step) for step in alias.path) if isinstance(alias, AliasPath) else (str(alias or name),)
        )
        adapter: TypeAdapter[Any] = TypeAdapter(info.rebuild_annotation(), config=ConfigDict(strict=True))
        checks.append(_FieldCheck(name, path, adapter))
    return tuple(checks)


_FieldChecks = dict[type[_Document], tuple[_FieldCheck, ...]]
_field_checks_built: _FieldChecks | None = None
_build_lock = threading.Lock()


def _built() -> _FieldChecks:
    """The documents' validators, built on first use rather than at import: a process that parses
    no state.json (a reconcile with nothing to do, a control command) does not pay for them. Built
    once, under a lock, since worker threads may parse their first files at the same moment."""
    global _field_checks_built
    if _field_checks_built is None:
        with _build_lock:
            if _field_checks_built is None:
                for model in (_V2Commit, _V1Commit, _V1Phase, _V1Phases, _V2Document, _V1Document):
                    model.model_rebuild()
                _field_checks_built = {m: _field_checks(m) for m in (_V2Document, _V1Document)}
    return _field_checks_built


def _validate_per_field(
    checks: tuple[_FieldCheck, ...], doc: dict[str, Any]
) -> tuple[dict[str, Any], frozenset[str], tuple[str, ...]]:
    """Validate each field on its own: the good ones by name, the bad ones' names, their messages."""
    values: dict[str, Any] = {}
    failed: set[str] = set()
    errors: list[str] = []
    for check in checks:
        value = _lookup(doc, check.path)
        if value is _MISSING:
            continue
        if value is _UNREACHABLE:
            # The section's own field reports the problem; this column is NULL with it.
            failed.add(check.name)
            continue
        try:
            values[check.name] = check.adapter.validate_python(value)
        except ValidationError as exc:
            failed.add(check.name)
            errors.append(_field_error(check.path, exc))
    return values, frozenset(failed), tuple(errors)


def _lookup(doc: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = doc
    for step in path:
        if value is None:
            return _MISSING
        if not isinstance(value, dict):
            return _UNREACHABLE
        value = value.get(step, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


_EXPECTED: Final = {
    "string_type": "a string",
    "int_type": "an integer",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "less_than_equal": "an integer that fits in 32 bits",
    "greater_than_equal": "an integer that fits in 32 bits",
}


def _field_error(path: tuple[str, ...], exc: ValidationError) -> str:
    # One message per field, from its first problem: "commits[1].checkpoint: expected an integer, got 'x'".
    error = exc.errors(include_url=False)[0]
    where = ".".join(path)
    for step in error["loc"]:
        where += f"[{step}]" if isinstance(step, int) else f".{step}"
    expected = _EXPECTED.get(error["type"], error["msg"])
    return f"{where}: expected {expected}, got {_describe(error['input'])}"


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict | list):
        return json_kind(value)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

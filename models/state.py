"""The state.json contract: bytes to a JSON object, and a v1 or v2 document to `sessions` columns.

Pure (no I/O, no database) so the daemon, the reconcile planner and the tests share one reading.
Unreadable bytes raise InvalidStateError; a readable object always maps, naming its bad fields.
"""

from __future__ import annotations

import codecs
import json
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from itertools import accumulate
from typing import Annotated, Any, Final, TypeVar

import orjson
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

MAX_DEPTH: Final = 64
DEFAULT_ARTIFACTS: Final[dict[str, str]] = {
    "spec": "spec.md",
    "plan": "plan.json",
    "plan_readable": "plan.md",
}


class InvalidStateError(Exception):
    """The bytes are not a readable JSON object; `.reason` is a one-line, user-facing why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- bytes -> JSON object -------------------------------------------------------------------------


def _finite_float(text: str) -> float | None:
    # 1e400 reads as inf, which is not valid JSON; treat it like the Infinity literal.
    value = float(text)
    return value if math.isfinite(value) else None


def _no_constant(_name: str) -> None:
    return None


# NaN / Infinity / -Infinity become null while parsing, so no second pass is needed for them.
_DECODER: Final = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)
# orjson reads a document three times as fast and, for what it accepts, exactly as the stdlib does,
# except integers beyond 64 bits (it makes them floats; the shortest is -9223372036854775809):
# texts with 19 digits in a row go to the stdlib (found by turning every digit into 0, 15 times
# faster than a regular expression). What orjson refuses (NaN, 1e400, a lone surrogate escape,
# bad JSON) goes to the stdlib too, which applies the rules above and words the error.
_DIGITS_TO_ZERO: Final = bytes.maketrans(b"123456789", b"000000000")
_LONG_NUMBER: Final = b"0" * 19
_JSON_WHITESPACE: Final = b" \t\r\n"
_BRACKET_STEP: Final = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_NOT_A_BRACKET: Final = bytes(byte for byte in range(256) if byte not in _BRACKET_STEP)
# Raw NUL bytes are refused up front and UTF-8 decoding refuses encoded surrogates, so U+0000
# and lone surrogates can only arrive as \u escapes; only then is the whole tree checked.
_RISKY_ESCAPE: Final = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
_UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")


def decode_document(raw: bytes) -> dict[str, Any]:
    """bytes (already size-limited by the caller) -> the JSON object, or InvalidStateError."""
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    body = raw[start:]
    if not body.strip(_JSON_WHITESPACE):
        raise InvalidStateError("empty file" if not body else "file holds only whitespace")
    nul = body.find(b"\x00")
    if nul >= 0:
        raise InvalidStateError(f"contains a NUL character at byte {start + nul}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidStateError(f"not valid UTF-8 at byte {start + exc.start}") from None
    # Depth needs at least MAX_DEPTH + 1 opening brackets, so almost every file skips the scan;
    # scanning the bytes (not the parsed tree) keeps a 100,000-deep file away from the parser.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _too_deep(body):
        raise InvalidStateError(f"nested deeper than {MAX_DEPTH} levels")
    try:
        doc = _parse(body, text)
    except json.JSONDecodeError as exc:
        raise InvalidStateError(_json_error_reason(exc, text)) from None
    except ValueError:
        # The only other ValueError is Python's cap on the digits of an integer.
        raise InvalidStateError("not valid JSON: a number has too many digits to read") from None
    if not isinstance(doc, dict):
        raise InvalidStateError(f"top level is {_json_kind(doc)}, not an object")
    if _RISKY_ESCAPE.search(text):
        _check_storable(doc, "")
    return doc


def _parse(body: bytes, text: str) -> Any:
    if _LONG_NUMBER not in body.translate(_DIGITS_TO_ZERO):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return _DECODER.decode(text)


def _too_deep(body: bytes) -> bool:
    # Byte operations only, no loop in Python: a file with many commits pays about 2 us per KiB.
    # Quotes and backslashes are ASCII and never part of a multi-byte UTF-8 sequence, so after
    # dropping escaped backslashes and quotes, every other piece between quotes is outside strings.
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(body.split(b'"')[::2]).translate(None, _NOT_A_BRACKET)
    # Opening minus closing brackets so far is how deep the parser would be at that point.
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0) > MAX_DEPTH


def _json_error_reason(exc: json.JSONDecodeError, text: str) -> str:
    # Some of json's messages already end in "at" ("Unterminated string starting at").
    joiner = " " if exc.msg.endswith(" at") else " at "
    reason = f"not valid JSON: {exc.msg}{joiner}line {exc.lineno} column {exc.colno}"
    if exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string"):
        reason += " (the file ends early: cut off mid-write?)"
    return reason


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "null"


def _check_storable(value: object, path: str) -> None:
    # Depth is already known to be at most MAX_DEPTH, so recursion is safe here.
    if isinstance(value, str):
        _check_string(value, path)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_string(key, f"a key in {path or 'the top level'}")
            # Quote keys that are not plain names, so a key holding a newline keeps the reason one line.
            step = key if key.isidentifier() else json.dumps(key)
            _check_storable(item, f"{path}.{step}" if path else step)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_storable(item, f"{path}[{index}]")


def _check_string(text: str, where: str) -> None:
    match = _UNSTORABLE.search(text)
    if match is None:
        return
    if match.group() == "\x00":
        raise InvalidStateError(
            f"contains a NUL character (\\u0000) in {where}, which the database cannot store"
        )
    raise InvalidStateError(
        f"contains a lone surrogate (\\u{ord(match.group()):04x}) in {where}, which is not valid Unicode"
    )


# --- JSON object -> columns -----------------------------------------------------------------------


def _timestamp(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
            # Naive means UTC; an offset is converted so every value compares the same way.
            return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
        except (ValueError, OverflowError):
            pass
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


@dataclass(frozen=True, slots=True)
class MappedState:
    """The `sessions` columns that come from state.json, and what was wrong with its fields."""

    schema_version: int
    session_id: str | None
    title: str | None
    description: str | None
    session_type: str | None
    status: str | None
    current_phase: str | None
    phase_history: dict[str, Any] | None
    git_branch: str | None
    git_worktree: str | None
    git_base_branch: str | None
    checkpoints_total: int | None
    checkpoints_completed: int | None
    checkpoints_completed_list: list[Any] | None
    current_checkpoint: int | None
    commits: list[dict[str, Any]] | None
    artifacts: dict[str, Any] | None
    created_at: datetime | None
    updated_at: datetime | None
    field_errors: tuple[str, ...]

    def columns(self) -> dict[str, Any]:
        """Every mapped column by name (field_errors is not a column)."""
        return {name: getattr(self, name) for name in _COLUMNS}


_COLUMNS: Final = tuple(field.name for field in fields(MappedState) if field.name != "field_errors")


def map_state(doc: Mapping[str, Any]) -> MappedState:
    """Map a decoded state.json object to columns; never raises for a JSON object."""
    document = doc if isinstance(doc, dict) else dict(doc)
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
        return _json_kind(value)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

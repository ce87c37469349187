"""The state.json contract: bytes to a JSON object, and a v1 or v2 document to `sessions` columns.

Pure (no I/O, no database) so the daemon, the reconcile planner and the tests share one reading.
Unreadable bytes raise InvalidStateError; a readable object always maps, naming its bad fields.
The two generations' models live in state_documents, imported with the first document mapped.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from itertools import accumulate
from typing import Any, Final, NamedTuple

import orjson

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
        raise InvalidStateError(f"top level is {json_kind(doc)}, not an object")
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


def json_kind(value: object) -> str:
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


class MappedState(NamedTuple):
    """The `sessions` columns that come from state.json, and what was wrong with its fields.

    A tuple (immutable, as a frozen dataclass, but built in a quarter of the time: a cold
    reconcile builds one per session); `field_errors` is last, so the columns are the rest."""

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
        return dict(zip(_COLUMNS, self, strict=False))


_COLUMNS: Final = MappedState._fields[:-1]


def map_state(doc: Mapping[str, Any]) -> MappedState:
    """Map a decoded state.json object to columns; never raises for a JSON object."""
    document = doc if isinstance(doc, dict) else dict(doc)
    try:
        return _map_plain(document)
    except _Unsure:
        pass
    # The models (pydantic classes, about 5 ms to define) only now: a process that maps only
    # well-typed documents, or none (a reconcile with nothing to do, a control command), never
    # defines them.
    from sessionsync.models.state_documents import map_document

    return map_document(document)


def parse_timestamp(value: str) -> datetime | None:
    """An ISO 8601 timestamp as an aware UTC datetime (naive means UTC); None when it is not one."""
    try:
        moment = datetime.fromisoformat(value)
        # An offset is converted so every value compares the same way.
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


# --- the plain reading: well-typed documents without pydantic -------------------------------------
#
# Almost every document has every field of the right type. For those, plain type checks give the
# very MappedState that the pydantic models (state_documents) give, at a third of the cost: a cold
# reconcile maps every session. The checks are the models' own, and no more lenient: exact JSON
# types (`type(x) is int` refuses true, as strict mode does), counts within 32 bits, timestamps
# read by the same `parse_timestamp`. The first value they cannot vouch for raises `_Unsure`, and
# the models then map the whole document and word its field errors: every message comes from
# there. tests/test_state.py holds both readings equal on every example and every kind of bad field.


class _Unsure(Exception):
    """A value the plain reading does not vouch for: the pydantic models decide."""


_INT32_MIN: Final = -(2**31)
_INT32_MAX: Final = 2**31 - 1


def _text(section: dict[str, Any], key: str) -> str | None:
    value = section.get(key)
    if value is None or type(value) is str:
        return value
    raise _Unsure


def _count(section: dict[str, Any], key: str) -> int | None:
    value = section.get(key)
    if value is None or (type(value) is int and _INT32_MIN <= value <= _INT32_MAX):
        return value
    raise _Unsure


def _moment(section: dict[str, Any], key: str) -> datetime | None:
    value = section.get(key)
    if value is None:
        return None
    if type(value) is str and (moment := parse_timestamp(value)) is not None:
        return moment
    raise _Unsure


def _object(section: dict[str, Any], key: str) -> dict[str, Any] | None:
    """A JSON object as `dict[str, Any]` validates it (keys are text in JSON). The document's own
    object, not a copy as the models make: nothing changes either, and a cold reconcile holds a
    batch of documents, whose every container the garbage collector walks."""
    value = section.get(key)
    if value is None:
        return None
    if type(value) is dict and all(type(k) is str for k in value):
        return value
    raise _Unsure


def _section(document: dict[str, Any], key: str) -> dict[str, Any]:
    """A nested object whose fields are read by path; missing or null reads as empty."""
    value = document.get(key)
    if value is None:
        return {}
    if type(value) is dict and all(type(k) is str for k in value):
        return value
    raise _Unsure


def _list(section: dict[str, Any], key: str) -> list[Any] | None:
    value = section.get(key)
    if value is None:
        return None
    if type(value) is list:
        return value  # the document's own, as in _object
    raise _Unsure


def _commits(document: dict[str, Any], first: str, second: str) -> list[dict[str, Any]] | None:
    """Commit entries; the checkpoint is the first of the two keys present (as AliasChoices)."""
    entries = document.get("commits")
    if entries is None:
        return None
    if type(entries) is not list:
        raise _Unsure
    commits = []
    for entry in entries:
        if type(entry) is not dict:
            raise _Unsure
        checkpoint = entry.get(first) if first in entry else entry.get(second)
        if not (checkpoint is None or type(checkpoint) is int):
            raise _Unsure
        commits.append(
            {
                "sha": _text(entry, "sha"),
                "message": _text(entry, "message"),
                "checkpoint": checkpoint,
                "created_at": _text(entry, "created_at"),
            }
        )
    return commits


def _phase(phases: dict[str, Any], name: str) -> dict[str, Any]:
    phase = _section(phases, name)
    return {
        "started_at": _text(phase, "started_at"),
        "finalized_at": _text(phase, "finalized_at"),
        "completed_at": _text(phase, "completed_at"),
    }


def _map_plain(document: dict[str, Any]) -> MappedState:
    """`map_state` for a document whose every field has its type; `_Unsure` otherwise."""
    v2 = "phase_history" in document or "build_progress" in document
    progress = _section(document, "build_progress" if v2 else "plan_state")
    completed = _list(progress, "checkpoints_completed")
    if completed is None:
        completed = []
    if v2:
        git = _section(document, "git")
        phase_history = _object(document, "phase_history")
        session_type = _text(document, "session_type")
        status = _text(document, "status")
        commits = _commits(document, "checkpoint", "checkpoint_id")
        artifacts = _object(document, "artifacts")
        branch, worktree, base = _text(git, "branch"), _text(git, "worktree"), _text(git, "base_branch")
    else:
        phases = _section(document, "phases")
        spec, plan, build = _phase(phases, "spec"), _phase(phases, "plan"), _phase(phases, "build")
        phase_history = {
            "spec_started_at": spec["started_at"],
            "spec_completed_at": spec["finalized_at"],
            "plan_started_at": plan["started_at"],
            "plan_completed_at": plan["finalized_at"],
            "build_started_at": build["started_at"],
            "build_completed_at": build["completed_at"],
            "docs_started_at": None,
            "docs_completed_at": None,
        }
        session_type = _text(document, "granularity")
        status = "active"
        commits = _commits(document, "checkpoint_id", "checkpoint")
        artifacts = None
        branch = worktree = base = None
    total = _count(progress, "checkpoints_total")
    phase = _text(document, "current_phase")
    return MappedState(
        schema_version=2 if v2 else 1,
        session_id=_text(document, "session_id"),
        title=_text(document, "topic"),
        description=_text(document, "description"),
        session_type="full" if session_type is None else session_type,
        status="active" if status is None else status,
        current_phase="spec" if phase is None else phase,
        phase_history=phase_history,
        git_branch=branch,
        git_worktree=worktree,
        git_base_branch=base,
        checkpoints_total=0 if total is None else total,
        checkpoints_completed=len(completed),
        checkpoints_completed_list=completed,
        current_checkpoint=_count(progress, "current_checkpoint"),
        commits=commits,
        artifacts=dict(DEFAULT_ARTIFACTS) if artifacts is None else artifacts,
        created_at=_moment(document, "created_at"),
        updated_at=_moment(document, "updated_at"),
        field_errors=(),
    )

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
from dataclasses import dataclass, fields
from datetime import datetime
from itertools import accumulate
from typing import Any, Final

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
    # The models (pydantic classes, about 5 ms to define) only now: a process that maps no
    # document (a reconcile with nothing to do, a control command) never defines them.
    from sessionsync.models.state_documents import map_document

    return map_document(doc if isinstance(doc, dict) else dict(doc))

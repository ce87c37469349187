"""Control-socket framing: one JSON object per line each way, at most MAX_LINE bytes a line.

Pure functions shared by the server and the client. Module scope imports only the standard
library because the client (`sessionsync status`) must start fast; the pydantic request models
are imported by `parse_request`, which only the daemon calls.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from sessionsync.daemon.errors import ControlError

if TYPE_CHECKING:
    from pydantic import ValidationError

    from sessionsync.models.control import ControlRequest, ErrorCode

MAX_LINE = 65536
"""Longest line accepted, in bytes, not counting the newline that ends it."""

# Fields an event keeps when the whole of it would not fit on one line.
_EVENT_CORE = ("kind", "project", "slug", "at")


class ProtocolError(ControlError):
    """A request (or reply) that breaks the protocol; `code` is the error code to answer with."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)


class LineTooLong(ProtocolError):
    """A line over MAX_LINE: the rest of the stream cannot be framed, so the connection ends."""

    def __init__(self) -> None:
        super().__init__("bad_request", f"line longer than {MAX_LINE} bytes; the connection is closed")


def read_line(stream: IO[bytes]) -> bytes | None:
    """The next line without its newline; None at end of stream, including after a partial line.

    A request is only complete once its newline arrives, so a peer that hangs up mid-line has
    sent nothing. Raises LineTooLong without reading past MAX_LINE + 1 bytes.
    """
    line = stream.readline(MAX_LINE + 1)
    if not line.endswith(b"\n"):
        if len(line) > MAX_LINE:
            raise LineTooLong
        return None
    return line[:-1]


def _frame(obj: Mapping[str, Any]) -> bytes:
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    # A folder name that is not UTF-8 reaches us surrogate-escaped ("caf\udce9"); UTF-8 cannot
    # hold a lone surrogate, and JSON writes it as the escape \udce9, which backslashreplace
    # produces: the line stays valid UTF-8 and valid JSON, and the name survives the round trip.
    return text.encode("utf-8", "backslashreplace") + b"\n"


def encode_request(payload: Mapping[str, Any]) -> bytes:
    """A request line; raises ProtocolError(bad_request) when it would exceed MAX_LINE."""
    line = _frame(payload)
    if len(line) > MAX_LINE + 1:
        raise ProtocolError("bad_request", f"request of {len(line) - 1} bytes exceeds {MAX_LINE} bytes")
    return line


def encode_ok(result: Mapping[str, Any]) -> bytes:
    """A success reply line. Raises ProtocolError(internal) when the result is not JSON or too long."""
    try:
        line = _frame({"ok": True, "result": result})
    except (TypeError, ValueError) as e:
        raise ProtocolError("internal", f"the reply cannot be encoded as JSON: {e}") from e
    if len(line) > MAX_LINE + 1:
        # The line limit holds both ways; a handler with a long answer must page or truncate it.
        raise ProtocolError("internal", f"the reply of {len(line) - 1} bytes exceeds {MAX_LINE} bytes")
    return line


def encode_error(code: str, message: str) -> bytes:
    """An error reply line; a message too long for a line is cut."""
    return _frame({"ok": False, "error": {"code": code, "message": message[: MAX_LINE // 2]}})


def encode_event(event: Mapping[str, Any]) -> bytes:
    """An event line for a subscriber. Raises TypeError or ValueError when it is not JSON.

    An event too long for a line keeps kind, project, slug and at, marked `"truncated": true`,
    so the subscriber still learns that the session changed.
    """
    line = _frame(event)
    if len(line) > MAX_LINE + 1:
        line = _frame({k: event[k] for k in _EVENT_CORE if k in event} | {"truncated": True})
    return line


@dataclass(frozen=True)
class Progressing:
    """A handler's answer that streams: `run(send)` may `send` progress objects (each a line of
    its own, before the reply) and returns the result. Only for requests that asked for it."""

    run: Callable[[Callable[[Mapping[str, Any]], None]], dict[str, Any]]


def _field_name(loc: tuple[int | str, ...]) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def parse_request(line: bytes) -> ControlRequest:
    """Validate one request line (without its newline) into its command's model.

    Raises ProtocolError: bad_request for invalid UTF-8, malformed JSON, a non-object, or a
    missing, unknown or wrongly typed field (named); unknown_command for a missing or unknown cmd.
    """
    from pydantic import ValidationError

    from sessionsync.models.control import COMMANDS, REQUEST_TYPES

    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError("bad_request", f"the request is not valid UTF-8 (byte {e.start})") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProtocolError("bad_request", f"malformed JSON: {e.msg} at column {e.colno}") from e
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", f"a request must be a JSON object, got {type(obj).__name__}")
    cmd = obj.get("cmd")
    model = REQUEST_TYPES.get(cmd) if isinstance(cmd, str) else None
    if model is None:
        what = "missing 'cmd'" if cmd is None else f"unknown command {cmd!r}"
        raise ProtocolError("unknown_command", f"{what}; expected one of: {', '.join(COMMANDS)}")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise ProtocolError("bad_request", f"{cmd}: {_describe(e)}") from e


def _describe(error: ValidationError) -> str:
    problems = []
    for err in error.errors(include_url=False):
        field = _field_name(err["loc"])
        if err["type"] == "missing":
            problems.append(f"missing field '{field}'")
        elif err["type"] == "extra_forbidden":
            problems.append(f"unknown field '{field}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] != "value_error":  # a type error: show what was sent instead
                msg += f" (got {err['input']!r:.60})"
            problems.append(f"field '{field}': {msg}" if field else msg)
    return "; ".join(problems)


def parse_reply(line: bytes) -> dict[str, Any]:
    """The result of a reply line; an error reply raises ControlError(code, message).

    A line that is not a reply raises ProtocolError(internal): the daemon and client disagree.
    """
    try:
        reply = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError("internal", f"the daemon sent a malformed reply: {e}") from e
    if isinstance(reply, dict):
        result, error = reply.get("result"), reply.get("error")
        if reply.get("ok") is True and isinstance(result, dict):
            return result
        if reply.get("ok") is False and isinstance(error, dict):
            raise ControlError(str(error.get("code", "internal")), str(error.get("message", "")))
    raise ProtocolError("internal", f"the daemon sent something that is not a reply: {line[:200]!r}")

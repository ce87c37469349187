"""Control protocol units: request validation and its error codes, line framing, reply encoding."""

from __future__ import annotations

import io
import json

import pytest

from sessionsync.daemon.control.protocol import (
    MAX_LINE,
    LineTooLong,
    ProtocolError,
    encode_error,
    encode_event,
    encode_ok,
    encode_request,
    parse_reply,
    parse_request,
    read_line,
)
from sessionsync.daemon.errors import ControlError
from sessionsync.daemon.service import fit_watch_list
from sessionsync.models.control import (
    COMMANDS,
    ReconcileRequest,
    ResyncRequest,
    SubscribeRequest,
    SyncRequest,
)


def _line(obj: object) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_without_required_fields_parses(cmd: str) -> None:
    required: dict[str, dict[str, object]] = {"resync": {"all": True}, "sync": {"path": "/p/s"}}
    fields = required.get(cmd, {})
    request = parse_request(_line({"cmd": cmd, **fields}))
    assert request.cmd == cmd


def test_requests_carry_their_fields_and_defaults() -> None:
    resync = parse_request(_line({"cmd": "resync", "projects": ["/home/me/app"], "wait": True}))
    assert resync == ResyncRequest(cmd="resync", projects=["/home/me/app"], all=False, wait=True)
    assert parse_request(_line({"cmd": "reconcile"})) == ReconcileRequest(cmd="reconcile", wait=False)
    assert parse_request(_line({"cmd": "sync", "path": "/a/b"})) == SyncRequest(cmd="sync", path="/a/b")
    assert isinstance(parse_request(b'{"cmd": "subscribe"}'), SubscribeRequest)


@pytest.mark.parametrize(
    ("line", "code", "fragment"),
    [
        (b"\xff\xfe{}", "bad_request", "not valid UTF-8"),
        (b'{"cmd": "ping"', "bad_request", "malformed JSON"),
        (b"", "bad_request", "malformed JSON"),
        (b'["ping"]', "bad_request", "must be a JSON object, got list"),
        (b'"ping"', "bad_request", "must be a JSON object, got str"),
        (b"{}", "unknown_command", "missing 'cmd'"),
        (b'{"cmd": 7}', "unknown_command", "unknown command 7"),
        (b'{"cmd": "explode"}', "unknown_command", "unknown command 'explode'; expected one of: ping,"),
        (b'{"cmd": "sync"}', "bad_request", "sync: missing field 'path'"),
        (b'{"cmd": "sync", "path": 3}', "bad_request", "field 'path'"),
        (b'{"cmd": "sync", "path": "rel/dir"}', "bad_request", "must be an absolute path, got 'rel/dir'"),
        (b'{"cmd": "ping", "verbose": true}', "bad_request", "ping: unknown field 'verbose'"),
        (b'{"cmd": "reconcile", "wait": "yes"}', "bad_request", "field 'wait'"),
        (b'{"cmd": "reconcile", "wait": 1}', "bad_request", "field 'wait'"),
        (b'{"cmd": "resync"}', "bad_request", "exactly one of a non-empty 'projects' list or 'all': true"),
        (b'{"cmd": "resync", "projects": []}', "bad_request", "exactly one of"),
        (b'{"cmd": "resync", "projects": ["/a"], "all": true}', "bad_request", "exactly one of"),
        (b'{"cmd": "resync", "projects": "/a"}', "bad_request", "field 'projects'"),
        (b'{"cmd": "resync", "projects": ["/a", 5]}', "bad_request", "field 'projects[1]'"),
        (b'{"cmd": "resync", "projects": ["app"]}', "bad_request", "field 'projects'"),
    ],
)
def test_malformed_requests_name_the_problem(line: bytes, code: str, fragment: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_request(line)
    assert caught.value.code == code
    assert fragment in caught.value.message


def test_read_line_frames_lines_and_drops_a_partial_one() -> None:
    stream = io.BytesIO(b'{"cmd":"ping"}\n{"cmd":"status"}\n{"cmd":"pi')
    assert read_line(stream) == b'{"cmd":"ping"}'
    assert read_line(stream) == b'{"cmd":"status"}'
    assert read_line(stream) is None  # a peer that hangs up mid-line sent nothing
    assert read_line(io.BytesIO(b"")) is None


def test_read_line_accepts_max_line_bytes_and_refuses_one_more() -> None:
    assert read_line(io.BytesIO(b"x" * MAX_LINE + b"\n")) == b"x" * MAX_LINE
    with pytest.raises(LineTooLong) as caught:
        read_line(io.BytesIO(b"x" * (MAX_LINE + 1) + b"\n"))
    assert caught.value.code == "bad_request"
    assert str(MAX_LINE) in caught.value.message


def test_replies_round_trip() -> None:
    ok = encode_ok({"projects": 1, "name": "café"})
    assert ok.endswith(b"\n")
    assert ok.count(b"\n") == 1
    assert parse_reply(ok[:-1]) == {"projects": 1, "name": "café"}
    with pytest.raises(ControlError) as caught:
        parse_reply(encode_error("not_found", "no project at /home/me/x")[:-1])
    assert (caught.value.code, caught.value.message) == ("not_found", "no project at /home/me/x")


def test_error_reply_shape() -> None:
    assert json.loads(encode_error("bad_request", "nope")) == {
        "ok": False,
        "error": {"code": "bad_request", "message": "nope"},
    }
    assert len(encode_error("internal", "x" * (2 * MAX_LINE))) <= MAX_LINE


@pytest.mark.parametrize(
    ("result", "fragment"),
    [
        ({"at": object()}, "cannot be encoded as JSON"),
        ({"ratio": float("nan")}, "cannot be encoded as JSON"),
        ({"blob": "x" * MAX_LINE}, "exceeds"),
    ],
)
def test_a_result_that_cannot_be_sent_is_an_internal_error(result: dict[str, object], fragment: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        encode_ok(result)
    assert caught.value.code == "internal"
    assert fragment in caught.value.message


@pytest.mark.parametrize("line", [b"not json", b"[]", b'{"ok": true}', b'{"ok": false, "error": "x"}'])
def test_a_line_that_is_not_a_reply_is_an_internal_error(line: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_reply(line)
    assert caught.value.code == "internal"


def test_events_are_one_line_and_an_oversized_one_keeps_its_core() -> None:
    event = {"kind": "session.updated", "project": "/p", "slug": "s", "at": "2024-05-01T10:00:00+00:00"}
    assert json.loads(encode_event(event)) == event
    huge = encode_event({**event, "detail": "x" * MAX_LINE})
    assert len(huge) <= MAX_LINE + 1
    assert json.loads(huge) == {**event, "truncated": True}
    with pytest.raises(TypeError):
        encode_event({"kind": "x", "at": object()})


def test_an_oversized_request_is_refused_before_sending() -> None:
    assert encode_request({"cmd": "ping"}) == b'{"cmd":"ping"}\n'
    with pytest.raises(ProtocolError) as caught:
        encode_request({"cmd": "sync", "path": "/" + "x" * MAX_LINE})
    assert caught.value.code == "bad_request"


def test_a_status_reply_for_thousands_of_projects_fits_one_line() -> None:
    watch = [{"project": f"/home/me/code/project-{n:05d}", "state": "live"} for n in range(3000)]
    watch[10]["state"] = watch[2999]["state"] = "fallback"
    reply = {"pid": 1, "watch": watch, "watch_states": {"fallback": 2, "live": 2998}}
    assert len(json.dumps(reply)) > MAX_LINE
    fitted = fit_watch_list(reply)
    line = encode_ok(fitted)  # the server's own encoder: raises past MAX_LINE
    assert len(line) <= MAX_LINE + 1
    assert MAX_LINE - len(line) < 200  # as many entries as fit, not a few
    kept = fitted["watch"]
    assert fitted["watch_left_out"] == 3000 - len(kept)
    assert [e for e in kept if e["state"] != "live"] == [watch[10], watch[2999]]  # never the faults
    assert kept == [e for e in watch if e in kept]  # still in the list's order
    assert fitted["watch_states"] == {"fallback": 2, "live": 2998}
    small = {"pid": 1, "watch": watch[:5], "watch_states": {"live": 5}}
    assert fit_watch_list(small) is small

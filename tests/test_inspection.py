"""One session folder inspected on its own (no database): the settle time for half-written files."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sessionsync.daemon.inspection import Action, Change, Verdict, inspect
from sessionsync.models.keys import SessionKey
from tests.support.sessions import fixture_doc, write_state

MAX_BYTES = 1 << 20
SETTLE_NS = 60 * 1_000_000_000  # a minute: "just written" beyond doubt, however slow the machine


def look(project: Path, slug: str, settle_ns: int) -> Change | Verdict:
    return inspect(
        SessionKey(str(project), slug), str(project / "agents" / "sessions"), None, MAX_BYTES, settle_ns
    )


def age(path: Path, seconds: float) -> None:
    """Set the file's mtime `seconds` ago (negative: in the future)."""
    when = time.time() - seconds
    os.utime(path, (when, when))


def test_a_just_written_file_that_does_not_parse_is_unsettled(project: Path) -> None:
    write_state(project, "half", b'{"topic": "cut sh')
    assert look(project, "half", SETTLE_NS) is Verdict.UNSETTLED


def test_without_a_settle_time_it_is_invalid_at_once(project: Path) -> None:
    write_state(project, "half", b'{"topic": "cut sh')
    outcome = look(project, "half", 0)
    assert isinstance(outcome, Change) and outcome.invalid


def test_once_settled_it_is_invalid(project: Path) -> None:
    path = write_state(project, "broken", b'{"topic": "cut sh')
    age(path, 61)
    outcome = look(project, "broken", SETTLE_NS)
    assert isinstance(outcome, Change) and outcome.invalid and outcome.error


def test_an_mtime_in_the_future_counts_as_settled(project: Path) -> None:
    """Else a broken file stamped ahead of the clock would be looked at again and again."""
    path = write_state(project, "ahead", b"not json")
    age(path, -3600)
    outcome = look(project, "ahead", SETTLE_NS)
    assert isinstance(outcome, Change) and outcome.invalid


def test_a_just_written_valid_file_is_written_at_once(project: Path) -> None:
    write_state(project, "fine", fixture_doc("v2-build"))
    outcome = look(project, "fine", SETTLE_NS)
    assert isinstance(outcome, Change) and outcome.action is Action.WRITE and not outcome.invalid

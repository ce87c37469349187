"""RecentErrors: what `status` lists under recent_errors, collected from the log as it is written."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from loguru import logger

from sessionsync.daemon.recent_errors import RecentErrors

S1 = "/p/agents/sessions/s1"
S2 = "/p/agents/sessions/s2"


@pytest.fixture
def recent() -> Iterator[RecentErrors]:
    errors = RecentErrors(size=3)
    errors.attach()
    yield errors
    errors.detach()


def test_warnings_and_errors_are_kept_with_their_session_info_and_debug_are_not(
    recent: RecentErrors,
) -> None:
    logger.bind(session=S1, project="/p").warning("state.json is not valid JSON")
    logger.info("an ordinary day")
    logger.debug("details")
    logger.error("database unavailable")
    entries = recent.entries()
    assert [(e["level"], e["session"], e["project"], e["message"]) for e in entries] == [
        ("WARNING", S1, "/p", "state.json is not valid JSON"),
        ("ERROR", None, None, "database unavailable"),
    ]
    assert all(e["at"] for e in entries)


def test_only_the_last_ones_are_kept(recent: RecentErrors) -> None:
    for i in range(5):
        logger.warning("warning {}", i)
    assert [e["message"] for e in recent.entries()] == ["warning 2", "warning 3", "warning 4"]


def event(kind: str, path: str, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "path": path, **extra}


def test_a_session_written_clean_or_gone_drops_out(recent: RecentErrors) -> None:
    logger.bind(session=S1).warning("s1 is invalid")
    logger.bind(session=S2).warning("s2 is invalid")
    logger.error("not about a session")
    recent.forget_fixed([event("session.updated", S1), {"kind": "project.resynced", "project": "/p"}])
    assert [e["message"] for e in recent.entries()] == ["s2 is invalid", "not about a session"]
    recent.forget_fixed([event("session.deleted", S2)])
    assert [e["message"] for e in recent.entries()] == ["not about a session"]


@pytest.mark.parametrize(
    "written", [event("session.invalid", S1), event("session.updated", S1, fields=["status"])]
)
def test_a_session_written_invalid_again_or_with_field_problems_keeps_its_entry(
    recent: RecentErrors, written: dict[str, Any]
) -> None:
    logger.bind(session=S1).warning("s1 is invalid")
    recent.forget_fixed([written])
    assert [e["message"] for e in recent.entries()] == ["s1 is invalid"]


def test_nothing_is_collected_once_detached(recent: RecentErrors) -> None:
    recent.detach()
    logger.warning("after")
    assert recent.entries() == []
    recent.detach()  # twice is harmless

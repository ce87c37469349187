"""Shared fixtures: a real database per test (SQLite file, or the test PostgreSQL server), session
folders written like agents write them, and a deadline-based wait.

PostgreSQL comes from $SESSIONSYNC_TEST_PG_URL; without it those tests skip, unless $CI is
set, where they fail: CI must never pass by skipping the production database.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from sessionsync.models.keys import SessionKey

FIXTURES = Path(__file__).parent / "fixtures" / "state-json"
PG_URL = os.environ.get("SESSIONSYNC_TEST_PG_URL", "")
IN_CI = bool(os.environ.get("CI"))


def require_postgres() -> str:
    """The test PostgreSQL URL; skips (or fails under CI) when there is none or it is down."""
    if not PG_URL:
        if IN_CI:
            pytest.fail("SESSIONSYNC_TEST_PG_URL is not set, and CI must run the PostgreSQL tests")
        pytest.skip("SESSIONSYNC_TEST_PG_URL is not set")
    import psycopg

    try:
        psycopg.connect(_libpq(PG_URL), connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL at {PG_URL} is unreachable under CI: {exc}")
        pytest.skip(f"PostgreSQL at {PG_URL} is unreachable: {exc}")
    return PG_URL


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A URL whose connections live in a new, empty schema (dropped afterwards), so tests and
    concurrent runs on one server never see each other's tables."""
    import psycopg

    base = require_postgres()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(base), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(_libpq(base), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL with nothing in it: a new SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sessions.db'}"
        return
    with postgres_schema() as url:
        yield url


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_schema() as url:
        yield url


def fixture_doc(name: str) -> dict[str, Any]:
    """One of the example state.json documents, parsed."""
    return dict(json.loads((FIXTURES / f"{name}.json").read_text()))


def write_state(
    project: Path, slug: str, content: dict[str, Any] | bytes | str, *, atomic: bool = True
) -> Path:
    """Write a session's state.json the way agents do: a temp file renamed into place."""
    folder = project / "agents" / "sessions" / slug
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(content, dict):
        data = json.dumps(content).encode()
    elif isinstance(content, str):
        data = content.encode()
    else:
        data = content
    target = folder / "state.json"
    if atomic:
        tmp = folder / "state.json.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, target)
    else:
        target.write_bytes(data)
    return target


def remove_session(project: Path, slug: str) -> None:
    shutil.rmtree(project / "agents" / "sessions" / slug)


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll `condition` until it returns something truthy; fail with a clear message at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s (last value: {last!r})")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An empty project folder with its agents/sessions folder."""
    path = tmp_path / "proj"
    (path / "agents" / "sessions").mkdir(parents=True)
    return path.resolve()


class Recorder:
    """Collects what the watcher reports; `wait` blocks until a condition holds or fails at a deadline."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.keys: list[SessionKey] = []
        self.resyncs: list[tuple[str, str]] = []

    def on_key(self, key: SessionKey) -> None:
        with self.cond:
            self.keys.append(key)
            self.cond.notify_all()

    def on_resync(self, project: str, reason: str) -> None:
        with self.cond:
            self.resyncs.append((project, reason))
            self.cond.notify_all()

    def wait(self, condition: Callable[[], bool], timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(condition, timeout)

    def expect_keys(self, *keys: SessionKey) -> None:
        assert self.wait(lambda: set(keys) <= set(self.keys)), f"missing {set(keys) - set(self.keys)}"

    def expect_resync(self, project: str, reason: str, count: int = 1) -> None:
        assert self.wait(lambda: self.resyncs.count((project, reason)) >= count), (
            f"no {count} x {reason!r} for {project}; got {self.resyncs}"
        )

    def clear(self) -> None:
        with self.cond:
            self.keys.clear()
            self.resyncs.clear()

"""Shared fixtures: a real database per test (SQLite file, or the test PostgreSQL server), session
folders written like agents write them, and a deadline-based wait.

PostgreSQL comes from $SESSIONSYNC_TEST_PG_URL; without it those tests skip, unless $CI is
set, where they fail: CI must never pass by skipping the production database.

Tests marked `sysctl` lower machine-wide inotify settings for a moment, under every process on the
box; they run only with SESSIONSYNC_TEST_SYSCTL=1 (CI sets it). Whatever runs, the session fails
if any inotify setting differs at the end from what it was at the start.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import tempfile
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
SYSCTL_ENV = "SESSIONSYNC_TEST_SYSCTL"
# The machine-wide inotify settings. fs.inotify.max_user_{watches,instances} and
# user.max_inotify_{watches,instances} are two names for one value each (the initial user
# namespace's); both are read, and both names' locks are taken.
INOTIFY_SYSCTL_GLOBS = ("/proc/sys/fs/inotify/*", "/proc/sys/user/max_inotify_*")
SETTLE_LOCK_S = 300.0


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("sysctl") is None:
        return
    if os.environ.get(SYSCTL_ENV) != "1":
        pytest.skip(f"changes machine-wide inotify sysctls; set {SYSCTL_ENV}=1 to run it (CI does)")
    if os.geteuid() != 0:
        pytest.skip("changing sysctls needs root")


def sysctl_lock_path(name: str) -> Path:
    """The lock file a run holds (exclusively) while it has lowered the setting `name`
    (`fs.inotify.max_queued_events`), so that no other run reads the lowered value as the original."""
    return Path(tempfile.gettempdir()) / f"sessionsync-sysctl-{name}.lock"


def _sysctl_name(path: str) -> str:
    return path.removeprefix("/proc/sys/").replace("/", ".")


def inotify_sysctls() -> dict[str, str]:
    """Every inotify setting under /proc/sys, by path, read while no run of ours has one lowered
    (shared locks on every setting's lock, waiting up to SETTLE_LOCK_S for a holder to put it back)."""
    paths = sorted(p for pattern in INOTIFY_SYSCTL_GLOBS for p in glob.glob(pattern))
    with contextlib.ExitStack() as stack:
        deadline = time.monotonic() + SETTLE_LOCK_S
        for path in paths:
            fd = os.open(sysctl_lock_path(_sysctl_name(path)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            stack.callback(os.close, fd)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"{path} stayed locked (lowered by another run) for {SETTLE_LOCK_S} s"
                        ) from None
                    time.sleep(0.05)
        return {path: Path(path).read_text().strip() for path in paths}


@pytest.fixture(scope="session", autouse=True)
def machine_inotify_settings_unchanged() -> Iterator[None]:
    """Fails the run when a test left a machine-wide inotify setting changed, naming it with its value
    before and after, and puts the value back: tests use the watcher's seam (InotifyFaults) or a user
    namespace of their own, and only `sysctl` tests may lower a setting, for a moment."""
    before = inotify_sysctls()
    yield
    after = inotify_sysctls()
    changed = {path: (was, after.get(path)) for path, was in before.items() if after.get(path) != was}
    if not changed:
        return
    for path, (was, _) in changed.items():
        with contextlib.suppress(OSError):
            Path(path).write_text(was)
    lines = [
        f"{path}: {was} before the run, {now} after it (put back to {was})"
        for path, (was, now) in changed.items()
    ]
    pytest.fail("the tests changed machine-wide inotify settings:\n  " + "\n  ".join(lines), pytrace=False)


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

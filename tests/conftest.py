"""Fixtures and session-wide guards. The helpers themselves live in tests.support, which the
benchmarks import too.

Every test gets a real database where it asks for one (`db_url`: a SQLite file, or a schema of
its own on the test PostgreSQL server). PostgreSQL comes from $SESSIONSYNC_TEST_PG_URL; without it
those tests skip, unless $CI is set, where they fail: CI must never pass by skipping the
production database.

After every test, no database connection it (or the code it ran) checked out may still be out or
have been left to the garbage collector: see tests.support.leaks.

Tests marked `sysctl` lower machine-wide inotify settings for a moment, under every process on the
box; they run only with SESSIONSYNC_TEST_SYSCTL=1 (CI sets it). Whatever runs, the session fails
if any inotify setting differs at the end from what it was at the start.

The suite runs in parallel worker processes (pytest-xdist, `-n` in pyproject's addopts). A `sysctl`
test runs alone all the same: it holds the run's machine lock exclusively, every other test holds
it shared (tests.support.machine_lock).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from sessionsync.daemon.db import make_engine
from sessionsync.daemon.migrate import upgrade
from sessionsync.daemon.store import Store
from tests.support.databases import libpq_url, postgres_schema
from tests.support.inotify_limits import inotify_sysctls
from tests.support.leaks import ConnectionLedger
from tests.support.machine_lock import MachineLock
from tests.support.newuser import NewUser

PG_URL = os.environ.get("SESSIONSYNC_TEST_PG_URL", "")
IN_CI = bool(os.environ.get("CI"))
SYSCTL_ENV = "SESSIONSYNC_TEST_SYSCTL"


def pytest_configure(config: pytest.Config) -> None:
    MachineLock.configure(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    MachineLock.unconfigure(config)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    # Setup, call and teardown under the lock: a `sysctl` test's fixtures change the machine too.
    with MachineLock.held(exclusive=item.get_closest_marker("sysctl") is not None):
        return (yield)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("sysctl") is None:
        return
    if os.environ.get(SYSCTL_ENV) != "1":
        pytest.skip(f"changes machine-wide inotify sysctls; set {SYSCTL_ENV}=1 to run it (CI does)")
    if os.geteuid() != 0:
        pytest.skip("changing sysctls needs root")


@pytest.fixture(scope="session", autouse=True)
def machine_inotify_settings_unchanged() -> Iterator[None]:
    """Fails the run when a test left a machine-wide inotify setting changed, naming it with its value
    before and after, and puts the value back: tests use the watcher's seam (InotifyFaults) or a user
    namespace of their own, and only `sysctl` tests may lower a setting, for a moment."""
    with MachineLock.held(exclusive=False):
        before = inotify_sysctls()
    yield
    with MachineLock.held(exclusive=False):
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


# -- leaked database connections ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def connection_ledger() -> Iterator[ConnectionLedger]:
    with ConnectionLedger() as ledger:
        yield ledger


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Kept on the item, so that the leak check can tell a test that already failed.
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def no_leaked_connections(
    request: pytest.FixtureRequest, connection_ledger: ConnectionLedger
) -> Iterator[None]:
    """After the test and its fixtures (torn down before this, as it is set up first): every pool
    connection checked out meanwhile is back in its pool, and none got there by the garbage collector.
    A test that failed already is not told about the connections its failure left behind."""
    connection_ledger.begin()
    yield
    leaks = connection_ledger.end()
    if leaks and not request.node.stash.get(_CALL_FAILED, False):
        pytest.fail(leaks.message(), pytrace=False)


# -- databases ---------------------------------------------------------------------------------------


def require_postgres() -> str:
    """The test PostgreSQL URL; skips (or fails under CI) when there is none or it is down."""
    if not PG_URL:
        if IN_CI:
            pytest.fail("SESSIONSYNC_TEST_PG_URL is not set, and CI must run the PostgreSQL tests")
        pytest.skip("SESSIONSYNC_TEST_PG_URL is not set")
    import psycopg

    try:
        psycopg.connect(libpq_url(PG_URL), connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL at {PG_URL} is unreachable under CI: {exc}")
        pytest.skip(f"PostgreSQL at {PG_URL} is unreachable: {exc}")
    return PG_URL


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL with nothing in it: a new SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sessions.db'}"
        return
    with postgres_schema(require_postgres()) as schema:
        yield schema.url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on `db_url` with the schema migrated to the head."""
    engine = make_engine(db_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine: Engine) -> Store:
    return Store(engine)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A new, empty schema on the test PostgreSQL server (dropped afterwards)."""
    with postgres_schema(require_postgres()) as schema:
        yield schema.url


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An empty project folder with its agents/sessions folder."""
    path = tmp_path / "proj"
    (path / "agents" / "sessions").mkdir(parents=True)
    return path.resolve()


@pytest.fixture
def user(tmp_path: Path) -> Iterator[NewUser]:
    """A new user with a fresh home (see tests.support.newuser); its daemons are killed after."""
    new = NewUser(tmp_path)
    try:
        yield new
    finally:
        new.close()

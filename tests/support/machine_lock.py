"""One lock for the whole test run, across pytest-xdist's worker processes: a test that changes the
machine (marker `sysctl`) holds it exclusively, every other test shared, so no test runs while a
machine-wide setting is lowered.

The lock is two flock(2) files in a folder the controlling process makes before its workers start
(they find it through the environment) and removes at the end. Writers come first: an exclusive
holder takes the turnstile and keeps it while it waits, so new shared holders queue behind it
instead of starving it. Without xdist there is one process and the lock does nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

FOLDER_ENV = "SESSIONSYNC_TEST_MACHINE_LOCK_DIR"
_MADE_HERE = pytest.StashKey[str]()


class MachineLock:
    _files: tuple[int, int] | None = None  # (turnstile, lock) descriptors of this worker

    @staticmethod
    def configure(config: pytest.Config) -> None:
        """In the controlling process of a parallel run: the lock's folder, for the workers."""
        parallel = bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")
        if parallel and FOLDER_ENV not in os.environ:
            folder = tempfile.mkdtemp(prefix="sessionsync-tests-lock-")
            os.environ[FOLDER_ENV] = folder
            config.stash[_MADE_HERE] = folder

    @staticmethod
    def unconfigure(config: pytest.Config) -> None:
        folder = config.stash.get(_MADE_HERE, None)
        if folder is not None:
            del os.environ[FOLDER_ENV]
            shutil.rmtree(folder, ignore_errors=True)

    @classmethod
    @contextlib.contextmanager
    def held(cls, *, exclusive: bool) -> Iterator[None]:
        folder = os.environ.get(FOLDER_ENV)
        if folder is None:
            yield
            return
        if cls._files is None:
            cls._files = (_open(Path(folder, "turnstile")), _open(Path(folder, "lock")))
        turnstile, lock = cls._files
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(turnstile, fcntl.LOCK_UN)


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

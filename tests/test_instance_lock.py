"""InstanceLock: one holder per database, the refused one told who holds it, free again on release."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sessionsync.daemon.errors import AlreadyRunning
from sessionsync.daemon.instance_lock import InstanceLock


def test_a_second_daemon_on_the_same_database_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    first = InstanceLock(tmp_path / "run", "sqlite:////db")
    first.acquire()
    try:
        # flock conflicts between two opens of the file even in one process: a second daemon's stand-in.
        with pytest.raises(AlreadyRunning) as refused:
            InstanceLock(tmp_path / "run", "sqlite:////db").acquire()
        assert f"(pid {os.getpid()})" in refused.value.message
        assert str(first.path) in refused.value.hint
    finally:
        first.release()


def test_released_the_lock_can_be_taken_again(tmp_path: Path) -> None:
    first = InstanceLock(tmp_path, "postgresql://u:***@h/db")
    first.acquire()
    first.release()
    second = InstanceLock(tmp_path, "postgresql://u:***@h/db")
    second.acquire()
    second.release()
    first.release()  # releasing twice is harmless


def test_another_database_has_a_lock_of_its_own(tmp_path: Path) -> None:
    a, b = InstanceLock(tmp_path, "sqlite:////a"), InstanceLock(tmp_path, "sqlite:////b")
    assert a.path != b.path
    a.acquire()
    b.acquire()
    a.release()
    b.release()


def test_the_lock_file_is_private_and_its_folder_created_private(tmp_path: Path) -> None:
    lock = InstanceLock(tmp_path / "runtime" / "sessionsync", "sqlite:////db")
    lock.acquire()
    try:
        assert stat.S_IMODE(lock.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(lock.path.parent.stat().st_mode) == 0o700
        assert lock.path.read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()

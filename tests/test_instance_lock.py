"""LockFile: one holder per lock file, the refused one told who holds it, free again on release,
and a file planted at its path never written through."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sessionsync.daemon.errors import AlreadyRunning, ConfigError
from sessionsync.daemon.instance_lock import LockFile


def _lock(folder: Path, holder: str = "pid 1, control socket /run/x.sock") -> LockFile:
    return LockFile(folder / "sessions.db.lock", holder, f"the database {folder / 'sessions.db'}")


def test_a_second_holder_is_refused_with_the_first_ones_description(tmp_path: Path) -> None:
    first = _lock(tmp_path, "pid 4242, control socket /run/a/control.sock")
    first.acquire()
    try:
        # flock conflicts between two opens of the file even in one process: a second daemon's stand-in.
        with pytest.raises(AlreadyRunning) as refused:
            _lock(tmp_path, "pid 7, control socket /run/b/control.sock").acquire()
        assert "(pid 4242, control socket /run/a/control.sock)" in refused.value.message
        assert str(tmp_path / "sessions.db") in refused.value.message
    finally:
        first.release()


def test_released_the_lock_can_be_taken_again(tmp_path: Path) -> None:
    first = _lock(tmp_path)
    first.acquire()
    first.release()
    second = _lock(tmp_path)
    second.acquire()
    second.release()
    first.release()  # releasing twice is harmless


def test_the_lock_file_is_private_and_names_its_holder(tmp_path: Path) -> None:
    lock = _lock(tmp_path, "pid 9, control socket /s")
    lock.acquire()
    try:
        assert stat.S_IMODE(lock.path.stat().st_mode) == 0o600
        assert lock.path.read_text() == "pid 9, control socket /s\n"
    finally:
        lock.release()


def test_a_link_at_the_lock_path_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    (tmp_path / "sessions.db.lock").symlink_to(target)
    with pytest.raises(ConfigError, match="is a symbolic link; refusing to use it"):
        _lock(tmp_path).acquire()
    assert target.read_text() == "keep me\n"


def test_a_hard_link_at_the_lock_path_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    os.link(target, tmp_path / "sessions.db.lock")
    with pytest.raises(ConfigError, match="has 2 hard links"):
        _lock(tmp_path).acquire()
    assert target.read_text() == "keep me\n"


def test_a_folder_others_may_write_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    with pytest.raises(ConfigError, match="is writable by other users"):
        _lock(tmp_path).acquire()
    tmp_path.chmod(0o1777)  # sticky, as /tmp: others cannot replace our files there
    lock = _lock(tmp_path)
    lock.acquire()
    lock.release()

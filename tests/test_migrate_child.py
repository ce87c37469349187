"""The schema migration run in a child process (daemon/migrate_child.py), on both databases."""

from __future__ import annotations

import os
from pathlib import Path

from sessionsync.daemon.db import make_engine
from sessionsync.daemon.migrate import current_revision
from sessionsync.daemon.migrate_child import upgrade_in_child
from sessionsync.models.migrations import HEAD


def test_the_child_brings_an_empty_database_to_head(db_url: str) -> None:
    assert upgrade_in_child(db_url, False, 20.0, os.environ) == (None, HEAD)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            assert current_revision(conn) == HEAD
    finally:
        engine.dispose()
    assert upgrade_in_child(db_url, False, 20.0, os.environ) == (HEAD, HEAD)


def test_a_child_that_fails_answers_none(tmp_path: Path) -> None:
    # A SQLite file below a plain file cannot be made: the caller migrates in-process instead,
    # and so raises the error as it is.
    (tmp_path / "plain").write_text("")
    url = f"sqlite:///{tmp_path / 'plain' / 'sessions.db'}"
    assert upgrade_in_child(url, False, 20.0, os.environ) is None

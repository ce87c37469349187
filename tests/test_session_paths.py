"""Path translation on its own: which session folders an event below a sessions folder touches.
Plain paths in, slugs out; only the symbolic-link cases look at the filesystem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sessionsync.daemon.session_paths import FsEvent, event_slugs, slug_for


@pytest.mark.parametrize(
    ("path", "is_dir", "slug"),
    [
        ("/s/a", True, "a"),
        ("/s/a", False, None),  # a file right in the sessions folder
        ("/s/a/state.json", False, "a"),
        ("/s/a/spec.md", False, "a"),
        ("/s/a/plan.json", False, "a"),
        ("/s/a/plan.md", False, None),
        ("/s/a/state.json.tmp", False, None),
        ("/s/a/research/state.json", False, None),
        ("/s/.trash", True, None),
        ("/s/.trash/state.json", False, None),
        ("/s", True, None),
        ("/other/a/state.json", False, None),
        ("/sx/a/state.json", False, None),
    ],
)
def test_slug_for(path: str, is_dir: bool, slug: str | None) -> None:
    assert slug_for("/s", path, is_directory=is_dir) == slug


@pytest.mark.parametrize(
    ("event", "slugs"),
    [
        (FsEvent("closed", "/s/a/state.json"), ["a"]),
        (FsEvent("created", "/s/a", is_directory=True), ["a"]),
        (FsEvent("deleted", "/s/a", is_directory=True), ["a"]),
        (FsEvent("created", "/s/a/state.json.tmp"), []),
        # An atomic replace: the temp file renamed over state.json.
        (FsEvent("moved", "/s/a/state.json.tmp", "/s/a/state.json"), ["a"]),
        # A session folder renamed: both names change.
        (FsEvent("moved", "/s/b", "/s/a", is_directory=True), ["a", "b"]),
        # Moved to a hidden name (a trash folder): only the old name.
        (FsEvent("moved", "/s/a", "/s/.trash-1", is_directory=True), ["a"]),
        (FsEvent("moved", "/s/a/research/x", "/s/a/research/y"), []),
        # A removed entry right in the sessions folder may have been a linked session.
        (FsEvent("deleted", "/s/gone"), ["gone"]),
        (FsEvent("deleted", "/s/.hidden"), []),
    ],
)
def test_event_slugs(event: FsEvent, slugs: list[str]) -> None:
    assert event_slugs("/s", event) == slugs


def test_a_symbolic_link_where_a_session_folder_would_be_is_a_session(tmp_path: Path) -> None:
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    os.symlink(tmp_path, sessions / "linked")
    (sessions / "README.md").write_text("not a session")
    assert event_slugs(str(sessions), FsEvent("created", str(sessions / "linked"))) == ["linked"]
    assert event_slugs(str(sessions), FsEvent("created", str(sessions / "README.md"))) == []
    moved_in = FsEvent("moved", str(sessions / "README.md"), str(sessions / "linked"))
    assert event_slugs(str(sessions), moved_in) == ["README.md", "linked"]

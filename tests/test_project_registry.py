"""ProjectRegistry: adding and removing projects, and the lookups behind `resync` and `sync`,
links included (projects are known by their real path; users may name them through a link)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sessionsync.daemon.project_registry import ProjectRegistry
from sessionsync.daemon.store import ProjectRef
from sessionsync.models.keys import SessionKey


def ref(path: Path, ident: int = 1) -> ProjectRef:
    return ProjectRef(ident, str(path), str(path / "agents" / "sessions"))


@pytest.fixture
def app(tmp_path: Path) -> Path:
    (tmp_path / "app" / "agents" / "sessions").mkdir(parents=True)
    return (tmp_path / "app").resolve()


@pytest.fixture
def registry(app: Path) -> ProjectRegistry:
    registry = ProjectRegistry()
    registry.add({str(app): ref(app)})
    return registry


def test_add_remove_and_count(tmp_path: Path) -> None:
    registry = ProjectRegistry()
    a, b = tmp_path / "a", tmp_path / "b"
    registry.add({str(a): ref(a, 1), str(b): ref(b, 2)})
    assert set(registry.refs()) == {str(a), str(b)}
    assert len(registry) == 2
    registry.remove([str(a), str(tmp_path / "never-there")])
    assert list(registry.refs()) == [str(b)]
    assert len(registry) == 1


def test_add_replaces_a_projects_reference(tmp_path: Path) -> None:
    registry = ProjectRegistry()
    registry.add({str(tmp_path): ref(tmp_path, 1)})
    registry.add({str(tmp_path): ref(tmp_path, 7)})
    assert registry.refs()[str(tmp_path)].id == 7


def test_refs_is_a_copy(registry: ProjectRegistry, app: Path) -> None:
    registry.refs().clear()
    assert str(app) in registry.refs()


def test_unknown_keeps_the_folders_as_given(registry: ProjectRegistry, app: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(app)
    assert registry.unknown([str(app), str(link), str(tmp_path / "x"), "/nowhere"]) == [
        str(tmp_path / "x"),
        "/nowhere",
    ]


def test_session_at_names_the_session_and_its_folder(registry: ProjectRegistry, app: Path) -> None:
    folder = app / "agents" / "sessions" / "s1"
    # The folder need not exist: a sync of a vanished session still has to be found.
    assert registry.session_at(str(folder)) == (SessionKey(str(app), "s1"), str(folder))
    assert registry.session_at(f"{folder}/") == (SessionKey(str(app), "s1"), str(folder))


def test_session_at_through_a_link_answers_with_the_projects_own_path(
    registry: ProjectRegistry, app: Path, tmp_path: Path
) -> None:
    link = tmp_path / "code"
    link.symlink_to(app)
    found = registry.session_at(str(link / "agents" / "sessions" / "s1"))
    assert found == (SessionKey(str(app), "s1"), str(app / "agents" / "sessions" / "s1"))


@pytest.mark.parametrize(
    "where", ["agents/sessions", "agents", "agents/sessions/s1/deeper", "elsewhere/s1", "../other/s1"]
)
def test_session_at_refuses_a_folder_outside_a_sessions_folder(
    registry: ProjectRegistry, app: Path, where: str
) -> None:
    assert registry.session_at(str(app / where)) is None

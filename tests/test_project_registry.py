"""ProjectRegistry: adding, replacing and removing projects."""

from __future__ import annotations

from pathlib import Path

import pytest

from sessionsync.daemon.project_registry import ProjectRegistry
from sessionsync.daemon.store import ProjectRef


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

"""Find projects: the configured ones plus every folder under the roots that holds agents/sessions.

The walk stays shallow (`discover_depth`), never follows links and skips folders that are
never projects (hidden ones, node_modules, virtual environments, caches), so a home folder
with hundreds of thousands of folders costs milliseconds, not minutes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from loguru import logger

SKIP = frozenset({"node_modules", ".git", ".venv", "venv", "__pycache__"})


@dataclass(frozen=True, slots=True, order=True)
class ProjectPath:
    """A project folder (absolute, links resolved) and its sessions folder."""

    path: str
    sessions_dir: str


def project_at(folder: str, sessions_subdir: str) -> ProjectPath:
    path = os.path.realpath(folder)
    return ProjectPath(path, os.path.normpath(os.path.join(path, sessions_subdir)))


def discover(
    projects: Iterable[str], roots: Iterable[str], depth: int, sessions_subdir: str
) -> list[ProjectPath]:
    """Configured projects (kept even while their sessions folder is missing) plus found ones."""
    found = {project_at(p, sessions_subdir) for p in projects}
    for root in roots:
        if not os.path.isdir(root):
            logger.warning("watch root {} does not exist or is not a folder; skipped", root)
            continue
        found.update(_walk(os.path.realpath(root), depth, sessions_subdir))
    return sorted(found)


def _walk(root: str, depth: int, sessions_subdir: str) -> Iterable[ProjectPath]:
    stack = [(root, 0)]
    while stack:
        folder, level = stack.pop()
        if os.path.isdir(os.path.join(folder, sessions_subdir)):
            yield project_at(folder, sessions_subdir)
        if level >= depth:
            continue
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith(".") or entry.name in SKIP:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        stack.append((entry.path, level + 1))
        except OSError:
            # Unreadable folders (permissions, vanished mid-walk) are simply not searched.
            continue


def list_slugs(sessions_dir: str) -> list[str]:
    """Session folder names (links included, so they can be reported); hidden names skipped."""
    try:
        with os.scandir(sessions_dir) as entries:
            return [
                e.name
                for e in entries
                if (e.is_dir(follow_symlinks=False) or e.is_symlink()) and not e.name.startswith(".")
            ]
    except (FileNotFoundError, NotADirectoryError):
        return []

"""What a filesystem event below a sessions folder means: the session folders (slugs) it touches.

Plain code on paths, with no watchdog in it: the inotify adapter reduces each watchdog event to an
FsEvent, and the watcher turns the slugs found here into session keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

# The files of a session folder whose change matters; anything deeper (research/, debug/) or
# named otherwise is ignored.
SESSION_FILES = frozenset({"state.json", "spec.md", "plan.json"})

EventKind = Literal["created", "deleted", "moved", "closed", "other"]


@dataclass(frozen=True)
class FsEvent:
    """One filesystem event as the watcher needs it: what happened, to which path (and, for a move
    seen from both ends, to where), and whether the entry is a folder. Paths are absolute."""

    kind: EventKind
    src: str
    dest: str = ""
    is_directory: bool = False


def slug_for(sessions_dir: str, path: str, *, is_directory: bool) -> str | None:
    """The slug an event path below `sessions_dir` is about, or None when it does not matter:
    `<sessions_dir>/<slug>` (a folder) or `<sessions_dir>/<slug>/<state.json|spec.md|plan.json>`."""
    prefix = sessions_dir.rstrip(os.sep) + os.sep
    if not path.startswith(prefix):
        return None
    parts = path[len(prefix) :].split(os.sep)
    slug = parts[0]
    if not slug or slug.startswith("."):
        return None
    if len(parts) == 1:
        return slug if is_directory else None
    if len(parts) == 2 and parts[1] in SESSION_FILES:
        return slug
    return None


def linked_slug(sessions_dir: str, path: str, *, removed: bool) -> str | None:
    """The slug of a non-folder entry right in `sessions_dir` that is a symbolic link (or, once
    `removed`, may have been one), or None."""
    parent, name = os.path.split(path)
    if parent != sessions_dir.rstrip(os.sep) or not name or name.startswith("."):
        return None
    return name if removed or os.path.islink(path) else None


def event_slugs(sessions_dir: str, event: FsEvent) -> list[str]:
    """The slugs `event` below `sessions_dir` touches, sorted, each once (often none)."""
    slugs = {slug_for(sessions_dir, event.src, is_directory=event.is_directory)}
    if event.kind == "moved" and event.dest:
        slugs.add(slug_for(sessions_dir, event.dest, is_directory=event.is_directory))
    if not event.is_directory:
        # inotify reports a symbolic link as a file, which slug_for drops right in the sessions
        # folder; a linked session folder must still reach the worker (it records it invalid)
        # and so must its removal (what a removed entry was is unknown: its key is cheap).
        removed = event.kind in ("deleted", "moved")
        slugs.add(linked_slug(sessions_dir, event.src, removed=removed))
        if event.kind == "moved" and event.dest:
            slugs.add(linked_slug(sessions_dir, event.dest, removed=False))
    return sorted(s for s in slugs if s is not None)

"""The projects the daemon mirrors, by real absolute path, and the lookups the control commands make.

Shared by the workers, the reconciler and the control socket, so it is locked; readers get a copy.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping

from sessionsync.daemon.store import ProjectRef
from sessionsync.models.keys import SessionKey


class ProjectRegistry:
    """Project path -> its row reference; discovery adds and the reconciler removes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[str, ProjectRef] = {}

    def refs(self) -> dict[str, ProjectRef]:
        with self._lock:
            return dict(self._refs)

    def __len__(self) -> int:
        with self._lock:
            return len(self._refs)

    def add(self, refs: Mapping[str, ProjectRef]) -> None:
        with self._lock:
            self._refs.update(refs)

    def remove(self, paths: Iterable[str]) -> None:
        with self._lock:
            for path in paths:
                self._refs.pop(path, None)

    def unknown(self, folders: Iterable[str]) -> list[str]:
        """The folders, as given, that are no known project once their links are resolved."""
        known = self.refs()
        return [f for f in folders if os.path.realpath(f) not in known]

    def session_at(self, folder: str) -> tuple[SessionKey, str] | None:
        """The session a folder names, if it sits in a known project's sessions folder, with that
        folder's path as the project has it; None otherwise. The folder itself need not exist."""
        folder = os.path.normpath(folder)
        # Projects are known by their real path; the user's may go through a link (~/code -> /data).
        parent = os.path.realpath(os.path.dirname(folder))
        slug = os.path.basename(folder)
        for ref in self.refs().values():
            if parent == os.path.realpath(ref.sessions_dir):
                return SessionKey(ref.path, slug), os.path.join(ref.sessions_dir, slug)
        return None

"""The projects the daemon mirrors, by real absolute path.

Shared by the workers, the reconciler and the control socket, so it is locked; readers get a copy.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from sessionsync.daemon.store import ProjectRef


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

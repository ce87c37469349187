"""The warnings and errors `status` shows: the last ones logged, less those a later write fixed.

A loguru sink collects them as they are logged, so nothing has to report them twice; a session
written clean again (or gone) drops out, so `status` shows what is still wrong, not what once was.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from loguru import logger

Entry = dict[str, str | None]


class RecentErrors:
    """The last `size` log records at WARNING or above, as `status` lists them; thread-safe.
    Collects from `attach()` until `detach()`."""

    def __init__(self, size: int = 20) -> None:
        self._lock = threading.Lock()
        self._entries: deque[Entry] = deque(maxlen=size)
        self._sink: int | None = None

    def attach(self) -> None:
        self._sink = logger.add(self._remember, level="WARNING", format="{message}")

    def detach(self) -> None:
        if self._sink is not None:
            logger.remove(self._sink)
            self._sink = None

    def entries(self) -> list[Entry]:
        """Those that still apply, oldest first."""
        with self._lock:
            return list(self._entries)

    def forget_fixed(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Drop the entries of sessions these change events show written clean or gone; a write
        that is invalid or has field problems keeps its entry."""
        bad = {e["path"] for e in events if e["kind"] == "session.invalid" or e.get("fields")}
        fixed = {e["path"] for e in events if "path" in e} - bad
        if fixed:
            with self._lock:
                kept = [e for e in self._entries if e.get("session") not in fixed]
                self._entries.clear()
                self._entries.extend(kept)

    def _remember(self, message: Any) -> None:
        record = message.record
        extra = record["extra"]
        with self._lock:
            self._entries.append(
                {
                    "at": record["time"].isoformat(),
                    "level": record["level"].name,
                    "session": extra.get("session"),
                    "project": extra.get("project"),
                    "message": record["message"],
                }
            )

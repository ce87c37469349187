"""The session key: which session an event, a queue entry or a row is about."""

from __future__ import annotations

from typing import NamedTuple


class SessionKey(NamedTuple):
    """A session is named by its project folder (absolute path) and its folder name (slug)."""

    project: str
    slug: str

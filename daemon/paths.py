"""How paths are shown to people, the same in log lines and in command output."""

from __future__ import annotations


def shown_path(path: str, home: str) -> str:
    """A path as people read it: the home folder as "~"."""
    home = home.rstrip("/")
    if home and (path == home or path.startswith(home + "/")):
        return "~" + path[len(home) :]
    return path

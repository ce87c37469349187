"""Paths every command agrees on, with the standard library only: the default control socket,
and how paths are shown to people (the same in log lines and in command output)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from sessionsync.daemon.errors import ConfigError

SOCKET_NAME = "control.sock"


# Control characters as escapes: a newline in a folder name must not start a forged log line.
_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}


def escape_controls(text: str) -> str:
    """`text` with every control character written as an escape (`\\n`, `\\x1b`), on one line."""
    return text.translate(_CONTROLS)


def shown_path(path: str, home: str) -> str:
    """A path as people read it: the home folder as "~", control characters escaped."""
    home = home.rstrip("/")
    if home and (path == home or path.startswith(home + "/")):
        path = "~" + path[len(home) :]
    return escape_controls(path)


def default_socket_path(env: Mapping[str, str] | None = None) -> Path:
    """The socket path when `control.socket` is empty.

    `$RUNTIME_DIRECTORY/control.sock` under systemd (RuntimeDirectory=sessionsync), else
    `$XDG_RUNTIME_DIR/sessionsync/control.sock`. Never a shared folder such as /tmp: without
    either variable this is a ConfigError.
    """
    env = os.environ if env is None else env
    # systemd joins several RuntimeDirectory= entries with ':'; ours is the first. A relative
    # value is ignored, as the XDG base directory specification asks.
    runtime_dir = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if os.path.isabs(runtime_dir):
        return Path(runtime_dir) / SOCKET_NAME
    xdg_runtime_dir = env.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(xdg_runtime_dir):
        return Path(xdg_runtime_dir) / "sessionsync" / SOCKET_NAME
    raise ConfigError(
        "cannot choose a control socket path: neither RUNTIME_DIRECTORY nor XDG_RUNTIME_DIR is set",
        hint="set control.socket in the config (or SESSIONSYNC_CONTROL__SOCKET), or set XDG_RUNTIME_DIR",
    )

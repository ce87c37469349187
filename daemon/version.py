"""The installed version, for `--version`, `status` and the start-up line."""

from __future__ import annotations

from functools import cache


@cache
def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("sessionsync")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"

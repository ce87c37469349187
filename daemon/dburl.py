"""Database URLs without SQLAlchemy: what sessionsync accepts, and how a URL is shown masked.

The config check and the client commands must not import SQLAlchemy (0.1 to 0.3 s), so the URL is
split here with the grammar SQLAlchemy's `make_url` uses: the password runs from the first `:`
after the user name to the first `@`, so it may hold `/`, `#`, `?` and spaces, and masking it by
that split hides exactly what the driver would send.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# sqlalchemy.engine.url._parse_url's pattern.
_URL = re.compile(
    r"""
    (?P<name>[\w\+]+)://
    (?:
        (?P<username>[^:/]*)
        (?::(?P<password>[^@]*))?
    @)?
    (?:
        (?:
            \[(?P<ipv6host>[^/\?]+)\] |
            (?P<ipv4host>[^/:\?]+)
        )?
        (?::(?P<port>[^/\?]*))?
    )?
    (?:/(?P<database>[^\?]*))?
    (?:\?(?P<query>.*))?
    """,
    re.VERBOSE | re.DOTALL,
)
_DRIVERS = {"sqlite": ("", "pysqlite"), "postgresql": ("", "psycopg")}
EXAMPLE = 'e.g. url = "postgresql+psycopg://me@localhost/sessions", or leave it empty for SQLite'


@dataclass(frozen=True)
class _Parts:
    dialect: str
    driver: str
    password: tuple[int, int] | None  # where the password stands in the URL
    port: str | None


def _split(url: str) -> _Parts | None:
    match = _URL.fullmatch(url)
    if match is None:
        return None
    dialect, _, driver = match["name"].partition("+")
    password = match.span("password") if match["password"] is not None else None
    return _Parts(dialect, driver, password, match["port"])


def check_url(url: str) -> None:
    """Raise ValueError, saying what is allowed, for a URL the daemon could not use."""
    parts = _split(url)
    if parts is None:
        raise ValueError(f"not a database URL; {EXAMPLE}")
    if parts.dialect == "postgres":
        raise ValueError("'postgres://' is not a SQLAlchemy URL scheme: write postgresql+psycopg://")
    if parts.dialect not in _DRIVERS:
        raise ValueError(f"uses {parts.dialect!r}; sessionsync supports sqlite and postgresql ({EXAMPLE})")
    if parts.driver not in _DRIVERS[parts.dialect]:
        wanted = "postgresql+psycopg://" if parts.dialect == "postgresql" else "sqlite:///"
        raise ValueError(f"the driver {parts.driver!r} is not supported: write {wanted}")
    if parts.port and not (parts.port.isdigit() and 1 <= int(parts.port) <= 65535):
        raise ValueError(f"the port {parts.port!r} is not a number from 1 to 65535")


def mask_url(url: str) -> str:
    """The URL with its password shown as ***; a text that is not a URL is returned as it is."""
    parts = _split(url)
    if parts is None or parts.password is None:
        return url
    start, end = parts.password
    return f"{url[:start]}***{url[end:]}"

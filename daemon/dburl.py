"""Database URLs without SQLAlchemy: what sessionsync accepts, and how a URL is shown masked.

The config check and the client commands must not import SQLAlchemy (0.1 to 0.3 s), so the URL is
split here with the grammar SQLAlchemy's `make_url` uses: the password runs from the first `:`
after the user name to the first `@`, so it may hold `/`, `#`, `?` and spaces, and masking it by
that split hides exactly what the driver would send.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote

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


# Query parameters that carry a password to libpq (`?password=...` works as well as `u:pw@`).
_SECRET_PARAMS = re.compile(r"(?P<head>[?&]password=)(?P<secret>[^&]*)", re.IGNORECASE)
# Shorter passwords are masked where they stand in a URL, but not wherever the text holds them.
MIN_REMEMBERED = 4


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
    if password is not None:
        # A raw '@' in the password: the parser ends it at the first '@' and takes the rest for
        # the host, which no host name holds; hide up to the last one, as the user meant it.
        host_end = match.end("ipv4host") if match["ipv4host"] is not None else password[1]
        password = (password[0], max(password[1], url.rfind("@", password[1], host_end)))
    return _Parts(dialect, driver, password, match["port"])


def _secrets(url: str) -> list[str]:
    """Every password in `url`, as written and decoded."""
    parts = _split(url)
    found: list[str] = []
    if parts is not None and parts.password is not None:
        found.append(url[parts.password[0] : parts.password[1]])
    query = url.partition("?")[2]
    found += [m["secret"] for m in _SECRET_PARAMS.finditer("?" + query)]
    found += [value for key, value in parse_qsl(query) if key.lower() == "password"]
    return found


_remembered: set[str] = set()


def remember_passwords(url: str) -> None:
    """Keep the passwords of a URL this process uses, in every form a text may quote them (as
    written, decoded, encoded), so that `known_passwords` lets every output mask them."""
    for secret in _secrets(url):
        for form in (secret, unquote(secret), quote(unquote(secret), safe=""), quote(unquote(secret))):
            if len(form) >= MIN_REMEMBERED:
                _remembered.add(form)


def mask_known(text: str) -> str:
    """`text` with every remembered password shown as ***, longest first (one may hold another)."""
    for secret in sorted(_remembered, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def check_url(url: str) -> None:
    """Raise ValueError, saying what is allowed, for a URL the daemon could not use. Every URL
    sessionsync uses comes through here first: its passwords are remembered for masking."""
    remember_passwords(url)
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
    """The URL with its passwords (user info and `?password=`) shown as ***; a text that is not
    a URL is returned as it is."""
    parts = _split(url)
    if parts is None:
        return url
    if parts.password is not None:
        start, end = parts.password
        url = f"{url[:start]}***{url[end:]}"
    head, sep, query = url.partition("?")
    return head + sep + _SECRET_PARAMS.sub(r"\g<head>***", "?" + query)[1:] if sep else url

"""Logging set-up: loguru sinks, journald detection, stdlib interception, secret masking.

One place decides how a line looks. On a terminal: a timestamp, the level, the logger and the
message. Under journald: no timestamp of our own and a `<N>` syslog priority prefix on every
line. With `fmt="json"`: one JSON object per line. Every message and traceback is masked first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TextIO

from loguru import logger

from sessionsync.daemon.dburl import mask_known
from sessionsync.daemon.errors import ConfigError
from sessionsync.daemon.paths import escape_controls, shown_path

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from loguru import Logger, Record

LogFormat = Literal["text", "json"]

_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
_FILE_ROTATION = "10 MB"
_FILE_RETENTION = 5

# Our formatters render the whole line and leave it here for the template "{extra[...]}": loguru
# parses a format template for colour tags, which a literal "<6>" or a message would break.
_LINE_KEY = "_sessionsync_line"
# The stdlib logger name of an intercepted record ("sqlalchemy.engine.Engine").
_STDLIB_KEY = "_sessionsync_stdlib_logger"

# Libraries that narrate every statement, job run, pool checkout or inotify event: their
# warnings only, whatever our level, so that at DEBUG the daemon's own lines are not drowned.
# SQL statements come back with `log.sql = true` (at INFO: statements, never result rows, which
# are whole documents).
_CHATTY_LOGGERS = (
    "sqlalchemy",
    "apscheduler",
    "alembic",
    "watchdog",
    "tzlocal",
)
_SQL_LOGGER = "sqlalchemy.engine"

_URL_PASSWORD = re.compile(r"(?P<head>://[^\s:/?#@]*:)(?P<secret>[^\s/?#]+)(?=@)")
_KV_PASSWORD = re.compile(
    r"""(?P<head>\b\w*pass(?:word|wd)\w*["']?\s*[=:]\s*)(?P<secret>"[^"]*"|'[^']*'|[^\s"'&;,)}\]]+)""",
    re.IGNORECASE,
)


def mask_secrets(text: str) -> str:
    """Hide passwords: postgresql://u:secret@h/db -> postgresql://u:***@h/db, password=x -> password=***.

    The patterns alone miss a password holding a space or a quote, or quoted by a driver in its
    own words: every password of a URL this process uses is also masked wherever it appears."""
    text = mask_known(text)
    if "://" in text:
        text = _URL_PASSWORD.sub(r"\g<head>***", text)
    return _KV_PASSWORD.sub(_mask_value, text)


def _mask_value(match: re.Match[str]) -> str:
    secret = match["secret"]
    quote = secret[0] if secret[0] in "'\"" else ""
    return f"{match['head']}{quote}***{quote}"


def session_log(project: str, slug: str, folder: str) -> Logger:
    """A logger whose lines name the session folder, so `journalctl | grep <slug>` tells its story."""
    return logger.bind(project=project, slug=slug, session=folder)


def _priority(levelno: int) -> int:
    """The syslog priority journald reads from a `<N>` prefix."""
    for threshold, priority in ((50, 2), (40, 3), (30, 4), (25, 5), (20, 6)):
        if levelno >= threshold:
            return priority
    return 7


@dataclass(frozen=True)
class _Style:
    """How one sink renders a record."""

    fmt: LogFormat
    journal: bool  # `<N>` prefix on every line, no timestamp of our own
    home: str  # shown as "~" in project paths

    def __call__(self, record: Record) -> str:
        record["extra"][_LINE_KEY] = self.render(record)
        return "{extra[" + _LINE_KEY + "]}\n"

    def render(self, record: Record) -> str:
        exception = _exception_text(record)
        if self.fmt == "json":
            text = json.dumps(_json_fields(record, exception), ensure_ascii=False)
        else:
            text = self._text(record, exception)
        if self.journal:
            # journald splits on newlines; each line needs its own prefix or it is logged at INFO.
            prefix = f"<{_priority(record['level'].no)}>"
            text = "\n".join(prefix + line for line in text.split("\n"))
        return text

    def _text(self, record: Record, exception: str) -> str:
        level = record["level"].name
        head = level if self.journal else f"{_timestamp(record)} {level:<8}"
        text = f"{head} {_short_name(record)}: {self._where(record)}{record['message']}"
        return f"{text}\n{exception}" if exception else text

    def _where(self, record: Record) -> str:
        """`[~/code/app/agents/sessions/fix-login] `: the session folder (home as "~"), or the
        project's when the line is about a project.

        The whole path, not its last component: two checkouts named `app` are common on one
        machine, and a log that cannot tell them apart cannot tell a session's story.
        """
        extra = record["extra"]
        where = extra.get("session") or extra.get("project")
        return f"[{shown_path(str(where), self.home)}] " if where else ""


def _timestamp(record: Record) -> str:
    time = record["time"]
    return f"{time:%Y-%m-%d %H:%M:%S}.{time.microsecond // 1000:03d}"


def _logger_name(record: Record) -> str:
    return str(record["extra"].get(_STDLIB_KEY) or record["name"] or "")


def _short_name(record: Record) -> str:
    name = _logger_name(record)
    for prefix in ("sessionsync.daemon.", "sessionsync."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _exception_text(record: Record) -> str:
    """The traceback, masked: exception messages quote URLs, and source lines quote literals."""
    exc = record["exception"]
    if exc is None or exc.type is None:
        return ""
    lines = traceback.format_exception(exc.type, exc.value, exc.traceback)
    return mask_secrets("".join(lines).rstrip("\n"))


def _json_fields(record: Record, exception: str) -> dict[str, str]:
    fields = {
        "time": record["time"].isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "logger": _logger_name(record),
        "message": record["message"],
    }
    for key in ("project", "slug", "session"):
        if key in record["extra"]:
            fields[key] = str(record["extra"][key])
    if exception:
        fields["exception"] = exception
    return fields


def _mask_record(record: Record) -> None:
    """The core patcher: every sink, ours or one added later, sees the masked message, on one line
    (paths in it are folder names, which may hold a newline or an escape sequence)."""
    record["message"] = escape_controls(mask_secrets(record["message"]))


class _InterceptHandler(logging.Handler):
    """Hands stdlib records (SQLAlchemy, alembic, APScheduler, watchdog) to loguru's sinks.

    The loguru recipe walks the stack so loguru names the calling module; we carry the stdlib
    logger's own name instead, which says more ("sqlalchemy.pool.impl.QueuePool").
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        try:
            message = record.getMessage()
        except Exception:  # bad %-arguments in a library's call: stdlib's own reporting
            self.handleError(record)
            return
        logger.bind(**{_STDLIB_KEY: record.name}).opt(exception=record.exc_info or None).log(level, message)


@dataclass
class _State:
    """What setup_logging last installed, so set_level and a reload can replace it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    # Starts as loguru's own stderr sink (id 0), which the first set-up replaces like any other.
    handler_ids: list[int] = field(default_factory=lambda: [0])
    install: Callable[[int], list[int]] | None = None
    sql: bool = False


_state = _State()


def _level_no(level: str) -> int:
    name = level.strip().upper()
    if name not in _LEVELS:
        raise ConfigError(f"log.level = {level!r} is not a log level", f"use one of {', '.join(_LEVELS)}")
    return logger.level(name).no


def _is_journal_stream(stream: TextIO, env: Mapping[str, str]) -> bool:
    """True when `stream` is the journald stream systemd connected: `$JOURNAL_STREAM` is "dev:ino".

    Checking the inode, not only that the variable is set, matters: a child process inherits the
    variable while its stderr goes to a terminal or a pipe.
    """
    dev, sep, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (AttributeError, OSError, ValueError):  # no real file descriptor behind it, or garbage
        return False


def _configure_stdlib(levelno: int, sql: bool) -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _InterceptHandler)]:
        root.removeHandler(handler)
    root.addHandler(_InterceptHandler())
    root.setLevel(levelno)
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger(_SQL_LOGGER).setLevel(logging.INFO if sql else logging.WARNING)


def _swap(install: Callable[[int], list[int]] | None, levelno: int, sql: bool | None = None) -> None:
    """Install new sinks (or the last ones again), then remove the old: a reload never drops a line.

    If the new sinks cannot be installed (a log file that cannot be opened) the old ones stay.
    """
    with _state.lock:
        install = install or _state.install
        if install is None:
            raise RuntimeError("set_level() before setup_logging()")
        new_ids = install(levelno)
        for handler_id in _state.handler_ids:
            with contextlib.suppress(ValueError):  # already removed by someone else
                logger.remove(handler_id)
        _state.handler_ids = new_ids
        _state.install = install
        if sql is not None:
            _state.sql = sql
        _configure_stdlib(levelno, _state.sql)


def setup_logging(
    level: str,
    fmt: LogFormat,
    file: str = "",
    env: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
    sql: bool = False,
) -> None:
    """Log to `stream` (stderr) in `fmt`, and to an optional rotated `file` in `fmt` too; call
    again to reload. `sql` adds SQL statements (SQLAlchemy's engine log) to the lines.

    Under journald the JSON format keeps the `<N>` prefix: journald strips it before storing, so
    MESSAGE is still pure JSON and `journalctl -p err` still works; without it every line is INFO.
    """
    levelno = _level_no(level)
    if fmt not in ("text", "json"):
        raise ConfigError(f"log.format = {fmt!r} is not a log format", "use text or json")
    env = os.environ if env is None else env
    out = sys.stderr if stream is None else stream
    home = env.get("HOME", "").rstrip("/")
    stream_style = _Style(fmt, _is_journal_stream(out, env), home)
    file_style = _Style(fmt, journal=False, home=home)
    path = Path(file).expanduser() if file else None

    def install(levelno: int) -> list[int]:
        # Our formatters render tracebacks themselves (masked). loguru still formats its own copy
        # for "{exception}", unused here: backtrace and diagnose off keep that copy cheap.
        ids = [
            logger.add(
                out, level=levelno, format=stream_style, colorize=False, backtrace=False, diagnose=False
            )
        ]
        if path is not None:
            try:
                ids.append(
                    logger.add(
                        path,
                        level=levelno,
                        format=file_style,
                        colorize=False,
                        backtrace=False,
                        diagnose=False,
                        rotation=_FILE_ROTATION,
                        retention=_FILE_RETENTION,
                        encoding="utf-8",
                        errors="backslashreplace",  # as stderr does: folder names need not be UTF-8
                    )
                )
            except OSError as exc:
                logger.remove(ids[0])
                raise ConfigError(
                    f"log.file = {file!r} cannot be opened: {exc.strerror or exc}",
                    "choose a writable path; under systemd, a file inside the state folder",
                ) from exc
        return ids

    logger.configure(patcher=_mask_record)
    _swap(install, levelno, sql)


def set_level(level: str) -> None:
    """Change the level of the sinks setup_logging installed (SIGHUP reload); stdlib loggers follow."""
    _swap(None, _level_no(level))

"""Log set-up: journald priorities, JSON lines, masking, session lines, runtime level, reload."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest
from loguru import logger

from sessionsync.daemon.errors import ConfigError
from sessionsync.daemon.logs import mask_secrets, session_log, set_level, setup_logging

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
HOME = "/home/me"
PROJECT = "/home/me/code/app"


def at(project: str, slug: str) -> str:
    """A session's folder under the default sessions_subdir."""
    return f"{project}/agents/sessions/{slug}"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """setup_logging changes process-wide state; put loguru and the stdlib back afterwards.

    Each test starts without loguru sinks, so only what setup_logging installs writes anything.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logger.remove()
    yield
    logger.remove()
    logger.add(sys.stderr)
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name in ("sqlalchemy", "sqlalchemy.engine", "apscheduler", "alembic", "watchdog", "tzlocal"):
        logging.getLogger(name).setLevel(logging.NOTSET)


@pytest.fixture
def stream(tmp_path: Path) -> Iterator[TextIO]:
    """A real file, so that it has a device and inode JOURNAL_STREAM can name; errors as stderr."""
    with open(tmp_path / "stderr.log", "w+", encoding="utf-8", errors="backslashreplace") as out:
        yield out


def journal_env(stream: TextIO) -> dict[str, str]:
    st = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "HOME": HOME}


def lines(stream: TextIO) -> list[str]:
    stream.flush()
    stream.seek(0)
    return stream.read().splitlines()


def test_journald_lines_carry_priority_and_no_timestamp(stream: TextIO) -> None:
    setup_logging("DEBUG", "text", env=journal_env(stream), stream=stream)
    logger.debug("d")
    logger.info("i")
    logger.success("s")
    logger.warning("w")
    logger.error("e")
    logger.critical("c")
    out = lines(stream)
    assert [line[:3] for line in out] == ["<7>", "<6>", "<5>", "<4>", "<3>", "<2>"]
    assert out[3].startswith("<4>WARNING ")
    assert out[3].endswith(": w")
    assert not any(TIMESTAMP.search(line) for line in out)


def test_journal_stream_must_name_the_stream(stream: TextIO, tmp_path: Path) -> None:
    """An inherited JOURNAL_STREAM with stderr on a terminal or pipe: the readable format."""
    other = tmp_path / "other"
    other.touch()
    st = os.stat(other)
    setup_logging("INFO", "text", env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stream=stream)
    logger.info("hello")
    (line,) = lines(stream)
    assert not line.startswith("<")
    assert TIMESTAMP.match(line)
    assert " INFO " in line
    assert line.endswith(": hello")


def test_traceback_lines_each_keep_the_priority(stream: TextIO) -> None:
    setup_logging("INFO", "text", env=journal_env(stream), stream=stream)
    try:
        raise ValueError("bad state")
    except ValueError:
        logger.exception("sync failed")
    out = lines(stream)
    assert len(out) > 2
    assert all(line.startswith("<3>") for line in out)
    assert out[-1] == "<3>ValueError: bad state"


def test_json_lines_parse_with_the_expected_fields(stream: TextIO) -> None:
    setup_logging("INFO", "json", env={"HOME": HOME}, stream=stream)
    logger.info("started")
    session_log(PROJECT, "fix-login", at(PROJECT, "fix-login")).warning("state.json is not valid JSON")
    try:
        raise KeyError("phase")
    except KeyError:
        logger.exception("worker crashed")
    started, session, crashed = (json.loads(line) for line in lines(stream))
    assert started["message"] == "started"
    assert started["level"] == "INFO"
    assert started["logger"] == __name__
    assert "time" in started
    assert "slug" not in started
    assert "exception" not in started
    assert session["project"] == PROJECT
    assert session["slug"] == "fix-login"
    assert session["session"] == at(PROJECT, "fix-login")
    assert session["level"] == "WARNING"
    assert "KeyError: 'phase'" in crashed["exception"]


def test_json_under_journald_keeps_the_priority_prefix(stream: TextIO) -> None:
    setup_logging("INFO", "json", env=journal_env(stream), stream=stream)
    logger.error("database unreachable")
    (line,) = lines(stream)
    assert line.startswith("<3>{")
    assert json.loads(line[3:])["message"] == "database unreachable"


def test_session_lines_name_the_session_folder(stream: TextIO) -> None:
    setup_logging("INFO", "text", env=journal_env(stream), stream=stream)
    session_log(PROJECT, "fix-login", at(PROJECT, "fix-login")).info("phase build -> docs")
    session_log("/srv/repos/api", "add-cache", at("/srv/repos/api", "add-cache")).info("created")
    logger.bind(project=PROJECT).info("watch restored")
    first, second, third = lines(stream)
    assert "[~/code/app/agents/sessions/fix-login] phase build -> docs" in first
    assert "[/srv/repos/api/agents/sessions/add-cache] created" in second
    assert "[~/code/app] watch restored" in third


def test_passwords_are_masked_everywhere(stream: TextIO) -> None:
    setup_logging("INFO", "text", env={"HOME": HOME}, stream=stream)
    logger.error("cannot connect to {}", "postgresql+psycopg://app:hunter2@db.local/sessions")
    logging.getLogger("sqlalchemy.engine").warning(
        "connection invalidated: %s", "host=db user=app password=hunter2 dbname=sessions"
    )
    try:
        raise RuntimeError("postgresql://app:hunter2@db.local/sessions refused")
    except RuntimeError:
        logging.getLogger("alembic.runtime.migration").exception("upgrade failed")
    text = "\n".join(lines(stream))
    assert "hunter2" not in text
    assert "postgresql+psycopg://app:***@db.local/sessions" in text
    assert "password=*** dbname=sessions" in text
    assert "RuntimeError: postgresql://app:***@db.local/sessions refused" in text
    assert "alembic.runtime.migration: upgrade failed" in text


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("postgresql://u:secret@h/db", "postgresql://u:***@h/db"),
        ("redis://:token@cache:6379/0", "redis://:***@cache:6379/0"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u@h:5432/db", "postgresql://u@h:5432/db"),
        ("https://example.com:8080/a@b", "https://example.com:8080/a@b"),
        ("PGPASSWORD=abc psql", "PGPASSWORD=*** psql"),
        ("?sslmode=require&password=abc&x=1", "?sslmode=require&password=***&x=1"),
        ("""{"password": "a b", 'db_passwd': 'c'}""", """{"password": "***", 'db_passwd': '***'}"""),
        ("password authentication failed for user", "password authentication failed for user"),
    ],
)
def test_mask_secrets(raw: str, masked: str) -> None:
    assert mask_secrets(raw) == masked


def test_set_level_filters_at_runtime(stream: TextIO) -> None:
    setup_logging("INFO", "text", env={"HOME": HOME}, stream=stream)
    logger.debug("hidden 1")
    logger.info("shown 1")
    set_level("DEBUG")
    logger.debug("shown 2")
    set_level("WARNING")
    logger.info("hidden 2")
    logging.getLogger("watchdog.observers").info("hidden 3")
    logger.warning("shown 3")
    logging.getLogger("watchdog.observers").warning("shown 4")
    out = "\n".join(lines(stream))
    assert re.findall(r"(?:shown|hidden) \d", out) == ["shown 1", "shown 2", "shown 3", "shown 4"]


def test_sql_statements_only_with_log_sql(stream: TextIO) -> None:
    setup_logging("DEBUG", "text", env={"HOME": HOME}, stream=stream)
    logging.getLogger("sqlalchemy.engine.Engine").info("SELECT 1")
    logging.getLogger("sqlalchemy.pool.impl.QueuePool").debug("connection checked out")
    logging.getLogger("watchdog.observers.inotify_buffer").debug("in-event")
    logger.debug("our own line")
    setup_logging("DEBUG", "text", env={"HOME": HOME}, stream=stream, sql=True)
    logging.getLogger("sqlalchemy.engine.Engine").info("SELECT 2")
    logging.getLogger("sqlalchemy.engine.Engine").debug("Row (1,)")
    set_level("DEBUG")  # a reload of the level keeps the SQL setting
    logging.getLogger("sqlalchemy.engine.Engine").info("SELECT 3")
    out = "\n".join(lines(stream))
    assert "our own line" in out
    assert "SELECT 1" not in out
    assert "checked out" not in out
    assert "in-event" not in out
    assert "sqlalchemy.engine.Engine: SELECT 2" in out
    assert "SELECT 3" in out
    assert "Row (1,)" not in out


def test_setup_again_replaces_sinks(stream: TextIO, tmp_path: Path) -> None:
    setup_logging("INFO", "text", env={"HOME": HOME}, stream=stream)
    setup_logging("INFO", "text", env={"HOME": HOME}, stream=stream)
    with open(tmp_path / "second.log", "w+", encoding="utf-8") as second:
        setup_logging("INFO", "json", env={"HOME": HOME}, stream=second)
        logger.info("once")
        logging.getLogger("apscheduler.scheduler").warning("also once")
        assert lines(stream) == []
        assert [json.loads(line)["message"] for line in lines(second)] == ["once", "also once"]


def test_file_sink_speaks_the_configured_format(stream: TextIO, tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "sessionsync.log"
    setup_logging("INFO", "text", file=str(log_file), env=journal_env(stream), stream=stream)
    session_log(PROJECT, "fix-login", at(PROJECT, "fix-login")).info("synced")
    (line,) = log_file.read_text(encoding="utf-8").splitlines()
    assert TIMESTAMP.match(line)  # no journald there: the file carries its own timestamps
    assert line.endswith("[~/code/app/agents/sessions/fix-login] synced")
    cafe = os.fsdecode(b"caf\xe9")
    session_log(PROJECT, cafe, at(PROJECT, cafe)).info("created")
    assert log_file.read_text(encoding="utf-8").splitlines()[1].endswith("sessions/caf\\udce9] created")

    json_file = tmp_path / "logs" / "sessionsync.json"
    setup_logging("INFO", "json", file=str(json_file), env=journal_env(stream), stream=stream)
    session_log(PROJECT, "fix-login", at(PROJECT, "fix-login")).info("synced")
    (record,) = (json.loads(line) for line in json_file.read_text(encoding="utf-8").splitlines())
    assert (record["message"], record["slug"]) == ("synced", "fix-login")
    assert json.loads(lines(stream)[-1][3:])["slug"] == "fix-login"


def test_unopenable_file_is_a_config_error_and_keeps_the_old_sinks(stream: TextIO, tmp_path: Path) -> None:
    setup_logging("INFO", "text", env={"HOME": HOME}, stream=stream)
    blocker = tmp_path / "not-a-folder"
    blocker.touch()
    with pytest.raises(ConfigError, match=r"log\.file"):
        setup_logging("INFO", "text", file=str(blocker / "x.log"), env={"HOME": HOME}, stream=stream)
    logger.info("still logging")
    (line,) = lines(stream)
    assert line.endswith(": still logging")


def test_unknown_level_is_a_config_error(stream: TextIO) -> None:
    with pytest.raises(ConfigError, match="verbose"):
        setup_logging("verbose", "text", stream=stream)


def test_a_newline_in_a_folder_name_cannot_forge_a_log_line(stream: TextIO) -> None:
    setup_logging("INFO", "text", env={"HOME": HOME}, stream=stream)
    evil = "x\n2026-01-01 00:00:00.000 ERROR    service: database wiped\x1b[2J"
    session_log(PROJECT, evil, at(PROJECT, evil)).info("session created, phase spec")
    logger.info("project {} is gone", f"{PROJECT}/a\rb")
    first, second = lines(stream)
    assert first.endswith(
        "[~/code/app/agents/sessions/x\\n2026-01-01 00:00:00.000 ERROR    service: database wiped\\x1b[2J] "
        "session created, phase spec"
    )
    assert second.endswith("project /home/me/code/app/a\\rb is gone")

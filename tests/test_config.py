"""Configuration: the repository config.toml, lookup order, environment overrides, and errors
that name the key, the bad value and what is allowed.

Every test passes its own environment dict and working folder to load_config, so the real
environment of the test run never leaks in.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from sessionsync.daemon.config import Config, DatabaseConfig, load_config
from sessionsync.daemon.errors import ConfigError

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config.toml"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    """The message of the ConfigError that loading `text` (as --config) raises."""
    path = _write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), env or {}, tmp_path)
    return str(caught.value)


# -- the repository config.toml ---------------------------------------------------------------


def test_repository_config_is_exactly_the_built_in_defaults(tmp_path: Path) -> None:
    loaded = load_config(str(REPO_CONFIG), {}, tmp_path)
    assert loaded == Config(source=REPO_CONFIG)
    # The default root is expanded the same way whether it comes from the file or the default.
    assert loaded.watch.roots == (os.path.expanduser("~"),)


def test_repository_config_documents_every_key() -> None:
    document = tomllib.loads(REPO_CONFIG.read_text())
    expected = {
        name: set(field.annotation.model_fields)  # type: ignore[union-attr]
        for name, field in Config.model_fields.items()
        if name != "source"
    }
    assert {section: set(keys) for section, keys in document.items()} == expected


# -- lookup order -----------------------------------------------------------------------------


def test_lookup_order_explicit_then_env_then_xdg_then_etc_then_defaults(tmp_path: Path) -> None:
    explicit = _write(tmp_path / "explicit.toml", "[workers]\nthreads = 1\n")
    from_env = _write(tmp_path / "from-env.toml", "[workers]\nthreads = 2\n")
    xdg = tmp_path / "xdg"
    in_xdg = _write(xdg / "sessionsync" / "config.toml", "[workers]\nthreads = 3\n")
    in_etc = _write(tmp_path / "etc" / "sessionsync" / "config.toml", "[workers]\nthreads = 4\n")
    env = {"SESSIONSYNC_CONFIG": str(from_env), "XDG_CONFIG_HOME": str(xdg), "HOME": str(tmp_path)}

    steps = [(explicit, 1), (from_env, 2), (in_xdg, 3), (in_etc, 4)]
    for path, threads in steps:
        cfg = load_config(str(explicit) if path == explicit else None, env, in_etc)
        assert (cfg.source, cfg.workers.threads) == (path, threads)
        # Take away this step, so the next one in the order is the first that matches.
        if path == from_env:
            del env["SESSIONSYNC_CONFIG"]
        elif path != explicit:
            path.unlink()

    cfg = load_config(None, env, in_etc)
    assert cfg.source is None
    assert cfg == Config()


def test_without_xdg_config_home_the_file_under_home_is_found(tmp_path: Path) -> None:
    in_home = _write(tmp_path / ".config" / "sessionsync" / "config.toml", "[workers]\nthreads = 5\n")
    for xdg in ("", "relative/ignored"):  # the XDG spec: empty or relative means unset
        cfg = load_config(None, {"HOME": str(tmp_path), "XDG_CONFIG_HOME": xdg}, tmp_path / "no-etc")
        assert (cfg.source, cfg.workers.threads) == (in_home, 5)


def test_the_current_folder_is_never_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A project folder (where hooks run) may hold an unrelated config.toml, a Hugo site's say.
    _write(tmp_path / "project" / "config.toml", '[site]\ntitle = "not ours"\n')
    monkeypatch.chdir(tmp_path / "project")
    cfg = load_config(None, {"HOME": str(tmp_path / "home")}, tmp_path / "no-etc")
    assert cfg.source is None


def test_a_file_sets_some_keys_and_defaults_fill_the_rest(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.toml", '[watch]\ndebounce_ms = 50\n\n[log]\nformat = "json"\n')
    cfg = load_config(str(path), {}, tmp_path)
    assert cfg.watch.debounce_ms == 50
    assert cfg.log.format == "json"
    assert cfg.watch.max_delay_ms == 2000
    assert cfg.workers == Config().workers


def test_missing_explicit_config_is_an_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml does not exist"):
        load_config(str(missing), {}, tmp_path)


def test_missing_config_named_by_environment_is_an_error(tmp_path: Path) -> None:
    env = {"SESSIONSYNC_CONFIG": str(tmp_path / "gone.toml")}
    with pytest.raises(ConfigError, match=r"gone\.toml \(from \$SESSIONSYNC_CONFIG\) does not exist"):
        load_config(None, env, tmp_path)


# -- environment overrides --------------------------------------------------------------------


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.toml", "[workers]\nthreads = 3\nbatch_size = 10\n")
    cfg = load_config(str(path), {"SESSIONSYNC_WORKERS__THREADS": "8"}, tmp_path)
    assert (cfg.workers.threads, cfg.workers.batch_size) == (8, 10)


@pytest.mark.parametrize(
    ("name", "raw", "section", "key", "expected"),
    [
        ("SESSIONSYNC_WATCH__DEBOUNCE_MS", "350", "watch", "debounce_ms", 350),
        ("SESSIONSYNC_DATABASE__AUTO_MIGRATE", "false", "database", "auto_migrate", False),
        ("SESSIONSYNC_SCHEDULE__RECONCILE_ON_START", "0", "schedule", "reconcile_on_start", False),
        (
            "SESSIONSYNC_WATCH__PROJECTS",
            '["/srv/a", "/srv/b c"]',
            "watch",
            "projects",
            ("/srv/a", "/srv/b c"),
        ),
        ("SESSIONSYNC_WATCH__ROOTS", "/srv/a:/srv/b:", "watch", "roots", ("/srv/a", "/srv/b")),
        ("SESSIONSYNC_WATCH__ROOTS", "[]", "watch", "roots", ()),
        (
            "SESSIONSYNC_DATABASE__URL",
            "postgresql+psycopg://me@db/s",
            "database",
            "url",
            "postgresql+psycopg://me@db/s",
        ),
        ("SESSIONSYNC_LOG__LEVEL", "debug", "log", "level", "DEBUG"),
        ("SESSIONSYNC_SCHEDULE__TIMEZONE", "Europe/Paris", "schedule", "timezone", "Europe/Paris"),
    ],
)
def test_environment_override_of_each_type(
    tmp_path: Path, name: str, raw: str, section: str, key: str, expected: object
) -> None:
    cfg = load_config(None, {name: raw}, tmp_path)
    assert getattr(getattr(cfg, section), key) == expected


def test_list_entries_from_the_environment_are_expanded(tmp_path: Path) -> None:
    cfg = load_config(None, {"SESSIONSYNC_WATCH__PROJECTS": "~/code/app:relative"}, tmp_path)
    assert cfg.watch.projects == (
        os.path.join(os.path.expanduser("~"), "code", "app"),
        os.path.abspath("relative"),
    )


def test_variables_that_are_not_settings_are_ignored(tmp_path: Path) -> None:
    # SESSIONSYNC_CONFIG (and the test suite's own variables) have no "__": not overrides.
    cfg = load_config(None, {"SESSIONSYNC_TEST_PG_URL": "x", "SESSIONSYNC_CONFIG": ""}, tmp_path)
    assert cfg == Config()


# -- errors name the key, the value and what is allowed ---------------------------------------


def test_unknown_key_in_a_file_names_it_and_lists_the_allowed_keys(tmp_path: Path) -> None:
    message = _error(tmp_path, "[watch]\ndebounce = 100\n")
    assert "unknown key 'debounce' in [watch]" in message
    assert "bad.toml" in message
    assert "allowed keys: projects, roots, discover_depth" in message
    assert "debounce_ms" in message


def test_unknown_section_lists_the_sections(tmp_path: Path) -> None:
    message = _error(tmp_path, "[workerz]\nthreads = 2\n")
    assert "unknown section [workerz]" in message
    assert "bad.toml" in message
    assert "[database], [watch], [workers]" in message


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    message = _error(tmp_path, "watch = 3\n")
    assert "[watch]" in message
    assert "must be a table of keys, got 3" in message


def test_unknown_environment_setting_names_it_and_the_allowed_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"SESSIONSYNC_WATCH__NOPE": "1"}, tmp_path)
    message = str(caught.value)
    assert "SESSIONSYNC_WATCH__NOPE" in message
    assert "no key 'nope' in [watch]" in message
    assert "allowed keys in [watch]: projects, roots" in message


def test_unknown_environment_section_names_the_sections(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"SESSIONSYNC_DB__URL": "sqlite://"}, tmp_path)
    message = str(caught.value)
    assert "SESSIONSYNC_DB__URL" in message
    assert "no section [db]" in message
    assert "sections: database, watch" in message


def test_non_integer_value_names_key_value_and_type(tmp_path: Path) -> None:
    message = _error(tmp_path, '[watch]\ndebounce_ms = "fast"\n')
    assert "[watch] debounce_ms = 'fast'" in message
    assert "bad.toml" in message
    assert "valid integer" in message


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"SESSIONSYNC_DATABASE__AUTO_MIGRATE": "maybe"}, tmp_path)
    message = str(caught.value)
    assert "[database] auto_migrate = 'maybe'" in message
    assert "$SESSIONSYNC_DATABASE__AUTO_MIGRATE" in message
    assert "valid boolean" in message


def test_bad_json_list_in_the_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"SESSIONSYNC_WATCH__ROOTS='\[\"/a\"' is not a valid JSON array"):
        load_config(None, {"SESSIONSYNC_WATCH__ROOTS": '["/a"'}, tmp_path)


def test_out_of_range_value_names_the_bound(tmp_path: Path) -> None:
    message = _error(tmp_path, "[workers]\nthreads = 0\n")
    assert "[workers] threads = 0" in message
    assert "greater than or equal to 1" in message


def test_max_delay_below_debounce_names_both_and_where_they_came_from(tmp_path: Path) -> None:
    message = _error(tmp_path, "[watch]\ndebounce_ms = 500\nmax_delay_ms = 100\n")
    assert "max_delay_ms (100) must be at least debounce_ms (500)" in message
    assert "bad.toml" in message


def test_debounce_above_the_default_ceiling_is_caught(tmp_path: Path) -> None:
    # Only debounce_ms is set; the check still compares it with the default max_delay_ms.
    message = _error(tmp_path, "[watch]\ndebounce_ms = 5000\n")
    assert "max_delay_ms (2000) must be at least debounce_ms (5000)" in message


def test_invalid_cron_names_the_expression_and_the_field(tmp_path: Path) -> None:
    message = _error(tmp_path, '[schedule]\nreconcile_cron = "61 * * * *"\n')
    assert "[schedule] reconcile_cron = '61 * * * *'" in message
    assert "not a valid 5-field crontab expression" in message
    assert "maximum value (59)" in message


def test_unknown_timezone_says_what_is_allowed(tmp_path: Path) -> None:
    message = _error(tmp_path, '[schedule]\ntimezone = "Mars/Base"\n')
    assert "[schedule] timezone = 'Mars/Base'" in message
    assert "must be 'local' or an IANA zone name" in message


def test_unknown_log_format_lists_the_formats(tmp_path: Path) -> None:
    message = _error(tmp_path, '[log]\nformat = "xml"\n')
    assert "[log] format = 'xml'" in message
    assert "'text' or 'json'" in message


def test_sessions_subdir_must_stay_inside_the_project(tmp_path: Path) -> None:
    message = _error(tmp_path, '[watch]\nsessions_subdir = "../elsewhere"\n')
    assert "[watch] sessions_subdir = '../elsewhere'" in message
    assert "relative folder inside the project" in message


def test_every_bad_value_is_reported_at_once(tmp_path: Path) -> None:
    message = _error(tmp_path, '[workers]\nthreads = 0\n\n[log]\nformat = "xml"\n')
    assert "[workers] threads" in message
    assert "[log] format" in message


def test_invalid_toml_names_the_file_and_the_position(tmp_path: Path) -> None:
    message = _error(tmp_path, "[watch\ndebounce_ms = 1\n")
    assert f"config file {tmp_path / 'bad.toml'} is not valid TOML" in message
    assert "line 1" in message


# -- database_url -----------------------------------------------------------------------------


def test_database_url_defaults_to_sqlite_under_xdg_state_home() -> None:
    url = Config().database_url({"XDG_STATE_HOME": "/var/tmp/state"})
    assert url == "sqlite:////var/tmp/state/sessionsync/sessions.db"


def test_database_url_under_systemd_uses_the_first_state_directory() -> None:
    env = {"STATE_DIRECTORY": "/var/lib/sessionsync:/var/lib/other", "XDG_STATE_HOME": "/ignored"}
    assert Config().database_url(env) == "sqlite:////var/lib/sessionsync/sessions.db"


def test_configured_database_url_wins() -> None:
    cfg = Config(database=DatabaseConfig(url="postgresql+psycopg://me@db/sessions"))
    assert (
        cfg.database_url({"STATE_DIRECTORY": "/var/lib/sessionsync"}) == "postgresql+psycopg://me@db/sessions"
    )


@pytest.mark.parametrize(
    "text",
    [
        'database = "postgresql+psycopg://me:pa/ss#w?rd@db/s"\n',
        '[database]\nurl = ["postgresql+psycopg://me:pa/ss#w?rd@db/s"]\n',
        '[database]\nurl = "postgres://me:pa/ss#w?rd@db/s"\n',
    ],
    ids=["url-at-top-level", "url-in-a-list", "refused-scheme"],
)
def test_config_errors_never_echo_a_password(tmp_path: Path, text: str) -> None:
    message = _error(tmp_path, text)
    assert "pa/ss" not in message
    assert "rd@db" not in message
    assert "me:***@db/s" in message

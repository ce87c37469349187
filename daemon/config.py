"""config.toml + environment -> one frozen, validated Config.

Lookup order: `--config PATH`, `$SESSIONSYNC_CONFIG`, `$XDG_CONFIG_HOME/sessionsync/config.toml`,
`/etc/sessionsync/config.toml`; built-in defaults fill the rest. The current folder is never
searched: hooks and `sessionsync sync` run inside project folders, which may hold an unrelated
`config.toml`. Any key can be overridden with `SESSIONSYNC_<SECTION>__<KEY>`. Every error names
the key, the value and what is allowed.
"""

from __future__ import annotations

import json
import os
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sessionsync.daemon.dburl import check_url, mask_url
from sessionsync.daemon.errors import ConfigError
from sessionsync.daemon.paths import default_socket_path

ENV_PREFIX = "SESSIONSYNC_"
SYSTEM_CONFIG = Path("/etc/sessionsync/config.toml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseConfig(_Section):
    url: str = ""
    auto_migrate: bool = True
    # PostgreSQL: how long the server may take to answer before the connection counts as stalled.
    timeout_s: float = Field(20.0, ge=1.0, le=600.0)

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        if url:
            check_url(url)  # what the daemon would refuse, refused when the file is read
        return url


class WatchConfig(_Section):
    projects: tuple[str, ...] = ()
    # Validated like a configured value, so the default "~" is expanded too (discovery needs a real path).
    roots: tuple[str, ...] = Field(("~",), validate_default=True)
    discover_depth: int = Field(4, ge=0, le=12)
    sessions_subdir: str = "agents/sessions"
    debounce_ms: int = Field(200, ge=0, le=60_000)
    max_delay_ms: int = Field(2000, ge=1, le=600_000)
    max_state_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576)

    @field_validator("projects", "roots")
    @classmethod
    def _absolute(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(os.path.abspath(os.path.expanduser(p)) for p in paths)

    @field_validator("sessions_subdir")
    @classmethod
    def _relative(cls, subdir: str) -> str:
        parts = Path(subdir).parts
        if not parts or Path(subdir).is_absolute() or ".." in parts:
            raise ValueError("must be a relative folder inside the project, such as agents/sessions")
        return subdir

    @model_validator(mode="after")
    def _ceiling_after_quiet_period(self) -> WatchConfig:
        if self.max_delay_ms < self.debounce_ms:
            raise ValueError(
                f"max_delay_ms ({self.max_delay_ms}) must be at least debounce_ms ({self.debounce_ms})"
            )
        return self


class WorkersConfig(_Section):
    threads: int = Field(2, ge=1, le=64)
    batch_size: int = Field(256, ge=1, le=10_000)


class ScheduleConfig(_Section):
    reconcile_cron: str = "0 3 * * *"
    timezone: str = "local"
    reconcile_on_start: bool = True
    discover_interval_s: int = Field(60, ge=1, le=86_400)

    @field_validator("reconcile_cron")
    @classmethod
    def _cron(cls, expr: str) -> str:
        from sessionsync.daemon import crontab  # only for a configured expression: the default is valid

        try:
            crontab.check(expr)  # weekdays 0-7 counted from Sunday, as the daemon runs them
        except ValueError as exc:
            raise ValueError(f"not a valid 5-field crontab expression ({exc})") from None
        return expr

    @field_validator("timezone")
    @classmethod
    def _zone(cls, name: str) -> str:
        if name != "local":
            try:
                zoneinfo.ZoneInfo(name)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise ValueError("must be 'local' or an IANA zone name such as Europe/Paris") from None
        return name


class RetentionConfig(_Section):
    tombstone_days: int = Field(7, ge=0, le=36_500)


class ControlConfig(_Section):
    socket: str = ""


class LogConfig(_Section):
    level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    format: Literal["text", "json"] = "text"
    file: str = ""
    sql: bool = False  # SQL statements in the log at DEBUG; off, they drown the daemon's own lines

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, level: object) -> object:
        return level.upper() if isinstance(level, str) else level


class MetricsConfig(_Section):
    """Prometheus metrics: over HTTP (`listen`) and/or a node_exporter textfile; both off by default."""

    listen: str = ""  # "HOST:PORT"; empty: no HTTP listener (`sessionsync metrics` still works)
    allow_remote: bool = False  # a non-loopback `listen` address is refused unless this is true
    textfile: str = ""  # a *.prom file rewritten atomically every textfile_interval_s
    textfile_interval_s: int = Field(15, ge=1, le=3600)

    @field_validator("listen")
    @classmethod
    def _listen(cls, listen: str) -> str:
        if listen:
            split_listen(listen)  # raises ValueError naming the problem
        return listen

    @field_validator("textfile")
    @classmethod
    def _textfile(cls, textfile: str) -> str:
        if not textfile:
            return textfile
        path = os.path.expanduser(textfile)
        if not os.path.isabs(path) or not path.endswith(".prom"):
            raise ValueError("must be an absolute path ending in .prom (node_exporter reads only those)")
        return path

    @model_validator(mode="after")
    def _loopback_unless_allowed(self) -> MetricsConfig:
        if self.listen and not self.allow_remote and not is_loopback(split_listen(self.listen)[0]):
            raise ValueError(
                f"listen = {self.listen!r} is not a loopback address; metrics are served to this machine "
                "only unless allow_remote = true"
            )
        return self


def split_listen(listen: str) -> tuple[str, int]:
    """("127.0.0.1", 9464) from "127.0.0.1:9464", ("::1", 9464) from "[::1]:9464"; ValueError else."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("must be HOST:PORT, such as 127.0.0.1:9464 or [::1]:9464 (port 0 to 65535)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


class Config(_Section):
    """The whole configuration; `source` is the file it came from (None: defaults only)."""

    database: DatabaseConfig = DatabaseConfig()
    watch: WatchConfig = WatchConfig()
    workers: WorkersConfig = WorkersConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    retention: RetentionConfig = RetentionConfig()
    control: ControlConfig = ControlConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    source: Path | None = None

    def database_url(self, env: Mapping[str, str] | None = None) -> str:
        """The configured URL, or SQLite in the state folder ($STATE_DIRECTORY under systemd)."""
        if self.database.url:
            return self.database.url
        env = os.environ if env is None else env
        state = env.get("STATE_DIRECTORY", "").split(":")[0]
        if not state:
            base = env.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
            state = os.path.join(base, "sessionsync")
        return f"sqlite:///{os.path.join(state, 'sessions.db')}"

    def socket_path(self, env: Mapping[str, str] | None = None) -> Path:
        """The control socket: configured, or under the runtime folder (never a shared one)."""
        if self.control.socket:
            return Path(os.path.expanduser(self.control.socket))
        return default_socket_path(env)


_SECTIONS: dict[str, type[_Section]] = {
    name: field.annotation  # type: ignore[misc]
    for name, field in Config.model_fields.items()
    if name != "source"
}


def find_config_file(
    explicit: str | None, env: Mapping[str, str], system_file: Path = SYSTEM_CONFIG
) -> Path | None:
    """The first config file in the lookup order; an explicitly named one must exist."""
    if explicit:
        path = Path(explicit).expanduser()
        if not _is_file(path):
            raise ConfigError(f"config file {path} does not exist", "check the --config path")
        return path
    if env.get("SESSIONSYNC_CONFIG"):
        path = Path(env["SESSIONSYNC_CONFIG"]).expanduser()
        if not _is_file(path):
            raise ConfigError(
                f"config file {path} (from $SESSIONSYNC_CONFIG) does not exist",
                "fix or unset SESSIONSYNC_CONFIG",
            )
        return path
    xdg = env.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(xdg):  # the XDG spec: relative (or empty) means unset
        xdg = os.path.join(env.get("HOME") or os.path.expanduser("~"), ".config")
    for candidate in (Path(xdg) / "sessionsync" / "config.toml", system_file):
        if _is_file(candidate):
            return candidate
    return None


def _is_file(path: Path) -> bool:
    # Path.is_file() raises on EACCES; a config that may exist but cannot be checked is an
    # error, not a silent fall-through to the next candidate.
    try:
        return path.is_file()
    except OSError as exc:
        raise ConfigError(
            f"cannot check config file {path}: {exc.strerror}", "fix its permissions or pass --config"
        ) from None


def load_config(
    explicit: str | None = None, env: Mapping[str, str] | None = None, system_file: Path = SYSTEM_CONFIG
) -> Config:
    """Read, overlay the environment, validate. Raises ConfigError naming what is wrong."""
    env = os.environ if env is None else env
    path = find_config_file(explicit, env, system_file)
    data: dict[str, Any] = {}
    if path is not None:
        import tomllib  # only with a file: a user without one never pays for the parser

        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    where = str(path) if path else "the built-in defaults"
    for section, values in data.items():
        if section not in _SECTIONS:
            raise ConfigError(
                f"unknown section [{section}] in {where}",
                f"allowed sections: {', '.join(f'[{s}]' for s in _SECTIONS)}",
            )
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] in {where} must be a table of keys, got {_masked(values)!r}")
    origins = {(s, k): where for s, keys in data.items() for k in keys}
    for name, raw in env.items():
        if name.startswith(ENV_PREFIX) and "__" in name:
            section, key = _apply_env(data, name, raw)
            origins[(section, key)] = f"${name}"
    try:
        return Config.model_validate({**data, "source": path})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origins)) from None


def _apply_env(data: dict[str, Any], name: str, raw: str) -> tuple[str, str]:
    section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
    model = _SECTIONS.get(section)
    if model is None:
        raise ConfigError(
            f"unknown setting {name} in the environment: no section [{section}]",
            f"names look like SESSIONSYNC_<SECTION>__<KEY>; sections: {', '.join(_SECTIONS)}",
        )
    if key not in model.model_fields:
        raise ConfigError(
            f"unknown setting {name} in the environment: no key {key!r} in [{section}]",
            f"allowed keys in [{section}]: {', '.join(model.model_fields)}",
        )
    value: Any = raw
    if model.model_fields[key].annotation == tuple[str, ...]:
        # Lists come as a JSON array or, like PATH, separated by ':'.
        if raw.lstrip().startswith("["):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{name}={raw!r} is not a valid JSON array: {exc}") from None
        else:
            value = [part for part in raw.split(":") if part]
    data.setdefault(section, {})[key] = value
    return section, key


def _masked(value: Any) -> Any:
    """A value as an error may show it: any database URL in it (a list of them, a URL where a
    table belongs) with its password masked by the URL's own grammar."""
    if isinstance(value, str):
        return mask_url(value)
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    return value


def _describe(exc: ValidationError, origins: Mapping[tuple[str, str], str]) -> str:
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        section, key = [*loc, "", ""][:2]
        # A check across keys (max_delay_ms vs debounce_ms) is reported on the section: name
        # where that section's values came from.
        origin = origins.get((section, key)) or ", ".join(
            sorted({o for (s, _), o in origins.items() if s == section})
        )
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(_SECTIONS[section].model_fields) if section in _SECTIONS else ""
            lines.append(f"unknown key {key!r} in [{section}] ({origin}); allowed keys: {allowed}")
            continue
        name = f"[{section}] {key}" if key else f"[{section}]"
        message = str(error["msg"]).removeprefix("Value error, ")
        got = _masked(error.get("input"))
        shown = f" = {got!r}" if got is not None and not isinstance(got, dict) else ""
        lines.append(f"{name}{shown} ({origin or 'default'}): {message}")
    return "invalid configuration:\n  " + "\n  ".join(lines)

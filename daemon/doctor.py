"""`sessionsync doctor`: one screen of checks of this install, each OK, WARN or FAIL with what to do.

Read-only, and it works with the daemon down: the database is opened read-only (the SQLite file
and its folder are never created, the schema never migrated), the daemon is asked for its status
when one answers, the inotify limits are read from /proc (or the test seam's stand-in folder) and
systemctl is only asked questions. A config that does not validate is one of its FAIL lines.
SQLAlchemy, alembic and the scheduler are imported by the checks that need them, and only then.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import textwrap
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sessionsync.daemon.config import Config, ControlConfig, find_config_file
from sessionsync.daemon.dburl import mask_url
from sessionsync.daemon.errors import ConfigError, DaemonNotRunning, OperationalError, SessionSyncError
from sessionsync.daemon.inotify_faults import INOTIFY_SYSCTL_ENV, InotifyFaults
from sessionsync.daemon.paths import shown_path
from sessionsync.daemon.status import duration
from sessionsync.daemon.version import version

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from sessionsync.daemon.discovery import ProjectPath

Status = Literal["OK", "WARN", "FAIL"]
_RANK: dict[Status, int] = {"OK": 0, "WARN": 1, "FAIL": 2}

# A scheduled full reconcile that has not happened this long after it was due was missed: the
# scheduler runs a late one when the machine wakes (misfire grace), so being late is not enough.
STALE_AFTER = timedelta(hours=1)
# inotify use above this share of a limit is a warning: every new session folder needs watches.
CLOSE_TO_LIMIT = 0.8
# What to suggest for each limit at the least (the daemon's own hint suggests the same values).
SUGGESTED = {"max_user_watches": 524_288, "max_user_instances": 1024}
PROC_INOTIFY = "/proc/sys/fs/inotify"
SYSTEMCTL_TIMEOUT_S = 5.0
DAEMON_TIMEOUT_S = 5.0
_START_HINT = "start it: `systemctl --user start sessionsync`, or `sessionsync run` in a terminal"


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's verdict: `message` says what was found, `hint` what to do (lines of text)."""

    check: str
    status: Status
    message: str
    hint: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "status": self.status,
            "message": self.message,
            "hint": self.hint or None,
        }


@dataclass
class Report:
    findings: list[Finding]

    @property
    def status(self) -> Status:
        return max((f.status for f in self.findings), key=_RANK.__getitem__, default="OK")

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "version": version(), "checks": [f.as_dict() for f in self.findings]}

    def lines(self, width: int | None = None) -> Iterator[str]:
        """The report for people: a status column, the check's name and the message, wrapped to
        the terminal; the hint below it, its indented lines (commands to copy) never wrapped."""
        if width is None:
            width = max(72, min(120, shutil.get_terminal_size((100, 24)).columns))
        yield f"sessionsync doctor {version()}"
        indent = " " * 17
        for f in self.findings:
            first, *more = f.message.splitlines() or [""]
            yield from _wrap(first, width, f"{f.status:<4}  {f.check:<9}  ", indent)
            for line in more:
                yield from _wrap(line.strip(), width, indent, indent + "  ")
            for i, line in enumerate(f.hint.splitlines()):
                lead = indent + ("-> " if i == 0 else "   ")
                if line.startswith(" "):
                    yield lead + line
                else:
                    yield from _wrap(line, width, lead, indent + "   ")
        counts = {s: sum(1 for f in self.findings if f.status == s) for s in ("FAIL", "WARN")}
        problems = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        yield f"{len(self.findings)} checks: {problems or 'all OK'}"


def _wrap(text: str, width: int, first: str, indent: str) -> list[str]:
    """`text` after `first` on the first line, however long its first word (a path), then wrapped."""
    return textwrap.wrap(
        text,
        width,
        initial_indent=first,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    ) or [first.rstrip()]


@dataclass
class _Issues:
    """What one check found wrong, gathered before it becomes one Finding (the worst status wins)."""

    status: Status = "OK"
    notes: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)

    def add(self, status: Status, note: str, hint: str = "") -> None:
        if _RANK[status] > _RANK[self.status]:
            self.status = status
        self.notes.append(note)
        if hint:
            self.hints.append(hint)

    def finding(self, check: str, head: str) -> Finding:
        return Finding(check, self.status, "; ".join([head, *self.notes]), "\n".join(self.hints))


@dataclass
class _Context:
    env: Mapping[str, str]
    home: str
    cfg: Config | None  # None: the config does not validate
    socket: Path | None = None
    daemon: dict[str, Any] | None = None  # the daemon's status reply, when it answers

    def shown(self, path: str | Path) -> str:
        return shown_path(str(path), self.home)


def run_checks(
    cfg: Config | ConfigError, explicit: str | None, env: Mapping[str, str] | None = None
) -> Report:
    """Every check, in reading order. `cfg` is the loaded config, or the error that loading it
    raised; `explicit` is the --config argument (to find the socket of a config that is broken)."""
    env = os.environ if env is None else env
    ctx = _Context(env=env, home=env.get("HOME", ""), cfg=cfg if isinstance(cfg, Config) else None)
    findings = [_config(ctx, cfg)]
    socket = _socket(ctx, explicit)
    daemon = _daemon(ctx)  # asked first: the database and projects checks read what it says
    engine = None
    if ctx.cfg is not None:
        database, engine = _database(ctx, ctx.cfg)
        findings += database
    findings += [socket, daemon]
    projects = _projects(ctx)
    if projects is not None:
        findings += [projects[0], _inotify(ctx, projects[1])]
    if engine is not None:
        try:
            findings += [
                _reading("reconcile", _reconcile, ctx, engine),
                _reading("sessions", _sessions, ctx, engine),
            ]
        finally:
            engine.dispose()
    findings.append(_unit(ctx))
    return Report(findings)


# -- config -----------------------------------------------------------------------------------


def _config(ctx: _Context, cfg: Config | ConfigError) -> Finding:
    if isinstance(cfg, ConfigError):
        hint = cfg.hint or "fix it; `sessionsync check-config` checks it again"
        return Finding(
            "config",
            "FAIL",
            cfg.message,
            f"{hint}\nthe database, inotify and reconcile checks need a valid config; they are skipped",
        )
    where = f"{ctx.shown(cfg.source)}: valid" if cfg.source else "built-in defaults (no config file found)"
    overrides = sorted(k for k in ctx.env if k.startswith("SESSIONSYNC_") and "__" in k)
    if overrides:
        where += f", with {', '.join(overrides)} from the environment"
    return Finding("config", "OK", where)


def _socket_of_broken_config(explicit: str | None, env: Mapping[str, str]) -> Path:
    """The socket a client command uses when the config is broken (as `status` does): the
    environment's, the file's [control] socket if that much can be read, else the default."""
    socket = env.get("SESSIONSYNC_CONTROL__SOCKET", "")
    if not socket:
        try:
            path = find_config_file(explicit, env)
            data = tomllib.loads(path.read_text(encoding="utf-8")) if path else {}
            value = data.get("control", {}).get("socket", "")
            socket = value if isinstance(value, str) else ""
        except (ConfigError, OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError):
            socket = ""
    return Config.model_construct(control=ControlConfig.model_construct(socket=socket)).socket_path(env)


# -- control socket and daemon ----------------------------------------------------------------


def _socket(ctx: _Context, explicit: str | None) -> Finding:
    try:
        ctx.socket = ctx.cfg.socket_path(ctx.env) if ctx.cfg else _socket_of_broken_config(explicit, ctx.env)
    except ConfigError as exc:
        return Finding("socket", "FAIL", exc.message, exc.hint)
    path, shown = ctx.socket, ctx.shown(ctx.socket)
    try:
        st = os.lstat(path)
        folder = os.stat(path.parent)
    except FileNotFoundError:
        return Finding("socket", "WARN", f"no socket at {shown}", "the daemon makes it when it starts")
    except OSError as exc:
        return Finding(
            "socket", "FAIL", f"cannot check {shown}: {exc.strerror}", "check that folder's permissions"
        )
    if not stat.S_ISSOCK(st.st_mode):
        return Finding(
            "socket",
            "FAIL",
            f"{shown} is not a socket",
            "move it away, or set control.socket to another path",
        )
    issues = _Issues()
    uid = os.getuid()
    mode, folder_mode = stat.S_IMODE(st.st_mode), stat.S_IMODE(folder.st_mode)
    for what, owner in (("it", st.st_uid), ("its folder", folder.st_uid)):
        if owner != uid:
            issues.add(
                "FAIL",
                f"{what} is owned by uid {owner}, not by you (uid {uid})",
                "set control.socket to a path in a folder of your own",
            )
    fix = ["the daemon sets both when it starts; or now:"]
    fix += [f"  chmod 600 {shlex.quote(str(path))}"] if mode & 0o077 else []
    fix += [f"  chmod 700 {shlex.quote(str(path.parent))}"] if folder_mode & 0o077 else []
    if folder_mode & 0o022:
        issues.add(
            "FAIL",
            f"its folder is writable by other users ({folder_mode:o}): anyone may replace it",
            "\n".join(fix),
        )
    elif mode & 0o077 or folder_mode & 0o077:
        issues.add(
            "WARN",
            f"mode {mode:o} in a {folder_mode:o} folder, not 600 in 700: other users may reach it"
            " (the daemon still refuses them)",
            "\n".join(fix),
        )
    head = f"{shown}: yours, 600 in a 700 folder" if issues.status == "OK" else shown
    return issues.finding("socket", head)


def _daemon(ctx: _Context) -> Finding:
    """The daemon line, from its status reply (kept in ctx for the checks that read it)."""
    from sessionsync.daemon.control.client import request

    if ctx.socket is None:
        return Finding("daemon", "FAIL", "cannot be asked: no control socket path (see the socket line)")
    shown = ctx.shown(ctx.socket)
    try:
        ctx.daemon = status = request(ctx.socket, {"cmd": "status"}, timeout=DAEMON_TIMEOUT_S)
    except DaemonNotRunning:
        stale = " (a socket is there: left by a daemon that died?)" if os.path.lexists(ctx.socket) else ""
        return Finding("daemon", "FAIL", f"not running: nothing answers on {shown}{stale}", _START_HINT)
    except SessionSyncError as exc:
        return Finding(
            "daemon",
            "FAIL",
            f"does not answer as it should: {exc.message}",
            "see its log (`journalctl --user -u sessionsync`, or its terminal) and restart it",
        )
    issues = _Issues()
    theirs, mine = status.get("version"), version()
    if theirs != mine:
        issues.add(
            "WARN",
            f"it runs version {theirs}, this install is {mine}",
            "restart it to run this install: `systemctl --user restart sessionsync` (or stop and start"
            " `sessionsync run`)",
        )
    if not status.get("database_ok", True):
        error = (status.get("database") or {}).get("last_error") or "unknown error"
        issues.add(
            "FAIL",
            f"it cannot use its database: {error}",
            "see the database line; changes stay queued until the database is back",
        )
    if status.get("paused"):
        issues.add("WARN", f"writes are paused, {status.get('pending', 0)} pending", "`sessionsync resume`")
    if ctx.cfg is not None and not _same_file(status.get("config"), ctx.cfg.source):
        started = ctx.shown(status["config"]) if status.get("config") else "built-in defaults"
        reads = ctx.shown(ctx.cfg.source) if ctx.cfg.source else "built-in defaults"
        issues.add(
            "WARN",
            f"it started with {started}, this command read {reads}",
            "restart it (or point both at one file) so that it and the commands agree",
        )
    head = (
        f"running: pid {status.get('pid')}, version {theirs}, up {duration(float(status.get('uptime_s', 0)))}"
    )
    return issues.finding("daemon", head)


def _same_file(theirs: str | None, mine: Path | None) -> bool:
    if theirs is None or mine is None:
        return theirs is None and mine is None
    return os.path.realpath(theirs) == os.path.realpath(mine)


# -- projects and inotify ---------------------------------------------------------------------


def _projects(ctx: _Context) -> tuple[Finding, list[ProjectPath]] | None:
    """The projects line (the daemon's watch states, else what discovery finds now) and the
    projects the inotify check counts; None when neither the config nor the daemon can say."""
    found: list[ProjectPath] = []
    issues = _Issues()
    if ctx.cfg is not None:
        from sessionsync.daemon.discovery import discover

        w = ctx.cfg.watch
        roots = [r for r in w.roots if os.path.isdir(r)]
        for root in sorted(set(w.roots) - set(roots)):  # said here, rather than logged by discover
            issues.add(
                "WARN", f"watch root {ctx.shown(root)} is not a folder", "fix or remove it in watch.roots"
            )
        found = discover(w.projects, roots, w.discover_depth, w.sessions_subdir)
    elif ctx.daemon is None:
        return None
    if ctx.daemon is None:
        head = f"{len(found)} found{_where_projects_come_from(ctx)}; their watch states need the daemon"
    else:
        watch = ctx.daemon.get("watch") or []
        by_state: dict[str, list[str]] = {}
        for entry in watch:
            by_state.setdefault(entry["state"], []).append(ctx.shown(entry["project"]))
        # watch_states counts every project; the watch list may leave live ones out to fit a line.
        states = ctx.daemon.get("watch_states") or {k: len(v) for k, v in by_state.items()}
        counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        head = f"{sum(states.values())} watched ({counts})" if states else "none watched"
        if "fallback" in by_state:
            issues.add(
                "WARN",
                f"{_some(by_state['fallback'])} without an inotify watch, scanned every 30 s instead",
                "see the inotify line; the watch comes back by itself once the limit is raised",
            )
        if "missing" in by_state:
            subdir = ctx.cfg.watch.sessions_subdir if ctx.cfg else "agents/sessions"
            issues.add(
                "WARN",
                f"{_some(by_state['missing'])} without a sessions folder",
                f"create its {subdir} folder, or take it out of watch.projects",
            )
    if (ctx.daemon is None and not found) or (ctx.daemon is not None and not ctx.daemon.get("watch")):
        issues.add(
            "WARN",
            f"no project{_where_projects_come_from(ctx)}: nothing to mirror",
            "name project folders in watch.projects, or folders that hold them in watch.roots",
        )
        head = "none found" if ctx.daemon is None else head
    return issues.finding("projects", head), found


def _some(paths: Sequence[str], shown: int = 3) -> str:
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more


def _where_projects_come_from(ctx: _Context) -> str:
    if ctx.cfg is None:
        return ""
    w = ctx.cfg.watch
    roots = ", ".join(ctx.shown(r) for r in w.roots) or "no roots"
    return f" under {roots} (depth {w.discover_depth})" + (
        f" and in watch.projects ({len(w.projects)})" if w.projects else ""
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _watches_needed(sessions_dir: str) -> int:
    """inotify watches one project takes: its sessions folder, that folder's parent, and one per
    folder right inside it (a session; links are not followed), whatever lies deeper."""
    if not os.path.isdir(sessions_dir):
        return 1 if os.path.isdir(os.path.dirname(sessions_dir)) else 0
    try:
        with os.scandir(sessions_dir) as entries:
            return 2 + sum(1 for entry in entries if entry.is_dir(follow_symlinks=False))
    except OSError:
        return 2  # unreadable: the daemon cannot watch its sessions either


def _held_by_user(exclude: int | None) -> tuple[int, int]:
    """inotify watches and instances held by this user's processes (but `exclude`), as the
    per-user limits count them: one `inotify wd:` line per watch in each instance's fdinfo."""
    uid, watches, instances = os.getuid(), 0, 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == exclude:
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        for fd in fds:
            try:
                if os.readlink(f"/proc/{name}/fd/{fd}") != "anon_inode:inotify":
                    continue
                with open(f"/proc/{name}/fdinfo/{fd}", encoding="ascii") as f:
                    watches += f.read().count("inotify wd:")
                instances += 1
            except OSError:
                continue
    return watches, instances


def _proc_limit(name: str) -> int | None:
    try:
        with open(os.path.join(PROC_INOTIFY, name), encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def suggested_limit(name: str, wanted: int) -> int:
    """A value to raise `name` to: the usual suggestion, or twice what is wanted, as a power of two."""
    value = SUGGESTED[name]
    while value < 2 * wanted:
        value *= 2
    return value


def raise_commands(limits: Mapping[str, int]) -> str:
    """The lines that raise fs.inotify limits now and keep them after a reboot."""
    settings = [f"fs.inotify.{name}={value}" for name, value in limits.items()]
    persist = (
        f"echo '{settings[0]}'"
        if len(settings) == 1
        else "printf '%s\\n' " + " ".join(f"'{s}'" for s in settings)
    )
    return (
        f"raise {'it' if len(settings) == 1 else 'them'} (the second line keeps it after a reboot):\n"
        f"  sudo sysctl {' '.join(settings)}\n"
        f"  {persist} | sudo tee /etc/sysctl.d/60-inotify.conf"
    )


def _inotify(ctx: _Context, projects: list[ProjectPath]) -> Finding:
    """The watches the projects need and the daemon's one instance, against the per-user limits
    less what this user's other programs hold (the daemon's own count as needed, not as held)."""
    needed = sum(_watches_needed(p.sessions_dir) for p in projects)
    pid = ctx.daemon.get("pid") if ctx.daemon else None
    held_watches, held_instances = _held_by_user(exclude=pid if isinstance(pid, int) else None)
    faults = InotifyFaults.from_env(ctx.env)
    wanted = (
        (
            "max_user_watches",
            needed,
            held_watches,
            f"watches {needed} for {_count(len(projects), 'project')}",
        ),
        ("max_user_instances", 1, held_instances, "instances 1"),
    )
    status: Status = "OK"
    parts, to_raise = [], {}
    for name, need, held_now, needs in wanted:
        stand_in = None
        if faults is not None:
            stand_in = faults.user_watches() if name == "max_user_watches" else faults.user_instances()
        limit: int | None
        if stand_in is not None:
            # The seam's limits hold for the daemon's process alone: nothing else counts then.
            limit, held, source = stand_in, 0, f" (stand-in from ${INOTIFY_SYSCTL_ENV})"
        else:
            limit, held, source = _proc_limit(name), held_now, ""
        elsewhere = "held by your other programs" if name == "max_user_watches" else "elsewhere"
        what = f"{needs} (+{held} {elsewhere})" if held else needs
        if limit is None:
            status = max(status, "WARN", key=_RANK.__getitem__)
            parts.append(f"{what}, of a limit that cannot be read ({PROC_INOTIFY}/{name})")
        elif need + held > limit:
            status = "FAIL"
            to_raise[name] = suggested_limit(name, need + held)
            parts.append(
                f"{what}, over fs.inotify.{name} = {limit}{source}: projects past it are scanned"
                " every 30 s, not live"
            )
        elif need + held > CLOSE_TO_LIMIT * limit:
            status = max(status, "WARN", key=_RANK.__getitem__)
            to_raise[name] = suggested_limit(name, need + held)
            parts.append(f"{what} of {limit}{source}: close to fs.inotify.{name}, and new sessions need more")
        else:
            parts.append(f"{what} of {limit}{source}")
    hint = (
        raise_commands(to_raise) if to_raise else "`sysctl fs.inotify` shows them" if status != "OK" else ""
    )
    return Finding("inotify", status, "; ".join(parts), hint)


# -- database ---------------------------------------------------------------------------------


def _database(ctx: _Context, cfg: Config) -> tuple[list[Finding], Engine | None]:
    """database (reachable), schema (at head), db-files (a SQLite file's modes); and a read-only
    engine for the checks that read the tables, when they are there (the caller disposes it)."""
    from sqlalchemy import exc as sa_exc
    from sqlalchemy import text

    from sessionsync.daemon.logs import mask_secrets

    url = cfg.database_url(ctx.env)
    shown = mask_url(url)
    findings: list[Finding] = []
    if url.startswith("sqlite"):
        path = _sqlite_path(url)
        if path is None:
            memory = Finding(
                "database", "WARN", f"{shown}: in memory, so nothing is kept", "set database.url to a file"
            )
            return [memory], None
        if not os.path.exists(path):
            running = ctx.daemon is not None
            missing = Finding(
                "database",
                "FAIL" if running else "WARN",
                f"{shown}: no database file yet" + (" (but the daemon runs: removed?)" if running else ""),
                "the daemon creates it when it starts; so does `sessionsync db upgrade`",
            )
            return [missing], None
        files = _sqlite_files(ctx, path, own_folder=not cfg.database.url)
        engine = _sqlite_read_only(path)
    else:
        from sessionsync.daemon.db import make_engine

        files = None
        engine = make_engine(url, pool_size=1)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except sa_exc.SQLAlchemyError as exc:
        engine.dispose()
        reason = mask_secrets(str(getattr(exc, "orig", None) or exc)).strip().splitlines()[0]
        hint = (
            "check the file: is it a sessionsync database, and readable by you?"
            if url.startswith("sqlite")
            else "check [database] url and that the server is running and lets you in"
        )
        failed = Finding("database", "FAIL", f"{shown}: cannot connect: {reason}", hint)
        return [failed, *([files] if files else [])], None
    findings.append(Finding("database", "OK", f"{shown}: reachable"))
    try:
        schema, tables = _schema(engine, ctx.daemon is not None)
    except BaseException:
        engine.dispose()
        raise
    findings.append(schema)
    if files is not None:
        findings.append(files)
    if not tables:
        engine.dispose()
        return findings, None
    return findings, engine


def _sqlite_path(url: str) -> str | None:
    from sqlalchemy.engine import make_url

    database = make_url(url).database or ""
    return None if database in ("", ":memory:") else os.path.abspath(database)


def _sqlite_read_only(path: str) -> Engine:
    """An engine that reads the SQLite file without creating anything: mode=ro while a writer
    has its -wal and -shm files open; immutable otherwise (no writer), because a read-only
    connection to a WAL database would leave a new -wal and -shm behind."""
    import sqlite3
    from urllib.parse import quote

    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    live = os.path.exists(f"{path}-wal") and os.path.exists(f"{path}-shm")
    uri = f"file:{quote(path)}?mode=ro" + ("" if live else "&immutable=1")

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(uri, uri=True, timeout=5.0, check_same_thread=False)

    return create_engine("sqlite://", creator=connect, poolclass=NullPool)


def _sqlite_files(ctx: _Context, path: str, own_folder: bool) -> Finding:
    """The mirror holds every session's state: the file (and its -wal, -shm) 0600, and the
    default state folder 0700. Reported only; the daemon tightens them when it starts."""
    uid = os.getuid()
    folder = os.path.dirname(path)
    issues = _Issues()
    loose: list[tuple[str, str]] = []  # (the path, as the message names it with its mode)
    checked = [(p, 0o600) for p in (path, f"{path}-wal", f"{path}-shm")]
    checked += [(folder, 0o700)] if own_folder else []
    for p, wanted in checked:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            continue
        except OSError as exc:
            issues.add(
                "FAIL", f"cannot check {ctx.shown(p)}: {exc.strerror}", "check its folder's permissions"
            )
            continue
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != uid:
            issues.add(
                "FAIL",
                f"{ctx.shown(p)} is owned by uid {st.st_uid}, not by you (uid {uid})",
                "the daemon, running as you, cannot keep it private: give it back to you (chown)",
            )
        if mode & ~wanted & 0o077:
            loose.append((p, f"{'its folder' if p == folder else os.path.basename(p)} {mode:o}"))
    if loose:
        fix = (
            [f"  chmod -R go= {shlex.quote(folder)}"]
            if own_folder
            else [f"  chmod go= {' '.join(shlex.quote(p) for p, _ in loose)}"]
        )
        issues.add(
            "FAIL",
            f"readable by other users: {', '.join(what for _, what in loose)}",
            "\n".join(["the daemon makes them private when it starts; or now:", *fix]),
        )
    if issues.status != "OK":
        return issues.finding("db-files", f"{ctx.shown(path)} holds every session's state")
    where = ", in a 700 folder" if own_folder else ""
    return Finding("db-files", "OK", f"private: {os.path.basename(path)} 600{where}")


def _schema(engine: Engine, daemon_running: bool) -> tuple[Finding, bool]:
    """The schema revision against this install's head; whether the tables are there."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from alembic.script.revision import RevisionError

    from sessionsync.daemon.migrate import alembic_config

    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    upgrade = "run `sessionsync db upgrade`" + (", then restart the daemon" if daemon_running else "")
    if current is None:
        return Finding(
            "schema", "FAIL", f"no sessionsync tables (this install's head is {head})", upgrade
        ), False
    if current == head:
        return Finding("schema", "OK", f"at head, revision {head}"), True
    try:
        behind = len(list(script.iterate_revisions(head, current)))
    except RevisionError:
        unknown = Finding(
            "schema",
            "FAIL",
            f"revision {current} is unknown to this install (head {head}): a newer version migrated it",
            "upgrade this install, or point database.url at another database",
        )
        return unknown, False  # the tables of a schema this install does not know are not read
    return Finding(
        "schema", "FAIL", f"revision {current}, {behind} behind this install's head {head}", upgrade
    ), True


def _reading(
    check: str, read: Callable[[_Context, Engine], Finding], ctx: _Context, engine: Engine
) -> Finding:
    """A check that reads the tables; a query that fails (a schema behind, a server gone) is its FAIL."""
    from sqlalchemy import exc as sa_exc

    from sessionsync.daemon.logs import mask_secrets

    try:
        return read(ctx, engine)
    except sa_exc.SQLAlchemyError as exc:
        reason = mask_secrets(str(getattr(exc, "orig", None) or exc)).strip().splitlines()[0]
        return Finding(
            check, "FAIL", f"cannot read the database: {reason}", "see the database and schema lines"
        )


def _reconcile(ctx: _Context, engine: Engine) -> Finding:
    from sessionsync.daemon.scheduler import zone
    from sessionsync.daemon.store import Store

    cfg = ctx.cfg
    assert cfg is not None  # the database checks run only with a valid config
    last = Store(engine).last_full_reconcile()
    next_at = (ctx.daemon or {}).get("next_reconcile_at")
    return reconcile_finding(
        cfg.schedule.reconcile_cron,
        zone(cfg.schedule.timezone),
        last,
        datetime.now(UTC),
        datetime.fromisoformat(next_at) if next_at else None,
        daemon_running=ctx.daemon is not None,
    )


def reconcile_finding(
    cron: str,
    tz: Any,
    last: datetime | None,
    now: datetime,
    next_at: datetime | None,
    daemon_running: bool,
) -> Finding:
    """Stale when the scheduled full reconcile after `last` is more than STALE_AFTER overdue."""
    from sessionsync.daemon.scheduler import next_run

    if daemon_running:
        run_one = "`sessionsync resync --all --wait` runs one now"
    else:
        run_one = (
            "start the daemon (it reconciles at once when a run was missed), or run `sessionsync reconcile`"
        )
    if last is None:
        return Finding(
            "reconcile",
            "WARN",
            "no full reconcile recorded yet for every project"
            + (" (the start-up one may still be running)" if daemon_running else ""),
            run_one,
        )
    due = next_run(cron, tz, last)
    if now - due > STALE_AFTER:
        see = (
            "; if the daemon keeps missing it, see `journalctl --user -u sessionsync`"
            if daemon_running
            else ""
        )
        return Finding(
            "reconcile",
            "FAIL",
            f"missed: the full reconcile due {_when(due, now)} ({cron}) did not run; the last was"
            f" {_when(last, now)}",
            run_one + see,
        )
    upcoming = next_at or next_run(cron, tz, now)
    return Finding("reconcile", "OK", f"last full {_when(last, now)}, next {_when(upcoming, now)}")


def _when(at: datetime, now: datetime) -> str:
    delta = (now - at).total_seconds()
    shown = at.astimezone().strftime("%Y-%m-%d %H:%M")
    return f"{shown} ({duration(abs(delta))} {'ago' if delta >= 0 else 'from now'})"


def _sessions(ctx: _Context, engine: Engine) -> Finding:
    from sessionsync.daemon.store import Store

    store = Store(engine)
    live = store.count_live_sessions()
    problems = store.invalid_sessions()
    invalid = sum(1 for p in problems if p["kind"] == "invalid")
    fields = len(problems) - invalid
    if not problems:
        return Finding("sessions", "OK", f"{live} mirrored, none invalid, no field problems")
    see = "`sessionsync errors` lists them and why" + (
        "" if ctx.daemon is not None else " (with the daemon running)"
    )
    counts = [f"{invalid} invalid"] if invalid else []
    counts += [f"{fields} with fields of the wrong type"] if fields else []
    return Finding("sessions", "WARN", f"{live} mirrored: {', '.join(counts)}", see)


# -- systemd user unit ------------------------------------------------------------------------


def _unit(ctx: _Context) -> Finding:
    from sessionsync.daemon.unit import default_executable, exec_start_words, render_unit, unit_destination

    path = unit_destination("user", ctx.env)
    shown = ctx.shown(path)
    install = "`sessionsync install-unit --user`, then `systemctl --user daemon-reload`"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Finding(
            "unit",
            "WARN",
            f"no user unit at {shown}",
            "to run it as a service: `sessionsync install-unit --user` (it says what to run next)",
        )
    except OSError as exc:
        return Finding("unit", "FAIL", f"cannot read {shown}: {exc.strerror}", "check its permissions")
    words = exec_start_words(text)
    issues = _Issues()
    if not words:
        issues.add("FAIL", "it has no ExecStart= line that can be read", f"rewrite it: {install}")
        return issues.finding("unit", shown)
    executable = words[0]
    config = words[words.index("--config") + 1] if "--config" in words[:-1] else None
    try:
        mine: str | None = default_executable()
    except OperationalError:
        mine = None
    if not (os.path.isfile(executable) and os.access(executable, os.X_OK)):
        issues.add(
            "FAIL",
            f"it runs {ctx.shown(executable)}, which is not there",
            f"point it at this install: {install}",
        )
    elif mine is not None and not os.path.samefile(executable, mine):
        issues.add(
            "WARN",
            f"it runs {ctx.shown(executable)}, not this install's {ctx.shown(mine)}",
            f"to run this install: {install}, and restart it",
        )
    elif config is not None and not os.path.isfile(config):
        issues.add("FAIL", f"it runs with --config {ctx.shown(config)}, which is not there", install)
    else:
        try:
            expected = render_unit("user", executable, config)
        except SessionSyncError:
            expected = text
        if text != expected:
            issues.add(
                "WARN",
                "it differs from the unit this install writes (edited, or from another version)",
                f"{install} rewrites it (settings of your own belong in `systemctl --user edit sessionsync`)",
            )
    if issues.status == "OK":
        issues.notes.append("runs this install")
    enabled_status, note, hint = _enabled(ctx.env)
    issues.add(enabled_status, note, hint)
    return issues.finding("unit", shown)


def _enabled(env: Mapping[str, str]) -> tuple[Status, str, str]:
    """Whether the user unit is enabled (and active), as systemctl says; plainly said when it
    cannot, as in a container or an ssh session without a user manager."""
    systemctl = shutil.which("systemctl", path=env.get("PATH"))
    if systemctl is None:
        return "OK", "systemctl not found, so whether it is enabled is not known", ""
    enabled, error = _systemctl(systemctl, env, "is-enabled", "sessionsync")
    manager, _ = _systemctl(systemctl, env, "is-system-running")
    answers = manager in {"running", "degraded", "starting", "initializing", "maintenance", "stopping"}
    if not enabled:
        return "OK", f"systemctl cannot tell whether it is enabled ({error or 'no answer'})", ""
    status: Status = "OK"
    hint = ""
    if enabled not in {"enabled", "enabled-runtime", "alias", "linked", "linked-runtime"}:
        status = "WARN"
        hint = (
            "`systemctl --user unmask sessionsync`, then enable it"
            if enabled.startswith("masked")
            else "`systemctl --user enable --now sessionsync`"
        )
    if not answers:
        note = (
            f"{enabled}; no systemd user manager here to run it (is-system-running: {manager or 'no answer'})"
        )
        return status, note, hint
    active, _ = _systemctl(systemctl, env, "is-active", "sessionsync")
    if active == "failed":
        return "WARN", f"{enabled}, failed", "`systemctl --user status sessionsync` and its log say why"
    return status, f"{enabled}, {active or 'state unknown'}", hint


def _systemctl(systemctl: str, env: Mapping[str, str], *args: str) -> tuple[str, str]:
    """A read-only question to the user manager: its answer (first stdout line) and its error."""
    try:
        out = subprocess.run(
            [systemctl, "--user", "--no-pager", *args],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=SYSTEMCTL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "", str(exc)
    answer = out.stdout.strip().splitlines()
    error = out.stderr.strip().splitlines()
    return (answer[0] if answer else ""), (error[0] if error else "")

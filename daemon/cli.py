"""Command line: argument parsing and exit codes; the only place that calls sys.exit.

A command imports only what it uses, when it runs: the config model (pydantic) once the arguments
parse, the database modules (SQLAlchemy, alembic, psycopg) inside the commands that need one, so
`--help` and the control-socket commands start fast.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sessionsync.daemon.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PIPE,
    ConfigError,
    DatabaseUnavailable,
    OperationalError,
    ProjectNotFound,
    SessionSyncError,
    UsageError,
)

if TYPE_CHECKING:
    from sessionsync.daemon.config import Config

Command = Callable[[argparse.Namespace, "Config"], int]


def _quiet_logging(cfg: Config) -> None:
    """One-shot commands log like the daemon (its format, session folders named), warnings and up
    only: their output is the summary on stdout."""
    from sessionsync.daemon.logs import setup_logging

    quiet = cfg.log.level if cfg.log.level in ("WARNING", "ERROR", "CRITICAL") else "WARNING"
    setup_logging(quiet, cfg.log.format, sql=cfg.log.sql)


def _open_store(cfg: Config) -> Any:
    """The store of a one-shot command, its schema upgraded (or checked); the caller has set up
    logging (`_quiet_logging`)."""
    from sessionsync.daemon.db import make_engine
    from sessionsync.daemon.migrate import upgrade
    from sessionsync.daemon.store import Store

    engine = make_engine(cfg.database_url(), own_folder=not cfg.database.url)
    if cfg.database.auto_migrate:
        _guard_database(lambda: upgrade(engine), cfg)
    store = Store(engine)
    _guard_database(store.check_schema, cfg)
    return store


def _set_up() -> None:
    """A one-shot command's start-up is over: what is alive now lives until it exits. Frozen, it is
    never walked by the collector again, and the collector can work for the rest of the run."""
    if gc.isenabled():  # run() called by a host program (the tests): collect its garbage first
        from sessionsync.daemon.reconcile import freeze_long_lived

        freeze_long_lived()
        return
    # Started by main(): everything allocated since is the imports, the config and the engine.
    gc.freeze()
    gc.enable()


def _guard_database(action: Callable[[], Any], cfg: Config) -> Any:
    """Run a database action, turning an unreachable database into DatabaseUnavailable."""
    from sqlalchemy import exc as sa_exc

    from sessionsync.daemon.dburl import mask_url
    from sessionsync.daemon.logs import mask_secrets

    url = cfg.database_url()
    try:
        return action()
    except sa_exc.OperationalError as exc:
        sqlite = url.startswith("sqlite")
        hint = (
            "check that the file's folder exists and is writable, and that no other program holds it locked"
            if sqlite
            else "check [database] url and that the server is running"
        )
        raise DatabaseUnavailable(
            f"cannot use the database {mask_url(url)}: {mask_secrets(str(exc.orig))}", hint
        ) from None


def cmd_check_config(args: argparse.Namespace, cfg: Config) -> int:
    print(f"configuration OK ({cfg.source or 'built-in defaults'})")
    return EXIT_OK


def cmd_db_upgrade(args: argparse.Namespace, cfg: Config) -> int:
    from sessionsync.daemon.db import make_engine
    from sessionsync.daemon.dburl import mask_url
    from sessionsync.daemon.migrate import upgrade

    engine = make_engine(cfg.database_url(), own_folder=not cfg.database.url)
    before, after = _guard_database(lambda: upgrade(engine), cfg)
    url = mask_url(cfg.database_url())
    if before == after:
        print(f"database {url} is up to date (revision {after})")
    else:
        print(f"database {url} upgraded from {before or 'empty'} to revision {after}")
    return EXIT_OK


def cmd_reconcile(args: argparse.Namespace, cfg: Config) -> int:
    from sessionsync.daemon.discovery import discover, project_at
    from sessionsync.daemon.quick_reconcile import reconcile_unchanged

    if args.projects:
        found = [project_at(p, cfg.watch.sessions_subdir) for p in args.projects]
        missing = [p.path for p in found if not _is_dir(p.sessions_dir)]
        if missing:
            raise ProjectNotFound(
                f"no sessions folder ({cfg.watch.sessions_subdir}) in {', '.join(missing)}",
                "name a project folder that contains it",
            )
    else:
        w = cfg.watch
        found = discover(w.projects, w.roots, w.discover_depth, w.sessions_subdir)
    _quiet_logging(cfg)
    # Nothing changed (the common case) is answered without the store; anything else is the full pass.
    quick = reconcile_unchanged(cfg.database_url(), not cfg.database.url, found)
    if quick is not None:
        print(quick.line())
        return EXIT_OK
    from sessionsync.daemon.progress import terminal_progress
    from sessionsync.daemon.reconcile import reconcile, register

    store = _open_store(cfg)
    _set_up()
    with terminal_progress(sys.stderr) as progress:  # None (nothing drawn) off a terminal
        summary = _guard_database(
            lambda: reconcile(
                store,
                list(register(store, found).values()),
                cfg.watch.max_state_bytes,
                cfg.workers.batch_size,
                on_progress=progress,
            ),
            cfg,
        )
    print(summary.line())
    return EXIT_OK


def cmd_sessions(args: argparse.Namespace, cfg: Config) -> int:
    _quiet_logging(cfg)
    store = _open_store(cfg)
    project = os.path.realpath(args.project) if args.project else None
    if project is not None and project not in {r.path for r in _guard_database(store.known_projects, cfg)}:
        raise ProjectNotFound(
            f"no project {args.project} in the mirror",
            "name a project folder the daemon mirrors (see `sessionsync status`), or leave out --project",
        )
    rows = _guard_database(lambda: store.query_sessions(project, args.phase, args.status), cfg)
    if args.json:
        for row in rows:
            print(json.dumps(row, default=str))
        return EXIT_OK
    if not rows:
        print("no sessions match")
        return EXIT_OK
    for row in rows:
        progress = f"{row['checkpoints_completed'] or 0}/{row['checkpoints_total'] or 0}"
        flag = "  INVALID" if row["invalid"] else ""
        print(
            f"{row['project']}  {row['slug']}  {row['current_phase'] or '-'}  "
            f"{row['status'] or '-'}  {progress}  {row['title'] or ''}{flag}"
        )
    return EXIT_OK


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    from sessionsync.daemon.service import run_daemon

    gc.enable()  # the daemon's own start-up freezes what it keeps (freeze_long_lived)
    return run_daemon(cfg, args.config, args.early_signals)


def _ask(cfg: Config, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    from sessionsync.client import Client

    return Client(cfg.socket_path()).call(payload, timeout=timeout)


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    from sessionsync.daemon.status import render_status

    status = _ask(cfg, {"cmd": "status"})
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    client = str(cfg.source) if cfg.source else None
    for line in render_status(status, client_config=client, home=os.environ.get("HOME", "")):
        print(line)
    return EXIT_OK


def cmd_resync(args: argparse.Namespace, cfg: Config) -> int:
    if bool(args.projects) == bool(args.all):
        raise UsageError("name one or more project folders, or --all", "e.g. sessionsync resync ~/code/app")
    payload: dict[str, Any] = {"cmd": "resync", "wait": args.wait}
    if args.all:
        payload["all"] = True
    else:
        payload["projects"] = [os.path.abspath(p) for p in args.projects]
    result = _wait_with_progress(cfg, payload) if args.wait else _ask(cfg, payload)
    if "queued" in result:
        print("resync queued")
    else:
        print(
            f"resynced {result['projects']} project(s): {result['sessions']} session(s), "
            f"{result['changed']} changed, in {result['ms']} ms"
        )
    return EXIT_OK


def _wait_with_progress(cfg: Config, payload: dict[str, Any]) -> dict[str, Any]:
    """A waiting request, showing the daemon's progress lines when stderr is a terminal."""
    from sessionsync.daemon.control.client import request_with_progress
    from sessionsync.daemon.progress import terminal_progress

    with terminal_progress(sys.stderr) as progress:
        if progress is None:
            return _ask(cfg, payload, timeout=630.0)
        return request_with_progress(
            cfg.socket_path(), {**payload, "progress": True}, progress, timeout=630.0
        )


def cmd_sync(args: argparse.Namespace, cfg: Config) -> int:
    result = _ask(cfg, {"cmd": "sync", "path": os.path.abspath(args.session_dir)})
    state = "written" if result["written"] else "invalid" if result["invalid"] else "unchanged"
    print(f"{result['path']}: {state}")
    return EXIT_OK


def cmd_pause(args: argparse.Namespace, cfg: Config) -> int:
    result = _ask(cfg, {"cmd": "pause"})
    print(f"paused: database writes held, {result['pending']} session(s) pending")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace, cfg: Config) -> int:
    result = _ask(cfg, {"cmd": "resume"})
    print(f"resumed: writing {result['pending']} pending session(s)")
    return EXIT_OK


def cmd_errors(args: argparse.Namespace, cfg: Config) -> int:
    result = _ask(cfg, {"cmd": "errors"})
    rows = result["errors"]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return EXIT_OK
    if not rows:
        print("no invalid sessions and no field problems")
    for row in rows:
        what = "invalid" if row["kind"] == "invalid" else "field problems"
        print(f"{row['path']}: {what}: {row['sync_error']}")
    if result["more"]:
        print(f"... and {result['more']} more")
    return EXIT_OK


def cmd_metrics(args: argparse.Namespace, cfg: Config) -> int:
    result = _ask(cfg, {"cmd": "metrics"})
    sys.stdout.write(result["text"])  # the exposition as it is, for a scraper or promtool
    if result.get("projects_left_out"):
        print(
            f"sessionsync: {result['projects_left_out']} project(s) left out of sessionsync_live_sessions "
            "to fit the reply; [metrics] listen or textfile has them all",
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_watch(args: argparse.Namespace, cfg: Config) -> int:
    """Follow the stream like `journalctl -f`: when the daemon restarts, wait for it and resume
    after the last id printed, so nothing committed meanwhile is missed."""
    import time

    from sessionsync.client import Client
    from sessionsync.daemon.backoff import Backoff

    gc.enable()  # it follows the stream for as long as it is left running
    client = Client(cfg.socket_path())
    since: int | None = args.since
    reached = False  # a daemon answered once: from then on its absence is waited out
    backoff = Backoff(0.1, 2.0)
    while True:
        subscription = None
        try:
            subscription = client.subscribe(since=since)
            reached = True
            backoff.reset()
            for event in subscription:
                print(json.dumps(event.data) if args.json else _event_line(event.data), flush=True)
        except OperationalError:
            if not reached:
                raise  # never reached a daemon: say so, as every client command does
        if subscription is not None:  # it ended: the daemon stopped, was killed, or broke the line
            since = subscription.last_id
            after = f" after id {since}" if since is not None else ""
            print(f"sessionsync: the daemon went away; waiting to resume{after}", file=sys.stderr, flush=True)
        # One connect attempt per delay until the daemon is back (no files are polled).
        time.sleep(backoff.next())


def _event_line(event: dict[str, Any]) -> str:
    """One readable line: id (session events), time, kind, the session folder (or project), and
    what changed."""
    where = event.get("path") or event.get("project") or ""
    old, new = event.get("from"), event.get("to")
    if old is not None and new is not None:
        change = f" {old} -> {new}"
    elif new is not None or old is not None:
        change = f" {new if new is not None else old}"
    else:
        change = ""
    reason = f" ({event['reason']})" if event.get("reason") else ""
    number = f"#{event['id']}" if event.get("id") is not None else "-"
    return f"{number:>8}  {event.get('at', '')}  {event['kind']:<22} {where}{change}{reason}".rstrip()


def cmd_install_unit(args: argparse.Namespace, cfg: Config) -> int:
    from sessionsync.daemon.unit import install_unit

    # A file found through XDG_CONFIG_HOME or /etc the daemon finds by itself; one named on the
    # command line or in $SESSIONSYNC_CONFIG (which the service does not inherit) goes into ExecStart.
    named = args.config or os.environ.get("SESSIONSYNC_CONFIG")
    config = str(cfg.source.absolute()) if named and cfg.source else None
    path, commands = install_unit("system" if args.system else "user", config=config)
    print(f"wrote {path}")
    print("now run:")
    for command in commands:
        print(f"  {command}")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace, cfg: Config | ConfigError) -> int:
    from sessionsync.daemon.doctor import run_checks

    report = run_checks(cfg, args.config)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        for line in report.lines():
            print(line)
    sys.stdout.flush()  # here, so that a closed pipe is caught by run() like any command's
    return EXIT_FAILURE if report.status == "FAIL" else EXIT_OK


def _is_dir(path: str) -> bool:
    return os.path.isdir(path)


class _VersionAction(argparse.Action):
    """argparse's own version action wants the text when the parser is built: looking the
    installed version up costs every command a scan of the installed packages' metadata."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from sessionsync.daemon.version import version

        print(f"sessionsync {version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sessionsync",
        description="Mirror coding-agent session folders (state.json) into a SQL database, live.",
        epilog="Run 'sessionsync COMMAND --help' for a command's options.",
    )
    config_help = (
        "the config file; default: $SESSIONSYNC_CONFIG, else $XDG_CONFIG_HOME/sessionsync/config.toml, "
        "else /etc/sessionsync/config.toml, else built-in defaults"
    )
    parser.add_argument("--config", metavar="PATH", default=None, help=config_help)
    parser.add_argument("--version", action=_VersionAction, help="show program's version number and exit")
    # The same option after the command. SUPPRESS: a subcommand without it keeps the value given
    # before the command instead of resetting it (`sessionsync --config X db upgrade`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Command | None, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        if func is not None:  # None: a group whose actions set their own (`db upgrade`)
            p.set_defaults(func=func)
        return p

    json_help = "one JSON object per line (status: one indented object)"
    command("run", cmd_run, "run the daemon in the foreground (what systemd starts)")

    p = command("status", cmd_status, "the running daemon's state")
    p.add_argument("--json", action="store_true", help="the whole status reply as JSON")

    p = command("resync", cmd_resync, "ask the daemon to rescan projects")
    p.add_argument("projects", nargs="*", metavar="PROJECT", help="a project folder the daemon mirrors")
    p.add_argument("--all", action="store_true", help="rediscover projects and reconcile every one")
    p.add_argument("--wait", action="store_true", help="reply after the changes are committed")

    p = command("sync", cmd_sync, "ask the daemon to sync one session now (a hook can call it)")
    p.add_argument(
        "session_dir", metavar="SESSION_DIR", help="the session folder, <project>/agents/sessions/<slug>"
    )

    p = command("watch", cmd_watch, "follow the change-event stream; resumes across daemon restarts")
    p.add_argument("--json", action="store_true", help="one JSON event per line")
    p.add_argument(
        "--since", type=int, metavar="ID", help="first every committed session event after this id"
    )

    command("pause", cmd_pause, "hold database writes (changes stay queued)")
    command("resume", cmd_resume, "let held writes go")

    command("metrics", cmd_metrics, "the running daemon's metrics, in Prometheus text format")

    p = command("errors", cmd_errors, "sessions whose state.json is invalid or has field problems, and why")
    p.add_argument("--json", action="store_true", help=json_help)

    p = command("install-unit", cmd_install_unit, "write the systemd unit for this install")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--user", action="store_true", help="a user unit, ~/.config/systemd/user (default)")
    kind.add_argument("--system", action="store_true", help="the system template sessionsync@USER")

    p = command("reconcile", cmd_reconcile, "one full reconcile, no daemon needed; prints a summary")
    p.add_argument("projects", nargs="*", metavar="PROJECT", help="project folders (default: discover)")

    p = command("sessions", cmd_sessions, "list sessions from the database")
    p.add_argument("--project", metavar="FOLDER", help="only the sessions of this project folder")
    p.add_argument(
        "--phase", metavar="PHASE", help="only sessions in this phase (spec, plan, build, docs, ...)"
    )
    p.add_argument("--status", metavar="STATUS", help="only sessions with this status (active, failed, ...)")
    p.add_argument("--json", action="store_true", help=json_help)

    p = command("db", None, "database maintenance")
    db_sub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    upgrade_help = "apply schema migrations"
    db_sub.add_parser("upgrade", parents=[common], help=upgrade_help, description=upgrade_help).set_defaults(
        func=cmd_db_upgrade
    )

    command("check-config", cmd_check_config, "validate the configuration, as `run` would")

    p = command(
        "doctor",
        cmd_doctor,
        "check the setup (config, database, socket, daemon, inotify, unit): OK, WARN, FAIL",
    )
    p.add_argument("--json", action="store_true", help="the checks as one indented JSON object")
    return parser


# Commands answered by the running daemon: a broken config file must not stop them from
# reaching it (the daemon keeps the configuration it started with).
_CLIENT_COMMANDS = {
    cmd_status,
    cmd_resync,
    cmd_sync,
    cmd_watch,
    cmd_pause,
    cmd_resume,
    cmd_errors,
    cmd_metrics,
}


def _client_config(explicit: str | None, error: ConfigError) -> Config:
    """The config a client command falls back on when the file is broken: its socket setting if
    that much can be read, the defaults for the rest. The error is still reported."""
    import tomllib

    from sessionsync.daemon.config import Config, ControlConfig, find_config_file

    path = find_config_file(explicit, os.environ)  # a file named but missing is still an error
    print(f"sessionsync: warning: {error}", file=sys.stderr)
    socket = os.environ.get("SESSIONSYNC_CONTROL__SOCKET", "")
    if not socket:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8")) if path else {}
            value = data.get("control", {}).get("socket", "")
            socket = value if isinstance(value, str) else ""
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError):
            socket = ""
    print("sessionsync: asking the running daemon anyway", file=sys.stderr)
    return Config.model_construct(control=ControlConfig.model_construct(socket=socket), source=path)


def main(argv: Sequence[str] | None = None) -> None:
    # Start-up allocates what lives as long as the process (modules, classes, validators, the
    # engine), and the collector's passes over it find nothing to free: about 140 of them, two
    # full, a fifth of a one-shot reconcile with nothing to do. Off until the command is set up
    # (_set_up, or the daemon's and `watch`'s own start); a short command never needs it.
    gc.disable()
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help and --version
        return int(exc.code or 0)
    func: Command = args.func
    if func is cmd_run:
        # Before anything slow (the config, the daemon's imports): a reload or stop sent now is
        # kept for the daemon instead of ending it.
        from sessionsync.daemon.early_signals import EarlySignals

        args.early_signals = EarlySignals().install()
    from sessionsync.daemon.config import load_config

    try:
        try:
            cfg = load_config(args.config)
        except ConfigError as exc:
            if func is cmd_doctor:  # a config that does not validate is one of its FAIL lines
                return cmd_doctor(args, exc)
            if func not in _CLIENT_COMMANDS:
                raise
            cfg = _client_config(args.config, exc)
        code = func(args, cfg)
        sys.stdout.flush()
        return code
    except SessionSyncError as exc:
        from sessionsync.daemon.dburl import mask_known

        print(f"sessionsync: {mask_known(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # The reader went away (`sessionsync status | head -1`): stop quietly, as cat would. Point
        # stdout at /dev/null so the interpreter's own flush at exit does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED

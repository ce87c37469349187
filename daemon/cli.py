"""Command line: argument parsing and exit codes; the only place that calls sys.exit.

Heavy modules (SQLAlchemy, alembic, psycopg) are imported inside the commands that need a
database, so the control-socket commands start fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sessionsync.daemon.config import Config, load_config
from sessionsync.daemon.errors import ProjectNotFound, SessionSyncError, UsageError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

Command = Callable[[argparse.Namespace, Config], int]


def _open_store(cfg: Config, migrate: bool | None = None) -> Any:
    from sessionsync.daemon.db import make_engine
    from sessionsync.daemon.migrate import upgrade
    from sessionsync.daemon.store import Store

    engine = make_engine(cfg.database_url())
    if cfg.database.auto_migrate if migrate is None else migrate:
        _guard_database(lambda: upgrade(engine), cfg)
    return Store(engine)


def _guard_database(action: Callable[[], Any], cfg: Config) -> Any:
    """Run a database action, turning an unreachable database into DatabaseUnavailable."""
    from sqlalchemy import exc as sa_exc

    from sessionsync.daemon.errors import DatabaseUnavailable
    from sessionsync.daemon.logs import mask_secrets

    try:
        return action()
    except sa_exc.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot use the database {mask_secrets(cfg.database_url())}: {mask_secrets(str(exc.orig))}",
            "check [database] url and that the server is running",
        ) from None


def cmd_check_config(args: argparse.Namespace, cfg: Config) -> int:
    print(f"configuration OK ({cfg.source or 'built-in defaults'})")
    return EXIT_OK


def cmd_db_upgrade(args: argparse.Namespace, cfg: Config) -> int:
    from sessionsync.daemon.db import make_engine
    from sessionsync.daemon.logs import mask_secrets
    from sessionsync.daemon.migrate import upgrade

    engine = make_engine(cfg.database_url())
    before, after = _guard_database(lambda: upgrade(engine), cfg)
    url = mask_secrets(cfg.database_url())
    if before == after:
        print(f"database {url} is up to date (revision {after})")
    else:
        print(f"database {url} upgraded from {before or 'empty'} to revision {after}")
    return EXIT_OK


def cmd_reconcile(args: argparse.Namespace, cfg: Config) -> int:
    from sessionsync.daemon.discovery import discover, project_at
    from sessionsync.daemon.reconcile import freeze_long_lived, reconcile, register

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
    store = _open_store(cfg)
    freeze_long_lived()
    summary = _guard_database(
        lambda: reconcile(
            store, list(register(store, found).values()), cfg.watch.max_state_bytes, cfg.workers.batch_size
        ),
        cfg,
    )
    print(summary.line())
    return EXIT_OK


def cmd_sessions(args: argparse.Namespace, cfg: Config) -> int:
    import os

    store = _open_store(cfg)
    project = os.path.realpath(args.project) if args.project else None
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

    return run_daemon(args.config)


def _ask(cfg: Config, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    from sessionsync.daemon.control.client import request

    return request(cfg.socket_path(), payload, timeout=timeout)


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    status = _ask(cfg, {"cmd": "status"})
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    db = "ok" if status["database_ok"] else f"DOWN ({status['database'].get('last_error')})"
    print(
        f"sessionsync pid {status['pid']}, up {status['uptime_s']} s{'  PAUSED' if status['paused'] else ''}"
    )
    print(f"  database      {status['database']['url']}: {db}")
    print(f"  projects      {status['projects']}, sessions {status['sessions']}, pending {status['pending']}")
    print(f"  last reconcile {status['last_reconcile_at'] or 'never'}")
    for watch in status["watch"]:
        print(f"  watch {watch['state']:<9} {watch['project']}")
    counters = ", ".join(f"{k} {v}" for k, v in sorted(status["counters"].items()))
    print(f"  counters      {counters}")
    for error in status["recent_errors"][-5:]:
        print(f"  {error['level'].lower():<8} {error['at']}  {error['message']}")
    return EXIT_OK


def cmd_resync(args: argparse.Namespace, cfg: Config) -> int:
    import os

    if bool(args.projects) == bool(args.all):
        raise UsageError("name one or more project folders, or --all", "e.g. sessionsync resync ~/code/app")
    payload: dict[str, Any] = {"cmd": "resync", "wait": args.wait}
    if args.all:
        payload["all"] = True
    else:
        payload["projects"] = [os.path.abspath(p) for p in args.projects]
    result = _ask(cfg, payload, timeout=630.0 if args.wait else 10.0)
    if "queued" in result:
        print("resync queued")
    else:
        print(
            f"resynced {result['projects']} project(s): {result['sessions']} session(s), "
            f"{result['changed']} changed, in {result['ms']} ms"
        )
    return EXIT_OK


def cmd_sync(args: argparse.Namespace, cfg: Config) -> int:
    import os

    result = _ask(cfg, {"cmd": "sync", "path": os.path.abspath(args.session_dir)})
    state = "written" if result["written"] else "invalid" if result["invalid"] else "unchanged"
    print(f"{result['project']}/{result['slug']}: {state}")
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
        print("no invalid sessions")
    for row in rows:
        print(f"{row['project']}/{row['slug']}: {row['sync_error']}")
    if result["more"]:
        print(f"... and {result['more']} more")
    return EXIT_OK


def cmd_watch(args: argparse.Namespace, cfg: Config) -> int:
    from sessionsync.daemon.control.client import stream

    for event in stream(cfg.socket_path(), {"cmd": "subscribe"}):
        if args.json:
            print(json.dumps(event), flush=True)
        else:
            print(_event_line(event), flush=True)
        if event.get("kind") == "lagged":
            print("sessionsync: this watcher fell behind and was dropped; run it again", file=sys.stderr)
            return EXIT_FAILURE
    print("sessionsync: the daemon closed the stream", file=sys.stderr)
    return EXIT_FAILURE


def _event_line(event: dict[str, Any]) -> str:
    where = f"{event['project']}/{event['slug']}" if "slug" in event else event.get("project", "")
    change = f" {event['from']} -> {event['to']}" if "from" in event else ""
    reason = f" ({event['reason']})" if "reason" in event else ""
    return f"{event.get('at', '')}  {event['kind']:<22} {where}{change}{reason}".rstrip()


def cmd_install_unit(args: argparse.Namespace, cfg: Config) -> int:
    from sessionsync.daemon.unit import install_unit

    path, commands = install_unit("system" if args.system else "user")
    print(f"wrote {path}")
    print("now run:")
    for command in commands:
        print(f"  {command}")
    return EXIT_OK


def _is_dir(path: str) -> bool:
    import os

    return os.path.isdir(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sessionsync", description="Mirror agent session folders into a SQL database."
    )
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: without it a nested subparser (`db --config X upgrade`) resets config to None.
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="config file (default: lookup order in README)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", parents=[common], help="the running daemon's state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("resync", parents=[common], help="ask the daemon to rescan projects")
    p.add_argument("projects", nargs="*", metavar="PROJECT")
    p.add_argument("--all", action="store_true", help="rediscover and reconcile every project")
    p.add_argument("--wait", action="store_true", help="reply after the changes are committed")
    p.set_defaults(func=cmd_resync)

    p = sub.add_parser("sync", parents=[common], help="ask the daemon to sync one session now")
    p.add_argument("session_dir", metavar="SESSION_DIR")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("watch", parents=[common], help="follow the change-event stream")
    p.add_argument("--json", action="store_true", help="one JSON event per line")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("pause", parents=[common], help="hold database writes (changes stay queued)")
    p.set_defaults(func=cmd_pause)
    p = sub.add_parser("resume", parents=[common], help="let held writes go")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("errors", parents=[common], help="sessions whose state.json is invalid, and why")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_errors)

    p = sub.add_parser("install-unit", parents=[common], help="write the systemd unit for this install")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--user", action="store_true", help="a user unit (default)")
    kind.add_argument("--system", action="store_true", help="the system template sessionsync@USER")
    p.set_defaults(func=cmd_install_unit)

    p = sub.add_parser("reconcile", parents=[common], help="one full reconcile, no daemon needed")
    p.add_argument("projects", nargs="*", metavar="PROJECT", help="project folders (default: discover)")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("sessions", parents=[common], help="list sessions from the database")
    p.add_argument("--project", metavar="P")
    p.add_argument("--phase", metavar="X")
    p.add_argument("--status", metavar="Y")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_sessions)

    p = sub.add_parser("db", parents=[common], help="database maintenance")
    db_sub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    db_sub.add_parser("upgrade", parents=[common], help="apply schema migrations").set_defaults(
        func=cmd_db_upgrade
    )

    p = sub.add_parser("check-config", parents=[common], help="validate the configuration")
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    try:
        cfg = load_config(getattr(args, "config", None))
        func: Command = args.func
        return func(args, cfg)
    except SessionSyncError as exc:
        print(f"sessionsync: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130

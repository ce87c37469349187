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
from sessionsync.daemon.errors import ProjectNotFound, SessionSyncError

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
    from sessionsync.daemon.reconcile import reconcile, register

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


def _is_dir(path: str) -> bool:
    import os

    return os.path.isdir(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sessionsync", description="Mirror agent session folders into a SQL database."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", help="config file (default: lookup order in README)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
        cfg = load_config(args.config)
        func: Command = args.func
        return func(args, cfg)
    except SessionSyncError as exc:
        print(f"sessionsync: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130



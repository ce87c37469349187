"""The schema migration, run in a child process: Alembic, and all that a migration builds,
never takes up the daemon's memory (about 8 MiB, which freeing the modules afterwards does not
give back). The child reads one JSON line on stdin, {"url", "own_folder", "timeout_s"} (the URL
may hold a password: never on a command line), and prints the revisions [before, after]."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping

from loguru import logger

_MODULE = "sessionsync.daemon.migrate_child"
_TAIL_CHARS = 2000  # of a failed child's output, kept for the debug log


def upgrade_in_child(
    url: str, own_folder: bool, timeout_s: float, env: Mapping[str, str]
) -> tuple[str | None, str | None] | None:
    """Bring the schema to head in a child process; (before, after), or None when the child
    failed: the caller then migrates in-process, which raises the error as it is (an outage to
    wait out, or not)."""
    request = json.dumps({"url": url, "own_folder": own_folder, "timeout_s": timeout_s})
    try:
        proc = subprocess.run(
            [sys.executable, "-m", _MODULE],
            input=request.encode(),
            capture_output=True,
            env=dict(env),
            check=False,
        )
    except OSError as exc:
        logger.debug("schema migration in a child process could not start: {}", exc)
        return None
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace")[-_TAIL_CHARS:]
        logger.debug("schema migration in a child process failed ({}): {}", proc.returncode, tail)
        return None
    before, after = json.loads(proc.stdout.splitlines()[-1])  # the last line: ours
    return before, after


def main() -> int:
    from sessionsync.daemon.db import make_engine
    from sessionsync.daemon.migrate import upgrade

    request = json.loads(sys.stdin.readline())
    engine = make_engine(request["url"], own_folder=request["own_folder"], timeout_s=request["timeout_s"])
    try:
        before, after = upgrade(engine)
    finally:
        engine.dispose()
    print(json.dumps([before, after]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

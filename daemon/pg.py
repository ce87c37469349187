"""The PostgreSQL connection as sessionsync makes it: libpq settings against a network or server
that hangs, and a deadline on every wait of psycopg's. Imported only for a PostgreSQL URL."""

from __future__ import annotations

from typing import Any

import psycopg
from sqlalchemy.engine import URL

from sessionsync.daemon.db import DEFAULT_TIMEOUT_S


class StallGuardedConnection(psycopg.Connection[Any]):
    """A psycopg connection that gives up on a server silent for `stall_timeout_s`.

    A network that stops moving bytes but keeps the TCP connection open (a stuck middlebox, a
    paused VM) would otherwise hold a worker in recv() for ever while keepalives, answered by
    something on the way, see nothing wrong. Every wait of psycopg's (statements, COMMIT, the
    pipeline's sync) gets a deadline; past it the connection is closed and the statement fails as
    a lost connection, which the pool drops and the workers retry, as in any outage."""

    stall_timeout_s = DEFAULT_TIMEOUT_S

    def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        limit = self.stall_timeout_s if timeout is None else timeout
        try:
            return super().wait(gen, interval, limit)
        except psycopg.errors._WaitTimeout:  # psycopg's own signal for an expired wait
            if timeout is not None:
                raise
            self.close()
            raise psycopg.OperationalError(
                f"the database stopped answering: no reply in {limit:g} s; the connection was dropped"
            ) from None


def pg_connect_args(parsed: URL, timeout_s: float) -> dict[str, Any]:
    """libpq settings so that no fault of the network or the server hangs us: a connect timeout,
    TCP keepalives and a user timeout (a dead peer), server-side statement and idle-in-transaction
    timeouts (a statement that runs away, a client that vanished mid-transaction)."""
    ms = int(timeout_s * 1000)
    server = f"-c statement_timeout={ms} -c idle_in_transaction_session_timeout={2 * ms}"
    given = parsed.query.get("options")
    options = " ".join([*([given] if isinstance(given, str) else list(given or ())), server])
    return {
        "connect_timeout": max(2, round(min(timeout_s, 10))),
        "application_name": "sessionsync",
        "keepalives": 1,
        "keepalives_idle": max(1, round(timeout_s / 2)),
        "keepalives_interval": max(1, round(timeout_s / 6)),
        "keepalives_count": 3,
        "tcp_user_timeout": ms,
        "options": options,
    }

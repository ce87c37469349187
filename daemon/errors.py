"""The error tree. Every message is written for the user: what happened, where, what to do.

    SessionSyncError            base; `.exit_code` is what the CLI exits with
    ├── UsageError              (2) bad arguments on the command line
    ├── ConfigError             (2) a bad config file, key or value
    └── OperationalError        (1) the world is not as needed
        ├── DaemonNotRunning    no daemon answers on the control socket
        ├── AlreadyRunning      another daemon holds the single-instance lock
        ├── DatabaseUnavailable the database cannot be reached or used
        │   └── SchemaMissing   reachable, but its tables were never created
        ├── ProjectNotFound     a requested project is not known
        └── ControlError        the daemon answered a control request with an error

Only `cli.py` turns these into exit codes; every exit code is named here.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # operational: daemon not running, database unreachable, unknown project
EXIT_USAGE = 2  # bad arguments or configuration; systemd's RestartPreventExitStatus=2
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
EXIT_PIPE = 141  # the reader of our output went away, as a shell reports SIGPIPE


class SessionSyncError(Exception):
    """Base of every error sessionsync reports to a user."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  {self.hint}" if self.hint else self.message


class UsageError(SessionSyncError):
    exit_code = EXIT_USAGE


class ConfigError(SessionSyncError):
    exit_code = EXIT_USAGE


class OperationalError(SessionSyncError):
    exit_code = EXIT_FAILURE


class DaemonNotRunning(OperationalError):
    pass


class AlreadyRunning(OperationalError):
    pass


class DatabaseUnavailable(OperationalError):
    pass


class SchemaMissing(DatabaseUnavailable):
    pass


class ProjectNotFound(OperationalError):
    pass


class ControlError(OperationalError):
    """An error reply from the daemon; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(message, hint)
        self.code = code

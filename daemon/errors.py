"""The error tree. Every message is written for the user: what happened, where, what to do.

    SessionSyncError            base; `.exit_code` is what the CLI exits with
    ├── UsageError              (2) bad arguments on the command line
    ├── ConfigError             (2) a bad config file, key or value
    └── OperationalError        (1) the world is not as needed
        ├── DaemonNotRunning    no daemon answers on the control socket
        ├── AlreadyRunning      another daemon holds the single-instance lock
        ├── DatabaseUnavailable the database cannot be reached or used
        ├── ProjectNotFound     a requested project is not known
        └── ControlError        the daemon answered a control request with an error

Only `cli.py` turns these into exit codes.
"""

from __future__ import annotations


class SessionSyncError(Exception):
    """Base of every error sessionsync reports to a user."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  {self.hint}" if self.hint else self.message


class UsageError(SessionSyncError):
    exit_code = 2


class ConfigError(SessionSyncError):
    exit_code = 2


class OperationalError(SessionSyncError):
    exit_code = 1


class DaemonNotRunning(OperationalError):
    pass


class AlreadyRunning(OperationalError):
    pass


class DatabaseUnavailable(OperationalError):
    pass


class ProjectNotFound(OperationalError):
    pass


class ControlError(OperationalError):
    """An error reply from the daemon; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(message, hint)
        self.code = code

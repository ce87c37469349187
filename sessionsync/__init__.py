"""sessionsync: mirror coding-agent session folders (state.json) into a SQL database, live.

The source lives in the top-level `daemon/` and `models/` folders; this folder's links make
them readable as `sessionsync.daemon` and `sessionsync.models` for mypy, pyright and editors, as
the installed package names them. The wheel maps the same folders (pyproject's `package-dir`).
"""

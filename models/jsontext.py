"""JSON text for the database and NOTIFY: orjson, with the stdlib for what orjson refuses."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import orjson


def dumps(value: Any) -> str:
    """Compact JSON text of `value`. orjson is about ten times as fast as the stdlib; it refuses
    integers beyond 64 bits and lone surrogates, which the stdlib writes (escaped) instead.
    Datetimes are written as ISO 8601 text by both."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"), default=_iso)


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")

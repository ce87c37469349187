"""The naive mirror both benchmarks measure against: per state.json, read, parse, ORM select by
key, insert or update, commit, on an engine with the driver's defaults. It maps with the daemon's
own `map_state`, so both sides store the same column values."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session as OrmSession

from bench.orm import Session
from sessionsync.models.state import map_state


def naive_upsert(engine: Engine, project_id: int, path: str) -> str | None:
    """Mirror one state.json the straightforward way; returns the description it stored."""
    folder = os.path.dirname(path)
    with open(path, "rb") as f:
        data = f.read()
    doc = json.loads(data)
    mapped = map_state(doc)
    now = datetime.now(UTC)
    values = {
        **mapped.columns(),
        "raw_state": doc,
        "state_size": len(data),
        "spec_exists": os.path.exists(os.path.join(folder, "spec.md")),
        "plan_exists": os.path.exists(os.path.join(folder, "plan.json")),
        "sync_error": "; ".join(mapped.field_errors) or None,
        "synced_at": now,
    }
    slug = os.path.basename(folder)
    with OrmSession(engine) as orm:
        row = orm.execute(
            select(Session).where(Session.project_id == project_id, Session.slug == slug)
        ).scalar_one_or_none()
        if row is None:
            orm.add(Session(project_id=project_id, slug=slug, first_seen_at=now, **values))
        else:
            for name, value in values.items():
                setattr(row, name, value)
        orm.commit()
    return mapped.description

"""Session folders written the way agents write them, and the example state.json documents."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "state-json"


def fixture_doc(name: str) -> dict[str, Any]:
    """One of the example state.json documents, parsed."""
    return dict(json.loads((FIXTURES / f"{name}.json").read_text()))


def write_state(
    project: Path, slug: str, content: dict[str, Any] | bytes | str, *, atomic: bool = True
) -> Path:
    """Write a session's state.json the way agents do: a temp file renamed into place."""
    folder = project / "agents" / "sessions" / slug
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(content, dict):
        data = json.dumps(content).encode()
    elif isinstance(content, str):
        data = content.encode()
    else:
        data = content
    target = folder / "state.json"
    if atomic:
        tmp = folder / "state.json.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, target)
    else:
        target.write_bytes(data)
    return target


def remove_session(project: Path, slug: str) -> None:
    shutil.rmtree(project / "agents" / "sessions" / slug)


def age_sessions(project: Path, seconds: float = 3600.0) -> None:
    """Date every session folder and the files in it `seconds` back, as a project looks that no
    agent touched lately: their stat is then old enough for a reconcile to trust for skipping."""
    when = os.stat(project).st_mtime - seconds
    for folder in (project / "agents" / "sessions").iterdir():
        for entry in folder.iterdir():
            os.utime(entry, (when, when), follow_symlinks=False)
        os.utime(folder, (when, when), follow_symlinks=False)

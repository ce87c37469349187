"""sessionsync.client against the real daemon, blocking and asyncio: every command, typed events
from `subscribe` (replay with `since`, then live), errors as exceptions carrying the protocol code,
and an import that pulls in no SQLAlchemy, psycopg or pydantic."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sessionsync.client import AsyncClient, Client, ControlError, DaemonNotRunning, Event
from tests.support.runner import Daemon
from tests.support.sessions import fixture_doc, write_state
from tests.support.waiting import wait_for


def doc(phase: str) -> dict[str, Any]:
    content = fixture_doc("v2-build")
    content["current_phase"] = phase
    return content


def test_importing_the_client_pulls_in_no_database_or_validation_library() -> None:
    code = (
        "import sys, sessionsync.client\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'sqlalchemy', 'psycopg', 'pydantic'})\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.replace("'", '"')) == []


def _scene(project: Path) -> None:
    write_state(project, "a", doc("spec"))
    write_state(project, "broken", "{ not json")


def test_blocking_client_against_the_daemon(db_url: str, tmp_path: Path, project: Path) -> None:
    with Daemon(tmp_path, db_url, projects=[project]) as daemon:
        daemon.wait_started()
        _scene(project)
        client = Client(daemon.socket_path)
        assert client.ping()["pong"] is True
        summary = client.resync([str(project)], wait=True)
        assert (summary["projects"], summary["sessions"]) == (1, 2)
        assert client.resync(wait=False) == {"queued": True}
        assert client.status()["sessions"] == 2
        assert [(e["slug"], e["kind"]) for e in client.errors()["errors"]] == [("broken", "invalid")]
        assert client.sync(project / "agents/sessions/a")["slug"] == "a"

        events = client.subscribe(since=0, kinds=["session.created", "session.phase_changed"])
        stream = iter(events)
        replayed = [next(stream), next(stream)]
        assert all(isinstance(e, Event) for e in replayed)
        assert sorted(e.slug for e in replayed if e.slug) == ["a", "broken"]
        assert replayed[0].id is not None and replayed[1].id == replayed[0].id + 1
        write_state(project, "a", doc("plan"))
        live = next(stream)
        assert (live.kind, live.slug, live.from_value, live.to_value) == (
            "session.phase_changed",
            "a",
            "spec",
            "plan",
        )
        assert events.last_id == live.id

        with pytest.raises(ControlError) as error:
            client.sync(tmp_path / "elsewhere")
        assert error.value.code == "not_found"
        with pytest.raises(ControlError) as error:
            list(client.subscribe(kinds=["session.exploded"]))
        assert error.value.code == "bad_request"
        assert daemon.stop() == 0
    with pytest.raises(DaemonNotRunning):
        Client(daemon.socket_path).ping()


def test_async_client_against_the_daemon(db_url: str, tmp_path: Path, project: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        async with AsyncClient(daemon.socket_path) as client:
            assert (await client.ping())["pong"] is True
            summary = await client.resync(wait=True)
            assert summary["sessions"] == 2
            assert (await client.status())["sessions"] == 2
            assert [e["slug"] for e in (await client.errors())["errors"]] == ["broken"]
            assert (await client.sync(project / "agents/sessions/a"))["path"] == str(
                project / "agents/sessions/a"
            )
            with pytest.raises(ControlError) as error:
                await client.sync(tmp_path / "elsewhere")
            assert error.value.code == "not_found"

            got: list[Event] = []
            async for event in client.subscribe(since=0, projects=[str(project)]):
                got.append(event)
                if len(got) == 2:
                    write_state(project, "a", doc("build"))
                if event.kind == "session.phase_changed":
                    break
            assert [e.kind for e in got[:2]] == ["session.created", "session.created"]
            assert (got[-1].slug, got[-1].to_value) == ("a", "build")
            assert [e.id for e in got if e.id is not None] == sorted({e.id for e in got if e.id is not None})

    with Daemon(tmp_path, db_url, projects=[project]) as daemon:
        daemon.wait_started()
        _scene(project)
        wait_for(lambda: daemon.status()["sessions"] == 2, timeout=10)
        asyncio.run(asyncio.wait_for(scenario(daemon), 30))
        assert daemon.stop() == 0

    async def absent() -> None:
        await AsyncClient(daemon.socket_path).ping()

    with pytest.raises(DaemonNotRunning):
        asyncio.run(absent())


def test_subscribe_resumes_by_itself_after_a_lag(tmp_path: Path, project: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    with Daemon(tmp_path, url, projects=[project], env={"SESSIONSYNC_TEST_SUBSCRIBER_QUEUE": "2"}) as daemon:
        daemon.wait_started()
        client = Client(daemon.socket_path)
        client.call({"cmd": "pause"})
        for n in range(6):
            write_state(project, f"burst-{n}", doc("spec"))
        wait_for(lambda: client.status()["pending"] >= 6, timeout=10)
        events = client.subscribe(kinds=["session.created"])
        stream = iter(events)
        client.call({"cmd": "resume"})  # six events at once: more than the queue of two
        got = [next(stream) for _ in range(6)]
        assert sorted(e.slug or "" for e in got) == [f"burst-{n}" for n in range(6)]
        assert daemon.log_count("dropped a subscriber that fell too far behind") >= 1
        assert daemon.stop() == 0

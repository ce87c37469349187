"""The notify protocol against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from sessionsync.daemon.systemd import Notifier, WatchdogPinger
from tests.support.notify import FakeSystemd

DEADLINE_S = 5.0


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[FakeSystemd, str]]:
    fake = FakeSystemd(str(tmp_path / "notify"))
    yield fake, fake.address
    fake.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[FakeSystemd, str]]:
    fake = FakeSystemd(f"@sessionsync-test-{uuid.uuid4().hex}")
    yield fake, fake.address
    fake.close()


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    lines: list[str] = []
    handler_id = logger.add(lambda message: lines.append(str(message)), level="WARNING", format="{message}")
    yield lines
    logger.remove(handler_id)


def test_ready_reaches_a_path_socket(path_socket: tuple[FakeSystemd, str]) -> None:
    fake, address = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    notifier.ready("watching 3 projects")
    assert fake.receive() == ["READY=1", "STATUS=watching 3 projects"]


def test_abstract_socket_name(abstract_socket: tuple[FakeSystemd, str]) -> None:
    fake, address = abstract_socket
    Notifier({"NOTIFY_SOCKET": address}).stopping()
    assert fake.receive() == ["STOPPING=1"]


def test_status_is_one_line(path_socket: tuple[FakeSystemd, str]) -> None:
    fake, address = path_socket
    Notifier({"NOTIFY_SOCKET": address}).status("3 projects\n  12 sessions\r\n0 pending\n")
    assert fake.receive() == ["STATUS=3 projects 12 sessions 0 pending"]


def test_undecodable_folder_name_in_status(path_socket: tuple[FakeSystemd, str]) -> None:
    fake, address = path_socket
    name = os.fsdecode(b"caf\xe9")  # a Latin-1 folder name, surrogate-escaped by os.listdir
    Notifier({"NOTIFY_SOCKET": address}).status(f"syncing {name}")
    assert fake.receive() == ["STATUS=syncing caf?"]


def test_reloading_carries_the_monotonic_clock(path_socket: tuple[FakeSystemd, str]) -> None:
    fake, address = path_socket
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier({"NOTIFY_SOCKET": address}).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = fake.receive()
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_extend_timeout_in_microseconds(path_socket: tuple[FakeSystemd, str]) -> None:
    fake, address = path_socket
    Notifier({"NOTIFY_SOCKET": address}).extend_timeout(2.5)
    assert fake.receive() == ["EXTEND_TIMEOUT_USEC=2500000"]


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}])
def test_disabled_outside_systemd(env: dict[str, str]) -> None:
    notifier = Notifier(env)
    assert not notifier.enabled
    notifier.ready("ignored")  # a no-op, and no exception
    assert notifier.watchdog_interval() is None


def test_watchdog_interval_is_half_of_watchdog_usec(path_socket: tuple[FakeSystemd, str]) -> None:
    _, address = path_socket
    base = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "30000000"}
    assert Notifier(base).watchdog_interval() == 15.0
    assert Notifier({**base, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval() == 15.0
    assert Notifier({**base, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval() is None
    assert Notifier({**base, "WATCHDOG_USEC": "0"}).watchdog_interval() is None
    assert Notifier({**base, "WATCHDOG_USEC": "soon"}).watchdog_interval() is None
    assert Notifier({"NOTIFY_SOCKET": address}).watchdog_interval() is None


def test_socket_gone_is_logged_once_and_never_raises(tmp_path: Path, warnings: list[str]) -> None:
    address = str(tmp_path / "notify")
    fake = FakeSystemd(address)
    notifier = Notifier({"NOTIFY_SOCKET": address})
    fake.close()
    os.unlink(address)
    notifier.status("one")
    notifier.status("two")
    notifier.ready("three")
    assert len(warnings) == 1
    assert address in warnings[0]


def test_watchdog_pings_only_while_healthy(path_socket: tuple[FakeSystemd, str]) -> None:
    fake, address = path_socket
    state = threading.Condition()
    healthy = True
    checks_while_unhealthy = 0

    def check() -> bool:
        nonlocal checks_while_unhealthy
        with state:
            if not healthy:
                checks_while_unhealthy += 1
                state.notify_all()
            return healthy

    def set_health(value: bool) -> None:
        nonlocal healthy, checks_while_unhealthy
        with state:
            healthy, checks_while_unhealthy = value, 0

    def wait_for_unhealthy_checks(count: int) -> None:
        with state:
            assert state.wait_for(lambda: checks_while_unhealthy >= count, timeout=DEADLINE_S)

    pinger = WatchdogPinger(Notifier({"NOTIFY_SOCKET": address}), 0.01, check)
    pinger.start()
    try:
        assert fake.receive() == ["WATCHDOG=1"]

        set_health(False)
        # The thread checks, then pings: once a check has answered False, every earlier ping
        # is already queued on our socket, and no later one may arrive.
        wait_for_unhealthy_checks(1)
        fake.pending()
        wait_for_unhealthy_checks(4)
        assert fake.pending() == []

        set_health(True)
        assert fake.receive() == ["WATCHDOG=1"]
    finally:
        pinger.stop()


def test_watchdog_stop_ends_the_pings(path_socket: tuple[FakeSystemd, str]) -> None:
    fake, address = path_socket
    pinger = WatchdogPinger(Notifier({"NOTIFY_SOCKET": address}), 0.01, lambda: True)
    pinger.start()
    assert fake.receive() == ["WATCHDOG=1"]
    pinger.stop()
    fake.pending()
    # The thread has been joined: nothing can be sent any more, however long we wait.
    assert not [t for t in threading.enumerate() if t.name == "systemd-watchdog"]
    assert fake.pending() == []


def test_a_health_check_that_raises_counts_as_unhealthy(
    path_socket: tuple[FakeSystemd, str], warnings: list[str]
) -> None:
    fake, address = path_socket
    raised = threading.Event()

    def check() -> bool:
        raised.set()
        raise RuntimeError("watcher thread is gone")

    pinger = WatchdogPinger(Notifier({"NOTIFY_SOCKET": address}), 0.01, check)
    pinger.start()
    try:
        assert raised.wait(DEADLINE_S)
    finally:
        pinger.stop()
    assert fake.pending() == []
    assert len(warnings) == 1
    assert "withholding watchdog pings" in warnings[0]

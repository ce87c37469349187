"""The shipped systemd units: rendering, `systemd-analyze verify`, and installing a user unit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sessionsync.daemon.errors import UsageError
from sessionsync.daemon.unit import (
    UnitKind,
    _enable_commands,
    default_executable,
    exec_start_words,
    install_unit,
    render_unit,
    unit_destination,
)

SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"


def exec_start(text: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    return line


@pytest.fixture
def executable(tmp_path: Path) -> str:
    """A real executable, since verify checks ExecStart; a space and a % make quoting matter."""
    folder = tmp_path / "my venv %d" / "bin"
    folder.mkdir(parents=True)
    script = folder / "sessionsync"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    return str(script)


@pytest.fixture
def analyze() -> str:
    if not os.access(SYSTEMD_ANALYZE, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail(f"{SYSTEMD_ANALYZE} is missing; CI must verify the units")
        pytest.skip(f"{SYSTEMD_ANALYZE} is not installed: cannot verify the units")
    return SYSTEMD_ANALYZE


@pytest.mark.parametrize("kind", ["user", "system"])
def test_render_points_exec_start_at_the_executable(kind: UnitKind) -> None:
    text = render_unit(kind, "/opt/sessionsync/bin/sessionsync")
    assert exec_start(text) == "ExecStart=/opt/sessionsync/bin/sessionsync run"
    assert "/usr/local/bin/sessionsync" not in text


@pytest.mark.parametrize(
    ("path", "word"),
    [
        ("/home/me/my tools/bin/sessionsync", '"/home/me/my tools/bin/sessionsync"'),
        ("/opt/100%/sessionsync", "/opt/100%%/sessionsync"),
        ("/opt/$HOME/sessionsync", "/opt/$$HOME/sessionsync"),
        ('/opt/a "b"\\c/sessionsync', '"/opt/a \\"b\\"\\\\c/sessionsync"'),
    ],
)
def test_render_quotes_for_systemd(path: str, word: str) -> None:
    assert exec_start(render_unit("user", path)) == f"ExecStart={word} run"


def test_render_needs_an_absolute_path() -> None:
    with pytest.raises(UsageError, match="absolute"):
        render_unit("user", "sessionsync")


@pytest.mark.parametrize("kind", ["user", "system"])
def test_rendered_units_pass_systemd_analyze_verify(
    kind: UnitKind, executable: str, analyze: str, tmp_path: Path
) -> None:
    text = render_unit(kind, executable)
    unit = tmp_path / ("sessionsync.service" if kind == "user" else "sessionsync@.service")
    unit.write_text(text)
    command = [analyze, "verify", "--man=no", str(unit)]
    env = dict(os.environ)
    if kind == "user":
        # A user manager needs its runtime folder to exist, even for verify.
        runtime = tmp_path / "runtime"
        runtime.mkdir(mode=0o700)
        env["XDG_RUNTIME_DIR"] = str(runtime)
        command.insert(1, "--user")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=False)
    # verify exits 0 on warnings such as an unknown key; those must fail the test as well.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_catches_a_missing_executable(analyze: str, tmp_path: Path) -> None:
    """The check above is only worth something if verify looks at ExecStart at all."""
    unit = tmp_path / "sessionsync@.service"
    unit.write_text(render_unit("system", str(tmp_path / "missing" / "sessionsync")))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "missing/sessionsync" in result.stderr


def test_unit_destinations(tmp_path: Path) -> None:
    assert unit_destination("user", {"HOME": "/home/me"}) == Path(
        "/home/me/.config/systemd/user/sessionsync.service"
    )
    assert unit_destination("user", {"HOME": "/home/me", "XDG_CONFIG_HOME": str(tmp_path)}) == (
        tmp_path / "systemd/user/sessionsync.service"
    )
    # The XDG spec: a relative XDG_CONFIG_HOME is invalid and ignored.
    assert unit_destination("user", {"HOME": "/home/me", "XDG_CONFIG_HOME": "cfg"}) == Path(
        "/home/me/.config/systemd/user/sessionsync.service"
    )
    assert unit_destination("system", {}) == Path("/etc/systemd/system/sessionsync@.service")


def test_install_user_unit(tmp_path: Path, executable: str) -> None:
    env = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    path, commands = install_unit("user", executable, env)
    assert path == tmp_path / "config/systemd/user/sessionsync.service"
    assert path.read_text() == render_unit("user", executable)
    assert path.stat().st_mode & 0o777 == 0o644
    assert commands == ["systemctl --user daemon-reload", "systemctl --user enable --now sessionsync"]
    # Installing again replaces the file and leaves no temporary files behind.
    install_unit("user", "/opt/other/sessionsync", env)
    assert exec_start(path.read_text()) == "ExecStart=/opt/other/sessionsync run"
    assert [p.name for p in path.parent.iterdir()] == ["sessionsync.service"]


def test_install_defaults_to_this_install(tmp_path: Path) -> None:
    path, _ = install_unit("user", env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert exec_start(path.read_text()) == f"ExecStart={default_executable()} run"


def test_default_executable_is_the_one_next_to_python() -> None:
    beside = Path(sys.executable).parent / "sessionsync"
    if not beside.is_file():
        pytest.skip(f"the package's script is not installed next to {sys.executable}")
    assert default_executable() == os.path.abspath(beside)


def test_system_commands_name_the_user_behind_sudo() -> None:
    assert _enable_commands("system", {"USER": "root", "SUDO_USER": "alice"}) == [
        "systemctl daemon-reload",
        "systemctl enable --now sessionsync@alice",
    ]
    assert _enable_commands("system", {"USER": "bob"})[1] == "systemctl enable --now sessionsync@bob"


@pytest.mark.parametrize(
    "executable", ["/opt/my tools/bin/sessionsync", "/home/a%b/$x/sessionsync", '/o"dd\\/sessionsync']
)
def test_exec_start_words_undo_what_render_unit_writes(executable: str) -> None:
    unit = render_unit("user", executable, "/etc/ss 1/config.toml")
    assert exec_start_words(unit) == [executable, "run", "--config", "/etc/ss 1/config.toml"]
    assert exec_start_words("[Service]\nType=notify\n") is None

"""The package as tools and users meet it: the source tree reads as `sessionsync.*` through the
committed links, and the wheel installs only `sessionsync` (never top-level `daemon`/`models`,
names other distributions own)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["daemon", "models", "systemd"])
def test_the_tree_names_each_folder_as_the_installed_package_does(name: str) -> None:
    link = REPO / "sessionsync" / name
    assert link.is_symlink()
    assert os.readlink(link) == f"../{name}"  # relative: a clone anywhere resolves it
    assert link.resolve() == (REPO / name).resolve()


@pytest.mark.timeout(300)
def test_the_wheel_installs_only_sessionsync(tmp_path: Path) -> None:
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("sessionsync-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"sessionsync", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    for needed in (
        "sessionsync/__init__.py",
        "sessionsync/client.py",
        "sessionsync/daemon/cli.py",
        "sessionsync/daemon/control/server.py",
        "sessionsync/models/migrations/script.py.mako",
        "sessionsync/models/migrations/versions/0001_initial_schema.py",
        "sessionsync/systemd/sessionsync.service",
        "sessionsync/systemd/sessionsync@.service",
    ):
        assert needed in names
    top_level = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).split() == [b"sessionsync"]

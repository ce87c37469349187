"""`sessionsync install-unit`: the shipped systemd unit, ExecStart pointed at this install.

The unit files in `systemd/` are the single source; rendering only replaces the placeholder
ExecStart line: this install's executable and, when one was named, `--config PATH`, each word
quoted for systemd's command-line syntax.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Literal

from sessionsync.daemon.errors import OperationalError, UsageError

UnitKind = Literal["user", "system"]

_UNIT_FILES: dict[UnitKind, str] = {"user": "sessionsync.service", "system": "sessionsync@.service"}
_PLACEHOLDER = "ExecStart=/usr/local/bin/sessionsync run\n"
_SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
# Characters that make systemd split, unquote or escape a word; such a path is double-quoted.
_NEEDS_QUOTES = re.compile(r"""[\s"'\\;]""")


def _quote_exec_word(word: str) -> str:
    r"""One word of an Exec*= line: `%` is a specifier and `$` a variable, so both are doubled.

    Inside double quotes systemd undoes C-style escapes, so `\` and `"` are escaped there.
    """
    word = word.replace("%", "%%").replace("$", "$$")
    if not _NEEDS_QUOTES.search(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_unit(kind: UnitKind, executable: str, config: str | None = None) -> str:
    """The shipped unit file of `kind` with ExecStart running `executable` (an absolute path),
    with `--config config` (an absolute path) when given."""
    for what, path in (("the sessionsync command", executable), ("the config file", config)):
        if path is not None and (not os.path.isabs(path) or "\n" in path):
            raise UsageError(
                f"the unit needs an absolute path to {what}, not {path!r}",
                "pass the full path, e.g. the output of `command -v sessionsync`",
            )
    text = files("sessionsync.systemd").joinpath(_UNIT_FILES[kind]).read_text(encoding="utf-8")
    if text.count(_PLACEHOLDER) != 1:
        raise RuntimeError(f"{_UNIT_FILES[kind]} must have exactly one line starting {_PLACEHOLDER!r}")
    words = [executable, "run", *(["--config", config] if config else [])]
    return text.replace(_PLACEHOLDER, f"ExecStart={' '.join(map(_quote_exec_word, words))}\n")


def exec_start_words(unit_text: str) -> list[str] | None:
    """The words of a unit's ExecStart= line as systemd splits them, undoing what render_unit does
    (quotes, `\\` escapes, doubled `%` and `$`); None without one, or when it cannot be split."""
    lines = [line for line in unit_text.splitlines() if line.startswith("ExecStart=")]
    if not lines:
        return None
    try:
        words = shlex.split(lines[-1].removeprefix("ExecStart="))  # the last one is what runs
    except ValueError:
        return None
    return [word.replace("%%", "%").replace("$$", "$") for word in words]


def default_executable() -> str:
    """The installed `sessionsync` command, absolute: next to sys.executable (a venv's bin), else on PATH."""
    # Not resolved: a venv's python is a symlink to the system one, whose folder has no sessionsync.
    beside = Path(os.path.abspath(sys.executable)).parent / "sessionsync"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("sessionsync")
    if found is None:
        raise OperationalError(
            "cannot find the installed sessionsync command to put in the unit",
            f"it is neither next to {sys.executable} nor on PATH; reinstall the package",
        )
    return os.path.abspath(found)


def unit_destination(kind: UnitKind, env: Mapping[str, str] | None = None) -> Path:
    """Where systemd looks for the unit: the user's `systemd/user` config folder, or /etc/systemd/system."""
    if kind == "system":
        return _SYSTEM_UNIT_DIR / _UNIT_FILES["system"]
    env = os.environ if env is None else env
    config_home = env.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(config_home):  # the XDG spec: relative (or empty) means unset
        config_home = os.path.join(env.get("HOME") or os.path.expanduser("~"), ".config")
    return Path(config_home) / "systemd" / "user" / _UNIT_FILES["user"]


def _service_user(env: Mapping[str, str]) -> str:
    """Whom `sudo sessionsync install-unit --system` is for: the user behind sudo, not root."""
    return env.get("SUDO_USER") or env.get("USER") or pwd.getpwuid(os.getuid()).pw_name


def _enable_commands(kind: UnitKind, env: Mapping[str, str]) -> list[str]:
    if kind == "user":
        return ["systemctl --user daemon-reload", "systemctl --user enable --now sessionsync"]
    instance = shlex.quote(f"sessionsync@{_service_user(env)}")
    return ["systemctl daemon-reload", f"systemctl enable --now {instance}"]


def install_unit(
    kind: UnitKind,
    executable: str | None = None,
    env: Mapping[str, str] | None = None,
    config: str | None = None,
) -> tuple[Path, list[str]]:
    """Write the unit (atomically) and return its path and the systemctl commands to print."""
    env = os.environ if env is None else env
    text = render_unit(kind, executable or default_executable(), config)
    destination = unit_destination(kind, env)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{destination.name}.", dir=destination.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, destination)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        hint = "run it with sudo" if kind == "system" else "check the permissions of that folder"
        raise OperationalError(f"cannot write {destination}: {exc.strerror or exc}", hint) from exc
    return destination, _enable_commands(kind, env)

"""What a chaos run records: one seed's Outcome, and the marker lines it writes into the daemon's
log so that the log can be read fault by fault afterwards."""

from __future__ import annotations

from dataclasses import dataclass, field

from tests.support.runner import Daemon

MARKER = "--- chaos:"


@dataclass
class Outcome:
    """One seed's run: what was done, what went wrong, how long convergence took."""

    seed: int
    db: str
    seconds: float
    ops: int = 0
    faults: list[str] = field(default_factory=list)
    divergences: list[str] = field(default_factory=list)  # the database differs from the files
    errors: list[str] = field(default_factory=list)  # the daemon misbehaved: exit codes, tracebacks
    converge_s: float | None = None
    notes: list[str] = field(default_factory=list)
    log_story: dict[str, int] = field(default_factory=dict)  # fault kind -> most daemon lines in one
    options: str = ""  # command-line options beyond the defaults, for `reproduce()`

    def line(self) -> str:
        took = "did not converge" if self.converge_s is None else f"converged in {self.converge_s:.1f} s"
        errors = f", {len(self.errors)} daemon errors" if self.errors else ""
        return (
            f"seed {self.seed}: {self.ops} ops, {len(self.faults)} faults, "
            f"{len(self.divergences)} divergences, {took}{errors}"
        )

    @property
    def failed(self) -> bool:
        return bool(self.divergences or self.errors)

    def reproduce(self) -> str:
        run = f".venv/bin/python -m bench.chaos --seed {self.seed} --seconds {self.seconds:g} --db {self.db}"
        return run + self.options


def mark(daemon: Daemon, ops: int, text: str) -> None:
    """A line in the daemon's log (both append), so the log can be read fault by fault."""
    with daemon.log_path.open("a") as log:
        log.write(f"{MARKER} op {ops}: {text}\n")

"""The rows of issue #13's speed table, as each benchmark hands them to bench.speed: a figure, what
sessionsync measured, the floor or anchor measured in the same run, the ratio, the target and the
verdict; and the one way they are printed."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata

HEADERS = ("figure", "sessionsync", "floor / anchor", "ratio", "target", "verdict")


@dataclass(frozen=True)
class Row:
    """One line of the table; `ok` is None where the figure has no target (or not at this size)."""

    figure: str
    value: str
    anchor: str = ""
    ratio: str = ""
    target: str = ""
    ok: bool | None = None


def mark(ok: bool | None) -> str:
    return "" if ok is None else "PASS" if ok else "FAIL"


def seconds(value: float) -> str:
    """A duration as the table prints it: milliseconds under a second, else seconds."""
    return f"{value * 1000:,.1f} ms" if value < 1 else f"{value:,.2f} s"


def median(runs: Sequence[float]) -> float:
    return statistics.median(runs)


def ratio(a: float, b: float) -> str:
    return f"{a / b:,.1f}x" if b else "-"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def versions() -> str:
    """The interpreter and the libraries whose speed the figures depend on."""
    names = ("SQLAlchemy", "psycopg", "pydantic", "orjson", "watchdog")
    libs = ", ".join(f"{name} {metadata.version(name)}" for name in names)
    return f"Python {platform.python_version()}, {os.cpu_count()} CPU(s); {libs}"


def render(rows: Sequence[Row]) -> list[str]:
    """The rows as an aligned text table, verdict last."""
    cells = [HEADERS, *((r.figure, r.value, r.anchor, r.ratio, r.target, mark(r.ok)) for r in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADERS))]
    lines = []
    for n, line in enumerate(cells):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * width for width in widths))
    return lines

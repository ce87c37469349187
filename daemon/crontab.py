"""Standard 5-field crontab expressions, checked without APScheduler (the config is read by every
client command, which must start fast), and the weekday field in the form APScheduler 3 reads.

The checker accepts what cron accepts: `*`, numbers, ranges `a-b`, steps `/n` and lists of them,
month and weekday names, weekdays 0-7 counted from Sunday. A test holds it to what the
scheduler itself accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
# crontab numbers weekdays from Sunday (0 and 7); APScheduler 3.x numbers them from Monday and
# from_crontab passes numbers through (apscheduler#286, fixed only in 4.x): "1-5" would run
# Tuesday to Saturday. So the weekday field is handed over as day names.
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()  # names[i] stands for low + i
    name_base: int = 0

    def value(self, token: str) -> int:
        if token in self.names:
            return self.names.index(token) + self.name_base
        if not token.isdigit():
            allowed = f"{self.low}-{self.high}" + (
                f" or {self.names[0]}-{self.names[-1]}" if self.names else ""
            )
            raise ValueError(f"{self.name} {token!r} is not {allowed}")
        number = int(token)
        if number < self.low:
            raise ValueError(f"{self.name} {number} is below the minimum value ({self.low})")
        if number > self.high:
            raise ValueError(f"{self.name} {number} is above the maximum value ({self.high})")
        return number


_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day of month", 1, 31),
    _Field("month", 1, 12, _MONTHS, 1),
    _Field("day of week", 0, 7, _DAYS, 0),
)


def _values(field: _Field, text: str) -> set[int]:
    """Every value a field's text stands for; ValueError naming the part that is wrong."""
    values: set[int] = set()
    for part in text.lower().split(","):
        span, slash, step_text = part.partition("/")
        if slash and not (step_text.isdigit() and int(step_text) > 0):
            raise ValueError(f"{field.name} step {step_text!r} in {part!r} is not a whole number above 0")
        step = int(step_text) if slash else 1
        if span == "*":
            low, high = field.low, field.high
        else:
            first, dash, last = span.partition("-")
            low = field.value(first)
            # "5/2" means "5-max/2", as in cron.
            high = field.value(last) if dash else (field.high if slash else low)
            if low > high:
                raise ValueError(f"{field.name} range {part!r} runs backwards")
        values.update(range(low, high + 1, step))
    return values


def check(expr: str) -> None:
    """Raise ValueError saying which field is wrong and why."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"wrong number of fields; got {len(fields)}, expected 5")
    for field, text in zip(_FIELDS, fields, strict=True):
        _values(field, text)


def apscheduler_weekdays(text: str) -> str:
    """A crontab day-of-week field as APScheduler day names: "1-5" -> "mon,tue,wed,thu,fri"."""
    days = {day % 7 for day in _values(_FIELDS[4], text)}
    return "*" if len(days) == 7 else ",".join(_DAYS[day] for day in sorted(days))

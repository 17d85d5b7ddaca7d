"""Day types (workday / weekend / holiday) from a calendar held as data.

Used by time-of-use tariffs and by the cutoff policy's no-disconnect windows.
A date listed in ``holidays`` is a holiday whatever its weekday; a date listed
in ``workdays`` is a working day even on a weekend (the Chinese 调休 make-up
working days). Otherwise ISO weekdays in ``weekend`` (default Saturday and
Sunday) are weekends and every other day is a workday.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import date

from gateway.problems import Problems


class DayType(enum.StrEnum):
    WORKDAY = "workday"
    WEEKEND = "weekend"
    HOLIDAY = "holiday"


@dataclass(frozen=True)
class DayCalendar:
    weekend: frozenset[int] = frozenset({6, 7})  # ISO weekday numbers, Monday = 1
    holidays: frozenset[date] = field(default_factory=frozenset)
    workdays: frozenset[date] = field(default_factory=frozenset)

    def day_type(self, d: date) -> DayType:
        if d in self.holidays:
            return DayType.HOLIDAY
        if d in self.workdays:
            return DayType.WORKDAY
        if d.isoweekday() in self.weekend:
            return DayType.WEEKEND
        return DayType.WORKDAY


def parse_calendar(raw: object, path: str, problems: Problems) -> DayCalendar:
    """Parse a ``[calendar]`` table (at key ``path``); problems go to ``problems``."""
    if raw is None:
        return DayCalendar()
    if not isinstance(raw, dict):
        problems.add(path, "must be a table")
        return DayCalendar()
    allowed = {"weekend", "holidays", "workdays"}
    problems.unknown(path, raw, allowed)
    weekend: frozenset[int] = frozenset({6, 7})
    if "weekend" in raw:
        w = raw["weekend"]
        if not isinstance(w, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 7 for x in w
        ):
            problems.add(f"{path}.weekend", "must be a list of ISO weekdays 1..7 (Monday = 1)")
        else:
            weekend = frozenset(w)

    def dates(key: str) -> frozenset[date]:
        v = raw.get(key, [])
        out: set[date] = set()
        if not isinstance(v, list):
            problems.add(f"{path}.{key}", "must be a list of dates")
            return frozenset()
        for i, x in enumerate(v):
            if isinstance(x, date) and not hasattr(x, "hour"):
                out.add(x)
            elif isinstance(x, str):
                try:
                    out.add(date.fromisoformat(x))
                except ValueError:
                    problems.add(f"{path}.{key}[{i}]", f"not a date (YYYY-MM-DD): {x!r}")
            else:
                problems.add(f"{path}.{key}[{i}]", f"not a date (YYYY-MM-DD): {x!r}")
        return frozenset(out)

    holidays = dates("holidays")
    workdays = dates("workdays")
    both = holidays & workdays
    if both:
        listed = ", ".join(sorted(d.isoformat() for d in both))
        problems.add(path, f"dates listed both as holiday and workday: {listed}")
    return DayCalendar(weekend=weekend, holidays=holidays, workdays=workdays)

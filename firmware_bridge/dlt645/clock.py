"""A meter's date and time (DIs 04000101 and 04000102), decoded without losing the rest.

Meters in the field report dates that do not decode: a weekday register
never set, a clock that lost its battery (``00-00-00``), bytes that are not
BCD. :func:`decode_clock` is pure: it returns what can be used (a naive
datetime in the meter's own time) and, when something is wrong, a
:class:`~firmware_bridge.reading.MeterFault` carrying the raw bytes as
evidence. Nothing here raises: a bad date never costs the energy register
read in the same poll.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from firmware_bridge.reading import MeterFault

DI_DATE = 0x04000101
DI_TIME = 0x04000102
_DAY_NAMES = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")


@dataclass(frozen=True, slots=True)
class ClockRead:
    """``local``: the meter's clock (naive, meter time) or None when unusable."""

    local: dt.datetime | None
    fault: MeterFault | None = None


def _digits(raw: bytes) -> str | None:
    """Little-endian BCD -> digits, most significant first; None if not BCD."""
    out = []
    for b in reversed(raw):
        if b >> 4 > 9 or b & 0x0F > 9:
            return None
        out.append(f"{b:02X}")
    return "".join(out)


def decode_clock(date_raw: bytes, time_raw: bytes) -> ClockRead:
    """Decode the payloads of 04000101 (``WW DD MM YY`` on the wire) and 04000102
    (``ss mm hh``); see the module documentation."""
    evidence = f"{DI_DATE:08X}: {date_raw.hex(' ')}; {DI_TIME:08X}: {time_raw.hex(' ')}"

    def fault(cause: str, detail: str) -> ClockRead:
        return ClockRead(None, MeterFault("clock", f"clock.{cause}", detail, evidence))

    if len(date_raw) != 4 or len(time_raw) != 3:
        return fault(
            "length", f"date/time payloads are {len(date_raw)}/{len(time_raw)} bytes, expected 4/3"
        )
    d, t = _digits(date_raw), _digits(time_raw)
    if d is None or t is None:
        which = "date" if d is None else "time"
        return fault("not_bcd", f"meter {which} bytes are not BCD")
    if d[:6] == "000000":
        return fault("unset", "meter date is unset (00-00-00): clock lost or never set")
    try:
        date = dt.date(2000 + int(d[0:2]), int(d[2:4]), int(d[4:6]))
    except ValueError:
        return fault("invalid_date", f"meter date 20{d[0:2]}-{d[2:4]}-{d[4:6]} does not exist")
    try:
        clock = dt.time(int(t[0:2]), int(t[2:4]), int(t[4:6]))
    except ValueError:
        return fault("invalid_time", f"meter time {t[0:2]}:{t[2:4]}:{t[4:6]} does not exist")
    local = dt.datetime.combine(date, clock)
    weekday = int(d[6:8])
    actual = date.isoweekday() % 7
    if weekday != actual:
        detail = (
            f"meter weekday {weekday} does not match its date {date.isoformat()}"
            f" (a {_DAY_NAMES[actual]}, weekday {actual})"
        )
        return ClockRead(local, MeterFault("clock", "clock.weekday", detail, evidence))
    return ClockRead(local)

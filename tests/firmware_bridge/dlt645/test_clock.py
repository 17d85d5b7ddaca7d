"""Meter date and time: decoded without losing anything, faults kept as evidence."""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.dlt645.clock import decode_clock
from firmware_bridge.dlt645.dataids import DATE_WEEK, TIME, DataItem, encode_values

TIME_RAW = bytes([0x15, 0x30, 0x10])  # 10:30:15 as sent (ss mm hh)


def date_raw(yy: int, mm: int, dd: int, ww: int) -> bytes:
    """WW DD MM YY as sent (little-endian BCD)."""
    return bytes(int(f"{v:02d}", 16) for v in (ww, dd, mm, yy))


def test_good_clock() -> None:
    c = decode_clock(date_raw(26, 11, 23, 1), TIME_RAW)  # 23 Nov 2026 is a Monday
    assert c.local == dt.datetime(2026, 11, 23, 10, 30, 15) and c.fault is None


def test_wrong_weekday_keeps_the_clock_and_says_so() -> None:
    c = decode_clock(date_raw(26, 11, 23, 4), TIME_RAW)
    assert c.local == dt.datetime(2026, 11, 23, 10, 30, 15)
    assert c.fault is not None and c.fault.cause == "clock.weekday"
    assert "weekday 4 does not match its date 2026-11-23 (a Monday, weekday 1)" in c.fault.detail
    assert c.fault.raw == "04000101: 04 23 11 26; 04000102: 15 30 10"


def test_unset_invalid_and_non_bcd_dates() -> None:
    unset = decode_clock(bytes(4), TIME_RAW)
    assert unset.local is None and unset.fault is not None and unset.fault.cause == "clock.unset"
    feb30 = decode_clock(date_raw(26, 2, 30, 1), TIME_RAW)
    assert feb30.fault is not None and feb30.fault.cause == "clock.invalid_date"
    assert "2026-02-30 does not exist" in feb30.fault.detail and feb30.local is None
    junk = decode_clock(b"\xff" * 4, TIME_RAW)
    assert junk.fault is not None and junk.fault.cause == "clock.not_bcd"
    assert junk.fault.raw.startswith("04000101: ff ff ff ff")
    bad_time = decode_clock(date_raw(26, 11, 23, 1), bytes([0x00, 0x61, 0x25]))
    assert bad_time.fault is not None and bad_time.fault.cause == "clock.invalid_time"
    short = decode_clock(b"\x01", TIME_RAW)
    assert short.fault is not None and short.fault.cause == "clock.length"


@given(st.binary(min_size=0, max_size=6), st.binary(min_size=0, max_size=4))
def test_never_raises_and_always_explains(date: bytes, time: bytes) -> None:
    c = decode_clock(date, time)
    assert c.local is not None or c.fault is not None
    if c.fault is not None:
        assert c.fault.kind == "clock" and c.fault.detail and date.hex(" ") in c.fault.raw


@given(st.datetimes(min_value=dt.datetime(2000, 1, 2), max_value=dt.datetime(2099, 12, 31)))
def test_round_trip_of_what_a_good_meter_sends(when: dt.datetime) -> None:
    when = when.replace(microsecond=0)
    d = encode_values(DataItem(0x04000101, "date", DATE_WEEK), [when.date()])
    t = encode_values(DataItem(0x04000102, "time", TIME), [when.time()])
    assert decode_clock(d, t).local == when and decode_clock(d, t).fault is None

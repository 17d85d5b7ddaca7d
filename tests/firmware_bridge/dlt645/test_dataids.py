"""Value formats: exact Decimals, signs, dates, blocks, round trips."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge.dlt645.dataids import (
    ITEMS,
    DataItem,
    Kind,
    StatusWord3,
    Value,
    decode_values,
    di_from_wire,
    di_to_wire,
    encode_values,
    item,
)
from firmware_bridge.dlt645.errors import DataError, Dlt645Error


def test_guide_vector_energy() -> None:
    # un-scrambled payload 42 06 12 00 -> 00120642 -> 001206.42 kWh
    assert decode_values(item(0x00010000), bytes.fromhex("42 06 12 00")) == (Decimal("1206.42"),)


def test_di_is_sent_low_byte_first() -> None:
    assert di_to_wire(0x0201FF00) == bytes.fromhex("00 FF 01 02")
    assert di_from_wire(bytes.fromhex("03 05 00 04")) == 0x04000503


@pytest.mark.parametrize(
    ("di", "payload", "values"),
    [
        (0x02010100, "05 22", (Decimal("220.5"),)),
        (0x02020100, "35 12 00", (Decimal("1.235"),)),
        (0x02020100, "35 12 80", (Decimal("-1.235"),)),
        (0x02030000, "34 12 80", (Decimal("-0.1234"),)),
        (0x02060000, "87 09", (Decimal("0.987"),)),
        (0x02060000, "00 90", (Decimal("-1.000"),)),
        (0x02800002, "00 50", (Decimal("50.00"),)),
        (0x04000102, "30 15 23", (dt.time(23, 15, 30),)),
        # 2026-11-23 is a Monday: weekday 01
        (0x04000101, "01 23 11 26", (dt.date(2026, 11, 23),)),
        (0x04000401, "25 04 03 02 01 00", ("000102030425",)),
        (0x04000503, "10 01", (0x0110,)),
        (
            0x0001FF00,
            "00 01 00 00  00 00 00 00  25 00 00 00  50 00 00 00  25 00 00 00",
            (Decimal("1.00"), Decimal("0.00"), Decimal("0.25"), Decimal("0.50"), Decimal("0.25")),
        ),
        (0x0201FF00, "00 22 10 22 20 22", (Decimal("220.0"), Decimal("221.0"), Decimal("222.0"))),
    ],
)
def test_golden_values(di: int, payload: str, values: tuple[Value, ...]) -> None:
    raw = bytes.fromhex(payload)
    assert decode_values(item(di), raw) == values
    assert encode_values(item(di), values) == raw


def test_decimals_keep_their_exponent() -> None:
    (v,) = decode_values(item(0x00010000), bytes.fromhex("00 00 00 00"))
    assert str(v) == "0.00"


@pytest.mark.parametrize(
    ("di", "payload"),
    [
        (0x00010000, "42 06 12"),  # short
        (0x00010000, "4A 06 12 00"),  # not BCD
        (0x0001FF00, "00 01 00"),  # block not a multiple of 4
        (0x0001FF00, ""),  # empty block
        (0x04000101, "02 23 11 26"),  # wrong weekday
        (0x04000101, "00 32 13 26"),  # no 32 of month 13
        (0x04000102, "61 15 23"),  # second 61
    ],
)
def test_bad_payloads(di: int, payload: str) -> None:
    with pytest.raises(DataError):
        decode_values(item(di), bytes.fromhex(payload))


def test_unknown_di() -> None:
    with pytest.raises(DataError, match="unknown data identifier 12345678"):
        item(0x12345678)


def test_status_word_3_bits() -> None:
    s = StatusWord3(0b01_1101_0000)
    assert s.relay_open and s.relay_command_open and s.pre_trip_alarm
    assert s.meter_type == 1
    assert not StatusWord3(0).relay_open


def _values_for(it: DataItem) -> st.SearchStrategy[tuple[Value, ...]]:
    fmt = it.fmt
    one: st.SearchStrategy[Value]
    if fmt.kind is Kind.NUMBER:
        limit = fmt.max_magnitude
        low = -limit if fmt.signed else 0
        one = st.integers(low, limit).map(lambda n: Decimal(n).scaleb(-fmt.decimals))
    elif fmt.kind is Kind.BITS:
        one = st.integers(0, 0xFFFF)
    elif fmt.kind is Kind.DIGITS:
        one = st.integers(0, 10**12 - 1).map(lambda n: f"{n:012d}")
    elif fmt.kind is Kind.TIME:
        one = st.times().map(lambda t: t.replace(microsecond=0))
    else:
        one = st.dates(dt.date(2000, 1, 1), dt.date(2099, 12, 31))
    if it.is_block:
        return st.lists(one, min_size=1, max_size=8).map(tuple)
    return st.tuples(*([one] * it.count))


@pytest.mark.parametrize("it", ITEMS, ids=lambda it: f"{it.di:08X}")
@settings(max_examples=40)
@given(data=st.data())
def test_encode_decode_round_trip(it: DataItem, data: st.DataObject) -> None:
    values = data.draw(_values_for(it))
    decoded = decode_values(it, encode_values(it, values))
    assert decoded == values
    # Decimals come back with the format's exact number of decimals.
    for v in decoded:
        if isinstance(v, Decimal):
            assert v.as_tuple().exponent == -it.fmt.decimals


@given(st.sampled_from(ITEMS), st.binary(max_size=40))
def test_arbitrary_payloads_raise_only_codec_errors(it: DataItem, payload: bytes) -> None:
    try:
        decode_values(it, payload)
    except Dlt645Error:
        pass

"""Data identifiers (DI) and value formats, as data.

A DI is four bytes ``DI3 DI2 DI1 DI0``, written here as one 32-bit number
(``0x00010000`` = forward active energy, total) and sent least significant byte
first. Each :class:`DataItem` says how the reply payload decodes: a fixed
:class:`Format` repeated ``count`` times (blocks such as ``0001FF00`` carry the
total followed by the per-rate registers; a block's count is whatever the meter
sends, at least one value).

Numbers are BCD, least significant byte first, and decode to exact
:class:`~decimal.Decimal` values; a signed format uses the top bit of the most
significant byte as the sign (sign-magnitude, as DL/T 645 does).
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from firmware_bridge.dlt645.errors import DataError, EncodeError


class Kind(enum.StrEnum):
    NUMBER = "number"  # BCD with an implied decimal point -> Decimal
    DATE_WEEK = "date_week"  # YYMMDDWW -> datetime.date (weekday checked)
    TIME = "time"  # hhmmss -> datetime.time
    DIGITS = "digits"  # BCD digit string (addresses, meter numbers) -> str
    BITS = "bits"  # binary word, little endian -> int


@dataclass(frozen=True, slots=True)
class Format:
    kind: Kind
    length: int  # bytes per value
    decimals: int = 0
    signed: bool = False
    unit: str = ""

    @property
    def max_magnitude(self) -> int:
        """Largest raw magnitude: the sign bit leaves 0-7 for the top digit."""
        if self.signed:
            return 8 * 10 ** (2 * self.length - 1) - 1
        return 10 ** (2 * self.length) - 1


ENERGY = Format(Kind.NUMBER, 4, 2, unit="kWh")  # XXXXXX.XX
VOLTAGE = Format(Kind.NUMBER, 2, 1, unit="V")  # XXX.X
CURRENT = Format(Kind.NUMBER, 3, 3, signed=True, unit="A")  # XXX.XXX
POWER = Format(Kind.NUMBER, 3, 4, signed=True, unit="kW")  # XX.XXXX
POWER_FACTOR = Format(Kind.NUMBER, 2, 3, signed=True)  # X.XXX
FREQUENCY = Format(Kind.NUMBER, 2, 2, unit="Hz")  # XX.XX
DATE_WEEK = Format(Kind.DATE_WEEK, 4)
TIME = Format(Kind.TIME, 3)
DIGITS6 = Format(Kind.DIGITS, 6)
WORD = Format(Kind.BITS, 2)


@dataclass(frozen=True, slots=True)
class DataItem:
    di: int
    name: str
    fmt: Format
    count: int = 1  # values in the payload; 0 = a block of one or more values

    @property
    def is_block(self) -> bool:
        return self.count == 0


ITEMS: tuple[DataItem, ...] = (
    DataItem(0x00000000, "combined active energy, total", ENERGY),
    DataItem(0x00010000, "forward active energy, total", ENERGY),
    DataItem(0x00010100, "forward active energy, rate 1 (sharp)", ENERGY),
    DataItem(0x00010200, "forward active energy, rate 2 (peak)", ENERGY),
    DataItem(0x00010300, "forward active energy, rate 3 (flat)", ENERGY),
    DataItem(0x00010400, "forward active energy, rate 4 (valley)", ENERGY),
    DataItem(0x0001FF00, "forward active energy, total and rates", ENERGY, count=0),
    DataItem(0x00020000, "reverse active energy, total", ENERGY),
    DataItem(0x02010100, "voltage, phase A", VOLTAGE),
    DataItem(0x02010200, "voltage, phase B", VOLTAGE),
    DataItem(0x02010300, "voltage, phase C", VOLTAGE),
    DataItem(0x0201FF00, "voltage, phases A B C", VOLTAGE, count=0),
    DataItem(0x02020100, "current, phase A", CURRENT),
    DataItem(0x02020200, "current, phase B", CURRENT),
    DataItem(0x02020300, "current, phase C", CURRENT),
    DataItem(0x0202FF00, "current, phases A B C", CURRENT, count=0),
    DataItem(0x02030000, "active power, total", POWER),
    DataItem(0x02030100, "active power, phase A", POWER),
    DataItem(0x02030200, "active power, phase B", POWER),
    DataItem(0x02030300, "active power, phase C", POWER),
    DataItem(0x0203FF00, "active power, total and phases", POWER, count=0),
    DataItem(0x02060000, "power factor, total", POWER_FACTOR),
    DataItem(0x02060100, "power factor, phase A", POWER_FACTOR),
    DataItem(0x02060200, "power factor, phase B", POWER_FACTOR),
    DataItem(0x02060300, "power factor, phase C", POWER_FACTOR),
    DataItem(0x0206FF00, "power factor, total and phases", POWER_FACTOR, count=0),
    DataItem(0x02800002, "grid frequency", FREQUENCY),
    DataItem(0x04000101, "date and weekday", DATE_WEEK),
    DataItem(0x04000102, "time", TIME),
    DataItem(0x04000401, "communication address", DIGITS6),
    DataItem(0x04000402, "meter number", DIGITS6),
    DataItem(0x04000503, "status word 3", WORD),
)
BY_DI: dict[int, DataItem] = {item.di: item for item in ITEMS}

Value = Decimal | dt.date | dt.time | str | int


def item(di: int) -> DataItem:
    try:
        return BY_DI[di]
    except KeyError:
        raise DataError(f"unknown data identifier {di:08X}") from None


# A block reply is budgeted at this many values (total + phases, total + 4 rates...);
# a longer one is still read, the budget's slack covers it.
BLOCK_VALUES = 8
MAX_READ_DATA = 200  # DL/T 645-2007 limit of a read reply's data field


def payload_bytes(di: int) -> int:
    """Expected payload of a read reply for ``di`` (after the DI), for time budgets."""
    it = BY_DI.get(di)
    if it is None:
        return MAX_READ_DATA - 4
    return it.fmt.length * (BLOCK_VALUES if it.is_block else it.count)


def di_to_wire(di: int) -> bytes:
    if not 0 <= di <= 0xFFFFFFFF:
        raise EncodeError(f"data identifier must be 32 bits, got {di:#x}")
    return di.to_bytes(4, "little")


def di_from_wire(raw: bytes) -> int:
    if len(raw) != 4:
        raise DataError(f"data identifier must be 4 bytes, got {len(raw)}")
    return int.from_bytes(raw, "little")


# ---------------------------------------------------------------------------
# BCD


def bcd_digits(raw: bytes) -> str:
    """Little-endian BCD bytes -> digit string, most significant digit first."""
    out = []
    for b in reversed(raw):
        hi, lo = b >> 4, b & 0x0F
        if hi > 9 or lo > 9:
            raise DataError(f"byte {b:02X} is not BCD")
        out.append(f"{hi}{lo}")
    return "".join(out)


def digits_bcd(digits: str) -> bytes:
    """Digit string (even length) -> little-endian BCD bytes."""
    if len(digits) % 2 or not (digits.isascii() and digits.isdigit()):
        raise EncodeError(f"{digits!r} is not an even number of decimal digits")
    return bytes(int(digits[i : i + 2], 16) for i in range(len(digits) - 2, -1, -2))


# ---------------------------------------------------------------------------
# Values


def _decode_number(fmt: Format, raw: bytes) -> Decimal:
    negative = False
    if fmt.signed:
        negative = bool(raw[-1] & 0x80)
        raw = raw[:-1] + bytes([raw[-1] & 0x7F])
    magnitude = int(bcd_digits(raw))
    return Decimal((1 if negative else 0, tuple(int(d) for d in str(magnitude)), -fmt.decimals))


def _encode_number(fmt: Format, value: Decimal) -> bytes:
    if not isinstance(value, Decimal) or not value.is_finite():
        raise EncodeError(f"{value!r} is not a finite Decimal")
    scaled = value.scaleb(fmt.decimals)
    if scaled != scaled.to_integral_value():
        raise EncodeError(f"{value} has more than {fmt.decimals} decimals")
    n = int(scaled)
    if n < 0 and not fmt.signed:
        raise EncodeError(f"{value} is negative, format is unsigned")
    if abs(n) > fmt.max_magnitude:
        raise EncodeError(f"{value} is out of range for {fmt.length} BCD bytes")
    raw = bytearray(digits_bcd(f"{abs(n):0{2 * fmt.length}d}"))
    if n < 0:
        raw[-1] |= 0x80
    return bytes(raw)


def _decode_one(fmt: Format, raw: bytes) -> Value:
    if fmt.kind is Kind.NUMBER:
        return _decode_number(fmt, raw)
    if fmt.kind is Kind.BITS:
        return int.from_bytes(raw, "little")
    digits = bcd_digits(raw)
    if fmt.kind is Kind.DIGITS:
        return digits
    if fmt.kind is Kind.TIME:
        try:
            return dt.time(int(digits[0:2]), int(digits[2:4]), int(digits[4:6]))
        except ValueError as exc:
            raise DataError(f"time {digits}: {exc}") from None
    # DATE_WEEK: YY MM DD WW, weekday 0 = Sunday
    try:
        date = dt.date(2000 + int(digits[0:2]), int(digits[2:4]), int(digits[4:6]))
    except ValueError as exc:
        raise DataError(f"date {digits}: {exc}") from None
    weekday = int(digits[6:8])
    if weekday != date.isoweekday() % 7:
        raise DataError(f"date {digits}: weekday {weekday} does not match {date.isoformat()}")
    return date


def _encode_one(fmt: Format, value: Value) -> bytes:
    if fmt.kind is Kind.NUMBER:
        if not isinstance(value, Decimal):
            raise EncodeError(f"{fmt.kind} needs a Decimal, got {value!r}")
        return _encode_number(fmt, value)
    if fmt.kind is Kind.BITS:
        if not isinstance(value, int) or not 0 <= value < 1 << (8 * fmt.length):
            raise EncodeError(f"{value!r} does not fit {fmt.length} bytes")
        return value.to_bytes(fmt.length, "little")
    if fmt.kind is Kind.DIGITS:
        if not isinstance(value, str) or len(value) != 2 * fmt.length:
            raise EncodeError(f"need {2 * fmt.length} digits, got {value!r}")
        return digits_bcd(value)
    if fmt.kind is Kind.TIME:
        if not isinstance(value, dt.time):
            raise EncodeError(f"need a datetime.time, got {value!r}")
        return digits_bcd(f"{value.hour:02d}{value.minute:02d}{value.second:02d}")
    if not isinstance(value, dt.date) or not 2000 <= value.year <= 2099:
        raise EncodeError(f"need a datetime.date in 2000..2099, got {value!r}")
    return digits_bcd(f"{value:%y%m%d}{value.isoweekday() % 7:02d}")


def decode_values(item: DataItem, payload: bytes) -> tuple[Value, ...]:
    """Decode a read reply's payload (the bytes after the DI) for ``item``."""
    size = item.fmt.length
    if item.is_block:
        if not payload or len(payload) % size:
            raise DataError(
                f"{item.di:08X}: block payload of {len(payload)} bytes is not a multiple of {size}"
            )
    elif len(payload) != size * item.count:
        raise DataError(
            f"{item.di:08X}: payload is {len(payload)} bytes, expected {size * item.count}"
        )
    return tuple(_decode_one(item.fmt, payload[i : i + size]) for i in range(0, len(payload), size))


def encode_values(item: DataItem, values: Sequence[Value]) -> bytes:
    """Inverse of :func:`decode_values` (used by the simulator and the tests)."""
    if item.is_block and not values:
        raise EncodeError(f"{item.di:08X}: a block needs at least one value")
    if not item.is_block and len(values) != item.count:
        raise EncodeError(f"{item.di:08X}: needs {item.count} value(s), got {len(values)}")
    return b"".join(_encode_one(item.fmt, v) for v in values)


# ---------------------------------------------------------------------------
# Status word 3


@dataclass(frozen=True, slots=True)
class StatusWord3:
    """Status word 3 (``04000503``), the bits this gateway acts on."""

    raw: int

    @property
    def relay_open(self) -> bool:  # bit4: 0 closed, 1 open
        return bool(self.raw & 0x0010)

    @property
    def relay_command_open(self) -> bool:  # bit6: last relay command was "open"
        return bool(self.raw & 0x0040)

    @property
    def pre_trip_alarm(self) -> bool:  # bit7
        return bool(self.raw & 0x0080)

    @property
    def meter_type(self) -> int:  # bits 8-9: 00 = not prepaid
        return (self.raw >> 8) & 0x03

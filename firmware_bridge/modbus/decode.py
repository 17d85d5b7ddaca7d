"""Pure register arithmetic: read planning and value decoding.

No I/O here. :func:`plan_reads` coalesces a profile's fields into as few
requests as possible; :func:`decode_field` turns the registers of one field
into a :class:`~firmware_bridge.reading.Measurement` without letting binary
floating point noise reach the reading.

Float32 → Decimal: the IEEE-754 value is converted *exactly* to Decimal
(every binary float is a finite decimal), multiplied by the field's factor
in Decimal arithmetic, then quantised half-even to the field's resolution.
So 1206.42 kWh sent as float32 (exactly 1206.4200439453125) becomes
``Decimal('1206.42')``. Float32 has 24 significant bits: above 131072 kWh
its step (ulp) exceeds 0.01 kWh and the last digit is the meter's rounding,
not ours; the reading still carries what the meter sent, quantised.
NaN and ±infinity become Quality.INVALID measurements holding Decimal NaN /
±Infinity (consumers must use ``Reading.good()`` for arithmetic).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Context, Decimal, InvalidOperation

from firmware_bridge.modbus.profiles import DataType, Field, WordOrder
from firmware_bridge.reading import Measurement, Quality, Quantity, new_measurement

_CTX = Context(prec=60)
_STRUCT = {
    DataType.FLOAT32: ">f",
    DataType.INT16: ">h",
    DataType.UINT16: ">H",
    DataType.INT32: ">i",
    DataType.UINT32: ">I",
}
_RAW = {dtype: struct.Struct(fmt) for dtype, fmt in _STRUCT.items()}
_WORDS = {1: struct.Struct(">H"), 2: struct.Struct(">2H")}  # registers as sent (16-bit each)


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One request: ``count`` registers from ``address``, covering ``fields``."""

    address: int
    count: int
    fields: tuple[Field, ...]

    @property
    def end(self) -> int:
        return self.address + self.count


def plan_reads(fields: Sequence[Field], max_gap: int, max_count: int) -> list[ReadBlock]:
    """Coalesce fields into requests.

    Neighbouring fields share a request when the unused registers between
    them are at most ``max_gap`` and the request stays within ``max_count``
    registers. Every field is covered by exactly one block, fields never
    straddle blocks, and blocks come out in address order.
    """
    ordered = sorted(fields, key=lambda f: f.address)
    blocks: list[ReadBlock] = []
    cur: list[Field] = []
    start = end = 0
    for f in ordered:
        if f.count > max_count:
            raise ValueError(f"field {f.quantity.value} needs {f.count} registers > max_count {max_count}")
        if cur and f.address - end <= max_gap and max(end, f.end) - start <= max_count and f.address >= start:
            cur.append(f)
            end = max(end, f.end)
            continue
        if cur:
            blocks.append(ReadBlock(start, end - start, tuple(cur)))
        cur, start, end = [f], f.address, f.end
    if cur:
        blocks.append(ReadBlock(start, end - start, tuple(cur)))
    return blocks


def has_gaps(block: ReadBlock) -> bool:
    """True if the block reads registers that belong to no field."""
    return sum(f.count for f in block.fields) < block.count


def split_block(block: ReadBlock) -> list[ReadBlock]:
    """The same fields without unused registers: contiguous runs only."""
    return plan_reads(block.fields, 0, block.count)


def registers_to_raw(regs: Sequence[int], dtype: DataType, word_order: WordOrder) -> int | float:
    """Registers (16-bit values as sent) → the raw integer or float."""
    n = dtype.registers
    if len(regs) != n:
        raise ValueError(f"{dtype.value} needs {n} registers, got {len(regs)}")
    words = [w & 0xFFFF for w in regs]
    if word_order is WordOrder.LITTLE:
        words.reverse()
    value: int | float = _RAW[dtype].unpack(_WORDS[n].pack(*words))[0]
    return value


def raw_to_registers(value: int | float, dtype: DataType, word_order: WordOrder) -> list[int]:
    """Inverse of :func:`registers_to_raw` (used by the simulator and tests)."""
    data = struct.pack(_STRUCT[dtype], value)
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if word_order is WordOrder.LITTLE:
        words.reverse()
    return words


def scale_raw(raw: int | float, field: Field) -> Measurement:
    """Raw register value → canonical, quantised Decimal measurement."""
    return _scale(raw, field.factor, field.resolution)


def _scale(raw: int | float, factor: Decimal, resolution: Decimal) -> Measurement:
    if isinstance(raw, float):
        if math.isnan(raw):
            return Measurement(Decimal("NaN"), Quality.INVALID)
        if math.isinf(raw):
            return Measurement(Decimal("Infinity") if raw > 0 else Decimal("-Infinity"), Quality.INVALID)
    exact = Decimal(raw)  # exact for int and for every binary float
    try:
        value = _CTX.multiply(exact, factor).quantize(resolution, context=_CTX)
    except InvalidOperation:  # magnitude beyond any meter's range
        return Measurement(Decimal("NaN"), Quality.INVALID)
    if value.is_zero():
        value = abs(value)  # no "-0.00"
    return Measurement(value)


def decode_field(block_regs: Sequence[int], block_address: int, field: Field, word_order: WordOrder) -> Measurement:
    """Decode ``field`` out of the registers of the block that starts at ``block_address``."""
    off = field.address - block_address
    if off < 0 or off + field.count > len(block_regs):
        raise ValueError(f"field {field.quantity.value} at {field.address:#06x} outside block")
    return scale_raw(registers_to_raw(block_regs[off : off + field.count], field.dtype, word_order), field)


def encode_value(value: Decimal, field: Field, word_order: WordOrder) -> list[int]:
    """Canonical value → registers as a meter would send them (simulator, tests).

    Integer types round half-even to the nearest raw step; float32 takes the
    nearest binary float.
    """
    raw = value / field.factor
    if field.dtype is DataType.FLOAT32:
        return raw_to_registers(float(raw), field.dtype, word_order)
    return raw_to_registers(int(raw.to_integral_value()), field.dtype, word_order)


# Decimal places a float is formatted to at most (see _places): a float32's integer part has
# at most 39 digits, so the digits always fit the 60 of the arithmetic, as quantising needs.
_MAX_PLACES = 20


def _places(f: Field) -> tuple[str, int | None] | None:
    """How a float32 field is quantised by formatting, or None where it is not.

    ``(".Nf", None)`` for a factor of 1 quantised to N >= 0 decimal places; ``(".Nf", e)``
    for a factor of 10**e: quantising ``x × 10**e`` to 10**-r is quantising ``x`` to
    10**-(r + e) and moving the decimal point by ``e`` (exact), so it is formatted
    to N = r + e >= 0 places and scaled.
    """
    exponent = f.resolution.as_tuple().exponent
    if f.dtype is not DataType.FLOAT32 or not isinstance(exponent, int) or exponent > 0:
        return None
    factor = f.factor
    if factor == 1:
        shift: int | None = None
        places = -exponent
    else:
        sign, digits, e = factor.normalize(_CTX).as_tuple()
        if sign or digits != (1,) or not isinstance(e, int):
            return None  # not a power of ten
        shift = e
        places = e - exponent
    if not 0 <= places <= _MAX_PLACES:
        return None
    return f".{places}f", shift


_UNSEEN = object()  # a raw value no register ever decodes to


class BlockDecoder:
    """:func:`decode_field` for every field of one block, with what each needs worked
    out once (offsets, struct layouts, the factor): a meter's blocks are decoded
    every poll with the same plan.

    The block's registers are packed to bytes once and each field unpacked from
    them at its offset (word-swapped fields are re-packed in their own order); a
    factor of 1 is not multiplied (exact either way: a float32 or a 32-bit
    integer has far fewer than the 60 digits the arithmetic keeps). A float
    with a factor of 1 (or a power of ten) is quantised by formatting it with the
    resolution's decimal places: Python formats a float correctly rounded from
    its exact binary value, half-even on exact ties, so the digits are those of
    quantising the exact Decimal, at half the cost.

    Each field's last raw value and its measurement are kept: a value the meter
    sends again (an energy register between two increments, a steady frequency)
    gives the same (immutable) measurement without being worked out again. Equal
    raw values give equal measurements (0.0 and -0.0 both give zero; NaN, never
    equal to itself, is worked out each time).
    """

    __slots__ = ("_end", "_fields", "_last", "_little", "_packs", "_quantities", "_seen", "_steps", "block")

    def __init__(self, block: ReadBlock, word_order: WordOrder) -> None:
        self.block = block
        self._little = word_order is WordOrder.LITTLE
        self._steps = [
            (
                f,
                f.address - block.address,  # in registers
                f.count,
                _WORDS[f.count],
                _RAW[f.dtype],
                None if f.factor == 1 else f.factor,
                f.resolution,
                f.dtype is DataType.FLOAT32,
                _places(f),
            )
            for f in block.fields
        ]
        self._fields = block.fields
        self._quantities = tuple(f.quantity for f in block.fields)
        # per field: the last raw value and its measurement
        self._last: list[object] = [_UNSEEN] * len(self._steps)
        self._seen: list[Measurement | None] = [None] * len(self._steps)
        # registers needed for every field to be inside the block (-1 for a bad plan:
        # the per-field check below names the field)
        bad = any(off < 0 for _, off, *_ in self._steps)
        self._end = -1 if bad else max((off + count for _, off, count, *_ in self._steps), default=0)
        self._packs: dict[int, struct.Struct] = {}

    def decode(self, regs: Sequence[int]) -> list[tuple[Field, Measurement]]:
        """Each field of the block with its measurement, in the block's order (what
        ``decode_field`` gives for each, and the same ValueError for a short block)."""
        return list(zip(self._fields, self._measure(regs), strict=True))

    def decode_into(self, regs: Sequence[int], values: dict[Quantity, Measurement]) -> None:
        """:meth:`decode`, each measurement stored in ``values`` under its field's quantity."""
        quantities = self._quantities  # (no zip: zip(strict=True) costs more than the loop)
        for i, m in enumerate(self._measure(regs)):
            values[quantities[i]] = m

    def decode_pdu_into(self, pdu: bytes, values: dict[Quantity, Measurement]) -> None:
        """:meth:`decode_into` for the registers as a register read's reply carries them
        (the PDU: function code, byte count, then the registers big-endian), with no
        list of integers made and packed again."""
        quantities = self._quantities
        for i, m in enumerate(self._measure_data(pdu, 2, (len(pdu) - 2) // 2)):
            values[quantities[i]] = m

    def _measure(self, regs: Sequence[int]) -> list[Measurement]:
        n = len(regs)
        pack = self._packs.get(n)
        if pack is None:
            pack = self._packs[n] = struct.Struct(f">{n}H")
        try:
            data = pack.pack(*regs)
        except struct.error:  # values outside 0..65535: as sent, 16 bits each
            data = pack.pack(*[w & 0xFFFF for w in regs])
        return self._measure_data(data, 0, n)

    def _measure_data(self, data: bytes, start: int, n: int) -> list[Measurement]:
        """The measurements of the ``n`` registers in ``data`` from byte ``start``."""
        if self._end < 0 or n < self._end:
            for field, off, count, *_ in self._steps:
                if off < 0 or off + count > n:
                    raise ValueError(f"field {field.quantity.value} at {field.address:#06x} outside block")
        out: list[Measurement] = []
        little = self._little
        last = self._last
        seen = self._seen
        i = -1
        for field, off, count, words, raw, factor, resolution, is_float, places in self._steps:
            i += 1
            if little and count > 1:
                value = raw.unpack(words.pack(*reversed(words.unpack_from(data, start + 2 * off))))[0]
            else:
                value = raw.unpack_from(data, start + 2 * off)[0]
            if value == last[i]:
                out.append(seen[i])  # type: ignore[arg-type]
                continue
            if is_float and not math.isfinite(value):
                m = _scale(value, field.factor, resolution)
            elif places is not None:
                fmt, shift = places
                q = Decimal(format(value, fmt))
                if shift is not None:
                    q = q.scaleb(shift, _CTX)
                m = new_measurement(abs(q) if q.is_zero() else q)
            else:
                exact = Decimal(value)  # exact for int and for every binary float
                try:
                    q = (exact if factor is None else _CTX.multiply(exact, factor)).quantize(resolution, context=_CTX)
                except InvalidOperation:  # magnitude beyond any meter's range
                    m = Measurement(Decimal("NaN"), Quality.INVALID)
                else:
                    m = new_measurement(abs(q) if q.is_zero() else q)
            last[i] = value
            seen[i] = m
            out.append(m)
        return out

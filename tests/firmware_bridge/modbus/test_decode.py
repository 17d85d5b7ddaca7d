from __future__ import annotations

import itertools
import math
import struct
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.modbus.decode import (
    BlockDecoder,
    decode_field,
    encode_value,
    has_gaps,
    plan_reads,
    raw_to_registers,
    registers_to_raw,
    scale_raw,
    split_block,
)
from firmware_bridge.modbus.profiles import BUILTIN_PROFILES, DataType, Field, WordOrder
from firmware_bridge.reading import Measurement, Quality, Quantity


def energy_field(address: int = 0x48) -> Field:
    f = BUILTIN_PROFILES["sdm120"].field(Quantity.ENERGY_IMPORT)
    assert f is not None
    return Field(f.quantity, address, f.dtype, f.scale, f.unit, f.resolution)


def test_float32_energy_has_no_binary_noise() -> None:
    regs = raw_to_registers(1206.42, DataType.FLOAT32, WordOrder.BIG)
    assert regs == [0x4496, 0xCD71]  # IEEE-754 of 1206.42f, high word first
    m = decode_field(regs, 0x48, energy_field(), WordOrder.BIG)
    assert m.value == Decimal("1206.42") and str(m.value) == "1206.42"
    assert m.quality is Quality.GOOD


def test_power_in_watts_becomes_kw() -> None:
    f = BUILTIN_PROFILES["sdm120"].field(Quantity.POWER)
    assert f is not None
    regs = raw_to_registers(1234.5, DataType.FLOAT32, WordOrder.BIG)
    assert decode_field(regs, f.address, f, WordOrder.BIG).value == Decimal("1.2345")


def test_little_word_order() -> None:
    big = raw_to_registers(230.1, DataType.FLOAT32, WordOrder.BIG)
    little = raw_to_registers(230.1, DataType.FLOAT32, WordOrder.LITTLE)
    assert little == list(reversed(big))
    assert registers_to_raw(little, DataType.FLOAT32, WordOrder.LITTLE) == pytest.approx(230.1, abs=1e-4)


@pytest.mark.parametrize("raw", [math.nan, math.inf, -math.inf])
def test_non_finite_is_invalid(raw: float) -> None:
    regs = raw_to_registers(raw, DataType.FLOAT32, WordOrder.BIG)
    m = decode_field(regs, 0x48, energy_field(), WordOrder.BIG)
    assert m.quality is Quality.INVALID
    assert not m.value.is_finite()


def test_integer_types_and_scale() -> None:
    f = Field(Quantity.ENERGY_IMPORT, 10, DataType.UINT32, Decimal("0.01"), "kWh", Decimal("0.01"))
    regs = raw_to_registers(120642, DataType.UINT32, WordOrder.BIG)
    assert decode_field(regs, 10, f, WordOrder.BIG).value == Decimal("1206.42")
    g = Field(Quantity.POWER, 0, DataType.INT16, Decimal(1), "W", Decimal("0.0001"))
    assert decode_field([0xFFFF], 0, g, WordOrder.BIG).value == Decimal("-0.0010")
    h = Field(Quantity.POWER, 0, DataType.UINT16, Decimal(1), "W", Decimal("0.0001"))
    assert decode_field([0xFFFF], 0, h, WordOrder.BIG).value == Decimal("65.5350")


def test_negative_zero_is_normalised() -> None:
    f = Field(Quantity.POWER, 0, DataType.FLOAT32, Decimal(1), "W", Decimal("0.0001"))
    assert str(scale_raw(-0.00001, f).value) == "0.0000"


@given(st.decimals(min_value=0, max_value=99999, places=2))
def test_energy_roundtrip_exact_below_float32_precision(value: Decimal) -> None:
    # below 131072 kWh the float32 step is under 0.01 kWh: two-decimal values survive exactly
    f = energy_field(0)
    regs = encode_value(value, f, WordOrder.BIG)
    assert decode_field(regs, 0, f, WordOrder.BIG).value == value


@given(st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-1e9, max_value=1e9))
def test_decoded_value_is_nearest_quantum_of_the_float32(x: float) -> None:
    f = energy_field(0)
    regs = raw_to_registers(x, DataType.FLOAT32, WordOrder.BIG)
    m = decode_field(regs, 0, f, WordOrder.BIG)
    exact = Decimal(struct.unpack(">f", struct.pack(">f", x))[0])
    assert abs(m.value - exact) <= Decimal("0.005")
    assert m.value.as_tuple().exponent == -2


fields_st = st.lists(
    st.tuples(st.integers(0, 300), st.sampled_from([DataType.FLOAT32, DataType.UINT16])),
    min_size=1,
    max_size=20,
)


def _mk(spec: list[tuple[int, DataType]]) -> list[Field]:
    out: list[Field] = []
    taken: set[int] = set()
    for i, (addr, dt) in enumerate(spec):
        regs = set(range(addr, addr + dt.registers))
        if regs & taken:
            continue
        taken |= regs
        q = list(Quantity)[i % len(Quantity)]
        out.append(Field(q, addr, dt))
    return out


@given(fields_st, st.integers(0, 20), st.integers(2, 125))
def test_plan_reads_covers_every_field_once(spec: list[tuple[int, DataType]], gap: int, max_count: int) -> None:
    fields = _mk(spec)
    blocks = plan_reads(fields, gap, max_count)
    covered = [f for b in blocks for f in b.fields]
    assert sorted(covered, key=lambda f: f.address) == sorted(fields, key=lambda f: f.address)
    for b in blocks:
        assert 1 <= b.count <= max_count
        for f in b.fields:
            assert b.address <= f.address and f.end <= b.end
    for a, b in itertools.pairwise(blocks):
        assert a.end <= b.address
        # blocks were split for a reason: gap too large or the merge would be too long
        assert b.fields[0].address - a.end > gap or max(a.end, b.fields[0].end) - a.address > max_count


def test_sdm120_plan_is_two_requests() -> None:
    p = BUILTIN_PROFILES["sdm120"]
    blocks = plan_reads(p.fields, p.max_gap, p.max_count)
    assert [(b.address, b.count) for b in blocks] == [(0x00, 14), (0x46, 6)]


def test_plan_gap_zero_splits_non_adjacent() -> None:
    fields = [Field(Quantity.VOLTAGE, 0), Field(Quantity.CURRENT, 2), Field(Quantity.POWER, 5)]
    assert [(b.address, b.count) for b in plan_reads(fields, 0, 125)] == [(0, 4), (5, 2)]


@given(fields_st, st.integers(0, 20), st.integers(2, 125))
def test_split_block_removes_gaps_keeps_fields(spec: list[tuple[int, DataType]], gap: int, max_count: int) -> None:
    for block in plan_reads(_mk(spec), gap, max_count):
        parts = split_block(block)
        assert [f for p in parts for f in p.fields] == list(block.fields)
        assert not any(has_gaps(p) for p in parts)
        assert all(block.address <= p.address and p.end <= block.end for p in parts)
        assert (len(parts) == 1) == (not has_gaps(block))


@given(
    fields_st,
    st.sampled_from([Decimal(1), Decimal("0.1"), Decimal("0.001"), Decimal(10)]),
    st.sampled_from([Decimal("0.01"), Decimal("0.0001"), Decimal(1)]),
    st.sampled_from(list(WordOrder)),
    st.data(),
)
def test_block_decoder_gives_what_decode_field_gives(
    spec: list[tuple[int, DataType]], scale: Decimal, resolution: Decimal, order: WordOrder, data: st.DataObject
) -> None:
    units = [
        (Quantity.VOLTAGE, "V"),
        (Quantity.POWER, "W"),
        (Quantity.ENERGY_IMPORT, "Wh"),
        (Quantity.POWER_FACTOR, ""),
        (Quantity.FREQUENCY, "Hz"),
        (Quantity.CURRENT, "mA"),
    ]
    fields = [
        Field(units[i % len(units)][0], f.address, f.dtype, scale, units[i % len(units)][1], resolution)
        for i, f in enumerate(_mk(spec))
    ]
    for block in plan_reads(fields, 4, 125):
        # register values as sent, NaN and infinity patterns among them
        word = st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0x7FC0, 0x7F80, 0xFF80, 0x8000, 0]))
        regs = data.draw(st.lists(word, min_size=block.count, max_size=block.count))
        want = [(f, decode_field(regs, block.address, f, order)) for f in block.fields]
        got = BlockDecoder(block, order).decode(regs)
        assert [(f, m.quality, str(m.value)) for f, m in got] == [(f, m.quality, str(m.value)) for f, m in want]
        with pytest.raises(ValueError, match="outside block"):
            BlockDecoder(block, order).decode(regs[:-1])


@pytest.mark.parametrize(
    "value, resolution, want",
    [
        (0.125, "0.01", "0.12"),  # exact ties round half-even, as quantising the exact value does
        (0.375, "0.01", "0.38"),
        (2.5, "1", "2"),
        (-0.001, "0.01", "0.00"),
        (1206.42, "0.01", "1206.42"),
        (3.0e38, "0.01", "300000000549775575777803994281145270272.00"),
    ],
)
def test_block_decoder_rounds_floats_as_decode_field(value: float, resolution: str, want: str) -> None:
    f = Field(Quantity.VOLTAGE, 0, DataType.FLOAT32, Decimal(1), "V", Decimal(resolution))
    block = plan_reads([f], 0, 125)[0]
    regs = raw_to_registers(value, DataType.FLOAT32, WordOrder.BIG)
    ((_, m),) = BlockDecoder(block, WordOrder.BIG).decode(regs)
    assert str(m.value) == want == str(decode_field(regs, 0, f, WordOrder.BIG).value)


@given(
    st.sampled_from([Decimal(1), Decimal("0.1"), Decimal("0.001"), Decimal(10), Decimal(-1)]),
    st.sampled_from([Decimal("0.01"), Decimal("0.0001"), Decimal(1), Decimal("0.1")]),
    st.sampled_from(list(DataType)),
    st.sampled_from(list(WordOrder)),
    st.lists(
        st.one_of(
            st.integers(0, 0xFFFF), st.sampled_from([0x7FC0, 0x7F80, 0xFF80, 0x8000, 0, 0x4496, 0xCD71])
        ),
        min_size=2,
        max_size=40,
    ),
)
def test_one_block_decoder_decoding_poll_after_poll_gives_what_decode_field_gives(
    scale: Decimal, resolution: Decimal, dtype: DataType, order: WordOrder, words: list[int]
) -> None:
    """The same decoder, poll after poll (values repeating, changing, coming back), as
    decode_field on each; decode_into fills a mapping with the same measurements."""
    fields = [
        Field(Quantity.POWER, 0, dtype, scale, "W", resolution),
        Field(Quantity.ENERGY_IMPORT, dtype.registers, dtype, scale, "kWh", resolution),
    ]
    (block,) = plan_reads(fields, 0, 125)
    decoder = BlockDecoder(block, order)
    polls = [words[i : i + block.count] for i in range(0, len(words) - block.count + 1, max(1, block.count // 2))]
    for regs in polls + polls[::-1]:
        want = [(f, decode_field(regs, block.address, f, order)) for f in block.fields]
        got = decoder.decode(regs)
        assert [(f, m.quality, str(m.value)) for f, m in got] == [(f, m.quality, str(m.value)) for f, m in want]
        values: dict[Quantity, Measurement] = {}
        decoder.decode_into(regs, values)
        assert {q: (m.quality, str(m.value)) for q, m in values.items()} == {
            f.quantity: (m.quality, str(m.value)) for f, m in got
        }


@pytest.mark.parametrize(
    "value, unit, resolution, want",
    [
        (1178.5999755859375, "W", "0.0001", "1.1786"),  # W -> kW: formatted to 1 place, shifted by 3
        (0.05, "W", "0.0001", "0.0001"),  # float32 0.05 is a little above 0.05: rounds up
        (-0.04, "W", "0.0001", "0.0000"),  # no "-0.0000"
        (2.5, "W", "0.001", "0.002"),  # exactly 0.0025 kW: ties round half-even
        (1.5, "W", "0.001", "0.002"),
        (3.0e38, "W", "0.0001", "300000000549775575777803994281145270.2720"),
        (123.456, "W", "0.1", "0.1"),  # fewer places than the shift: multiplied and quantised
    ],
)
def test_block_decoder_scales_by_powers_of_ten_as_decode_field(value: float, unit: str, resolution: str, want: str) -> None:
    f = Field(Quantity.POWER, 0, DataType.FLOAT32, Decimal(1), unit, Decimal(resolution))
    block = plan_reads([f], 0, 125)[0]
    regs = raw_to_registers(value, DataType.FLOAT32, WordOrder.BIG)
    ((_, m),) = BlockDecoder(block, WordOrder.BIG).decode(regs)
    assert str(m.value) == want == str(decode_field(regs, 0, f, WordOrder.BIG).value)

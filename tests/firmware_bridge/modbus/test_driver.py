"""ModbusDriver against the real pymodbus-based simulator over TCP on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from firmware_bridge.driver import MeterRefused, MeterTimeout, TransportError
from firmware_bridge.modbus.driver import ModbusDriver
from firmware_bridge.modbus.profiles import BUILTIN_PROFILES
from firmware_bridge.modbus.transport import ModbusTransport
from firmware_bridge.reading import Quality, Quantity
from testbed.simulators.modbus import ModbusSimulator

SDM120 = BUILTIN_PROFILES["sdm120"]


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSimulator]:
    async with ModbusSimulator([1, 2, 3], load_kw="1.5") as s:
        yield s


@pytest.fixture
async def transport(sim: ModbusSimulator) -> AsyncIterator[ModbusTransport]:
    t = ModbusTransport.tcp("127.0.0.1", sim.port, name="test", timeout_s=0.25)
    yield t
    t.close()


async def test_read_sdm120(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    d = ModbusDriver("m1", 1, SDM120, transport)
    r = await d.read(1_700_000_000_000)
    assert r.meter_id == "m1" and r.time_ms == 1_700_000_000_000
    assert r.get(Quantity.VOLTAGE) == Decimal("230.4")
    assert r.get(Quantity.POWER) == Decimal("1.5000")
    assert r.get(Quantity.FREQUENCY) == Decimal("50.00")
    e = r.get(Quantity.ENERGY_IMPORT)
    assert e is not None and Decimal("1206.42") <= e < Decimal("1206.50")
    assert all(m.quality is Quality.GOOD for m in r.values.values())
    assert transport.requests == 2  # coalesced: two requests for six quantities
    assert r.meta["profile"] == "sdm120"


async def test_energy_rises_and_values_settable(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    d = ModbusDriver("m2", 2, SDM120, transport)
    m = sim.meter(2)
    m.load_kw = Decimal(36000)  # 10 kWh per second
    first = (await d.read(0)).get(Quantity.ENERGY_IMPORT)
    await asyncio.sleep(0.1)
    second = (await d.read(0)).get(Quantity.ENERGY_IMPORT)
    assert first is not None and second is not None and second > first
    m.values[Quantity.VOLTAGE] = Decimal("199.9")
    assert (await d.read(0)).get(Quantity.VOLTAGE) == Decimal("199.9")


async def test_nan_is_invalid(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    sim.meter(1).values[Quantity.VOLTAGE] = Decimal("NaN")
    r = await ModbusDriver("m1", 1, SDM120, transport).read(0)
    assert r.values[Quantity.VOLTAGE].quality is Quality.INVALID
    assert r.good(Quantity.VOLTAGE) is None
    assert r.good(Quantity.ENERGY_IMPORT) is not None


async def test_dead_unit_times_out_others_unaffected(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    sim.meter(2).dead = True
    with pytest.raises(MeterTimeout):
        await ModbusDriver("m2", 2, SDM120, transport).read(0)
    with pytest.raises(MeterTimeout):
        await ModbusDriver("m9", 9, SDM120, transport).read(0)  # no such unit
    r = await ModbusDriver("m1", 1, SDM120, transport).read(0)
    assert r.get(Quantity.VOLTAGE) == Decimal("230.4")


async def test_exception_reply_is_refused(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    sim.meter(3).refuse = 2
    with pytest.raises(MeterRefused, match="illegal data address"):
        await ModbusDriver("m3", 3, SDM120, transport).read(0)


async def test_wrong_profile_address_is_refused(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    # an SDM120 asked with the DDSU666 map answers "illegal data address"
    with pytest.raises(MeterRefused):
        await ModbusDriver("m1", 1, BUILTIN_PROFILES["ddsu666"], transport).read(0)


async def test_connection_refused_is_transport_error() -> None:
    async with ModbusSimulator([1]) as s:
        port = s.port
    t = ModbusTransport.tcp("127.0.0.1", port, name="gone", timeout_s=0.25)
    try:
        with pytest.raises(TransportError):
            await ModbusDriver("m1", 1, SDM120, t).read(0)
        # a second attempt right away does not hammer the port: fails fast
        with pytest.raises(TransportError, match="retrying"):
            await ModbusDriver("m1", 1, SDM120, t).read(0)
    finally:
        t.close()


@pytest.mark.parametrize("name", ["sdm630", "ddsu666", "dtsu666"])
async def test_every_builtin_profile_reads_from_simulator(name: str) -> None:
    profile = BUILTIN_PROFILES[name]
    async with ModbusSimulator([5], profile=profile, load_kw="2.0") as s:
        t = ModbusTransport.tcp("127.0.0.1", s.port, name="p", timeout_s=0.25)
        try:
            r = await ModbusDriver("m", 5, profile, t).read(0)
        finally:
            t.close()
    assert r.get(Quantity.VOLTAGE) == Decimal("230.4")
    assert r.get(Quantity.POWER) == Decimal("2.0000")
    assert r.get(Quantity.ENERGY_IMPORT) is not None


async def test_server_restart_is_transport_error_then_recovers() -> None:
    meters = None
    async with ModbusSimulator([1]) as s:
        port = s.port
        meters = s.meters
        t = ModbusTransport.tcp("127.0.0.1", port, name="restart", timeout_s=0.25)
        t.reconnect_min_s = 0.0  # re-dial immediately for the test
        d = ModbusDriver("m1", 1, SDM120, t)
        await d.read(0)
    try:
        with pytest.raises((TransportError, MeterTimeout)):
            await d.read(0)
        with pytest.raises(TransportError):
            await d.read(0)
        async with ModbusSimulator(meters=meters, port=port):
            r = await d.read(0)
            assert r.get(Quantity.VOLTAGE) == Decimal("230.4")
    finally:
        t.close()


async def test_rtu_over_tcp() -> None:
    async with ModbusSimulator([3], rtu_over_tcp=True) as s:
        t = ModbusTransport.tcp("127.0.0.1", s.port, name="conv", timeout_s=0.25, rtu_over_tcp=True, baud=2400)
        try:
            assert t.silent_interval_s == pytest.approx(3.5 * 11 / 2400)
            r = await ModbusDriver("m3", 3, SDM120, t).read(0)
            assert r.get(Quantity.VOLTAGE) == Decimal("230.4")
            with pytest.raises(MeterTimeout):
                await ModbusDriver("m4", 4, SDM120, t).read(0)
        finally:
            t.close()


async def test_dead_meter_does_not_flood_the_log(
    sim: ModbusSimulator, transport: ModbusTransport, caplog: pytest.LogCaptureFixture
) -> None:
    sim.meter(2).dead = True
    with caplog.at_level("WARNING"), pytest.raises(MeterTimeout):
        await ModbusDriver("m2", 2, SDM120, transport).read(0)
    assert not [r for r in caplog.records if r.name.startswith("pymodbus")]


async def test_meter_refusing_gaps_gets_split_requests() -> None:
    profile = BUILTIN_PROFILES["ddsu666"]
    async with ModbusSimulator([9], profile=profile) as s:
        s.meter(9).strict_map = True
        t = ModbusTransport.tcp("127.0.0.1", s.port, name="strict", timeout_s=0.25)
        try:
            d = ModbusDriver("m9", 9, profile, t)
            coalesced = len(d.blocks)
            r = await d.read(0)
            assert r.get(Quantity.FREQUENCY) == Decimal("50.00")
            assert r.get(Quantity.ENERGY_EXPORT) == Decimal("0.00")
            assert d.splits >= 1 and len(d.blocks) > coalesced
            requests = t.requests
            await d.read(0)  # the finer plan is kept: no refused request any more
            assert t.requests - requests == len(d.blocks)
        finally:
            t.close()

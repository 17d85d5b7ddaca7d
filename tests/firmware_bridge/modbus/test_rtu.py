"""Modbus RTU through pymodbus' serial client against the RTU simulator on a pseudo-terminal."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from firmware_bridge.bus import open_bus
from firmware_bridge.driver import MeterFrameError, MeterTimeout
from firmware_bridge.modbus.driver import ModbusDriver
from firmware_bridge.modbus.profiles import BUILTIN_PROFILES
from firmware_bridge.modbus.transport import ModbusTransport
from firmware_bridge.reading import Quantity
from firmware_bridge.relay import RelayPolicy, controller_for
from firmware_bridge.scheduler import BackoffPolicy, modbus_rtu_read_time_s
from firmware_bridge.settings import BusSettings, MeterSettings, RelaySettings
from testbed.simulators.modbus import RtuSimulator, WireFault, corrupt
from tests.harness.loops import BOTH_LOOPS

SDM120 = BUILTIN_PROFILES["sdm120"]


@pytest.fixture
async def sim() -> AsyncIterator[RtuSimulator]:
    async with RtuSimulator([1, 2, 3]) as s:
        yield s


@pytest.fixture
async def transport(sim: RtuSimulator) -> AsyncIterator[ModbusTransport]:
    # parity N: some pseudo-terminal implementations reject PARENB (EINVAL); see test_serial_settings
    t = ModbusTransport.serial(sim.path, name="rs485", baud=9600, parity="N", stop_bits=1, timeout_s=0.2)
    yield t
    t.close()


async def test_serial_settings_reach_the_client() -> None:
    t = ModbusTransport.serial("/dev/ttyUSB9", name="x", baud=2400, parity="E", stop_bits=2, timeout_s=1.5)
    p = t.client.comm_params
    assert (p.baudrate, p.parity, p.stopbits, p.bytesize) == (2400, "E", 2, 8)
    assert t.silent_interval_s == pytest.approx(3.5 * 12 / 2400)  # 8E2: 12 bits a character
    assert t.timeout_s == 1.5


@BOTH_LOOPS
async def test_rtu_read(sim: RtuSimulator, transport: ModbusTransport) -> None:
    r = await ModbusDriver("m1", 1, SDM120, transport).read(0)
    assert r.get(Quantity.VOLTAGE) == Decimal("230.4")
    assert r.get(Quantity.ENERGY_IMPORT) is not None
    assert sim.requests == 2 and sim.replies == 2


@BOTH_LOOPS
@pytest.mark.parametrize("fault", list(WireFault))
async def test_wire_faults_are_frame_errors_and_bus_recovers(
    sim: RtuSimulator, transport: ModbusTransport, fault: WireFault
) -> None:
    d = ModbusDriver("m2", 2, SDM120, transport)
    sim.meter(2).wire_fault = fault
    with pytest.raises(MeterFrameError, match="no valid frame"):
        await d.read(0)
    sim.meter(2).wire_fault = None
    assert (await d.read(0)).get(Quantity.VOLTAGE) == Decimal("230.4")
    # the neighbour on the same line never noticed
    assert (await ModbusDriver("m1", 1, SDM120, transport).read(0)).get(Quantity.VOLTAGE) is not None


@BOTH_LOOPS
async def test_dead_and_slow_units_time_out(sim: RtuSimulator, transport: ModbusTransport) -> None:
    sim.meter(3).dead = True
    with pytest.raises(MeterTimeout):
        await ModbusDriver("m3", 3, SDM120, transport).read(0)
    sim.meter(3).dead = False
    sim.meter(3).delay_s = 0.3  # slower than the 0.2 s timeout
    with pytest.raises(MeterTimeout):
        await ModbusDriver("m3", 3, SDM120, transport).read(0)
    await asyncio.sleep(0.4)  # the late answer lands and is discarded (no request waits for it)
    # a per-meter timeout long enough for the slow meter
    r = await ModbusDriver("m3s", 3, SDM120, transport, timeout_s=1.0).read(0)
    assert r.get(Quantity.VOLTAGE) == Decimal("230.4")


@BOTH_LOOPS
async def test_late_answer_is_never_taken_for_another_request(sim: RtuSimulator, transport: ModbusTransport) -> None:
    sim.meter(3).delay_s = 0.3
    with pytest.raises(MeterTimeout):
        await transport.read_registers("m3", 3, 4, 0x00, 14)
    # the 14-register answer arrives while we wait for a 6-register one: rejected, not decoded
    with pytest.raises(MeterFrameError, match="answered 14 registers"):
        await transport.read_registers("m3", 3, 4, 0x46, 6, timeout_s=1.0)


async def test_energy_going_backwards_is_reported_as_read(sim: RtuSimulator, transport: ModbusTransport) -> None:
    d = ModbusDriver("m1", 1, SDM120, transport)
    before = (await d.read(0)).get(Quantity.ENERGY_IMPORT)
    sim.meter(1).energy_step_kwh = Decimal("-100")
    after = (await d.read(0)).get(Quantity.ENERGY_IMPORT)
    assert before is not None and after is not None and after < before - 99
    # the driver reports what the meter said; plausibility is the rating layer's job


def test_corrupt_is_deterministic() -> None:
    import random

    frame = bytes(range(1, 10))
    assert corrupt(frame, None, random.Random(0)) == frame
    assert corrupt(frame, WireFault.BAD_CRC, random.Random(0))[:-1] == frame[:-1]
    assert len(corrupt(frame, WireFault.PARTIAL, random.Random(0))) == 4
    assert corrupt(frame, WireFault.GARBAGE, random.Random(1)) == corrupt(frame, WireFault.GARBAGE, random.Random(1))


async def test_wire_timing_matches_the_arithmetic() -> None:
    async with RtuSimulator([1], baud=9600, wire_timing=True) as sim:
        t = ModbusTransport.serial(sim.path, name="rs485", baud=9600, parity="N", stop_bits=1, timeout_s=0.5)
        try:
            d = ModbusDriver("m1", 1, SDM120, t)
            await d.read(0)
            t0 = time.monotonic()
            for _ in range(3):
                await d.read(0)
            per_read = (time.monotonic() - t0) / 3
        finally:
            t.close()
    floor = sum(modbus_rtu_read_time_s(9600, b.count) for b in d.blocks) - 2 * 0.004  # one t3.5 per block is ours
    assert floor * 0.9 <= per_read <= floor + 0.15


@BOTH_LOOPS
async def test_rtu_bus_scheduler_and_relay(sim: RtuSimulator) -> None:
    bus = BusSettings(name="rs485-1", type="serial", device=sim.path, baud=9600, parity="N", timeout_s=0.2, retries=1)
    meters = [
        MeterSettings(id=f"m{u}", bus="rs485-1", protocol="modbus", profile="sdm120", unit_id=u,
                     relay=RelaySettings(kind="coil", address=0, min_interval_s=0))
        for u in (1, 2, 3)
    ]
    sim.meter(2).dead = True
    sim.meter(3).relay_stuck = True
    policy = BackoffPolicy(base_ms=1000, max_ms=4000, quarantine_after=3, reprobe_ms=60_000)
    async with open_bus(bus, meters, policy=policy) as sched:
        assert sched.silent_interval_s == pytest.approx(3.5 * 10 / 9600)  # 8N1: 10 bits a character
        res = await sched.run_cycle(0)
        assert [r.meter_id for r in res.readings] == ["m1", "m3"]
        assert res.health["m2"].last_error is not None and res.health["m2"].last_error.kind == "timeout"
        relays = controller_for(sched, policy=RelayPolicy(min_interval_s=0, settle_s=0.01, max_drives=2, redrive_delays_s=(0.01,)))
        ok = await relays.set_open("m1", True)
        stuck = await relays.set_open("m3", True)
        assert ok.ok and sim.meter(1).relay_open
        assert stuck.alarm and not sim.meter(3).relay_open
        r = await sched.read_meter("m1", 10, force=True)
        assert r is not None and r.get(Quantity.POWER) == Decimal("0.0000")

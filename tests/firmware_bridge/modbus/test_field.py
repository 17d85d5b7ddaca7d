"""Modbus meters that behave like the field: slow answers, partial failures,
another unit answering, slow starts after power returns."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from firmware_bridge.bus import open_bus
from firmware_bridge.driver import MeterTimeout, MeterWrongAddress
from firmware_bridge.reading import Quantity
from firmware_bridge.settings import BusSettings, MeterSettings
from testbed.simulators.modbus import ModbusSimulator, RtuSimulator


def meter(unit: int, bus: str = "b", **kw: object) -> MeterSettings:
    return MeterSettings(id=f"m{unit}", bus=bus, protocol="modbus", profile="sdm120", unit_id=unit, **kw)  # type: ignore[arg-type]


async def test_energy_is_read_first_and_kept_when_a_later_request_fails() -> None:
    async with ModbusSimulator([1]) as sim:
        sim.meter(1).unanswered = {0x0000}  # voltage, current, power never answered
        bus = BusSettings("b", "tcp", host="127.0.0.1", port=sim.port, response_time_s=0.1)
        async with open_bus(bus, [meter(1)]) as sched:
            assert [b.address for b in sched.drivers["m1"].blocks] == [0x0046, 0x0000]  # type: ignore[attr-defined]
            r = await sched.read_meter("m1", 0)
    assert r is not None and r.get(Quantity.ENERGY_IMPORT) == Decimal("1206.42")
    assert r.meta["incomplete"].startswith("timeout: unit 1 FC04 0x0000+14: no answer within")
    assert r.meta["missing"] == "voltage_v,current_a,power_kw"
    assert sched.health["m1"].online


async def test_first_request_failing_is_a_failed_read() -> None:
    async with ModbusSimulator([1]) as sim:
        sim.meter(1).unanswered = {0x0046}
        bus = BusSettings("b", "tcp", host="127.0.0.1", port=sim.port, response_time_s=0.1, retries=0)
        async with open_bus(bus, [meter(1)]) as sched:
            assert await sched.read_meter("m1", 0) is None
        err = sched.health["m1"].last_error
        assert err is not None and err.kind == "timeout"


async def test_per_meter_response_time_reads_a_slow_meter_on_a_fast_bus() -> None:
    async with RtuSimulator([1, 2], wire_timing=True, baud=9600) as sim:
        sim.meter(2).delay_s = 0.3  # its manual: answers within 0.4 s
        bus = BusSettings("b", "serial", device=sim.path, baud=9600, parity="N", response_time_s=0.1, retries=0)
        async with open_bus(bus, [meter(1), meter(2)]) as sched:
            assert await sched.read_meter("m2", 0) is None  # read with the bus's 0.1 s
            err = sched.health["m2"].last_error
            assert err is not None and err.kind == "timeout"
        # its late answer must not be taken for the next question (RTU answers carry no
        # request id: that is why the response time must be right)
        await asyncio.sleep(0.5)
        async with open_bus(bus, [meter(1), meter(2, response_time_s=0.4)]) as sched:
            r = await sched.read_meter("m2", 0)
            assert r is not None and r.get(Quantity.VOLTAGE) == Decimal("230.4")
            assert "incomplete" not in r.meta


async def test_a_reply_from_another_unit_is_named_and_not_retried() -> None:
    async with RtuSimulator([1]) as sim:
        sim.meter(1).reply_unit = 9
        bus = BusSettings("b", "serial", device=sim.path, baud=9600, parity="N", response_time_s=0.1, retries=2)
        async with open_bus(bus, [meter(1)]) as sched:
            with pytest.raises(MeterWrongAddress, match="reply from unit 9, expected unit 1"):
                await sched.drivers["m1"].read(0)
            before = sim.requests
            assert await sched.read_meter("m1", 0) is None
            assert sim.requests - before == 1  # deterministic: not retried
            err = sched.health["m1"].last_error
            assert err is not None and err.kind == "address"


async def test_slow_start_after_power_returns() -> None:
    now = [1000.0]
    async with ModbusSimulator([1], clock=lambda: now[0]) as sim:
        bus = BusSettings("b", "tcp", host="127.0.0.1", port=sim.port, response_time_s=0.1)
        async with open_bus(bus, [meter(1)]) as sched:
            d = sched.drivers["m1"]
            sim.meter(1).power_off(now[0])
            with pytest.raises(MeterTimeout):
                await d.read(0)
            sim.meter(1).power_on(now[0], boot_s=5.0)
            with pytest.raises(MeterTimeout):
                await d.read(0)
            now[0] += 6.0
            assert (await d.read(0)).get(Quantity.ENERGY_IMPORT) == Decimal("1206.42")

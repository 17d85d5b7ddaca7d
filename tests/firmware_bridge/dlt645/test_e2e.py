"""Driver against the simulator, over a real pseudo-terminal and over TCP."""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal

import pytest

from firmware_bridge.dlt645 import ControlCommand, Dlt645Driver, broadcast_time, discover, probe
from firmware_bridge.driver import (
    MeterError,
    MeterFrameError,
    MeterRefused,
    MeterTimeout,
)
from firmware_bridge.reading import Quantity as Q
from tests.harness.loops import BOTH_LOOPS

from .conftest import PASSWORD, T0, Bus

A1, A2, A3 = "000000000001", "000000000002", "000000000003"
LATER = T0 + dt.timedelta(minutes=5)


def driver(bus: Bus, address: str = A1, **kw: object) -> Dlt645Driver:
    return Dlt645Driver(f"m-{address[-1]}", address, bus.transport, password=PASSWORD, **kw)  # type: ignore[arg-type]


@BOTH_LOOPS
async def test_reads_every_quantity(bus: Bus) -> None:
    m = bus.sim.meter(A1)
    r = await driver(bus).read(now_ms=1234)
    assert r.meter_id == "m-1" and r.time_ms == 1234
    # make_meters: registers 100, 101, 102, 103 kWh; load 0.5 kW at 230.0 V, PF 0.950
    assert r.get(Q.ENERGY_IMPORT) == Decimal("406.00")
    assert [r.get(q) for q in (Q.ENERGY_IMPORT_T1, Q.ENERGY_IMPORT_T2, Q.ENERGY_IMPORT_T3)] == [
        Decimal("100.00"),
        Decimal("101.00"),
        Decimal("102.00"),
    ]
    assert r.get(Q.ENERGY_IMPORT_T4) == Decimal("103.00")
    assert r.get(Q.VOLTAGE) == Decimal("230.0")
    assert r.get(Q.CURRENT) == Decimal("2.288")  # 500 W / (230 V * 0.95)
    assert r.get(Q.POWER) == Decimal("0.5000")
    assert r.get(Q.POWER_FACTOR) == Decimal("0.950")
    assert r.get(Q.FREQUENCY) == Decimal("50.00")
    assert r.get(Q.RELAY_OPEN) == 0
    assert r.get(Q.METER_CLOCK) == int(T0.timestamp())
    assert r.meta == {"protocol": "dlt645", "address": A1}
    assert m.relay_open is False


async def test_three_meters_on_one_bus(bus: Bus) -> None:
    totals = [(await driver(bus, a).read(0)).get(Q.ENERGY_IMPORT) for a in (A1, A2, A3)]
    assert totals == [Decimal("406.00"), Decimal("806.00"), Decimal("1206.00")]


async def test_energy_rises_on_the_rate_of_the_meter_clock(bus: Bus) -> None:
    d = driver(bus, A2)  # 0.75 kW
    before = await d.read(0)
    bus.clock.advance(3600)  # one hour at 10:00..11:00: rate 2 (peak)
    after = await d.read(0)
    delta = {q: after.get(q) - before.get(q) for q in (Q.ENERGY_IMPORT, Q.ENERGY_IMPORT_T2)}  # type: ignore[operator]
    assert delta == {Q.ENERGY_IMPORT: Decimal("0.75"), Q.ENERGY_IMPORT_T2: Decimal("0.75")}
    assert after.get(Q.ENERGY_IMPORT_T1) == before.get(Q.ENERGY_IMPORT_T1)
    assert after.get(Q.METER_CLOCK) == before.get(Q.METER_CLOCK) + 3600  # type: ignore[operator]


@BOTH_LOOPS
async def test_trip_and_close_with_read_back(bus: Bus) -> None:
    d = driver(bus)
    await d.control(ControlCommand.TRIP, LATER)
    assert await d.read_relay_open() is True
    status = await d.read_status3()
    assert status.relay_command_open
    r = await d.read(0)
    assert r.get(Q.RELAY_OPEN) == 1 and r.get(Q.POWER) == 0
    await d.control(ControlCommand.CLOSE, LATER)
    assert await d.read_relay_open() is False
    # the other meters were not touched
    assert await driver(bus, A2).read_relay_open() is False


async def test_close_allowed_waits_for_the_customer(bus: Bus) -> None:
    d = driver(bus)
    await d.control(ControlCommand.TRIP, LATER)
    await d.control(ControlCommand.CLOSE_ALLOWED, LATER)
    assert await d.read_relay_open() is True
    assert not (await d.read_status3()).relay_command_open
    bus.sim.meter(A1).press_button()
    assert await d.read_relay_open() is False


async def test_alarm_and_protect(bus: Bus) -> None:
    d = driver(bus)
    await d.control(ControlCommand.ALARM, LATER)
    assert (await d.read_status3()).pre_trip_alarm
    await d.control(ControlCommand.ALARM_OFF, LATER)
    assert not (await d.read_status3()).pre_trip_alarm
    await d.control(ControlCommand.PROTECT, LATER)
    with pytest.raises(MeterRefused, match="other error"):
        await d.control(ControlCommand.TRIP, LATER)
    assert await d.read_relay_open() is False
    await d.control(ControlCommand.PROTECT_OFF, LATER)
    await d.control(ControlCommand.TRIP, LATER)
    assert await d.read_relay_open() is True


async def test_wrong_password_is_refused_and_nothing_moves(bus: Bus) -> None:
    d = Dlt645Driver("m-1", A1, bus.transport, password=bytes.fromhex("02123456"))
    with pytest.raises(MeterRefused, match="password error / unauthorised"):
        await d.control(ControlCommand.TRIP, LATER)
    assert await d.read_relay_open() is False


async def test_expired_deadline_is_refused(bus: Bus) -> None:
    with pytest.raises(MeterRefused):
        await driver(bus).control(ControlCommand.TRIP, T0 - dt.timedelta(seconds=1))
    assert bus.sim.meter(A1).relay_open is False


async def test_no_password_no_control(bus: Bus) -> None:
    d = Dlt645Driver("m-1", A1, bus.transport)
    with pytest.raises(MeterError, match="no control password"):
        await d.control(ControlCommand.TRIP, LATER)


async def test_stuck_relay_is_visible_in_the_read_back(bus: Bus) -> None:
    bus.sim.meter(A1).faults.relay_stuck = True
    d = driver(bus)
    await d.control(ControlCommand.TRIP, LATER)  # acknowledged...
    assert await d.read_relay_open() is False  # ...but the relay did not move
    assert (await d.read_status3()).relay_command_open


@BOTH_LOOPS
async def test_no_reply_is_a_timeout_and_other_meters_still_answer(bus: Bus) -> None:
    bus.sim.meter(A2).faults.no_reply = True
    with pytest.raises(MeterTimeout, match=r"no reply within 0\.3 s"):
        await driver(bus, A2).read(0)
    assert (await driver(bus, A3).read(0)).get(Q.ENERGY_IMPORT) == Decimal("1206.00")


async def test_bad_checksum_is_a_frame_error(bus: Bus) -> None:
    bus.sim.meter(A1).faults.bad_checksum = True
    with pytest.raises(MeterFrameError, match="checksum mismatch"):
        await driver(bus).read(0)
    assert bus.transport.stats.bad_frames >= 1
    bus.sim.meter(A1).faults.bad_checksum = False
    assert (await driver(bus).read(0)).get(Q.ENERGY_IMPORT) == Decimal("406.00")


@BOTH_LOOPS
async def test_garbage_before_the_reply_is_skipped(bus: Bus) -> None:
    bus.sim.meter(A1).faults.garbage_prefix = bytes.fromhex("00 FF 68 16 68 11 22 33 FE")
    assert (await driver(bus).read(0)).get(Q.ENERGY_IMPORT) == Decimal("406.00")
    assert bus.transport.stats.noise_bytes > 0


async def test_partial_reply_is_a_timeout(bus: Bus) -> None:
    bus.sim.meter(A1).faults.partial = True
    with pytest.raises(MeterTimeout, match=r"no complete reply .* bytes received"):
        await driver(bus).read(0)
    bus.sim.meter(A1).faults.partial = False
    assert (await driver(bus).read(0)).get(Q.VOLTAGE) == Decimal("230.0")


@BOTH_LOOPS
async def test_late_reply_is_not_taken_for_the_next_answer(bus: Bus) -> None:
    bus.sim.meter(A1).faults.slow_reply_s = 0.45  # timeout is 0.3 s
    d1 = driver(bus, A1, quantities=[Q.ENERGY_IMPORT])
    with pytest.raises(MeterTimeout):
        await d1.read(0)
    # A1's late reply arrives during the next transactions; it is ignored.
    r2 = await driver(bus, A2, quantities=[Q.ENERGY_IMPORT, Q.VOLTAGE]).read(0)
    assert r2.get(Q.ENERGY_IMPORT) == Decimal("806.00")
    assert r2.get(Q.VOLTAGE) == Decimal("230.0")
    bus.sim.meter(A1).faults.slow_reply_s = 0.0
    assert (await d1.read(0)).get(Q.ENERGY_IMPORT) == Decimal("406.00")


async def test_refused_block_falls_back_to_single_identifiers(bus: Bus) -> None:
    bus.sim.meter(A1).faults.refuse = {0x0001FF00}
    d = driver(bus)
    before = bus.transport.stats.transactions
    r = await d.read(0)
    assert r.get(Q.ENERGY_IMPORT) == Decimal("406.00")
    assert r.get(Q.ENERGY_IMPORT_T4) == Decimal("103.00")
    first = bus.transport.stats.transactions - before
    await d.read(0)
    second = bus.transport.stats.transactions - before - first
    assert second == first - 1  # the refused block is not asked again


async def test_refused_quantity_is_listed_not_fatal(bus: Bus) -> None:
    bus.sim.meter(A1).faults.refuse = {0x02800002}
    r = await driver(bus).read(0)
    assert Q.FREQUENCY not in r.values
    assert r.meta["unsupported"] == "frequency_hz"
    assert r.get(Q.ENERGY_IMPORT) == Decimal("406.00")


async def test_everything_refused_is_refused(bus: Bus) -> None:
    bus.sim.meter(A1).faults.refuse = {0x00010000, 0x02800002}
    with pytest.raises(MeterRefused, match="every quantity was refused"):
        await driver(bus, quantities=[Q.ENERGY_IMPORT, Q.FREQUENCY]).read(0)


async def test_follow_up_frames_are_joined(bus: Bus) -> None:
    bus.sim.meter(A1).max_reply_data = 4 + 6  # energy block (20 bytes) needs 12H follow-ups
    r = await driver(bus).read(0)
    assert [r.get(q) for q in (Q.ENERGY_IMPORT, Q.ENERGY_IMPORT_T4)] == [
        Decimal("406.00"),
        Decimal("103.00"),
    ]


async def test_energy_going_backwards_is_reported_as_read(bus: Bus) -> None:
    # The driver reports what the meter says; plausibility is the rating layer's job.
    d = driver(bus, quantities=[Q.ENERGY_IMPORT])
    bus.sim.meter(A1).faults.energy_backwards_kwh = Decimal("5")
    assert (await d.read(0)).get(Q.ENERGY_IMPORT) == Decimal("401.00")


async def test_clock_drift_shows_in_the_meter_clock(bus: Bus) -> None:
    bus.sim.meter(A1).faults.clock_offset_s = -90
    clock = await driver(bus).read_clock()
    assert clock == T0 - dt.timedelta(seconds=90)


async def test_broadcast_time_sync_sets_every_clock(bus: Bus) -> None:
    for a in (A1, A2):
        bus.sim.meter(a).faults.clock_offset_s = 600
    await broadcast_time(bus.transport, T0 + dt.timedelta(seconds=30))
    for a in (A1, A2, A3):
        assert await driver(bus, a).read_clock() == T0 + dt.timedelta(seconds=30)


async def test_discover_with_one_meter(single_bus: Bus) -> None:
    assert await discover(single_bus.transport) == [A1]


async def test_discover_with_several_meters_collides(bus: Bus) -> None:
    with pytest.raises(MeterFrameError):
        await discover(bus.transport)
    # a partial wildcard (AA in the high bytes) narrows it down to one
    assert await discover(bus.transport, "AAAAAAAAAA02") == [A2]
    assert await discover(bus.transport, "AAAAAAAAAA09") == []


async def test_probe_finds_the_present_meters(bus: Bus) -> None:
    assert await probe(bus.transport, [A3, "000000000009", A1]) == [A3, A1]


async def test_random_faults_only_ever_raise_meter_errors(bus: Bus) -> None:
    rng = random.Random(7)
    bus.transport.timeout_s = 0.1
    m = bus.sim.meter(A1)
    d = driver(bus, quantities=[Q.ENERGY_IMPORT, Q.VOLTAGE])
    outcomes: dict[str, int] = {}
    for _ in range(20):
        m.faults.no_reply = rng.random() < 0.15
        m.faults.bad_checksum = rng.random() < 0.25
        m.faults.partial = rng.random() < 0.25
        m.faults.garbage_prefix = rng.randbytes(rng.randrange(8))
        try:
            r = await d.read(0)
        except MeterError as exc:
            outcomes[exc.kind] = outcomes.get(exc.kind, 0) + 1
        else:
            assert r.get(Q.ENERGY_IMPORT) == Decimal("406.00")
            outcomes["ok"] = outcomes.get("ok", 0) + 1
    assert outcomes.get("ok", 0) > 0 and len(outcomes) >= 2

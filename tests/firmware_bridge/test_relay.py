"""Relay control against the Modbus simulator: coil and register relays, read-back, alarms."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.bus import BusConfigError, open_bus
from firmware_bridge.driver import MeterFrameError
from firmware_bridge.modbus.transport import ModbusTransport
from firmware_bridge.relay import (
    ModbusCoilActuator,
    ModbusRegisterActuator,
    RelayActuator,
    RelayController,
    RelayPolicy,
    RelayRateLimited,
    RelayRefused,
    RelayResult,
    controller_for,
    interval_remaining_s,
    redrive_delay_s,
)
from firmware_bridge.settings import BusSettings, MeterSettings, RelaySettings
from testbed.simulators.modbus import ModbusSimulator

FAST = RelayPolicy(min_interval_s=0.0, settle_s=0.01, max_drives=3, redrive_delays_s=(0.01, 0.02))


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSimulator]:
    async with ModbusSimulator([1, 2]) as s:
        s.meter(2).relay_coil = None
        s.meter(2).relay_register = 0x100
        s.meter(2).holding[0x100] = 0
        yield s


@pytest.fixture
async def transport(sim: ModbusSimulator) -> AsyncIterator[ModbusTransport]:
    t = ModbusTransport.tcp("127.0.0.1", sim.port, name="bus", timeout_s=0.2)
    yield t
    t.close()


# --------------------------------------------------------------------------- pure parts


@given(st.floats(0, 100), st.integers(1, 10), st.lists(st.floats(0, 100), max_size=4))
def test_redrive_delay_never_below_min_interval(min_interval: float, n: int, delays: list[float]) -> None:
    p = RelayPolicy(min_interval_s=min_interval, redrive_delays_s=tuple(delays))
    d = redrive_delay_s(p, n)
    assert d >= min_interval
    if delays:
        assert d == max(min_interval, delays[min(n, len(delays)) - 1])


@given(st.none() | st.floats(0, 1e6), st.floats(0, 1e6), st.floats(0, 1e3))
def test_interval_remaining(last: float | None, now: float, minimum: float) -> None:
    r = interval_remaining_s(last, now, minimum)
    assert 0 <= r <= minimum
    if last is None or now >= last + minimum:
        assert r == 0


# --------------------------------------------------------------------------- actuators


async def test_coil_actuator(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    act = ModbusCoilActuator(transport, "m1", 1, 0, open_value=1)
    assert isinstance(act, RelayActuator)
    assert await act.read_open() is False
    await act.set_open(True)
    assert sim.meter(1).relay_open and await act.read_open() is True
    inverted = ModbusCoilActuator(transport, "m1", 1, 0, open_value=0)
    assert await inverted.read_open() is False  # coil is 1, which means closed for this wiring


async def test_register_actuator(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    act = ModbusRegisterActuator(transport, "m2", 2, 0x100, open_value=0xA5, closed_value=0x5A)
    sim.meter(2).relay_open_value = 0xA5
    await act.set_open(True)
    assert sim.meter(2).holding[0x100] == 0xA5 and sim.meter(2).relay_open
    assert await act.read_open() is True
    await act.set_open(False)
    assert await act.read_open() is False
    sim.meter(2).holding[0x100] = 7
    with pytest.raises(MeterFrameError, match="neither open"):
        await act.read_open()


# --------------------------------------------------------------------------- controller


async def test_verified_open_and_close(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    c = RelayController({"m1": ModbusCoilActuator(transport, "m1", 1, 0)}, policy=FAST)
    r = await c.set_open("m1", True)
    assert r.ok and not r.alarm and r.final_open is True and len(r.attempts) == 1
    assert sim.meter(1).relay_open
    again = await c.set_open("m1", True)
    assert again.ok and again.attempts == () and again.reason == "already open"
    writes = sim.meter(1).writes
    r = await c.set_open("m1", False)
    assert r.ok and r.final_open is False and not sim.meter(1).relay_open
    assert sim.meter(1).writes == writes + 1


async def test_stuck_relay_raises_alarm_with_evidence(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    alarms: list[RelayResult] = []
    c = RelayController({"m1": ModbusCoilActuator(transport, "m1", 1, 0)}, policy=FAST, on_alarm=alarms.append)
    sim.meter(1).relay_stuck = True
    r = await c.set_open("m1", True)
    assert not r.ok and r.alarm and alarms == [r]
    assert len(r.attempts) == FAST.max_drives
    assert all(a.command_error is None and a.read_open is False for a in r.attempts)
    assert r.final_open is False and "not verified open after 3 drive(s)" in r.reason
    assert sim.meter(1).writes == FAST.max_drives  # bounded: exactly max_drives commands


async def test_relay_that_recovers_on_redrive(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    sim.meter(1).relay_stuck = True

    async def unstick(delay: float) -> None:
        await asyncio.sleep(delay)
        sim.meter(1).relay_stuck = False

    policy = RelayPolicy(min_interval_s=0.0, settle_s=0.02, max_drives=4, redrive_delays_s=(0.05,))
    c = RelayController({"m1": ModbusCoilActuator(transport, "m1", 1, 0)}, policy=policy)
    task = asyncio.create_task(unstick(0.03))
    r = await c.set_open("m1", True)
    await task
    assert r.ok and not r.alarm and len(r.attempts) >= 2


async def test_dead_relay_unit_alarms_with_errors(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    sim.meter(1).dead = True
    alarms: list[RelayResult] = []
    pol = RelayPolicy(min_interval_s=0.0, settle_s=0.0, max_drives=2, redrive_delays_s=(0.0,))
    c = RelayController({"m1": ModbusCoilActuator(transport, "m1", 1, 0)}, policy=pol, on_alarm=alarms.append)
    r = await c.set_open("m1", True)
    assert r.alarm and r.final_open is None
    assert all(a.command_error and a.command_error.startswith("timeout") for a in r.attempts)
    assert all(a.read_error for a in r.attempts) and "unknown" in r.reason


async def test_min_interval_enforced(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    pol = RelayPolicy(min_interval_s=30.0, settle_s=0.0, max_drives=1)
    now = [1000.0]
    c = RelayController({"m1": ModbusCoilActuator(transport, "m1", 1, 0)}, policy=pol, clock=lambda: now[0])
    assert (await c.set_open("m1", True)).ok
    now[0] += 10
    with pytest.raises(RelayRateLimited) as ei:
        await c.set_open("m1", False)
    assert ei.value.retry_after_s == pytest.approx(20.0)
    assert sim.meter(1).relay_open  # nothing was sent
    writes = sim.meter(1).writes
    again = await c.set_open("m1", True)  # already open: no switching, so no rate limit
    assert again.ok and again.attempts == () and sim.meter(1).writes == writes
    now[0] += 20
    assert (await c.set_open("m1", False)).ok


async def test_supply_check_vetoes(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    async def low_voltage(meter_id: str, open: bool) -> str | None:
        return None if open else "supply voltage 150.0 V below 0.75 Un"

    c = RelayController({"m1": ModbusCoilActuator(transport, "m1", 1, 0)}, policy=FAST, supply_check=low_voltage)
    assert (await c.set_open("m1", True)).ok
    with pytest.raises(RelayRefused, match=r"0\.75 Un"):
        await c.set_open("m1", False)
    assert sim.meter(1).relay_open


class DeferredClose:
    """A meter whose close command only allows the customer to close (DL/T 645 1BH)."""

    close_is_deferred = True

    def __init__(self) -> None:
        self.open = True
        self.commands: list[bool] = []

    async def set_open(self, open: bool) -> None:
        self.commands.append(open)
        if open:
            self.open = True

    async def read_open(self) -> bool:
        return self.open


async def test_any_actuator_and_deferred_close() -> None:
    act = DeferredClose()
    c = RelayController({"x": act}, policy=FAST)
    r = await c.set_open("x", False)
    assert r.ok and r.pending_customer and not r.alarm and act.commands == [False]


async def test_open_bus_builds_relays_and_serialises_with_polling() -> None:
    async with ModbusSimulator([1, 2]) as sim:
        sim.meter(2).relay_coil = 5
        bus = BusSettings(name="b", type="tcp", host="127.0.0.1", port=sim.port, timeout_s=0.2)
        meters = [
            MeterSettings(id="m1", bus="b", protocol="modbus", profile="sdm120", unit_id=1, relay=RelaySettings(kind="coil", address=0, min_interval_s=0)),
            MeterSettings(id="m2", bus="b", protocol="modbus", profile="sdm120", unit_id=2, relay=RelaySettings(kind="coil", address=5, min_interval_s=0)),
        ]
        async with open_bus(bus, meters) as sched:
            assert set(sched.relays) == {"m1", "m2"}
            c = controller_for(sched, policy=FAST)
            assert c.policy_for("m2").min_interval_s == 0
            cyc, r1, r2 = await asyncio.gather(sched.run_cycle(0), c.set_open("m1", True), c.set_open("m2", True))
            assert r1.ok and r2.ok and len(cyc.readings) == 2
            assert sim.meter(1).relay_open and sim.meter(2).relay_open
            assert sched.metrics.operations >= 2 + 2 * 3  # reads + (pre-read, drive, read-back) × 2


async def test_relay_config_errors() -> None:
    bus = BusSettings(name="b", type="tcp", host="127.0.0.1", port=1, timeout_s=0.2)
    bad = MeterSettings(id="m", bus="b", protocol="modbus", profile="sdm120", unit_id=1, relay=RelaySettings(kind="dlt645"))
    with pytest.raises(BusConfigError, match="needs a dlt645 meter"):
        async with open_bus(bus, [bad]):
            pass
    same = MeterSettings(
        id="m", bus="b", protocol="modbus", profile="sdm120", unit_id=1,
        relay=RelaySettings(kind="register", open_value=1, closed_value=1),
    )
    with pytest.raises(BusConfigError, match="must differ"):
        async with open_bus(bus, [same]):
            pass


class ScriptedRelay:
    """A contactor following a script: which drives move it, which commands/reads fail."""

    def __init__(self, start_open: bool, moves: list[bool], cmd_fails: list[bool], read_fails: list[bool]) -> None:
        self.open = start_open
        self.moves, self.cmd_fails, self.read_fails = moves, cmd_fails, read_fails
        self.drives = 0
        self.reads = 0

    async def set_open(self, open: bool) -> None:
        i = self.drives
        self.drives += 1
        if self.moves[i % len(self.moves)]:
            self.open = open
        if self.cmd_fails[i % len(self.cmd_fails)]:
            raise MeterFrameError("x", "garbled acknowledgement")

    async def read_open(self) -> bool:
        i = self.reads
        self.reads += 1
        if self.read_fails[i % len(self.read_fails)]:
            raise MeterFrameError("x", "garbled read")
        return self.open


@given(
    start_open=st.booleans(),
    want=st.booleans(),
    moves=st.lists(st.booleans(), min_size=1, max_size=5),
    cmd_fails=st.lists(st.booleans(), min_size=1, max_size=5),
    read_fails=st.lists(st.booleans(), min_size=1, max_size=5),
    max_drives=st.integers(1, 4),
)
def test_controller_properties(
    start_open: bool, want: bool, moves: list[bool], cmd_fails: list[bool], read_fails: list[bool], max_drives: int
) -> None:
    relay = ScriptedRelay(start_open, moves, cmd_fails, read_fails)
    alarms: list[RelayResult] = []
    slept: list[float] = []

    async def fake_sleep(s: float) -> None:
        slept.append(s)

    pol = RelayPolicy(min_interval_s=3.0, settle_s=1.0, max_drives=max_drives, redrive_delays_s=(2.0, 7.0))
    c = RelayController({"x": relay}, policy=pol, on_alarm=alarms.append, sleep=fake_sleep)
    r = asyncio.run(c.set_open("x", want))

    assert r.ok != r.alarm
    assert alarms == ([r] if r.alarm else [])
    assert relay.drives == len(r.attempts) <= max_drives
    if r.ok:
        assert r.final_open is want
        assert relay.open is want
    else:
        assert len(r.attempts) == max_drives
        assert all(a.read_open is not want for a in r.attempts)
    if not read_fails[0] and start_open is want:
        assert r.attempts == () and relay.drives == 0  # already there: never switched
    # re-drives are spaced by at least the minimum interval
    redrive_waits = [s for s in slept if s != pol.settle_s]
    assert len(redrive_waits) == max(0, len(r.attempts) - 1)
    assert all(w >= pol.min_interval_s for w in redrive_waits)


def test_voltage_veto() -> None:
    from decimal import Decimal

    from firmware_bridge.relay import voltage_veto

    assert voltage_veto(Decimal("230.4")) is None
    assert voltage_veto(Decimal("172.5")) is None  # exactly 0.75 × 230
    assert voltage_veto(Decimal("172.4")) == "supply voltage 172.4 V below 0.75 Un (172.50 V)"
    assert voltage_veto(Decimal("NaN")) is not None
    assert voltage_veto(None) == "supply voltage unknown"
    assert voltage_veto(None, allow_unknown=True) is None
    assert voltage_veto(Decimal("100"), nominal_v=Decimal(110)) is None


async def test_voltage_guard_with_the_simulator(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    from decimal import Decimal

    from firmware_bridge.modbus.driver import ModbusDriver
    from firmware_bridge.modbus.profiles import BUILTIN_PROFILES
    from firmware_bridge.reading import Quantity
    from firmware_bridge.relay import voltage_guard

    last: dict[str, Decimal | None] = {}
    meter = ModbusDriver("m1", 1, BUILTIN_PROFILES["sdm120"], transport)
    c = RelayController(
        {"m1": ModbusCoilActuator(transport, "m1", 1, 0)}, policy=FAST, supply_check=voltage_guard(last.get)
    )
    with pytest.raises(RelayRefused, match="unknown"):
        await c.set_open("m1", True)
    sim.meter(1).values[Quantity.VOLTAGE] = Decimal("150.0")  # brown-out
    last["m1"] = (await meter.read(0)).good(Quantity.VOLTAGE)
    with pytest.raises(RelayRefused, match=r"below 0\.75 Un"):
        await c.set_open("m1", True)
    assert not sim.meter(1).relay_open
    sim.meter(1).values[Quantity.VOLTAGE] = Decimal("229.0")
    last["m1"] = (await meter.read(0)).good(Quantity.VOLTAGE)
    assert (await c.set_open("m1", True)).ok

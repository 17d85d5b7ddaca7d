"""Driver details: configuration checks, security module plumbing, time zones."""

from __future__ import annotations

import datetime as dt

import pytest

from firmware_bridge.dlt645 import ControlCommand, Dlt645Driver, open_transport
from firmware_bridge.dlt645.codec import Function
from firmware_bridge.dlt645.messages import (
    ErrorFlags,
    control_ok_reply,
    control_plaintext,
    error_reply_frame,
)
from firmware_bridge.driver import MeterRefused
from firmware_bridge.reading import Quantity as Q
from firmware_bridge.settings import BusSettings
from testbed.simulators.dlt645 import SimulatedMeter, Simulator

from .conftest import PASSWORD, T0, Bus, FakeClock
from .peer import ADDR, Peer

CST = dt.timezone(dt.timedelta(hours=8))


class RecordingSecurityModule:
    """A stand-in for an ESAM: returns a marked ciphertext and records what it sealed.

    It is the driver's plumbing under test here, not any cryptography."""

    level = 0x98

    def __init__(self) -> None:
        self.sealed: list[tuple[str, bytes]] = []

    async def seal_control(self, address: str, plaintext: bytes) -> bytes:
        self.sealed.append((address, plaintext))
        return b"\xc1" * 16


def section(port: int) -> BusSettings:
    return BusSettings("t", "tcp", host="127.0.0.1", port=port, timeout_s=0.3)


async def test_security_module_seals_n1_to_n8(peer: Peer) -> None:
    peer.script = lambda req: [control_ok_reply(ADDR).encode()]
    sm = RecordingSecurityModule()
    async with open_transport(section(peer.port)) as t:
        d = Dlt645Driver("m", ADDR, t, operator=b"OP01", security=sm, clock_tz=CST)
        deadline = dt.datetime(2026, 11, 23, 16, 0, tzinfo=dt.UTC)  # 24:00 at UTC+8
        await d.control(ControlCommand.TRIP, deadline)
    local = dt.datetime(2026, 11, 24, 0, 0)
    assert sm.sealed == [(ADDR, control_plaintext(ControlCommand.TRIP, local))]
    sent = peer.requests[0][1]
    assert sent.control.function == Function.CONTROL
    assert sent.data == bytes.fromhex("98000000") + b"OP01" + b"\xc1" * 16


async def test_refused_sealed_control(peer: Peer) -> None:
    peer.script = lambda req: [
        error_reply_frame(ADDR, Function.CONTROL, ErrorFlags.UNAUTHORISED).encode()
    ]
    async with open_transport(section(peer.port)) as t:
        d = Dlt645Driver("m", ADDR, t, security=RecordingSecurityModule())
        with pytest.raises(MeterRefused, match=r"meter m: .*password error / unauthorised"):
            await d.control(ControlCommand.CLOSE, T0)


async def test_plaintext_deadline_is_sent_in_meter_time(peer: Peer) -> None:
    peer.script = lambda req: [control_ok_reply(ADDR).encode()]
    async with open_transport(section(peer.port)) as t:
        d = Dlt645Driver("m", ADDR, t, password=PASSWORD, clock_tz=CST)
        await d.control(ControlCommand.CLOSE, dt.datetime(2026, 11, 23, 2, 30, 15, tzinfo=dt.UTC))
    # ss mm hh DD MM YY of 10:30:15 on 23 Nov 2026 at UTC+8
    assert peer.requests[0][1].data[10:] == bytes.fromhex("15 30 10 23 11 26")


async def test_meter_clock_in_its_time_zone() -> None:
    clock = FakeClock()
    meter = SimulatedMeter("000000000001", clock_tz=CST)
    async with Simulator([meter], clock=clock) as sim:
        port = await sim.start_tcp()
        async with open_transport(section(port)) as t:
            d = Dlt645Driver("m", "000000000001", t, clock_tz=CST)
            assert await d.read_clock() == T0
            r = await d.read(0)
    assert r.get(Q.METER_CLOCK) == int(T0.timestamp())


def test_configuration_is_checked() -> None:
    t = open_transport(section(1))
    with pytest.raises(ValueError, match="12 digits"):
        Dlt645Driver("m", "12345", t)
    with pytest.raises(ValueError, match="cannot read"):
        Dlt645Driver("m", ADDR, t, quantities=[Q.ENERGY_EXPORT, "nonsense"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="password must be 4 bytes"):
        Dlt645Driver("m", ADDR, t, password=b"\x02")
    d = Dlt645Driver("m", ADDR, t, quantities=[Q.POWER, Q.POWER, Q.ENERGY_EXPORT])
    assert d.quantities == (Q.POWER, Q.ENERGY_EXPORT)
    assert d.meter_id == "m"


async def test_only_configured_quantities_are_read(bus: Bus) -> None:
    d = Dlt645Driver("m", "000000000001", bus.transport, quantities=[Q.ENERGY_EXPORT, Q.POWER])
    before = bus.sim.requests
    r = await d.read(0)
    assert set(r.values) == {Q.ENERGY_EXPORT, Q.POWER}
    assert bus.sim.requests - before == 2

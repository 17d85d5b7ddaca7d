"""The simulator itself: meter model, collisions, wire timing, command line."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from firmware_bridge.dlt645 import Dlt645Driver, open_transport
from firmware_bridge.dlt645.codec import FrameParser, decode_frame
from firmware_bridge.dlt645.messages import (
    ErrorFlags,
    Refused,
    parse_read_reply,
    read_address_request,
    read_request,
)
from firmware_bridge.dlt645.transport import frame_time_s
from firmware_bridge.reading import Quantity as Q
from firmware_bridge.settings import BusSettings
from testbed.simulators.dlt645 import SimulatedMeter, Simulator, make_meters

from .conftest import T0, FakeClock

ROOT = Path(__file__).resolve().parents[3]


def test_energy_integrates_across_rate_boundaries() -> None:
    m = SimulatedMeter("000000000001", load_kw=Decimal("2.0000"))
    start = T0.replace(hour=18, minute=30).timestamp()  # 18:30: rate 2, 19:00 on: rate 1
    m.advance(start)
    m.advance(start + 3600)
    assert m.registers_kwh[1] == Decimal("1.0000")  # half an hour of peak
    assert m.registers_kwh[0] == Decimal("1.0000")  # half an hour of sharp


def test_open_relay_stops_the_registers() -> None:
    m = SimulatedMeter("000000000001", relay_open=True)
    m.advance(T0.timestamp())
    m.advance(T0.timestamp() + 3600)
    assert sum(m.registers_kwh) == 0
    assert m.current_a == 0


def test_unknown_di_is_no_data() -> None:
    sim = Simulator(make_meters(1), clock=FakeClock())
    raw, _ = sim.reply_bytes(read_request("000000000001", 0x12345678))
    with pytest.raises(Refused) as info:
        parse_read_reply(decode_frame(raw))
    assert info.value.reply.flags is ErrorFlags.NO_DATA


def test_wildcard_with_several_meters_collides() -> None:
    sim = Simulator(make_meters(2), clock=FakeClock())
    raw, _ = sim.reply_bytes(read_address_request())
    assert [type(e).__name__ for e in FrameParser().feed(raw)] == ["BadFrame"]


async def test_wire_time_is_spent() -> None:
    sim = Simulator(make_meters(1), baud=2400, clock=FakeClock())
    async with sim:
        port = await sim.start_tcp()
        bus = BusSettings("t", "tcp", host="127.0.0.1", port=port, baud=2400, parity="E")
        async with open_transport(bus) as t:
            d = Dlt645Driver(
                "m", "000000000001", t, quantities=[Q.ENERGY_IMPORT, Q.ENERGY_IMPORT_T1]
            )
            loop = asyncio.get_running_loop()
            start = loop.time()
            await d.read(0)
            elapsed = loop.time() - start
    # one block read: the 40-byte reply (FE x4, 12 framing, DI + 5 x 4 bytes) at 2400 8E1
    assert elapsed >= frame_time_s(40, 2400) == pytest.approx(0.1833, abs=1e-3)
    assert elapsed < 1.0


async def test_command_line_serves_tcp() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "testbed.simulators.dlt645",
        "--tcp",
        "0",
        "--meters",
        "2",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        assert line.startswith("tcp 127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        meters = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        assert meters.split() == ["meters", "000000000001", "000000000002"]
        bus = BusSettings("t", "tcp", host="127.0.0.1", port=port)
        async with open_transport(bus) as t:
            r = await Dlt645Driver("m2", "000000000002", t).read(0)
        energy = r.get(Q.ENERGY_IMPORT)
        assert energy is not None and energy >= Decimal("806.00")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0


def test_command_line_needs_a_transport() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "testbed.simulators.dlt645", "--meters", "2"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        timeout=20,
    )
    assert out.returncode == 2
    assert "give --pty and/or --tcp PORT" in out.stderr

"""Fixtures: simulated meters served over a real pseudo-terminal and over TCP."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import os
import termios
import tty
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import serial

from firmware_bridge.dlt645.transport import Dlt645Transport, open_transport
from firmware_bridge.settings import BusSettings
from testbed.simulators.dlt645 import Simulator, make_meters

from .peer import REPLY, Peer

T0 = dt.datetime(2026, 11, 23, 10, 0, 0, tzinfo=dt.UTC)  # 10:00 is rate 2 (peak)
TIMEOUT_S = 0.3
PASSWORD = bytes.fromhex("02000000")


@functools.cache
def pty_parity() -> str:
    """``E`` where this kernel's pseudo-terminals take even parity (8E1, as DL/T 645
    lines run), else ``N`` (some kernels refuse PARENB on a pty with EINVAL)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        port = serial.Serial(os.ttyname(slave), 2400, parity="E")
        try:
            port.timeout = 0  # reconfigures, as the asyncio transport does
        finally:
            port.close()
        return "E"
    except (serial.SerialException, termios.error, OSError):
        return "N"
    finally:
        os.close(master)
        os.close(slave)


class FakeClock:
    """System time for the simulator: fixed unless a test moves it."""

    def __init__(self, start: dt.datetime = T0) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Bus:
    sim: Simulator
    transport: Dlt645Transport
    clock: FakeClock
    kind: str


async def _serve(kind: str, n_meters: int) -> AsyncIterator[Bus]:
    clock = FakeClock()
    sim = Simulator(make_meters(n_meters), clock=clock)
    async with sim:
        if kind == "tcp":
            port = await sim.start_tcp()
            section = BusSettings("sim", "tcp", host="127.0.0.1", port=port, timeout_s=TIMEOUT_S)
        else:
            path = await sim.start_pty()
            # Parity N: this platform's pseudo-terminals refuse PARENB (EINVAL);
            # the bytes are the same, parity only exists on a real UART.
            section = BusSettings(
                "sim", "serial", device=path, baud=9600, parity="N", timeout_s=TIMEOUT_S
            )
        # a short gap keeps the suite fast; the gap itself is tested in test_transport
        async with open_transport(section, gap_s=0.002) as transport:
            yield Bus(sim, transport, clock, kind)


@pytest.fixture(params=["pty", "tcp"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    """Three simulated meters 000000000001..3 on one bus, over pty and over TCP."""
    async for b in _serve(request.param, 3):
        yield b


@pytest.fixture(params=["pty", "tcp"])
async def single_bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    async for b in _serve(request.param, 1):
        yield b


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    """A scripted peer answering every request with REPLY (change ``script``)."""
    p = Peer(script=lambda req: [REPLY.encode()])
    p.server = await asyncio.start_server(p.handle, "127.0.0.1", 0)
    p.port = p.server.sockets[0].getsockname()[1]
    yield p
    p.server.close()

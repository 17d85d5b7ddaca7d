from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from decimal import Decimal
from pathlib import Path

from firmware_bridge.modbus.driver import ModbusDriver
from firmware_bridge.modbus.profiles import BUILTIN_PROFILES
from firmware_bridge.modbus.transport import ModbusTransport
from firmware_bridge.reading import Quantity

ROOT = Path(__file__).resolve().parents[3]


async def test_simulator_command_line_serves_and_stops() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "testbed.simulators.modbus", "--tcp", "0", "--units", "4,5", "--load-kw", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        m = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert m, line
        t = ModbusTransport.tcp("127.0.0.1", int(m.group(1)), name="cli", timeout_s=1.0)
        try:
            r = await ModbusDriver("m5", 5, BUILTIN_PROFILES["sdm120"], t).read(0)
        finally:
            t.close()
        assert r.get(Quantity.POWER) == Decimal("2.0000")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

"""The daemon's log as the journal gets it, from a real ``edgegw run``.

Its stderr is a file whose device and inode ``JOURNAL_STREAM`` names, as
systemd does for a unit whose output goes to the journal. The broker is away
the whole time in three stages — nothing listening (connection refused), then
a server that refuses every connection (not authorised), then a real mosquitto — while the
uplink retries every 0.1..0.5 s. The log must have one line per cause (the
second with the count of the first), one line when the link comes back (with
the count of the last cause), no line per attempt, a syslog priority prefix
on every line and the gateway as a field.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import site_config, until
from tests.harness.mosquitto import Mosquitto, free_port

ROOT = Path(__file__).resolve().parents[2]
PRIORITY = re.compile(r"^<([0-7])>")


def start(config: Path, err: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with err.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=out, stdin=subprocess.DEVNULL, env=env, cwd=ROOT,
        )  # fmt: skip


async def test_one_line_per_cause_with_counts_and_priority_prefixes(tmp_path: Path) -> None:
    port = free_port()
    err = tmp_path / "stderr"
    err.touch()
    st = os.stat(err)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    env.pop("EDGEGW_LOG_FORMAT", None)
    broker = Mosquitto(tmp_path, port=port)

    def uplink_lines() -> list[str]:
        return [ln for ln in err.read_text().splitlines() if "store_forward.uplink: uplink:" in ln]

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A broker that refuses the gateway: CONNACK "not authorised" (return code 5)."""
        await reader.read(1024)
        writer.write(bytes([0x20, 0x02, 0x00, 0x05]))
        await writer.drain()
        writer.close()

    async with ModbusSimulator(units=[1]) as sim:
        config = site_config(
            tmp_path / "site.toml", gateway_id="gw-j", db=tmp_path / "gw.db",
            broker_port=port, modbus_port=sim.port, units=[1], poll_s=0.5,
        )  # fmt: skip
        proc = start(config, err, env)
        try:
            await until(lambda: len(uplink_lines()) >= 1, 20, "the first cause")
            await asyncio.sleep(2.0)  # retries with the same cause: no new line
            assert len(uplink_lines()) == 1, uplink_lines()
            server = await asyncio.start_server(refuse, "127.0.0.1", port)
            try:
                await until(lambda: len(uplink_lines()) >= 2, 20, "the second cause")
                await asyncio.sleep(2.0)
                assert len(uplink_lines()) == 2, uplink_lines()
            finally:
                server.close()
                await server.wait_closed()
            broker.start()
            await until(lambda: any("after" in ln for ln in uplink_lines()[2:]), 20, "the recovery")
            await asyncio.sleep(1.0)
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(proc.wait, 30)
            broker.stop()
    text = err.read_text()
    assert rc == 0, text[-3000:]
    lines = text.splitlines()
    assert lines and all(PRIORITY.match(ln) for ln in lines), [ln for ln in lines if not PRIORITY.match(ln)]
    assert all(ln.endswith("gateway=gw-j") or " gateway=gw-j " in ln for ln in lines), lines

    # The refusing server lets go of the port before the broker takes it: a retry in
    # that gap meets a closed port again, a cause of its own (one more line).
    first, second, *between, back = uplink_lines()
    assert len(between) <= 1, uplink_lines()
    assert first.startswith("<4>store_forward.uplink: uplink: connection lost: ") and "refused" in first, first
    m = re.search(r"\(the previous cause repeated (\d+) times: connection lost: [^)]*refused", second)
    assert second.startswith("<4>") and m is not None, second
    refused_times = int(m.group(1))
    assert refused_times >= 3 and f"repeats={refused_times}" in second
    repeats = refused_times
    for line in between:
        cause, _, previous = line.partition("(the previous cause repeated ")
        m = re.match(r"(\d+) times: ", previous)
        assert line.startswith("<4>") and "refused" in cause and m is not None, line
        assert second.split("connection lost: ")[1].split(" (")[0] in previous, (second, line)
        repeats += int(m.group(1))
    m = re.search(r"connected after (\d+) failures in \d+ s \(last cause, (\d+) times: ", back)
    assert back.startswith("<6>") and m is not None, back
    failures, last_times = int(m.group(1)), int(m.group(2))
    assert (last_times >= 3 or between) and failures == repeats + last_times
    assert "uplink connecting" not in text and "uplink down" not in text
    assert "<6>gateway.daemon.supervisor: gateway gw-j running" in text

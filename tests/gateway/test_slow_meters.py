"""The daemon against DL/T 645 meters that behave like the field.

Two RS-485 lines (pseudo-terminals at 2400 baud) each carry a slow but
conformant meter that waits 450 ms before every answer, one with block reads
and one without: both are read, completely, in every cycle. A third line
carries a prepaid meter whose date register holds 30 February: its energy is
still billed, and central gets one ``meter.clock_fault`` event with the raw
bytes. While the daemon polls, its lines are locked: ``edgegw meters read``
refuses, naming the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest

from firmware_bridge.dlt645.driver import DEFAULT_QUANTITIES
from firmware_bridge.serial_line import LOCK_DIR_ENV, LineBusy, LineLock
from gateway import meters_cli as cli
from gateway.config import load_config
from gateway.daemon import Cycle, Daemon
from testbed.simulators.dlt645 import DateFault, Simulator, make_meters
from tests.firmware_bridge.dlt645.conftest import pty_parity
from tests.gateway.e2e import until
from tests.gateway.test_prepaid_daemon import outbox_bodies
from tests.harness.mosquitto import free_port

ROOT = Path(__file__).resolve().parents[2]
SHANGHAI = "Asia/Shanghai"

ACCOUNT = """
account = "acct-003"
timezone = "Asia/Shanghai"
opening_balance = "500.00"
meters = ["m3"]
protected = false

[limits]
alarm1 = "20.00"
alarm2 = "10.00"
overdraft = "0.00"
close_permit = "5.00"
close_mode = "direct"
reconnect_delay_s = 0
relay_min_interval_s = 0
"""


def site(tmp: Path, line1: str, line2: str, tcp_port: int, addresses: list[str]) -> Path:
    shutil.copy(ROOT / "examples" / "tariffs" / "flat.toml", tmp / "flat.toml")
    (tmp / "acct-003.toml").write_text(ACCOUNT)
    path = tmp / "site.toml"
    parity = pty_parity()
    path.write_text(
        f"""
[gateway]
id = "gw-slow"
site = "field"
timezone = "{SHANGHAI}"
poll_interval_s = 10   # buses start spread over it: line-2, line-1 3.3 s later, line-3

[storage]
path = "gw.db"

[broker]
port = {free_port()}   # nobody listens: the link is down, readings wait in the outbox

[[bus]]
name = "line-2"
type = "serial"
device = "{line2}"
baud = 2400
parity = "{parity}"

[[bus]]
name = "line-1"
type = "serial"
device = "{line1}"
baud = 2400
parity = "{parity}"

[[bus]]
name = "line-3"
type = "tcp"
host = "127.0.0.1"
port = {tcp_port}
response_time_s = 0.1   # a fast meter, and the manual says so

[[meter]]
id = "m1"
bus = "line-1"
protocol = "dlt645"
address = "{addresses[0]}"

[[meter]]
id = "m2"
bus = "line-2"
protocol = "dlt645"
address = "{addresses[1]}"

[[meter]]
id = "m3"
bus = "line-3"
protocol = "dlt645"
address = "{addresses[2]}"
quantities = ["energy_import_kwh", "meter_clock_s"]
account = "acct-003"

[[account]]
id = "acct-003"
settings = "acct-003.toml"
tariffs = ["flat.toml"]
"""
    )
    return path


async def test_slow_meters_are_read_every_cycle_and_a_bad_date_still_bills(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path))
    monkeypatch.chdir(tmp_path)
    zone = __import__("zoneinfo").ZoneInfo(SHANGHAI)
    slow_block = make_meters(1, clock_tz=zone, response_delay_s=0.45)
    slow_single = make_meters(1, first=2, clock_tz=zone, response_delay_s=0.45, block_reads=False)
    bad_date = make_meters(1, first=3, clock_tz=zone, response_delay_s=0.02)
    bad_date[0].load_kw = Decimal("150")  # 150 kW: the register moves every few seconds
    bad_date[0].faults.date = DateFault.INVALID
    addresses = [slow_block[0].address, slow_single[0].address, bad_date[0].address]

    finished: dict[str, list[list[object]]] = defaultdict(list)  # bus -> readings per cycle
    pending: dict[str, list[object]] = defaultdict(list)

    def on_cycle(c: Cycle) -> None:
        pending[c.bus] += c.readings
        if c.final and c.statuses:
            finished[c.bus].append(pending.pop(c.bus, []))

    async with Simulator(slow_block, baud=2400) as s1, Simulator(slow_single, baud=2400) as s2, Simulator(
        bad_date
    ) as s3:
        line1, line2, port = await s1.start_pty(), await s2.start_pty(), await s3.start_tcp()
        cfg_path = site(tmp_path, line1, line2, port, addresses)
        daemon = Daemon(load_config(cfg_path), on_cycle=on_cycle)
        stop = asyncio.Event()
        run = asyncio.create_task(daemon.run(stop))
        try:
            await asyncio.wait_for(daemon.ready.wait(), 10)
            # the daemon holds its serial lines: the commissioning command refuses
            await until(lambda: bool(finished["line-3"]), 15, "a first cycle on line-3")
            with pytest.raises(LineBusy, match=r"in use by edgegw daemon \(gateway gw-slow\), pid"):
                LineLock(line1, "test", tmp_path).acquire()
            p = argparse.ArgumentParser()
            cli.register(p.add_subparsers(dest="command"))
            args = p.parse_args(["meters", "read", "--config", str(cfg_path), "--meter", "m1"])
            assert await asyncio.to_thread(args.func, args) == 1
            assert "in use by edgegw daemon (gateway gw-slow)" in capsys.readouterr().err
            # two complete cycles on each slow line: 6 s with block reads, 9 s without,
            # 10 s apart; both lines are idle when they are done, so the stop is quick
            await until(
                lambda: len(finished["line-1"]) >= 2 and len(finished["line-2"]) >= 2,
                60,
                "two cycles on both slow lines",
            )
        finally:
            stop.set()
            await asyncio.wait_for(run, 60)

    for bus, mid in (("line-1", "m1"), ("line-2", "m2")):
        for cycle in finished[bus]:
            assert [r.meter_id for r in cycle] == [mid], (bus, cycle)  # type: ignore[attr-defined]
            reading = cycle[0]
            assert set(reading.values) == set(DEFAULT_QUANTITIES), reading  # type: ignore[attr-defined]
            assert "incomplete" not in reading.meta  # type: ignore[attr-defined]
    assert len(finished["line-3"]) >= 2

    events = await outbox_bodies(tmp_path / "gw.db", "event")
    faults = [e for e in events if e["type"] == "meter.clock_fault"]
    assert len(faults) == 1, faults  # once per change of cause, not every cycle
    assert faults[0]["meter"] == "m3" and faults[0]["cause"] == "clock.invalid_date"
    assert str(faults[0]["raw"]).startswith("04000101: 01 30 02 26")
    assert "2026-02-30 does not exist" in str(faults[0]["detail"])
    # the energy of the meter with the bad date was billed
    charges = [c for c in await outbox_bodies(tmp_path / "gw.db", "charge") if c.get("account") == "acct-003"]
    assert any(int(c["amount_micro"]) < 0 for c in charges), charges  # type: ignore[call-overload]
    with sqlite3.connect(tmp_path / "gw.db") as conn:
        (balance,) = conn.execute(
            "SELECT balance_micro FROM billing_account WHERE account = 'acct-003'"
        ).fetchone()
    assert balance < 500_000_000
    assert os.environ[LOCK_DIR_ENV] == str(tmp_path)

"""``edgegw meters`` on DL/T 645 lines as a technician meets them.

Slow but conformant meters (450 ms before each answer) at 2400 baud, with and
without block reads; meter clocks in Asia/Shanghai; a missing adapter; a line
the daemon holds. Commands run in a worker thread, as from a shell.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from firmware_bridge.dlt645.driver import DEFAULT_QUANTITIES
from firmware_bridge.serial_line import LOCK_DIR_ENV, LineLock
from gateway import meters_cli as cli
from testbed.simulators.dlt645 import SimulatedMeter, Simulator, make_meters
from tests.firmware_bridge.dlt645.conftest import pty_parity

SHANGHAI = ZoneInfo("Asia/Shanghai")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgegw")
    cli.register(p.add_subparsers(dest="command", required=True))
    return p


async def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    rc: int = await asyncio.to_thread(args.func, args)
    return rc


@pytest.fixture(autouse=True)
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "lock"
    d.mkdir()
    monkeypatch.setenv(LOCK_DIR_ENV, str(d))
    return d


@contextlib.asynccontextmanager
async def lines(*groups: Sequence[SimulatedMeter], baud: int = 2400) -> AsyncIterator[list[str]]:
    """One pseudo-terminal line per group of meters; yields their device paths."""
    async with contextlib.AsyncExitStack() as stack:
        paths = []
        for group in groups:
            sim = await stack.enter_async_context(Simulator(group, baud=baud))
            paths.append(await sim.start_pty())
        yield paths


def site(tmp_path: Path, buses: list[tuple[str, str | None, int]], meters: str, tz: str = "Asia/Shanghai") -> str:
    """A site file: ``buses`` = (name, device, baud); default timing everywhere."""
    text = f"""
[gateway]
id = "gw-field"
site = "bench"
timezone = "{tz}"

[storage]
path = "{tmp_path / 'gw.db'}"
"""
    for name, device, baud in buses:
        text += f"""
[[bus]]
name = "{name}"
type = "serial"
device = "{device}"
baud = {baud}
parity = "{pty_parity()}"
"""
    path = tmp_path / "site.toml"
    path.write_text(text + meters, encoding="utf-8")
    return str(path)


def meter(mid: str, bus: str, address: str, extra: str = "") -> str:
    return f"""
[[meter]]
id = "{mid}"
bus = "{bus}"
protocol = "dlt645"
address = "{address}"
{extra}
"""


async def test_slow_meters_at_2400_baud_with_and_without_block_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """450 ms before every answer, 2400 8E1, every default quantity; the two lines
    are read in parallel. The meters keep Asia/Shanghai time, shown as such."""
    with_blocks = make_meters(1, clock_tz=SHANGHAI, response_delay_s=0.45)
    without = make_meters(1, first=2, clock_tz=SHANGHAI, response_delay_s=0.45, block_reads=False)
    async with lines(with_blocks, without) as (p1, p2):
        cfg = site(
            tmp_path,
            [("line-1", p1, 2400), ("line-2", p2, 2400)],
            meter("m1", "line-1", with_blocks[0].address) + meter("m2", "line-2", without[0].address),
        )
        assert await run(["meters", "read", "--config", cfg]) == 0
    out = capsys.readouterr().out
    for mid in ("m1", "m2"):
        block = out[out.index(f"{mid}:") :]
        for q in DEFAULT_QUANTITIES:
            assert q.value in block, (mid, q)
    assert out.count("energy_import_kwh      406.00") == 2
    assert "FAILED" not in out and "incomplete" not in out
    # the meter clock, in the site's zone: within a minute of Shanghai's wall time
    shown = [line.split()[1:3] for line in out.splitlines() if "meter_clock_s" in line]
    now = dt.datetime.now(SHANGHAI).replace(tzinfo=None)
    for day, hms in shown:
        clock = dt.datetime.fromisoformat(f"{day} {hms}")
        assert abs((clock - now).total_seconds()) < 60
    assert all("Asia/Shanghai" in line for line in out.splitlines() if "meter_clock_s" in line)


async def test_relay_open_and_close_against_a_meter_keeping_shanghai_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = make_meters(1, clock_tz=SHANGHAI, response_delay_s=0.05)[0]
    async with lines([m], baud=9600) as (path,):
        cfg = site(
            tmp_path,
            [("line-1", path, 9600)],
            meter("m1", "line-1", m.address, 'password = "02000000"\n[meter.relay]\nkind = "dlt645"\nmin_interval_s = 0'),
        )
        assert await run(["meters", "relay", "--config", cfg, "--meter", "m1", "open"]) == 0
        opened = json.loads(capsys.readouterr().out)
        assert opened["ok"] and opened["final_open"] is True and len(opened["attempts"]) == 1
        assert m.relay_open
        assert await run(["meters", "relay", "--config", cfg, "--meter", "m1", "close"]) == 0
        assert json.loads(capsys.readouterr().out)["final_open"] is False and not m.relay_open
        assert await run(["meters", "relay", "--config", cfg, "--meter", "m1", "status"]) == 0
        assert json.loads(capsys.readouterr().out) == {"meter": "m1", "open": False}


async def test_relay_refusal_says_what_the_meter_answered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = make_meters(1, response_delay_s=0.02)[0]
    async with lines([m], baud=9600) as (path,):
        cfg = site(
            tmp_path,
            [("line-1", path, 9600)],
            meter("m1", "line-1", m.address, 'password = "02123456"\n[meter.relay]\nkind = "dlt645"\nmin_interval_s = 0'),
        )
        assert await run(["meters", "relay", "--config", cfg, "--meter", "m1", "open"]) == 1
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["refused"] and len(result["attempts"]) == 1 and not m.relay_open
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("meter m1: meter refused the trip command, not resent")
    assert "password error / unauthorised (error byte 04)" in err[0]


async def test_missing_adapter_is_one_line_naming_the_bus_and_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    device = str(tmp_path / "ttyUSB0")
    cfg = site(
        tmp_path,
        [("rs485-1", device, 2400)],
        meter("m1", "rs485-1", "000000000001", 'password = "02000000"\n[meter.relay]\nkind = "dlt645"'),
    )
    for argv in (
        ["meters", "read", "--config", cfg],
        ["meters", "relay", "--config", cfg, "--meter", "m1", "status"],
        ["meters", "scan", "--config", cfg, "--bus", "rs485-1"],
    ):
        assert await run(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"bus rs485-1: serial device {device} does not exist: is the USB-RS485 adapter"
            " plugged in? (ls -l /dev/serial/by-id/ lists the adapters; put its path in bus.device)"
        ], argv


async def test_the_line_the_daemon_polls_is_refused_unless_forced(
    tmp_path: Path, lock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = make_meters(1, response_delay_s=0.02)[0]
    async with lines([m], baud=9600) as (path,):
        cfg = site(tmp_path, [("line-1", path, 9600)], meter("m1", "line-1", m.address, 'quantities = ["energy_import_kwh"]'))
        with LineLock(path, "edgegw daemon (gateway gw-field)", lock_dir):
            assert await run(["meters", "read", "--config", cfg]) == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert err == [
                f"bus line-1: {path} is in use by edgegw daemon (gateway gw-field), pid {os.getpid()}:"
                " stop it first (the daemon: sudo systemctl stop edgegw), or pass --force"
                " to share the line (the two masters will talk over each other)"
            ]
            assert await run(["meters", "scan", "--config", cfg, "--bus", "line-1"]) == 1
            assert "in use by edgegw daemon" in capsys.readouterr().err
            assert await run(["meters", "read", "--config", cfg, "--force"]) == 0
            assert "energy_import_kwh      406.00" in capsys.readouterr().out
        assert await run(["meters", "read", "--config", cfg]) == 0


async def test_scan_prints_finds_progress_and_what_each_configured_meter_did(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    present, impostor = make_meters(2, response_delay_s=0.02)
    impostor.faults.reply_address = "000000000099"  # set up with another address than configured
    async with lines([present, impostor], baud=9600) as (path,):
        cfg = site(
            tmp_path,
            [("line-1", path, 9600)],
            meter("m1", "line-1", present.address)
            + meter("m2", "line-1", impostor.address)
            + meter("m3", "line-1", "000000000007"),
        )
        rc = await run(["meters", "scan", "--config", cfg, "--bus", "line-1", "--pattern", "AAAAAAAAAA01"])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "found 000000000001",
        "configured m1 000000000001: answered",
        "configured m2 000000000002: reply from address 000000000099, expected 000000000002",
        "configured m3 000000000007: no reply",
        "1 meter(s) found with 2 request(s)",
    ]
    assert "bus line-1: address search: 2/2 done, 1 found" in captured.err

"""``edgegw meters`` commands against the Modbus simulator (commands run in a worker thread)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest

from gateway import meters_cli as cli
from testbed.simulators.modbus import ModbusSimulator


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgegw")
    cli.register(p.add_subparsers(dest="command", required=True))
    return p


def write_config(tmp_path: Path, port: int) -> Path:
    cfg = tmp_path / "site.toml"
    cfg.write_text(
        f"""
[gateway]
id = "gw-test"
site = "bench"

[storage]
path = "{tmp_path / 'gw.db'}"

[[bus]]
name = "tcp-1"
type = "tcp"
host = "127.0.0.1"
port = {port}
timeout_s = 0.2

[[meter]]
id = "m1"
bus = "tcp-1"
protocol = "modbus"
profile = "sdm120"
unit_id = 1
relay = {{ kind = "coil", address = 0, min_interval_s = 0 }}

[[meter]]
id = "m2"
bus = "tcp-1"
protocol = "modbus"
profile = "sdm120"
unit_id = 2
""",
        encoding="utf-8",
    )
    return cfg


async def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    rc: int = await asyncio.to_thread(args.func, args)
    return rc


async def test_meters_read_scan_relay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with ModbusSimulator([1, 2, 7]) as sim:
        cfg = str(write_config(tmp_path, sim.port))
        assert await run(["meters", "read", "--config", cfg, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert {r["meter"] for r in out["readings"]} == {"m1", "m2"}
        assert out["readings"][0]["values"]["voltage_v"] == {"value": "230.4", "quality": "good"}

        sim.meter(2).dead = True
        assert await run(["meters", "read", "--config", cfg, "--meter", "m2"]) == 1
        assert "m2: FAILED timeout" in capsys.readouterr().out

        sim.meter(7).refuse = 2
        assert await run(["meters", "scan", "--config", cfg, "--bus", "tcp-1", "--units", "1-3,7", "--json", "--timeout", "0.1"]) == 0
        rows = {r["unit_id"]: r["status"] for r in json.loads(capsys.readouterr().out)["units"]}
        assert rows == {1: "answered", 2: "timeout", 3: "timeout", 7: "present, map does not match"}

        assert await run(["meters", "relay", "--config", cfg, "--meter", "m1", "open"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["ok"] and res["final_open"] is True and sim.meter(1).relay_open
        assert await run(["meters", "relay", "--config", cfg, "--meter", "m1", "status"]) == 0
        assert json.loads(capsys.readouterr().out) == {"meter": "m1", "open": True}
        assert await run(["meters", "relay", "--config", cfg, "--meter", "m2", "status"]) == 2


def test_parse_units() -> None:
    assert cli.parse_units("1,2,5-7, 2") == [1, 2, 5, 6, 7]
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_units("0-3")
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_units("")


async def test_scan_dlt645_bus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from testbed.simulators.dlt645 import Simulator, make_meters

    sims = make_meters(2)
    sims[1].faults.no_reply = True
    async with Simulator(sims[:1]) as lone:
        port = await lone.start_tcp()
        cfg = tmp_path / "dlt.toml"
        cfg.write_text(
            f"""
[gateway]
id = "gw"
site = "s"
[storage]
path = "{tmp_path / 'db'}"
[[bus]]
name = "d"
type = "tcp"
host = "127.0.0.1"
port = {port}
response_time_s = 0.1  # the simulator answers at once
timeout_s = 0.2
[[meter]]
id = "x"
bus = "d"
protocol = "dlt645"
address = "{sims[0].address}"
[[meter]]
id = "y"
bus = "d"
protocol = "dlt645"
address = "{sims[1].address}"
""",
            encoding="utf-8",
        )
        assert await run(["meters", "scan", "--config", str(cfg), "--bus", "d", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["discovered"] == [sims[0].address]
    assert out["configured"] == [
        {"meter": "x", "address": sims[0].address, "status": "answered"},
        {"meter": "y", "address": sims[1].address, "status": "no reply"},
    ]


async def test_modbus_scan_prints_each_find_as_it_happens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with ModbusSimulator([1, 2, 7]) as sim:
        sim.meter(7).refuse = 2
        cfg = str(write_config(tmp_path, sim.port))
        argv = ["meters", "scan", "--config", cfg, "--bus", "tcp-1", "--units", "1-4,7", "--timeout", "0.1"]
        assert await run(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("unit   1: answered  voltage_v=230.4")
    assert lines[1].startswith("unit   2: answered")
    assert lines[2] == "unit   7: present, map does not match  unit 7 FC04 0x0000+14: exception 2 (illegal data address)"
    assert lines[3] == "2 of 5 unit(s) answered with the sdm120 map"
    progress = captured.err.splitlines()
    assert progress[-1].startswith("bus tcp-1: units: 5/5 done, 3 found,") and "ETA 0s" in progress[-1]
    assert any(p.startswith("bus tcp-1: units: 1/5 done, 1 found") for p in progress)

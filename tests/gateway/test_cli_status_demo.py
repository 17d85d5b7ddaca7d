"""`edgegw status` against a real gateway database, and `edgegw demo` end to end."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from firmware_bridge.reading import Measurement, Quantity, Reading
from gateway.cli import main
from gateway.database import open_database
from store_forward.outbox import MeterStatus
from tests.gateway.e2e import site_config

ROOT = Path(__file__).resolve().parents[2]


async def _fill(db: Path) -> None:
    ob = await open_database(db)
    await ob.commit_cycle(
        1_000,
        [Reading("m001", 1_000, {Quantity.ENERGY_IMPORT: Measurement(Decimal("3.20"))})],
        [
            MeterStatus("m001", True, 1_000, 1_000, 0, 2, None),
            MeterStatus("m002", False, 1_000, None, 4, 4, "timeout: no reply in 0.5s"),
        ],
    )
    await ob.set_state({"link_state": "down", "link_since_ms": 500})
    await ob.close()


def test_status_human_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = site_config(
        tmp_path / "site.toml",
        gateway_id="gw-s",
        db=tmp_path / "gw.db",
        broker_port=1883,
        modbus_port=502,
        units=[1, 2],
    )
    assert main(["status", "--config", str(cfg)]) == 1  # no database yet
    asyncio.run(_fill(tmp_path / "gw.db"))
    assert main(["status", "--config", str(cfg), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["link"]["state"] == "down"
    assert st["backlog"]["readings"] == 1 and st["backlog"]["records"] == 1
    assert st["backlog"]["bytes"] > 0 and st["backlog"]["oldest_age_s"] > 0
    by_meter = {m["meter"]: m for m in st["meters"]}
    assert by_meter["m002"]["consecutive_failures"] == 4 and not by_meter["m002"]["online"]
    assert main(["status", "--config", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "link:    down" in text
    assert "m002" in text and "OFFLINE" in text and "timeout: no reply" in text


def test_demo_delivers_everything_exactly_once(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "demo",
            "--duration",
            "9",
            "--meters",
            "4",
            "--report",
            str(report),
            "--workdir",
            str(tmp_path / "demo"),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "link DOWN" in proc.stdout and "link UP" in proc.stdout
    r = json.loads(report.read_text())
    assert r["readings_polled"] > 0
    assert r["readings_acked"] == r["readings_polled"]
    assert r["duplicates"] == 0 and r["lost"] == 0
    # both protocols made it to central: Modbus TCP and DL/T 645 over the pty line
    with sqlite3.connect(tmp_path / "demo" / "central.db") as db:
        meters = {m for (m,) in db.execute("SELECT DISTINCT meter_id FROM readings")}
        energy = db.execute(
            "SELECT quantities FROM readings WHERE meter_id = 'dlt-01' ORDER BY time_ms DESC"
        ).fetchone()
    assert {"meter-01", "meter-04", "dlt-01", "dlt-02"} <= meters
    assert "energy_import_t1_kwh" in json.loads(energy[0])
    # the prepaid story: warned, cut after the no-disconnect window, topped up by a
    # signed command from central, restored; central agrees with the gateway to the fen
    assert r["balances_match"] is True
    story = "\n".join(r["prepaid_story"])
    for step in ("normal -> alarm1", "alarm1 -> alarm2", "cut deferred: no-disconnect window until",
                 "-> cutoff", "relay trip on meter-01: ok", "(topup): applied",
                 "cutoff -> normal", "relay close on meter-01: ok"):
        assert step in story, (step, story)

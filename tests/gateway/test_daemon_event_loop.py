"""``edgegw run`` as a real process on each event loop: uvloop by default,
asyncio's with ``EDGEGW_EVENT_LOOP=asyncio``. On either it names the loop in its
start line, reads the meters (Modbus TCP simulator), commits, sends the readings
to the headend through mosquitto and has them acknowledged, and stops cleanly."""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from headend.ingest import Headend
from headend.store import HeadendDB
from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import (
    assert_exactly_once,
    gateway_counters,
    headend_readings,
    site_config,
    until,
)
from tests.harness.mosquitto import Mosquitto
from tests.harness.procs import start_gateway


def counters(db: Path) -> dict[str, int]:
    try:
        return gateway_counters(db)
    except sqlite3.Error:  # not created yet, or its tables not yet
        return {"committed": 0, "acked": 0, "backlog": 0}


@pytest.mark.parametrize(
    ("setting", "loop"), [(None, "uvloop"), ("asyncio", "asyncio")], ids=["default", "asyncio"]
)
async def test_the_daemon_runs_reads_and_commits_on_its_event_loop(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch, setting: str | None, loop: str
) -> None:
    if setting is None:
        monkeypatch.delenv("EDGEGW_EVENT_LOOP", raising=False)
    else:
        monkeypatch.setenv("EDGEGW_EVENT_LOOP", setting)
    gw, db, log = "gw-loop", tmp_path / "gw.db", tmp_path / "gateway.log"
    hdb = await HeadendDB.open(tmp_path / "central.db")
    headend = asyncio.create_task(Headend(hdb, host="127.0.0.1", port=mosquitto.port).run())
    try:
        async with ModbusSimulator(units=[1, 2, 3]) as sim:
            config = site_config(
                tmp_path / "site.toml", gateway_id=gw, db=db,
                broker_port=mosquitto.port, modbus_port=sim.port, units=[1, 2, 3], poll_s=0.2,
            )  # fmt: skip
            proc = start_gateway(config, log)
            try:
                await until(lambda: "running:" in log.read_text(), 30, "the start line")
                start_line = next(ln for ln in log.read_text().splitlines() if "running:" in ln)
                assert re.search(rf"\bevent_loop={loop}\b", start_line), start_line
                # every meter read and committed, and acknowledged by the headend
                await until(lambda: counters(db)["committed"] >= 30, 30, "30 readings committed")
                await until(lambda: counters(db)["acked"] >= 30, 30, "30 readings acknowledged")
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    rc = await asyncio.to_thread(proc.wait, 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    raise AssertionError("no clean stop within 30 s:\n" + log.read_text()[-3000:]) from None
            assert rc == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "Traceback" not in text and "uvloop cannot be imported" not in text, text[-3000:]
        committed = counters(db)["committed"]
        await until(
            lambda: len(headend_readings(tmp_path / "central.db", gw)) >= counters(db)["acked"],
            10, "the acknowledged readings at the headend",
        )  # fmt: skip
    finally:
        headend.cancel()
        await asyncio.gather(headend, return_exceptions=True)
        await hdb.close()
    readings = headend_readings(tmp_path / "central.db", gw)
    assert {m for _, m, _ in readings} == {"m001", "m002", "m003"}
    # what was acknowledged is at the headend exactly once; nothing beyond what was committed
    assert len(readings) <= committed
    assert_exactly_once(readings, len(readings))

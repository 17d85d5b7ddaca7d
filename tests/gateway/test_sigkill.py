"""SIGKILL the gateway process mid-run: after restarts nothing is lost and nothing duplicated."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
from pathlib import Path

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

ROOT = Path(__file__).resolve().parents[2]


def committed(db: Path) -> int:
    try:
        return gateway_counters(db)["committed"]
    except sqlite3.Error:  # not created yet, or its tables not yet
        return 0


async def test_gateway_sigkilled_mid_run(tmp_path: Path, mosquitto: Mosquitto) -> None:
    rng = random.Random(int.from_bytes(os.urandom(4)))
    db = tmp_path / "gw.db"
    log = tmp_path / "gateway.log"
    hdb = await HeadendDB.open(tmp_path / "central.db")
    headend = asyncio.create_task(Headend(hdb, host="127.0.0.1", port=mosquitto.port).run())
    try:
        async with ModbusSimulator(units=[1, 2, 3]) as sim:
            config = site_config(
                tmp_path / "site.toml",
                gateway_id="gw-kill",
                db=db,
                broker_port=mosquitto.port,
                modbus_port=sim.port,
                units=[1, 2, 3],
                poll_s=0.1,
            )
            for run in range(3):
                proc = start_gateway(config, log)
                try:
                    if run == 0:  # something to lose: the first run commits before its kill
                        await until(lambda: committed(db) > 0, 30, "first commit")
                    await asyncio.sleep(1.5 + rng.random() * 1.5)
                finally:
                    proc.send_signal(signal.SIGKILL)
                    await asyncio.to_thread(proc.wait, 10)
            assert gateway_counters(db)["committed"] > 0, log.read_text()
        # meters off; a clean run drains the backlog, then SIGTERM stops it
        # a killed run may have died before its uplink came up: count from here
        ups_before = log.read_text().count("uplink up")
        proc = start_gateway(config, log)
        try:
            await until(
                lambda: log.read_text().count("uplink up") > ups_before, 30, "restarted uplink"
            )
            await until(lambda: gateway_counters(db)["backlog"] == 0, 60, "drain after restart")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError("no clean stop within 30 s:\n" + log.read_text()[-3000:]) from None
        assert rc == 0, log.read_text()[-3000:]
    finally:
        headend.cancel()
        await asyncio.gather(headend, return_exceptions=True)
        await hdb.close()
    counters = gateway_counters(db)
    assert_exactly_once(headend_readings(tmp_path / "central.db", "gw-kill"), counters["committed"])

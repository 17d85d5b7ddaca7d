"""The whole path with real parts: Modbus TCP simulator → daemon → mosquitto → headend."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.config import load_config
from gateway.daemon import Daemon
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


async def test_broker_killed_and_restarted_mid_run(tmp_path: Path, mosquitto: Mosquitto) -> None:
    async with ModbusSimulator(units=[1, 2, 3, 4]) as sim:
        sim.meter(3).dead = True  # a dead meter must not disturb the others
        cfg = load_config(
            site_config(
                tmp_path / "site.toml",
                gateway_id="gw-e2e",
                db=tmp_path / "gw.db",
                broker_port=mosquitto.port,
                modbus_port=sim.port,
                units=[1, 2, 3, 4],
            )
        )
        hdb = await HeadendDB.open(tmp_path / "central.db")
        headend = asyncio.create_task(Headend(hdb, host="127.0.0.1", port=mosquitto.port).run())
        stop = asyncio.Event()
        daemon = Daemon(cfg)
        run = asyncio.create_task(daemon.run(stop))
        try:
            await asyncio.wait_for(daemon.ready.wait(), 10)
            for _ in range(4):
                await asyncio.sleep(1.0)
                mosquitto.kill()
                await asyncio.sleep(0.7)  # polling goes on while the broker is gone
                mosquitto.start()
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.wait_for(run, 20)
        finally:
            stop.set()
            await asyncio.gather(run, return_exceptions=True)
    # the meters are gone now; a restarted gateway must still deliver the backlog
    stop2 = asyncio.Event()
    drain = asyncio.create_task(Daemon(cfg).run(stop2))
    try:
        await until(lambda: gateway_counters(tmp_path / "gw.db")["backlog"] == 0, 30, "drain")
    finally:
        stop2.set()
        await asyncio.wait_for(drain, 20)
        headend.cancel()
        await asyncio.gather(headend, return_exceptions=True)
        await hdb.close()
    counters = gateway_counters(tmp_path / "gw.db")
    readings = headend_readings(tmp_path / "central.db", "gw-e2e")
    assert counters["committed"] > 20
    assert_exactly_once(readings, counters["committed"])
    assert counters["acked"] == counters["committed"]
    assert {m for _, m, _ in readings} == {"m001", "m002", "m004"}

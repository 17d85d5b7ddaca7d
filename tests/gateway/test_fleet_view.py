"""A test fleet seen from central: three real daemons (subprocesses) on loopback,
one real mosquitto, a real headend with its metrics. The headend shows each
gateway's presence with its software version, its health records, a meter going
offline and back; the metrics parse; a clean stop shows offline within a second,
a kill shows offline by the broker's last will."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from headend.ingest import Headend
from headend.metrics import HeadendMetrics
from headend.store import HeadendDB
from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import site_config, until
from tests.harness.mosquitto import Mosquitto

ROOT = Path(__file__).resolve().parents[2]
GATEWAYS = ("gw-a", "gw-b", "gw-c")


def presence(central: Path) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(central) as db:
        db.row_factory = sqlite3.Row
        return {r["gateway_id"]: dict(r) for r in db.execute("SELECT * FROM fleet_presence")}


def health(central: Path, gateway: str) -> list[dict[str, Any]]:
    with sqlite3.connect(central) as db:
        rows = db.execute(
            "SELECT body FROM events WHERE gateway_id = ? AND kind = 'event' ORDER BY record_id", (gateway,)
        ).fetchall()
    bodies = [json.loads(b) for (b,) in rows]
    return [b for b in bodies if b.get("type") == "gateway.health"]


def meter_events(central: Path, gateway: str, meter: str) -> list[str]:
    with sqlite3.connect(central) as db:
        rows = db.execute("SELECT body FROM events WHERE gateway_id = ? ORDER BY record_id", (gateway,)).fetchall()
    bodies = [json.loads(b) for (b,) in rows]
    return [str(b["type"]) for b in bodies if str(b.get("type", "")).startswith("meter.") and b.get("meter") == meter]


def fleet_meter(central: Path, gateway: str, meter: str) -> str | None:
    with sqlite3.connect(central) as db:
        row = db.execute(
            "SELECT state FROM fleet_meters WHERE gateway_id = ? AND meter_id = ?", (gateway, meter)
        ).fetchone()
    return None if row is None else str(row[0])


def start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
            stdout=out, stderr=out, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=config.parent,
        )


def scrape(port: int) -> dict[str, list[Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


async def test_fleet_presence_health_and_meter_transitions(tmp_path: Path, mosquitto: Mosquitto) -> None:
    central = tmp_path / "central.db"
    hdb = await HeadendDB.open(central)
    metrics = HeadendMetrics()
    server = metrics.serve("127.0.0.1", 0)
    headend = asyncio.create_task(Headend(hdb, host="127.0.0.1", port=mosquitto.port, observer=metrics).run())
    procs: dict[str, subprocess.Popen[bytes]] = {}
    async with ModbusSimulator(units=[1, 2, 3, 4, 5, 6]) as sim:
        try:
            for i, gw in enumerate(GATEWAYS):
                d = tmp_path / gw
                d.mkdir()
                units = [2 * i + 1, 2 * i + 2]
                cfg = site_config(
                    d / "site.toml", gateway_id=gw, db=d / "gw.db", broker_port=mosquitto.port,
                    modbus_port=sim.port, units=units, poll_s=0.3,
                )  # fmt: skip
                text = cfg.read_text().replace('site = "test site"', 'site = "test site"\nhealth_interval_s = 10')
                cfg.write_text(text.replace("timeout_s = 0.5", "timeout_s = 0.3"))
                procs[gw] = start(cfg, d / "gateway.log")

            # presence, with the software version, boot id and session
            await until(
                lambda: {g: p["state"] for g, p in presence(central).items()} == dict.fromkeys(GATEWAYS, "online"),
                40, "every gateway online",
            )  # fmt: skip
            for p in presence(central).values():
                assert p["version"] == __version__ and p["boot_id"] and p["session_ms"] >= p["started_ms"]

            # health records through the outbox
            await until(lambda: all(health(central, g) for g in GATEWAYS), 40, "a health record from each")
            h = health(central, "gw-a")[0]
            assert h["version"] == __version__ and h["uptime_s"] >= 0
            assert h["disk"]["free_bytes"] > 0 and h["disk"]["used_bytes"] > 0
            assert set(h["meters"]) == {"online", "offline", "quarantined", "unknown"}
            assert h["outbox"]["records"] >= 0 and h["link"]["state"] == "up"
            assert h["time"]["quality"] and isinstance(h["load"], list)

            # a meter goes offline and comes back (gw-b's m004 is unit 4)
            await until(lambda: fleet_meter(central, "gw-b", "m004") == "online", 20, "m004 online")
            sim.meter(4).dead = True
            await until(lambda: fleet_meter(central, "gw-b", "m004") == "offline", 30, "m004 offline")
            sim.meter(4).dead = False
            await until(lambda: fleet_meter(central, "gw-b", "m004") == "online", 40, "m004 back")
            assert meter_events(central, "gw-b", "m004")[-2:] in (
                ["meter.offline", "meter.online"], ["meter.quarantined", "meter.online"],
            )  # fmt: skip

            # the metrics parse, and name the version
            await metrics.refresh(hdb)
            fams = await asyncio.to_thread(scrape, server.port)
            online = {s.labels["gateway"]: s.value for s in fams["edgegw_headend_gateway_online"]}
            assert online == dict.fromkeys(GATEWAYS, 1.0)
            info = {s.labels["gateway"]: s.labels["version"] for s in fams["edgegw_headend_gateway_info"]}
            assert info == dict.fromkeys(GATEWAYS, __version__)

            # a clean stop: offline within a second of the daemon's exit
            procs["gw-a"].send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(procs["gw-a"].wait, 30) == 0
            t0 = time.monotonic()
            await until(lambda: presence(central)["gw-a"]["state"] == "offline", 1.0, "gw-a offline", 0.02)
            assert time.monotonic() - t0 < 1.0
            assert presence(central)["gw-a"]["reason"] == "stopped"

            # a kill: the broker's last will says so (after the keepalive)
            procs["gw-c"].send_signal(signal.SIGKILL)
            await asyncio.to_thread(procs["gw-c"].wait, 10)
            await until(lambda: presence(central)["gw-c"]["state"] == "offline", 20, "gw-c's last will")
            assert presence(central)["gw-c"]["reason"] == "lost"
            assert presence(central)["gw-b"]["state"] == "online"
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs.values():
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
            headend.cancel()
            await asyncio.gather(headend, return_exceptions=True)
            server.close()
            await hdb.close()

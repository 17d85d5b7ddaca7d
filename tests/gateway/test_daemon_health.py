"""The daemon tells central and the operator what is wrong, once per change.

* Meter health: a meter going silent, quarantined and answering again becomes
  `meter.offline` / `meter.quarantined` / `meter.online` events at the headend
  (real Modbus TCP simulator, real mosquitto, real headend), one log line per
  transition, its state in `edgegw status`, nothing re-announced after a
  restart.
* A TLS file error names the file and cause and is logged once per change of
  cause, with the repeat count.
* The storage directory is created; one that cannot be is a one-line error.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from firmware_bridge.scheduler import BackoffPolicy
from gateway import meter_health
from gateway.config import load_config
from gateway.daemon import Daemon
from gateway.meter_health import Known, State, changes
from gateway.status_cli import gather_status
from headend.ingest import Headend
from headend.store import HeadendDB
from testbed.demo_pki import make_demo_pki
from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import site_config, until
from tests.harness.mosquitto import Mosquitto, free_port

ROOT = Path(__file__).resolve().parents[2]
FAST = BackoffPolicy(base_ms=100, factor=1, max_ms=100, quarantine_after=3, reprobe_ms=400)


def health_events(central: Path, meter: str) -> list[dict[str, object]]:
    with sqlite3.connect(central) as db:
        rows = db.execute("SELECT body FROM events ORDER BY record_id").fetchall()
    bodies = [json.loads(b) for (b,) in rows]
    return [b for b in bodies if str(b.get("type", "")).startswith("meter.") and b.get("meter") == meter and "from" in b]


async def test_meter_health_reaches_central_once_per_transition(
    tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.daemon")
    central = tmp_path / "central.db"
    async with ModbusSimulator(units=[1, 2]) as sim:
        path = site_config(
            tmp_path / "site.toml", gateway_id="gw-h", db=tmp_path / "gw.db",
            broker_port=mosquitto.port, modbus_port=sim.port, units=[1, 2], poll_s=0.2,
        )  # fmt: skip
        path.write_text(path.read_text().replace("timeout_s = 0.5", "timeout_s = 0.3"))
        cfg = load_config(path)
        hdb = await HeadendDB.open(central)
        headend = asyncio.create_task(Headend(hdb, host="127.0.0.1", port=mosquitto.port).run())
        stop = asyncio.Event()
        daemon = Daemon(cfg, backoff=FAST)
        run = asyncio.create_task(daemon.run(stop))

        def states() -> list[str]:
            return [str(e["type"]) for e in health_events(central, "m002")]

        try:
            await asyncio.wait_for(daemon.ready.wait(), 10)
            await until(lambda: states() == ["meter.online"], 15, "m002 first seen online at central")
            sim.meter(2).dead = True
            await until(lambda: states()[1:] == ["meter.offline", "meter.quarantined"], 20, "offline, then quarantined")
            st = await gather_status(cfg.storage.path, 0)
            row = {m["meter"]: m for m in st["meters"]}["m002"]
            assert row["state"] == "quarantined" and row["state_since_ms"] is not None
            sim.meter(2).dead = False
            await until(lambda: len(states()) == 4, 20, "m002 back online at central")
        finally:
            stop.set()
            await asyncio.wait_for(run, 20)
        events = health_events(central, "m002")
        assert [(e["type"], e["from"]) for e in events] == [
            ("meter.online", None),
            ("meter.offline", "online"),
            ("meter.quarantined", "offline"),
            ("meter.online", "quarantined"),
        ]
        offline, quarantined, back = events[1], events[2], events[3]
        assert str(offline["last_error"]).startswith("timeout") and offline["bus"] == "tcp-1"
        assert offline["account"] == "acct-002"
        assert quarantined["consecutive_failures"] == 3
        assert isinstance(back["away_ms"], int) and back["away_ms"] > 0
        assert [e["type"] for e in health_events(central, "m001")] == ["meter.online"]
        logged = [r.getMessage() for r in caplog.records if "m002" in r.getMessage()]
        assert len([m for m in logged if "offline" in m]) == 1, logged
        assert len([m for m in logged if "quarantined after 3 failures" in m]) == 1, logged
        assert len([m for m in logged if m.endswith("quarantined") or "online after" in m]) == 1, logged

        # A restart announces nothing that did not change.
        stop2 = asyncio.Event()
        again = Daemon(cfg, backoff=FAST)
        run2 = asyncio.create_task(again.run(stop2))
        try:
            await asyncio.wait_for(again.ready.wait(), 10)
            await until(lambda: again.stats.cycles >= 5, 15, "cycles after the restart")
            await asyncio.sleep(0.5)
        finally:
            stop2.set()
            await asyncio.wait_for(run2, 20)
            headend.cancel()
            await asyncio.gather(headend, return_exceptions=True)
            await hdb.close()
        assert len(health_events(central, "m002")) == 4 and len(health_events(central, "m001")) == 1


def test_changes_follow_the_scheduler_states() -> None:
    from firmware_bridge.scheduler import MeterHealth, on_failure, on_success

    h = MeterHealth("m")
    assert changes({}, {"m": h}, "b", 1) == []  # never attempted: nothing to say
    up = on_success(h, 10)
    [c] = changes({}, {"m": up}, "b", 10)
    assert (c.before, c.after, c.at_ms) == (None, State.ONLINE, 10)
    known = {"m": Known(State.ONLINE, 10)}
    assert changes(known, {"m": up}, "b", 20) == []
    down = on_failure(up, 30, "transport", "port gone", FAST)  # a bus fault still makes it offline
    [c] = changes(known, {"m": down}, "b", 30)
    assert c.after is State.OFFLINE and c.last_error == "transport: port gone"
    assert c.event("acct-1") == {
        "type": "meter.offline", "meter": "m", "bus": "b", "from": "online", "time_ms": 30,
        "last_good_ms": 10, "account": "acct-1", "last_error": "transport: port gone", "consecutive_failures": 0,
    }  # fmt: skip
    q = down
    for t in (40, 50, 60):
        q = on_failure(q, t, "timeout", "no reply", FAST)
    [c] = changes({"m": Known(State.OFFLINE, 30)}, {"m": q}, "b", 60)
    assert c.after is State.QUARANTINED and c.consecutive_failures == 3
    [c] = changes({"m": Known(State.QUARANTINED, 60)}, {"m": on_success(q, 1060)}, "b", 1060)
    assert c.event()["away_ms"] == 1000 and c.event()["type"] == "meter.online"


def test_a_whole_bus_going_offline_is_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    from firmware_bridge.scheduler import MeterHealth, on_failure, on_success

    health = {f"m{i}": on_failure(on_success(MeterHealth(f"m{i}"), 1), 2, "timeout", "no reply", FAST) for i in range(50)}
    known = {m: Known(State.ONLINE, 1) for m in health}
    found = changes(known, health, "rs485-1", 2)
    assert len(found) == 50  # one event per meter for central ...
    with caplog.at_level(logging.INFO):
        meter_health.log_changes(logging.getLogger("t"), found)
    assert [r.getMessage() for r in caplog.records] == [  # ... and one line for the operator
        "bus rs485-1: 50 meters offline (m0, m1, m2, ...): timeout: no reply"
    ]


async def test_tls_file_error_names_the_file_once_per_cause(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="store_forward.uplink")
    port = free_port()  # nothing listens: after the CA appears the cause becomes "refused"
    ca = tmp_path / "certs" / "ca.pem"
    path = site_config(
        tmp_path / "site.toml", gateway_id="gw-t", db=tmp_path / "gw.db",
        broker_port=port, modbus_port=free_port(), units=[1],
    )  # fmt: skip
    path.write_text(path.read_text().replace("keepalive_s = 5", f'keepalive_s = 5\ntls = true\nca_file = "{ca}"'))
    stop = asyncio.Event()
    daemon = Daemon(load_config(path))
    run = asyncio.create_task(daemon.run(stop))

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "store_forward.uplink" and "uplink:" in r.getMessage()]

    try:
        await asyncio.wait_for(daemon.ready.wait(), 10)
        assert daemon.uplink is not None
        await until(lambda: daemon.uplink is not None and daemon.uplink.stats.connects == 0 and len(lines()) == 1, 5, "first line")
        await asyncio.sleep(2.0)  # several retries at 0.1..0.5 s
        assert lines() == [f"uplink: connection lost: broker.ca_file {ca}: No such file or directory"]
        pki = make_demo_pki(tmp_path / "pki", gateway_ids=["gw-t"], valid_for=dt.timedelta(days=30))
        ca.parent.mkdir()
        ca.write_bytes(pki.ca.read_bytes())
        await until(lambda: len(lines()) == 2, 10, "the new cause")
    finally:
        stop.set()
        await asyncio.wait_for(run, 20)
    second = lines()[1]
    assert "(the previous cause repeated " in second and f"times: connection lost: broker.ca_file {ca}" in second
    repeats = int(second.split("(the previous cause repeated ")[1].split(" ")[0])
    assert repeats >= 3


async def test_the_storage_directory_is_created(tmp_path: Path) -> None:
    db = tmp_path / "var" / "lib" / "gw.db"
    path = site_config(tmp_path / "site.toml", gateway_id="gw-d", db=db, broker_port=free_port(), modbus_port=free_port(), units=[1])
    stop = asyncio.Event()
    daemon = Daemon(load_config(path))
    run = asyncio.create_task(daemon.run(stop))
    try:
        await asyncio.wait_for(daemon.ready.wait(), 10)
    finally:
        stop.set()
        await asyncio.wait_for(run, 20)
    assert db.exists() and (db.parent.stat().st_mode & 0o777) == 0o700


def test_a_storage_directory_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    path = site_config(
        tmp_path / "site.toml", gateway_id="gw-d", db=tmp_path / "afile" / "gw.db",
        broker_port=free_port(), modbus_port=free_port(), units=[1],
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "run", "--config", str(path)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        line for line in proc.stderr.strip().splitlines() if "cannot start" in line
    ], proc.stderr
    assert f"cannot start: storage.path {tmp_path}/afile/gw.db: cannot create the directory {tmp_path}/afile: " in proc.stderr
    assert "Traceback" not in proc.stderr

"""The periodic ``gateway.health`` record costs the card no commit of its own while
poll cycles commit: it rides the next one's transaction, and commits alone only
when none came within its bound (buses silent). The running daemon with a Modbus
simulator, a real mosquitto and a real headend; which transaction wrote which
record is read back from the gateway database's write-ahead log
(tests/harness/walcommits.py), which records are health records from central."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

from gateway.config import load_config
from gateway.daemon import Daemon
from gateway.daemon.supervisor import HEALTH_RIDE_MAX_S, health_ride_s
from gateway.daemon.writer import Cycle
from headend.ingest import Headend
from headend.store import HeadendDB
from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import daemon_running, rows, until
from tests.harness.mosquitto import Mosquitto
from tests.harness.site import DEV_UPLINK, gateway_config, meter
from tests.harness.walcommits import states


def site(tmp: Path, modbus_port: int, broker_port: int | None, poll_s: float) -> Path:
    """One SDM120 on Modbus TCP; no broker with ``broker_port`` None (the link stays down)."""
    return gateway_config(
        tmp,
        "gw-rides",
        modbus_port=modbus_port,
        gateway={"poll_interval_s": poll_s},
        broker=None if broker_port is None else {"host": "127.0.0.1", "port": broker_port, "keepalive_s": 5},
        uplink=DEV_UPLINK,
        meters=[meter()],
    )


def central_health(central: Path) -> list[int]:
    """Record ids of the gateway.health events central stored."""
    return [
        int(rid)
        for rid, body in rows(central, "SELECT record_id, body FROM events ORDER BY record_id")
        if json.loads(body).get("type") == "gateway.health"
    ]


def transactions(db: Path, scratch: Path) -> list[dict[int, str]]:
    """The records (id: kind) each commit in the log added, in commit order."""
    out: list[dict[int, str]] = []
    top = -1
    for state in states(db, "SELECT id, kind FROM outbox", scratch):
        out.append({int(i): str(k) for i, k in state if int(i) > top})
        top = max([top, *(int(i) for i, _ in state)])
    return out


class HealthSeen:
    """The daemon's own hook: each health record as the writer committed it, with how
    long after its sampling that was."""

    def __init__(self) -> None:
        self.waited_s: list[float] = []
        self.time_ms: list[int] = []

    def __call__(self, c: Cycle) -> None:
        if any(e.get("type") == "gateway.health" for e in c.events):
            self.waited_s.append(time.monotonic() - c.handed_mono)
            self.time_ms.append(c.time_ms)


def test_the_bound_follows_the_poll_interval() -> None:
    assert health_ride_s(60.0, 300.0) == 90.0  # one meter every minute: the next cycle is in it
    assert health_ride_s(1.0, 300.0) == 31.0
    assert health_ride_s(900.0, 300.0) == HEALTH_RIDE_MAX_S  # central's view stays fresh
    assert health_ride_s(60.0, 30.0) == 30.0  # never past the next record


class Run:
    """What a daemon run until central held three health records left behind."""

    def __init__(self, health: list[int], txs: list[dict[int, str]], seen: HealthSeen, readings: int) -> None:
        self.health, self.txs, self.seen, self.readings = health, txs, seen, readings

    def commits_of_health(self) -> dict[int, dict[int, str]]:
        """Each health record central holds -> the records its commit added."""
        found = {rid: tx for tx in self.txs for rid in tx if rid in self.health}
        assert set(self.health) <= set(found), "a health record's commit is not in the log"
        return found


async def run_until_three_health_records(
    tmp_path: Path, mosquitto: Mosquitto, poll_s: float, interval_s: float, ride_s: float | None = None
) -> Run:
    """The daemon (one meter polled every ``poll_s``, health every ``interval_s``; its
    ride bound, first checked to be the one its configuration gives, ``ride_s`` when
    given) with a
    real headend, until central holds three health records; the gateway's log is
    kept open by another connection so that every commit can be read back."""
    db, central = tmp_path / "gw.db", tmp_path / "central.db"
    (tmp_path / "scratch").mkdir()
    hdb = await HeadendDB.open(central)
    headend = asyncio.create_task(Headend(hdb, host="127.0.0.1", port=mosquitto.port).run())
    seen = HealthSeen()
    keep: sqlite3.Connection | None = None
    try:
        async with ModbusSimulator(units=[1]) as sim:
            daemon = Daemon(load_config(site(tmp_path, sim.port, mosquitto.port, poll_s)), on_cycle=seen)
            # the bound the configuration gives (health every 300 s), unless ``ride_s``
            assert daemon.health_ride_s == health_ride_s(poll_s, 300.0)
            daemon.health_interval_s = interval_s  # (the configuration allows 10 s at least)
            if ride_s is not None:
                daemon.health_ride_s = ride_s
            async with daemon_running(daemon):
                # another connection keeps the log when the daemon closes the database
                keep = sqlite3.connect(db)
                keep.execute("SELECT count(*) FROM sqlite_master").fetchall()  # (opens the log)
                await until(lambda: len(central_health(central)) >= 3, 30, "three health records at central")
                readings = daemon.stats.readings
            return Run(central_health(central), transactions(db, tmp_path / "scratch"), seen, readings)
    finally:
        if keep is not None:
            keep.close()
        headend.cancel()
        await asyncio.gather(headend, return_exceptions=True)
        await hdb.close()


async def test_a_health_record_rides_the_next_poll_cycle_transaction(tmp_path: Path, mosquitto: Mosquitto) -> None:
    run = await run_until_three_health_records(tmp_path, mosquitto, poll_s=1.0, interval_s=3.0)
    # each health record went in a transaction that wrote a poll cycle's reading, and
    # no transaction wrote a health record without one
    for rid, tx in run.commits_of_health().items():
        kinds = sorted(tx.values())
        assert "reading" in kinds, f"health record {rid} was committed without a poll cycle: {kinds}"
    # stamped when sampled, and committed within a poll interval or so of it
    assert len(run.seen.waited_s) >= 3 and max(run.seen.waited_s) < 3.0
    t_central = [json.loads(b)["time_ms"] for (b,) in rows(
        tmp_path / "central.db",
        "SELECT body FROM events WHERE json_extract(body, '$.type') = 'gateway.health' ORDER BY record_id",
    )]  # fmt: skip
    assert t_central == run.seen.time_ms[: len(t_central)]


async def test_a_health_record_commits_alone_after_its_bound_when_the_buses_are_silent(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    # one poll at start, then none for a minute: nothing commits but the health records
    run = await run_until_three_health_records(tmp_path, mosquitto, poll_s=60.0, interval_s=2.0, ride_s=1.0)
    assert run.readings <= 1  # the buses were silent after the first poll
    for rid, tx in run.commits_of_health().items():
        assert tx == {rid: "event"}, f"health record {rid} did not commit alone: {tx}"
    # alone only once its bound passed, and at most a moment later
    assert len(run.seen.waited_s) >= 3 and all(1.0 <= w < 2.5 for w in run.seen.waited_s), run.seen.waited_s


async def test_a_health_record_waiting_for_a_cycle_is_committed_at_stop(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    seen = HealthSeen()
    async with ModbusSimulator(units=[1]) as sim:
        daemon = Daemon(load_config(site(tmp_path, sim.port, None, 60.0)), on_cycle=seen)
        daemon.health_interval_s, daemon.health_ride_s = 2.0, 2.0
        async with daemon_running(daemon):
            await until(lambda: bool(daemon.writer.riders), 10, "a health record waiting for a transaction")
            assert seen.time_ms == []
    assert len(seen.time_ms) == 1  # committed with the last writes of the stop
    (t,) = seen.time_ms
    assert rows(db, "SELECT count(*) FROM outbox WHERE kind = 'event' AND created_ms = ?", t) == [(1,)]

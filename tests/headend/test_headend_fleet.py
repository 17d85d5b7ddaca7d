"""A simulated fleet (testbed.fleet_sim) against two ``edgegw headend run --share``
processes, a real mosquitto and PostgreSQL: every reading stored exactly once,
presence, health and command results where central looks for them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from headend.central_db import CentralDB, NewCommand
from headend.registry import generate_headend_key
from testbed import fleet_sim
from testbed.headend_proc import HeadendProcess
from tests.harness.mosquitto import Mosquitto
from tests.headend.test_headend_scaleout import pg_dsn

__all__ = ["pg_dsn"]  # the fixture, imported

GATEWAYS = 20
METERS = 50
ROUNDS = 3


@pytest.fixture
def headend_key(tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    key = tmp_path / "headend.pem"
    yield key, generate_headend_key(key)


async def test_fleet_through_two_shared_headends_exactly_once(
    tmp_path: Path, mosquitto: Mosquitto, pg_dsn: str, headend_key: tuple[Path, bytes]
) -> None:
    key, public = headend_key
    registry = tmp_path / "registry"
    gateways = fleet_sim.provision(GATEWAYS, registry, public, seed=3)
    assert len(list(registry.glob("*.json"))) == GATEWAYS
    # the commands central has queued; three gateways answer one each
    answered = {g.gateway_id: [f"cmd-sync-{g.index}"] for g in gateways[:3]}
    spec = fleet_sim.FleetSpec(meters=METERS, seed=3)
    rounds = fleet_sim.seal_rounds(gateways, spec, ROUNDS, commands=answered, workers=2)
    batches = [b for r in rounds for b in r]
    args = ["--broker", f"127.0.0.1:{mosquitto.port}", "--dsn", pg_dsn, "--share", "central",
            "--key", str(key), "--registry", str(registry)]  # fmt: skip
    heads = [HeadendProcess(tmp_path / f"headend-{i}.log", list(args), metrics_refresh_s=3600) for i in range(2)]
    try:
        deadline = time.monotonic() + 20
        while not all(h.subscribed() for h in heads) and time.monotonic() < deadline:
            assert all(h.proc.poll() is None for h in heads), [h.log.read_text() for h in heads]
            await asyncio.sleep(0.1)
        assert all(h.subscribed() for h in heads), [h.log.read_text() for h in heads]
        central = await CentralDB.open_postgres(pg_dsn)
        try:
            async with central.transaction() as tx:
                for gw, (cid,) in answered.items():
                    await CentralDB.insert_command(
                        tx,
                        NewCommand(
                            command_id=cid, gateway_id=gw, type="time.sync", role="operations",
                            issuer="ops-sim", counter=1, body={}, requested_by="test",
                            created_ms=spec.start_ms, issued_ms=spec.start_ms,
                            expires_ms=spec.start_ms + 10**10, envelope=b"{}",
                        ),
                    )  # fmt: skip
        finally:
            await central.close()

        async with fleet_sim.Fleet(
            gateways, "127.0.0.1", mosquitto.port, connections=4, window=32
        ) as fleet:
            await fleet.birth()
            for r in rounds:
                await fleet.send(r)
            await fleet.drain(60)
            assert fleet.stats.statuses == {"stored": len(batches)}, fleet.stats
            assert fleet.stats.bad_acks == 0 and fleet.stats.retransmits == 0
            # round 0 again, byte for byte (as after a lost ack): duplicates, nothing new
            await fleet.send(rounds[0])
            await fleet.drain(60)
            assert fleet.stats.statuses == {"stored": len(batches), "duplicate": len(rounds[0])}
            await fleet.death()

        per_head = [h.batches() for h in heads]
        assert sum(p.get("stored", 0) for p in per_head) == len(batches), per_head
        assert all(p.get("stored", 0) > 0 for p in per_head), per_head  # both took a share

        readings = GATEWAYS * METERS * ROUNDS
        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:

            async def one(q: str) -> tuple[object, ...]:
                row = await (await conn.execute(q)).fetchone()
                assert row is not None
                return tuple(row)

            assert await one(
                "SELECT count(*), count(DISTINCT (gateway_id, meter_id, time_ms)),"
                " count(DISTINCT (gateway_id, epoch, record_id)), count(DISTINCT gateway_id) FROM readings"
            ) == (readings, readings, readings, GATEWAYS)
            assert await one("SELECT count(*) FROM telemetry") == (readings,)
            assert await one("SELECT count(*) FROM batches") == (len(batches),)
            assert await one(
                "SELECT coalesce(sum(value), 0) FROM counters WHERE name = 'duplicate_batches'"
            ) == (len(rounds[0]),)
            # a reading as the meter gave it: five energy registers that add up
            (q,) = await one(
                "SELECT quantities FROM readings ORDER BY gateway_id, record_id LIMIT 1"
            )
            assert isinstance(q, dict) and len(q) == 5
            assert sum(float(v) for k, v in q.items() if "_t" in k) == pytest.approx(
                float(q["energy_import_kwh"])
            )
            # presence: every gateway's birth, then its clean stop (retained, not shared)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                states = await one(
                    "SELECT count(*) FILTER (WHERE state = 'offline' AND reason = 'stopped'),"
                    " count(*) FROM fleet_presence"
                )
                if states == (GATEWAYS, GATEWAYS):
                    break
                await asyncio.sleep(0.2)
            assert states == (GATEWAYS, GATEWAYS)
            # health: the newest record of every gateway, from the last round that had one
            assert await one(
                "SELECT count(*), count(*) FILTER (WHERE body::jsonb->>'version' = '0.1.0-sim'"
                " AND (body::jsonb->'meters'->>'online')::int = 50), min(time_ms) FROM fleet_health"
            ) == (GATEWAYS, GATEWAYS, spec.start_ms + (ROUNDS - 1) * fleet_sim.INTERVAL_MS)
            assert await one(
                "SELECT count(*) FROM events WHERE body::jsonb->>'type' = 'gateway.health'"
            ) == (GATEWAYS * ROUNDS,)
            # command results: stored, counted per gateway, and central's commands applied
            assert await one(
                "SELECT count(*) FROM events WHERE body::jsonb->>'type' = 'command_result'"
            ) == (len(answered),)
            assert await one(
                "SELECT count(*), sum(value) FROM fleet_counters WHERE name = 'command.applied'"
            ) == (len(answered), len(answered))
            assert await one(
                "SELECT count(*) FILTER (WHERE state = 'applied' AND results = 1), count(*) FROM central_commands"
            ) == (len(answered), len(answered))
        for h in heads:
            assert "refused batch" not in h.log.read_text()
    finally:
        for h in heads:
            h.stop(10)

"""Two headend processes behind one MQTT shared subscription, sharing PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from firmware_bridge.reading import Measurement, Quantity, Reading
from gateway.config import BrokerSection, UplinkSection
from headend.ingest import Headend
from headend.store_pg import PostgresHeadendDB
from store_forward.outbox import Outbox
from store_forward.uplink import Uplink
from tests.harness.mosquitto import Mosquitto

# Where a PostgreSQL server for tests is looked for, in order. `./dev test` makes
# sure one of these answers (it installs and starts PostgreSQL when none does).
CANDIDATE_DSNS = [
    d
    for d in (
        os.environ.get("EDGEGW_TEST_PG"),
        "host=127.0.0.1 port=5432 user=postgres dbname=postgres",
        "host=/var/run/postgresql dbname=postgres",
    )
    if d
]


def admin_connection() -> tuple[psycopg.Connection[tuple[object, ...]], str]:
    errors = []
    for dsn in CANDIDATE_DSNS:
        try:
            return psycopg.connect(dsn, autocommit=True, connect_timeout=5), dsn
        except psycopg.OperationalError as exc:
            errors.append(f"{dsn!r}: {exc}".strip())
    pytest.fail("no PostgreSQL server for the tests: " + "; ".join(errors), pytrace=False)


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    name = f"edgegw_test_{secrets.token_hex(4)}"
    admin, dsn = admin_connection()
    with admin:
        admin.execute(f"CREATE DATABASE {name}")
        try:
            yield dsn.replace("dbname=postgres", f"dbname={name}")
        finally:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.asynccontextmanager
async def tasks(*coros) -> AsyncIterator[None]:  # type: ignore[no-untyped-def]
    ts = [asyncio.create_task(c) for c in coros]
    try:
        yield
    finally:
        for t in ts:
            t.cancel()
        await asyncio.gather(*ts, return_exceptions=True)


async def test_two_headends_share_the_load_exactly_once(
    tmp_path: Path, mosquitto: Mosquitto, pg_dsn: str
) -> None:
    stores = [await PostgresHeadendDB.open(pg_dsn) for _ in range(2)]
    heads = [
        Headend(s, host="127.0.0.1", port=mosquitto.port, share_group="central", identifier=f"he{i}")
        for i, s in enumerate(stores)
    ]
    ob = await Outbox.open(tmp_path / "gw.db")
    for k in range(40):
        await ob.commit_cycle(
            k,
            [
                Reading(f"m{j}", 1000 * k, {Quantity.ENERGY_IMPORT: Measurement(Decimal(k) / 4)})
                for j in range(5)
            ],
        )
    up = Uplink(
        ob,
        gateway_id="gw-pg",
        broker=BrokerSection(port=mosquitto.port),
        settings=UplinkSection(batch_max_records=10, window=4, ack_timeout_s=3.0),
        unauthenticated_acks=True,  # unsealed batches (a headend without a registry)
    )
    async with tasks(*(h.run() for h in heads)):
        await asyncio.wait_for(asyncio.gather(*(h.connected.wait() for h in heads)), 10)
        async with tasks(up.run()):
            deadline = time.monotonic() + 30
            while (await ob.stats()).records and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
    assert (await ob.stats()).records == 0
    summary = await stores[0].summary("gw-pg")
    assert summary["readings"] == 200 and summary["distinct_meter_times"] == 200
    assert all(h.batches_received > 0 for h in heads), [h.batches_received for h in heads]
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        cur = await conn.execute("SELECT min(record_id), max(record_id), count(*) FROM readings")
        assert await cur.fetchone() == (1, 200, 200)
    await ob.close()
    for s in stores:
        await s.close()

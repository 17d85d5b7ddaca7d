"""The time floor and the last trusted time used share one row (schema version 6):
a commit that stores both writes one database page, observed in a real SQLite
file's write-ahead log; a database of the previous release keeps both values."""

from __future__ import annotations

from pathlib import Path

import aiosqlite

from gateway import storage_setup
from gateway.config import load_config
from gateway.database import SCHEMA, open_database
from gateway.security.trusted_time import (
    CONFIRM_MS,
    create_schema,
    load_floor,
    load_seen,
    save_clock,
    save_floor,
    save_floor_and_seen,
    save_seen,
)
from gateway.storage_recovery import plan_recovery
from tests.gateway.test_previous_release import copy_site, snapshot, user_version
from tests.gateway.test_storage_recovery import image, table
from tests.security.test_trusted_time import T0, FakeClocks

PAGE = 1024


def wal_frames(db: Path) -> int:
    wal = Path(f"{db}-wal")
    size = wal.stat().st_size if wal.exists() else 0
    return 0 if size < 32 else (size - 32) // (PAGE + 24)


async def test_storing_the_floor_and_the_last_time_used_writes_one_page(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    clocks = FakeClocks(wall=T0, synced=True)
    async with aiosqlite.connect(db, isolation_level=None) as conn:
        await conn.execute(f"PRAGMA page_size={PAGE}")
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA wal_autocheckpoint=0")
        await create_schema(conn)
        await save_floor(conn, T0 - 1000, 1)
        await conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        clock = clocks.clock(await load_floor(conn), await load_seen(conn))
        clocks.advance(CONFIRM_MS)
        clock.now()
        await conn.execute("BEGIN IMMEDIATE")
        await save_clock(conn, clock)
        await conn.execute("COMMIT")
        assert wal_frames(db) == 1  # the row's page, once
        assert await load_seen(conn) == T0 + CONFIRM_MS and await load_floor(conn) > T0 - 1000


async def test_one_statement_keeps_the_floor_from_going_back_and_stores_the_time_used(
    tmp_path: Path,
) -> None:
    async with aiosqlite.connect(tmp_path / "gw.db") as conn:
        await create_schema(conn)
        await save_seen(conn, 500)  # no floor stored yet: the floor stays 0
        assert (await load_floor(conn), await load_seen(conn)) == (0, 500)
        await save_floor_and_seen(conn, 2000, 7, 1900)
        assert (await load_floor(conn), await load_seen(conn)) == (2000, 1900)
        await save_floor_and_seen(conn, 1500, 9, 1400)  # an older floor never overwrites
        assert (await load_floor(conn), await load_seen(conn)) == (2000, 1400)
        async with conn.execute("SELECT updated_mono_ms FROM sec_time_floor") as cur:
            assert await cur.fetchall() == [(7,)]


async def test_the_previous_releases_database_keeps_its_floor_and_last_time_used(
    tmp_path: Path,
) -> None:
    site = copy_site(tmp_path)
    db = site / "gw.db"
    assert user_version(db) < 6
    before = snapshot(db)
    [(_, floor_ms, _)] = before["sec_time_floor"][1]
    [(_, seen_ms)] = before["sec_time_seen"][1]
    assert floor_ms and seen_ms
    ob = await open_database(
        db, keys=storage_setup.storage_keys(load_config(site / "gateway.toml"))
    )
    try:
        async with ob.transaction() as conn:
            assert (await load_floor(conn), await load_seen(conn)) == (floor_ms, seen_ms)
    finally:
        await ob.close()
    assert user_version(db) == SCHEMA.version
    after = snapshot(db)
    assert after["sec_time_seen"] == before["sec_time_seen"]  # kept as it was
    columns, [row] = after["sec_time_floor"]
    assert dict(zip(columns, row, strict=True))["seen_ms"] == seen_ms


def test_storage_recovery_takes_the_last_time_used_from_the_floors_row_where_it_is() -> None:
    floor_v4 = ("id", "floor_ms", "updated_mono_ms")
    floor_v6 = (*floor_v4, "seen_ms")
    seen = ("id", "seen_ms")
    # An image of an earlier release: the value is in sec_time_seen.
    old = image(
        "past-damage",
        [],
        [],
        sec_time_floor=table(
            "sec_time_floor", floor_v4, [{"id": 1, "floor_ms": 900, "updated_mono_ms": 1}]
        ),
        sec_time_seen=table("sec_time_seen", seen, [{"id": 1, "seen_ms": 950}]),
    )
    assert (plan_recovery([old], []).time_floor_ms, plan_recovery([old], []).time_seen_ms) == (
        900,
        950,
    )
    # One of this release: the floor's row holds it; sec_time_seen's value from before
    # version 6 (higher: a signed reset moved trusted time back since) is not taken.
    new = image(
        "as-sqlite-reads",
        [],
        [],
        sec_time_floor=table(
            "sec_time_floor",
            floor_v6,
            [{"id": 1, "floor_ms": 800, "updated_mono_ms": 1, "seen_ms": 820}],
        ),
        sec_time_seen=table("sec_time_seen", seen, [{"id": 1, "seen_ms": 5000}]),
    )
    plan = plan_recovery([new], [])
    assert (plan.time_floor_ms, plan.time_seen_ms) == (800, 820)

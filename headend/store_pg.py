"""PostgreSQL storage for the headend (``edgegw headend run --dsn ...``).

Same contract as the SQLite store in :mod:`headend.store`: the batch
row ``(gateway_id, epoch, seq)`` and every record ``(gateway_id, epoch,
record_id)`` are unique; a batch is stored in one transaction that is
committed before the ack goes out; a known batch identity with other bytes
is a conflict, not a duplicate. A database made before batch epochs is
migrated when opened (columns added, existing rows keep the epoch ``''``,
primary keys widened), under the same advisory lock as schema creation. Several headend processes may share one database (and one
MQTT shared subscription): the unique keys make concurrent deliveries of
the same batch safe — exactly one transaction inserts it, the others see a
duplicate.

The tables are the export schema for billing systems (docs/protocol.md,
"Central database").
"""

from __future__ import annotations

from typing import Any

import orjson
import psycopg
from psycopg import sql

from headend import fleet, notices
from headend.fleet import PresenceRow
from headend.store import (
    BATCH_COLS,
    EVENT_COLS,
    READING_COLS,
    StoreResult,
    batch_row,
    batch_statements,
    record_row,
    same_bytes,
)
from store_forward.codec import AnyBatch
from store_forward.presence import Presence

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    gateway_id  TEXT    NOT NULL,
    seq         BIGINT  NOT NULL,
    received_ms BIGINT  NOT NULL,
    n_records   INTEGER NOT NULL,
    epoch       TEXT    NOT NULL DEFAULT '',
    digest      BYTEA,
    PRIMARY KEY (gateway_id, epoch, seq)
);
CREATE TABLE IF NOT EXISTS readings (
    gateway_id  TEXT    NOT NULL,
    record_id   BIGINT  NOT NULL,
    meter_id    TEXT    NOT NULL,
    time_ms     BIGINT  NOT NULL,
    time_source TEXT    NOT NULL,
    quantities  JSONB   NOT NULL,
    quality     JSONB,
    batch_seq   BIGINT  NOT NULL,
    epoch       TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (gateway_id, epoch, record_id)
);
CREATE INDEX IF NOT EXISTS readings_meter_time ON readings (gateway_id, meter_id, time_ms);
CREATE TABLE IF NOT EXISTS telemetry (
    gateway_id  TEXT    NOT NULL,
    record_id   BIGINT  NOT NULL,
    meter_id    TEXT    NOT NULL,
    time_ms     BIGINT  NOT NULL,
    time_source TEXT    NOT NULL,
    quantities  JSONB   NOT NULL,
    quality     JSONB,
    batch_seq   BIGINT  NOT NULL,
    epoch       TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (gateway_id, epoch, record_id)
);
CREATE INDEX IF NOT EXISTS telemetry_meter_time ON telemetry (gateway_id, meter_id, time_ms);
CREATE TABLE IF NOT EXISTS events (
    gateway_id  TEXT    NOT NULL,
    record_id   BIGINT  NOT NULL,
    kind        TEXT    NOT NULL,
    created_ms  BIGINT  NOT NULL,
    body        JSONB   NOT NULL,
    batch_seq   BIGINT  NOT NULL,
    epoch       TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (gateway_id, epoch, record_id)
);
-- What the operator console (headend/console) looks events up by.
CREATE INDEX IF NOT EXISTS events_type_time ON events ((body->>'type'), created_ms);
CREATE INDEX IF NOT EXISTS events_gateway_time ON events (gateway_id, created_ms);
CREATE INDEX IF NOT EXISTS events_gateway_type ON events (gateway_id, (body->>'type'), created_ms);
CREATE INDEX IF NOT EXISTS events_gateway_account ON events (gateway_id, (body->>'account'), created_ms);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS fleet_gateways (
    gateway_id        TEXT PRIMARY KEY,
    last_batch_ms     BIGINT NOT NULL,
    newest_record_ms  BIGINT,
    last_batch_lag_ms BIGINT,
    batches           BIGINT NOT NULL,
    records           BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS fleet_meters (
    gateway_id TEXT   NOT NULL,
    meter_id   TEXT   NOT NULL,
    state      TEXT   NOT NULL,
    since_ms   BIGINT NOT NULL,
    PRIMARY KEY (gateway_id, meter_id)
);
CREATE TABLE IF NOT EXISTS fleet_counters (
    gateway_id TEXT   NOT NULL,
    name       TEXT   NOT NULL,
    value      BIGINT NOT NULL,
    PRIMARY KEY (gateway_id, name)
);
CREATE TABLE IF NOT EXISTS fleet_presence (
    gateway_id TEXT   PRIMARY KEY,
    state      TEXT   NOT NULL,
    since_ms   BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    version    TEXT,
    boot_id    TEXT,
    started_ms BIGINT,
    session_ms BIGINT,
    reason     TEXT
);
CREATE TABLE IF NOT EXISTS fleet_health (
    gateway_id TEXT   PRIMARY KEY,
    time_ms    BIGINT NOT NULL,
    record_id  BIGINT NOT NULL,
    body       TEXT   NOT NULL
);
"""

# Tables made before batch epochs: the columns they gain, and their new keys.
_MIGRATION = {
    "batches": ("epoch TEXT NOT NULL DEFAULT '', ADD COLUMN digest BYTEA", "gateway_id, epoch, seq"),
    "readings": ("epoch TEXT NOT NULL DEFAULT ''", "gateway_id, epoch, record_id"),
    "telemetry": ("epoch TEXT NOT NULL DEFAULT ''", "gateway_id, epoch, record_id"),
    "events": ("epoch TEXT NOT NULL DEFAULT ''", "gateway_id, epoch, record_id"),
}


async def _migrate(conn: psycopg.AsyncConnection[Any]) -> None:
    for table, (add, key) in _MIGRATION.items():
        cur = await conn.execute(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = %s AND column_name = 'epoch'",
            (table,),
        )
        row = await cur.fetchone()
        cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
        exists = await cur.fetchone()
        if not exists or not exists[0] or (row and row[0]):
            continue
        cur = await conn.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'p'",
            (table,),
        )
        pkey = await cur.fetchone()
        drop = sql.SQL("DROP CONSTRAINT {}, ").format(sql.Identifier(pkey[0])) if pkey else sql.SQL("")
        await conn.execute(
            sql.SQL("ALTER TABLE {} ADD COLUMN {}, {}ADD PRIMARY KEY ({})").format(
                sql.Identifier(table), sql.SQL(add), drop, sql.SQL(key)
            )
        )


class PostgresHeadendDB:
    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn

    @classmethod
    async def open(cls, dsn: str) -> PostgresHeadendDB:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=False)
        async with conn.transaction():
            # Serialise schema creation between headends starting together.
            await conn.execute("SELECT pg_advisory_xact_lock(727001)")
            await _migrate(conn)
            await conn.execute(SCHEMA)
            await conn.execute(notices.PG_SCHEMA)
        return cls(conn)

    async def close(self) -> None:
        await self._conn.close()

    async def store(self, batch: AnyBatch, now_ms: int) -> StoreResult:
        conn = self._conn
        async with conn.transaction():
            cur = await conn.execute(
                f"INSERT INTO batches ({BATCH_COLS}) VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT DO NOTHING",
                batch_row(batch, now_ms),
            )
            if cur.rowcount == 0:
                cur = await conn.execute(
                    "SELECT digest FROM batches WHERE gateway_id = %s AND epoch = %s AND seq = %s",
                    (batch.gateway_id, batch.epoch, batch.seq),
                )
                row = await cur.fetchone()
                known = same_bytes(row[0] if row else None, batch)
                await self._count("duplicate_batches" if known else "conflicting_batches", 1)
                return StoreResult("duplicate" if known else "conflict", 0, 0)
            new = dup = 0
            fresh = []
            for r in batch.records:
                table, row = record_row(batch, r)
                cols = EVENT_COLS if table == "events" else READING_COLS
                cur = await conn.execute(
                    f"INSERT INTO {table} ({cols}) VALUES ({', '.join(['%s'] * len(row))})"
                    " ON CONFLICT DO NOTHING",
                    row,
                )
                if cur.rowcount:
                    new += 1
                    fresh.append(r)
                else:
                    dup += 1
            if dup:
                await self._count("duplicate_records", dup)
            for stmt, args in batch_statements(batch, fresh, now_ms):
                await conn.execute(stmt.replace("?", "%s"), args)
            return StoreResult("stored", new, dup)

    async def _count(self, name: str, n: int) -> None:
        await self._conn.execute(
            "INSERT INTO counters (name, value) VALUES (%s, %s)"
            " ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value",
            (name, n),
        )

    async def fleet(self) -> fleet.FleetSnapshot:
        rows = []
        async with self._conn.transaction():
            for q in (fleet.SELECT_GATEWAYS, fleet.SELECT_METERS, fleet.SELECT_COUNTERS):
                cur = await self._conn.execute(q)
                rows.append([tuple(r) for r in await cur.fetchall()])
        return fleet.snapshot(*rows)

    async def save_presence(self, gateway: str, p: Presence, now_ms: int) -> None:
        async with self._conn.transaction():  # committed at once: no transaction left open
            await self._conn.execute(
                fleet.UPSERT_PRESENCE.replace("?", "%s"), fleet.presence_params(gateway, p, now_ms)
            )

    async def presence(self) -> list[PresenceRow]:
        async with self._conn.transaction():
            cur = await self._conn.execute(fleet.SELECT_PRESENCE)
            return [PresenceRow.of(tuple(r)) for r in await cur.fetchall()]

    async def health(self) -> dict[str, tuple[int, dict[str, Any]]]:
        """The newest health record per gateway: (time, body)."""
        async with self._conn.transaction():
            cur = await self._conn.execute(fleet.SELECT_HEALTH)
            return {str(g): (int(t), orjson.loads(b)) for g, t, _, b in await cur.fetchall()}

    async def summary(self, gateway_id: str | None = None) -> dict[str, Any]:
        async with self._conn.transaction():
            if gateway_id:
                cur = await self._conn.execute(
                    "SELECT count(*), count(DISTINCT (meter_id, time_ms)) FROM readings"
                    " WHERE gateway_id = %s",
                    (gateway_id,),
                )
            else:
                cur = await self._conn.execute(
                    "SELECT count(*), count(DISTINCT (meter_id, time_ms)) FROM readings"
                )
            row = await cur.fetchone()
            cur = await self._conn.execute("SELECT name, value FROM counters")
            counters = {str(k): int(v) for k, v in await cur.fetchall()}
        assert row is not None
        return {
            "readings": int(row[0]),
            "distinct_meter_times": int(row[1]),
            "duplicate_batches": counters.get("duplicate_batches", 0),
            "duplicate_records": counters.get("duplicate_records", 0),
            "conflicting_batches": counters.get("conflicting_batches", 0),
        }

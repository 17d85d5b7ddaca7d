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
duplicate. A batch's records go in with one statement per table, from arrays,
``ON CONFLICT DO NOTHING RETURNING`` the ids inserted: a record that another
headend's transaction stored meanwhile is waited for and then left out, so
the records new to central (and what they change: fleet, notices, command
results) are exactly those this statement inserted.

The tables are the export schema for billing systems (docs/protocol.md,
"Central database"); the ``edgegw_*`` views (:data:`VIEWS`) present them for
integrators without our decoder (docs/integration.md).
"""

from __future__ import annotations

from typing import Any

import orjson
import psycopg
from psycopg import sql

from headend import central_db, fleet, notices
from headend.fleet import PresenceRow
from headend.sql import PgTx
from headend.store import (
    BATCH_COLS,
    EVENT_COLS,
    READING_COLS,
    Entry,
    StoreBatch,
    StoreResult,
    batch_row,
    batch_rows,
    batch_statements,
    fresh_of,
    record_count,
    same_bytes,
)
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

# PostgreSQL views for integrators (docs/integration.md, "PostgreSQL views"). Their
# columns are only ever added at the end; a change that would alter a column gets a
# view of a new name, so what an integrator built on these keeps working.
VIEWS = """
CREATE OR REPLACE VIEW edgegw_readings AS
SELECT r.gateway_id, r.meter_id, to_timestamp(r.time_ms / 1000.0) AS read_at, r.time_ms, r.time_source,
       'billing'::text AS record_class, q.key AS quantity, q.value AS value_text,
       CASE WHEN q.value ~ '^-?[0-9]+(\\.[0-9]+)?$' THEN q.value::numeric END AS value,
       COALESCE(r.quality->>q.key, 'good') AS quality, r.epoch, r.record_id, r.batch_seq
  FROM readings r CROSS JOIN LATERAL jsonb_each_text(r.quantities) q
UNION ALL
SELECT t.gateway_id, t.meter_id, to_timestamp(t.time_ms / 1000.0), t.time_ms, t.time_source,
       'telemetry'::text, q.key, q.value,
       CASE WHEN q.value ~ '^-?[0-9]+(\\.[0-9]+)?$' THEN q.value::numeric END,
       COALESCE(t.quality->>q.key, 'good'), t.epoch, t.record_id, t.batch_seq
  FROM telemetry t CROSS JOIN LATERAL jsonb_each_text(t.quantities) q;
COMMENT ON VIEW edgegw_readings IS
  'One row per reading and quantity (billing registers and telemetry); value as numeric and as the exact text the meter gave';

CREATE OR REPLACE VIEW edgegw_events AS
SELECT e.gateway_id, e.epoch, e.record_id, e.kind, e.body->>'type' AS type,
       COALESCE(e.body->>'account', e.body->'effect'->>'account') AS account, e.body->>'meter' AS meter,
       COALESCE(CASE WHEN jsonb_typeof(e.body->'time_ms') = 'number' THEN (e.body->>'time_ms')::bigint END,
                e.created_ms) AS time_ms,
       to_timestamp(COALESCE(CASE WHEN jsonb_typeof(e.body->'time_ms') = 'number'
                                  THEN (e.body->>'time_ms')::bigint END, e.created_ms) / 1000.0) AS occurred_at,
       e.created_ms, e.body, e.batch_seq
  FROM events e WHERE e.kind = 'event';
COMMENT ON VIEW edgegw_events IS
  'Gateway events (docs/protocol.md, docs/billing.md): type, account and meter lifted out of the JSON body';

CREATE OR REPLACE VIEW edgegw_charges AS
SELECT e.gateway_id, e.epoch, e.record_id, e.body->>'id' AS entry_id, e.body->>'account' AS account,
       (e.body->>'seq')::bigint AS ledger_seq, e.body->>'kind' AS entry_kind,
       (e.body->>'amount_micro')::bigint AS amount_micro, (e.body->>'time_ms')::bigint AS time_ms,
       to_timestamp((e.body->>'time_ms')::bigint / 1000.0) AS charged_at, e.body->'body' AS detail
  FROM events e WHERE e.kind = 'charge';
COMMENT ON VIEW edgegw_charges IS
  'Ledger entries the gateways reported (debits negative, credits positive), micro-yuan';

CREATE OR REPLACE VIEW edgegw_balance_reports AS
SELECT gateway_id, epoch, record_id, account, time_ms, (body->>'balance_micro')::bigint AS balance_micro,
       type AS source
  FROM edgegw_events
 WHERE type IN ('cutoff.state_change', 'cutoff.trip_pending', 'cutoff.restore_pending')
   AND jsonb_typeof(body->'balance_micro') = 'number' AND account IS NOT NULL
UNION ALL
SELECT gateway_id, epoch, record_id, body->'effect'->>'account',
       COALESCE(CASE WHEN jsonb_typeof(body->'at_ms') = 'number' THEN (body->>'at_ms')::bigint END, time_ms),
       (body->'effect'->>'balance_after_micro')::bigint, type
  FROM edgegw_events
 WHERE type = 'command_result' AND jsonb_typeof(body->'effect'->'balance_after_micro') = 'number'
   AND body->'effect'->>'account' IS NOT NULL;
COMMENT ON VIEW edgegw_balance_reports IS
  'Every balance a gateway reported: at each cutoff level change and after each top-up';

CREATE OR REPLACE VIEW edgegw_balances AS
SELECT b.gateway_id, b.account, b.balance_micro, b.time_ms AS as_of_ms, to_timestamp(b.time_ms / 1000.0) AS as_of,
       b.source, c.since AS charges_since_micro, b.balance_micro + c.since AS estimated_balance_micro
  FROM (SELECT DISTINCT ON (gateway_id, account) *
          FROM edgegw_balance_reports
         ORDER BY gateway_id, account, time_ms DESC, epoch DESC, record_id DESC) b
  CROSS JOIN LATERAL (
        SELECT COALESCE(sum(amount_micro), 0)::bigint AS since FROM edgegw_charges ch
         WHERE ch.gateway_id = b.gateway_id AND ch.account = b.account AND ch.time_ms > b.time_ms) c;
COMMENT ON VIEW edgegw_balances IS
  'Per account: the newest balance reported, and that balance plus the charges reported for later instants';

CREATE OR REPLACE VIEW edgegw_cutoff_state AS
SELECT DISTINCT ON (gateway_id, account)
       gateway_id, account, body->>'to' AS level, body->>'from' AS previous_level, body->>'state' AS supply,
       body->>'reason' AS reason, time_ms AS since_ms, occurred_at AS since,
       (body->>'balance_micro')::bigint AS balance_micro
  FROM edgegw_events
 WHERE type = 'cutoff.state_change' AND account IS NOT NULL
 ORDER BY gateway_id, account, time_ms DESC, epoch DESC, record_id DESC;
COMMENT ON VIEW edgegw_cutoff_state IS
  'Per account: the supply level (normal, alarm1, alarm2, grace, cutoff) since its newest change, with the reason';

CREATE OR REPLACE VIEW edgegw_gateways AS
SELECT g.gateway_id, p.state AS presence, p.since_ms AS presence_since_ms, p.updated_ms AS presence_updated_ms,
       p.version, p.boot_id, p.started_ms, p.session_ms, p.reason AS presence_reason,
       f.last_batch_ms, f.newest_record_ms, f.last_batch_lag_ms,
       GREATEST(f.last_batch_lag_ms,
                (extract(epoch FROM clock_timestamp()) * 1000)::bigint - f.newest_record_ms) AS backlog_age_ms,
       f.batches, f.records, h.time_ms AS health_ms, h.body::jsonb AS health,
       (SELECT count(*) FROM fleet_meters m WHERE m.gateway_id = g.gateway_id AND m.state = 'online') AS meters_online,
       (SELECT count(*) FROM fleet_meters m WHERE m.gateway_id = g.gateway_id AND m.state = 'offline') AS meters_offline,
       (SELECT count(*) FROM fleet_meters m WHERE m.gateway_id = g.gateway_id AND m.state = 'quarantined')
         AS meters_quarantined
  FROM (SELECT gateway_id FROM fleet_gateways UNION SELECT gateway_id FROM fleet_presence) g
  LEFT JOIN fleet_presence p ON p.gateway_id = g.gateway_id
  LEFT JOIN fleet_gateways f ON f.gateway_id = g.gateway_id
  LEFT JOIN fleet_health h ON h.gateway_id = g.gateway_id;
COMMENT ON VIEW edgegw_gateways IS
  'Per gateway: presence (retained birth/death), last batch and backlog age, newest health record, meters by state';

CREATE OR REPLACE VIEW edgegw_notifications AS
SELECT notice_id, gateway_id, account, kind, kind IN ('cutoff', 'restored') AS urgent, event_type, event_ms,
       state, attempts, sent_ms, recipient, language, text, http_status, detail
  FROM notify_queue;
COMMENT ON VIEW edgegw_notifications IS
  'Caring reminders: each notice, its state (pending, sent, superseded, cleared, expired, unaddressed, failed) and text';
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


def _insert(table: str, cols: str, arrays: str, alias: str, values: str) -> str:
    """One statement that inserts a batch's rows of ``table`` from arrays (one per
    column that varies; gateway, batch seq and epoch are the same for every row)
    and returns the ids it inserted: a row whose key is taken is skipped, and its
    id is not returned. The arrays go in binary (``%b``): as text, psycopg would quote
    and escape every JSON document in Python."""
    return (
        f"INSERT INTO {table} ({cols})"
        f" SELECT %(gw)s, {values}, %(seq)s, %(epoch)s FROM unnest({arrays}) AS u({alias})"
        " ON CONFLICT DO NOTHING RETURNING record_id"
    )


_READING_INSERT = (
    "%(c1)b::bigint[], %(c2)b::text[], %(c3)b::bigint[], %(c4)b::text[],"
    " %(c5)b::text[], %(c6)b::text[]",
    "id, meter, t, ts, v, q",
    "u.id, u.meter, u.t, u.ts, u.v::jsonb, u.q::jsonb",
)
_EVENT_INSERT = (
    "%(c1)b::bigint[], %(c2)b::text[], %(c3)b::bigint[], %(c4)b::text[]",
    "id, kind, t, body",
    "u.id, u.kind, u.t, u.body::jsonb",
)
_INSERT = {
    "readings": _insert("readings", READING_COLS, *_READING_INSERT),
    "telemetry": _insert("telemetry", READING_COLS, *_READING_INSERT),
    "events": _insert("events", EVENT_COLS, *_EVENT_INSERT),
}


def _unnest_args(batch: StoreBatch, table: str, entries: list[Entry]) -> dict[str, Any]:
    """The parameters of :data:`_INSERT` ``[table]``: the varying columns as lists."""
    width = 7 if table != "events" else 5  # row columns before batch_seq, epoch
    columns = list(zip(*(e[2] for e in entries), strict=True))
    args: dict[str, Any] = {"gw": batch.gateway_id, "seq": batch.seq, "epoch": batch.epoch}
    for i in range(1, width):
        args[f"c{i}"] = list(columns[i])
    return args


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
            await conn.execute(VIEWS)
            await conn.execute(central_db.PG_SCHEMA)
        return cls(conn)

    async def close(self) -> None:
        await self._conn.close()

    async def store(self, batch: StoreBatch, now_ms: int) -> StoreResult:
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
            rows = batch_rows(batch)
            inserted = []
            for table, entries in rows.tables.items():
                cur = await conn.execute(_INSERT[table], _unnest_args(batch, table, entries))
                stored = {int(i) for (i,) in await cur.fetchall()}
                # the ids this statement inserted: any other was there already, or was
                # inserted meanwhile by another headend's transaction (which this one waited for)
                inserted.append([e for e in entries if e[2][1] in stored])
            fresh = fresh_of(inserted)
            new, dup = len(fresh), record_count(batch) - len(fresh)
            if dup:
                await self._count("duplicate_records", dup)
            for stmt, args in batch_statements(batch, fresh, now_ms):
                await conn.execute(stmt.replace("?", "%s"), args)
            await central_db.apply_results_in(PgTx(conn), batch.gateway_id, fresh.records, now_ms)
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

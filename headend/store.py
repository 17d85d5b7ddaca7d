"""The headend's SQLite store: every batch once, committed before its ack.

A batch is recorded by (gateway, epoch, seq) with the SHA-256 of its payload,
in one transaction with its records (each keyed by (gateway, epoch, record
id)); if that identity is already known the batch is a duplicate (or, with
other bytes, a conflict) and nothing else is written. The records go in with
one statement per table (:func:`batch_rows`: each (table, record id) once;
here the ids the table already holds are looked up once and the rest inserted
with ``executemany``), never one statement per row. Commits are
``synchronous=FULL``. :class:`HeadendStore` is the contract the ingest
(:mod:`headend.ingest`) and the USB import rely on; PostgreSQL implements it
too (:mod:`headend.store_pg`). The same transaction applies the command
results and top-up credits among the new records to central's command queue
(:func:`headend.central_db.apply_results_in`), whose tables the store creates
too.

Databases made before batch epochs existed are migrated when opened: their
rows keep the legacy epoch ``''`` (batches in the encodings without an epoch
still get it), and the keys gain the epoch.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from itertools import compress
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
import orjson

from headend import central_db, fleet, notices
from headend.fleet import PresenceRow
from headend.sql import SqliteTx, begin_sqlite
from store_forward.codec import AnyBatch
from store_forward.presence import Presence
from store_forward.records import RecordClass, RecordKind, dumps
from store_forward.wire import DecodedRows

log = logging.getLogger(__name__)

# The tables (columns in this order; ``epoch`` last, where migrations add it).
_TABLES = {
    "batches": """
    gateway_id  TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    n_records   INTEGER NOT NULL,
    epoch       TEXT    NOT NULL DEFAULT '',  -- batch epoch; '' for batches without one
    digest      BLOB,                         -- SHA-256 of the payload (NULL: stored before epochs)
    PRIMARY KEY (gateway_id, epoch, seq)""",
    "readings": """
    gateway_id  TEXT    NOT NULL,
    record_id   INTEGER NOT NULL,
    meter_id    TEXT    NOT NULL,
    time_ms     INTEGER NOT NULL,
    time_source TEXT    NOT NULL,
    quantities  TEXT    NOT NULL,  -- JSON {quantity: "decimal"}
    quality     TEXT,              -- JSON {quantity: quality}, only non-good
    batch_seq   INTEGER NOT NULL,
    epoch       TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (gateway_id, epoch, record_id)""",
    "telemetry": """
    gateway_id  TEXT    NOT NULL,
    record_id   INTEGER NOT NULL,
    meter_id    TEXT    NOT NULL,
    time_ms     INTEGER NOT NULL,
    time_source TEXT    NOT NULL,
    quantities  TEXT    NOT NULL,  -- JSON {quantity: "decimal"}: instantaneous values
    quality     TEXT,
    batch_seq   INTEGER NOT NULL,
    epoch       TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (gateway_id, epoch, record_id)""",
    "events": """
    gateway_id  TEXT    NOT NULL,
    record_id   INTEGER NOT NULL,
    kind        TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL,
    body        TEXT    NOT NULL,
    batch_seq   INTEGER NOT NULL,
    epoch       TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (gateway_id, epoch, record_id)""",
}

SCHEMA = (
    "".join(f"CREATE TABLE IF NOT EXISTS {name} ({cols}\n);\n" for name, cols in _TABLES.items())
    + """
CREATE INDEX IF NOT EXISTS readings_meter_time ON readings (gateway_id, meter_id, time_ms);
CREATE INDEX IF NOT EXISTS telemetry_meter_time ON telemetry (gateway_id, meter_id, time_ms);
-- What the operator console (headend/console) looks events up by: the event type
-- and the account in the body, spelt exactly as its queries spell them.
CREATE INDEX IF NOT EXISTS events_type_time ON events (json_extract(body, '$.type'), created_ms);
CREATE INDEX IF NOT EXISTS events_gateway_time ON events (gateway_id, created_ms);
CREATE INDEX IF NOT EXISTS events_gateway_type ON events (gateway_id, json_extract(body, '$.type'), created_ms);
CREATE INDEX IF NOT EXISTS events_gateway_account ON events (gateway_id, json_extract(body, '$.account'), created_ms);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""
    + fleet.SQLITE_SCHEMA
    + notices.SQLITE_SCHEMA
    + central_db.SQLITE_SCHEMA
)


@dataclass(frozen=True)
class StoreResult:
    status: str  # "stored" | "duplicate" | "conflict" (other bytes under this identity)
    records_new: int
    records_dup: int


READING_COLS = "gateway_id, record_id, meter_id, time_ms, time_source, quantities, quality, batch_seq, epoch"
EVENT_COLS = "gateway_id, record_id, kind, created_ms, body, batch_seq, epoch"
BATCH_COLS = "gateway_id, seq, received_ms, n_records, epoch, digest"


# What a store takes: a batch of records, or a sealed batch decoded with its readings
# as rows (store_forward.wire.decode_batch_rows: the headend's ingest path).
StoreBatch = AnyBatch | DecodedRows


def record_count(batch: StoreBatch) -> int:
    """How many records ``batch`` carries."""
    return batch.n_records if isinstance(batch, DecodedRows) else len(batch.records)


def batch_row(batch: StoreBatch, now_ms: int) -> tuple[Any, ...]:
    """The ``batches`` row of ``batch``, in :data:`BATCH_COLS` order."""
    return (batch.gateway_id, batch.seq, now_ms, record_count(batch), batch.epoch, batch.digest or None)


def same_bytes(stored_digest: bytes | None, batch: StoreBatch) -> bool:
    """Whether a known batch identity holds the bytes just received (a row stored
    before digests were kept cannot tell, and counts as the same)."""
    return stored_digest is None or not batch.digest or bytes(stored_digest) == batch.digest


CONFLICT_REASON = "central holds different bytes under this batch's (gateway, epoch, seq)"


_TELEMETRY = int(RecordClass.TELEMETRY)
TABLE_COLS = {"readings": READING_COLS, "telemetry": READING_COLS, "events": EVENT_COLS}


def record_row(batch: AnyBatch, r: Any) -> tuple[str, tuple[Any, ...]]:
    """The table a record goes to (``readings``, ``telemetry`` or ``events``) and its
    row, in :data:`READING_COLS` / :data:`EVENT_COLS` order (both stores use it)."""
    return _record_row(batch.gateway_id, batch.seq, batch.epoch, r)


_SORTED = orjson.OPT_SORT_KEYS  # as store_forward.records.dumps


def _record_row(gw: str, seq: int, epoch: str, r: Any) -> tuple[str, tuple[Any, ...]]:
    if r.kind == RecordKind.READING:
        b = r.body
        q = b.get("q")
        return "telemetry" if r.cls == _TELEMETRY else "readings", (
            gw,
            r.id,
            str(b["m"]),
            int(b["t"]),
            str(b.get("ts", "system")),
            orjson.dumps(b["v"], option=_SORTED).decode(),
            orjson.dumps(q, option=_SORTED).decode() if q else None,
            seq,
            epoch,
        )
    body = dumps(r.body).decode()
    return "events", (gw, r.id, r.kind, r.created_ms, body, seq, epoch)


# (position in the batch, record, row); the row's second column is the record id. A
# reading of a DecodedRows batch has no record object: (its index among the batch's
# readings, None, row).
Entry = tuple[int, Any, tuple[Any, ...]]


@dataclass(frozen=True)
class BatchRows:
    """A batch's records as rows per table, each (table, record id) once: a record
    that repeats one earlier in the same batch is left out (and counted), as the
    row-by-row ``INSERT ... ON CONFLICT DO NOTHING`` it replaces would have ignored
    it."""

    tables: dict[str, list[Entry]]
    repeated: int

    def ids(self, table: str) -> list[int]:
        return [e[2][1] for e in self.tables[table]]


def batch_rows(batch: StoreBatch) -> BatchRows:
    """The rows of ``batch`` by table, in batch order (see :class:`BatchRows`)."""
    gw, seq, epoch = batch.gateway_id, batch.seq, batch.epoch
    tables: dict[str, list[Entry]] = {}
    if isinstance(batch, DecodedRows):
        # the readings' rows as decoded, each table's in batch order (a reading that
        # travelled as a generic record comes among the others, and is put in its place)
        rows, classes, others = batch.reading_rows, batch.reading_classes, batch.others
        if others:
            taken = {p for p, _ in others}
            where: Sequence[int] = [p for p in range(batch.n_records) if p not in taken]
        else:
            where = range(len(rows))
        telemetry = [c == _TELEMETRY for c in classes]
        billing = [not t for t in telemetry]
        for table, keep in (("readings", billing), ("telemetry", telemetry)):
            if any(keep):
                tables[table] = list(
                    zip(compress(where, keep), itertools.repeat(None), compress(rows, keep), strict=False)
                )
        numbered: Iterable[tuple[int, Any]] = others
        mixed = {"readings", "telemetry"}.intersection(tables)  # tables that may get records too
    else:
        numbered = enumerate(batch.records)
        mixed = set()
    unsorted: set[str] = set()
    for pos, r in numbered:
        table, row = _record_row(gw, seq, epoch, r)
        entries = tables.get(table)
        if entries is None:
            entries = tables[table] = []
        entries.append((pos, r, row))
        if table in mixed:
            unsorted.add(table)
    for table in unsorted:
        tables[table].sort(key=itemgetter(0))
    repeated = 0
    for table, entries in tables.items():
        if len({e[2][1] for e in entries}) == len(entries):
            continue  # (the usual batch: no id twice)
        seen: set[int] = set()
        firsts = []
        for e in entries:
            if e[2][1] in seen:
                repeated += 1
            else:
                seen.add(e[2][1])
                firsts.append(e)
        tables[table] = firsts
    return BatchRows(tables, repeated)


def new_entries(entries: list[Entry], stored: Collection[int]) -> list[Entry]:
    """The entries whose record ids are not among ``stored`` (the ids the table already
    holds for this gateway and epoch)."""
    return [e for e in entries if e[2][1] not in stored] if stored else entries


def fresh_records(inserted: Iterable[list[Entry]]) -> list[Any]:
    """The records of the entries inserted into each table, back in batch order."""
    parts = [p for p in inserted if p]
    if len(parts) == 1:
        return [e[1] for e in parts[0]]
    return [e[1] for e in sorted((e for p in parts for e in p), key=itemgetter(0))]


@dataclass(frozen=True)
class Fresh:
    """What a batch stored that was new: its records, in batch order, and the times
    of its new readings that came as rows without a record (a DecodedRows batch)."""

    records: list[Any]
    reading_times: list[int]

    def __len__(self) -> int:
        return len(self.records) + len(self.reading_times)


def fresh_of(inserted: Iterable[list[Entry]]) -> Fresh:
    """The new records and reading times of the entries inserted into each table."""
    parts = [p for p in inserted if p]
    times = [e[2][3] for p in parts for e in p if e[1] is None]
    if not times:
        return Fresh(fresh_records(parts), times)
    return Fresh(fresh_records([[e for e in p if e[1] is not None] for p in parts]), times)


def probe_by_range(ids: Sequence[int]) -> bool:
    """Whether the ids of a table's rows in a batch are dense enough that reading every
    stored id between the smallest and the largest is cheaper than probing each id
    (the usual backlog batch: consecutive ids, a share of them per table)."""
    return bool(ids) and max(ids) - min(ids) < 4 * len(ids) + 64


def batch_statements(batch: StoreBatch, fresh: Fresh, now_ms: int) -> list[tuple[str, tuple[Any, ...]]]:
    """What a stored batch's new records change beside their own rows, in the batch's
    transaction (``?`` placeholders): the fleet tables (:mod:`headend.fleet`) and the
    notice queue (:mod:`headend.notices`)."""
    update = fleet.fleet_update(batch.gateway_id, fresh.records, now_ms, fresh.reading_times)
    return fleet.statements(update) + notices.statements(
        notices.notices_of(batch.gateway_id, batch.epoch, fresh.records), now_ms
    )


class HeadendStore(Protocol):
    """Where the headend commits batches (SQLite here, PostgreSQL in store_pg)."""

    async def store(self, batch: StoreBatch, now_ms: int) -> StoreResult: ...

    async def summary(self, gateway_id: str | None = None) -> dict[str, Any]: ...

    async def fleet(self) -> fleet.FleetSnapshot:
        """The fleet tables (:mod:`headend.fleet`), for the metrics."""
        ...

    async def save_presence(self, gateway: str, p: Presence, now_ms: int) -> None:
        """A gateway's retained presence (:mod:`store_forward.presence`), as received."""
        ...

    async def presence(self) -> list[PresenceRow]: ...

    async def health(self) -> dict[str, tuple[int, dict[str, Any]]]:
        """The newest health record per gateway: (time, body)."""
        ...

    async def close(self) -> None: ...


CACHE_KIB = 64 * 1024  # the connection's page cache
CHECKPOINT_PAGES = 10_000  # write-ahead log pages between automatic checkpoints


class HeadendDB:
    """SQLite storage of the reference headend (one writer connection)."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: str | Path) -> HeadendDB:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(str(path), isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA busy_timeout=5000")
        # room for the indexes' pages that a backlog's inserts touch (SQLite's default
        # is 2 MiB): fewer pages read again from the file for every batch
        await db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        # a backlog's batches dirty the same index pages again and again (each meter's
        # place in the meter/time indexes): a checkpoint every ~40 MiB of log instead of
        # SQLite's 4 MiB copies each such page back to the file once, not every few
        # batches (durability is the log's, synchronous=FULL, either way)
        await db.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES}")
        await _migrate(db)
        await db.executescript(SCHEMA)
        return cls(db)

    async def close(self) -> None:
        await self._db.close()

    async def store(self, batch: StoreBatch, now_ms: int) -> StoreResult:
        db = self._db
        await begin_sqlite(db)  # (a cancelled ingest task leaves no transaction open)
        try:
            cur = await db.execute(
                f"INSERT OR IGNORE INTO batches ({BATCH_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
                batch_row(batch, now_ms),
            )
            if cur.rowcount == 0:
                async with db.execute(
                    "SELECT digest FROM batches WHERE gateway_id = ? AND epoch = ? AND seq = ?",
                    (batch.gateway_id, batch.epoch, batch.seq),
                ) as c:
                    found = await c.fetchone()
                known = same_bytes(found[0] if found else None, batch)
                await self._count(db, "duplicate_batches" if known else "conflicting_batches", 1)
                await db.commit()
                return StoreResult("duplicate" if known else "conflict", 0, 0)
            rows = batch_rows(batch)
            inserted = []
            for table, entries in rows.tables.items():
                new = new_entries(entries, await self._stored_ids(table, batch, rows.ids(table)))
                if new:
                    # BEGIN IMMEDIATE: no other writer between the look-up and the insert
                    marks = ",".join("?" * len(new[0][2]))
                    await db.executemany(
                        f"INSERT INTO {table} ({TABLE_COLS[table]}) VALUES ({marks})",
                        [e[2] for e in new],
                    )
                inserted.append(new)
            fresh = fresh_of(inserted)
            new_n, dup = len(fresh), record_count(batch) - len(fresh)
            if dup:
                await self._count(db, "duplicate_records", dup)
            for stmt, args in batch_statements(batch, fresh, now_ms):
                await db.execute(stmt, args)
            # the gateway's answers to central's commands, taken with the batch
            await central_db.apply_results_in(SqliteTx(db), batch.gateway_id, fresh.records, now_ms)
            await db.commit()
            return StoreResult("stored", new_n, dup)
        except BaseException:
            await db.rollback()
            raise

    async def _stored_ids(self, table: str, batch: StoreBatch, ids: list[int]) -> set[int]:
        """Which of ``ids`` ``table`` already holds for the batch's gateway and epoch."""
        key = "SELECT record_id FROM {} WHERE gateway_id = ? AND epoch = ? AND record_id {}"
        if probe_by_range(ids):
            sql = key.format(table, "BETWEEN ? AND ?")
            args: tuple[Any, ...] = (batch.gateway_id, batch.epoch, min(ids), max(ids))
        else:
            sql = key.format(table, "IN (SELECT value FROM json_each(?))")
            args = (batch.gateway_id, batch.epoch, orjson.dumps(ids).decode())
        found = {int(i) for (i,) in await self._db.execute_fetchall(sql, args)}
        return found.intersection(ids) if found else found

    @staticmethod
    async def _count(db: aiosqlite.Connection, name: str, n: int) -> None:
        await db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (name, n),
        )

    async def fleet(self) -> fleet.FleetSnapshot:
        rows = []
        for q in (fleet.SELECT_GATEWAYS, fleet.SELECT_METERS, fleet.SELECT_COUNTERS):
            async with self._db.execute(q) as cur:
                rows.append([tuple(r) async for r in cur])
        return fleet.snapshot(*rows)

    async def save_presence(self, gateway: str, p: Presence, now_ms: int) -> None:
        # autocommit (isolation_level=None): one statement, its own transaction
        await self._db.execute(fleet.UPSERT_PRESENCE, fleet.presence_params(gateway, p, now_ms))

    async def presence(self) -> list[PresenceRow]:
        async with self._db.execute(fleet.SELECT_PRESENCE) as cur:
            return [PresenceRow.of(tuple(r)) async for r in cur]

    async def health(self) -> dict[str, tuple[int, dict[str, Any]]]:
        async with self._db.execute(fleet.SELECT_HEALTH) as cur:
            return {str(g): (int(t), orjson.loads(b)) async for g, t, _, b in cur}

    async def summary(self, gateway_id: str | None = None) -> dict[str, Any]:
        where, args = ("WHERE gateway_id = ?", (gateway_id,)) if gateway_id else ("", ())
        async with self._db.execute(
            f"SELECT count(*), count(DISTINCT meter_id || '/' || time_ms) FROM readings {where}", args
        ) as cur:
            row = await cur.fetchone()
        async with self._db.execute("SELECT name, value FROM counters") as cur:
            counters = {str(k): int(v) async for k, v in cur}
        assert row is not None
        return {
            "readings": int(row[0]),
            "distinct_meter_times": int(row[1]),
            "duplicate_batches": counters.get("duplicate_batches", 0),
            "duplicate_records": counters.get("duplicate_records", 0),
            "conflicting_batches": counters.get("conflicting_batches", 0),
        }


async def _migrate(db: aiosqlite.Connection) -> None:
    """Give a database made before batch epochs the epoch columns and keys.

    Each table is rebuilt with its rows (epoch ``''``), in one transaction."""
    async with db.execute("PRAGMA table_info(batches)") as cur:
        columns = {str(row[1]) async for row in cur}
    if not columns or "epoch" in columns:
        return
    log.warning("headend database: adding batch epochs to the keys (existing rows keep epoch '')")
    await db.execute("BEGIN IMMEDIATE")
    try:
        for name, cols in _TABLES.items():
            async with db.execute(f"PRAGMA table_info({name})") as cur:
                old = [str(row[1]) async for row in cur]
            if not old:
                continue
            await db.execute(f"CREATE TABLE {name}_epochs ({cols}\n)")
            keep = ", ".join(old)
            await db.execute(f"INSERT INTO {name}_epochs ({keep}) SELECT {keep} FROM {name}")
            await db.execute(f"DROP TABLE {name}")
            await db.execute(f"ALTER TABLE {name}_epochs RENAME TO {name}")
        await db.commit()
    except BaseException:
        await db.rollback()
        raise

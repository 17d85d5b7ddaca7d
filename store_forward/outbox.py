"""The durable outbox: one SQLite file, one writer connection.

Everything the gateway must not lose goes through here: readings, events,
and (with the billing package) the ledger entries they cause. The rules:

* One connection owns all writes (WAL, ``synchronous=FULL``); every public
  write is one explicit ``BEGIN IMMEDIATE … COMMIT`` under an asyncio lock,
  so the poll cycle, the uplink and command handling never interleave inside
  a transaction.
* A poll cycle is one transaction: all of its readings, its meter-status
  updates and its events commit together or not at all.
* Records are assigned to uplink batches in a transaction that also stores
  the batch row, so a batch sequence number always names the same records,
  across retransmissions and restarts. Records are deleted only when the
  headend's application-level ack for their batch arrives.
* Record ids come from ``AUTOINCREMENT`` and are never reused, so the headend
  can see a gap as a loss and a repeated id as a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from firmware_bridge.reading import Reading
from store_forward.records import Record, RecordClass, RecordKind, dumps, loads, reading_body

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    cls         INTEGER NOT NULL,
    kind        TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL,
    body        BLOB    NOT NULL,
    batch_seq   INTEGER
);
CREATE INDEX IF NOT EXISTS outbox_unbatched ON outbox (cls, id) WHERE batch_seq IS NULL;
CREATE INDEX IF NOT EXISTS outbox_batch ON outbox (batch_seq) WHERE batch_seq IS NOT NULL;
CREATE TABLE IF NOT EXISTS batches (
    seq         INTEGER PRIMARY KEY,
    created_ms  INTEGER NOT NULL,
    n_records   INTEGER NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_sent_ms INTEGER
);
CREATE TABLE IF NOT EXISTS kv (
    key   TEXT PRIMARY KEY,
    value
);
CREATE TABLE IF NOT EXISTS meter_status (
    meter_id              TEXT PRIMARY KEY,
    online                INTEGER NOT NULL,
    last_attempt_ms       INTEGER,
    last_good_ms          INTEGER,
    consecutive_failures  INTEGER NOT NULL DEFAULT 0,
    total_failures        INTEGER NOT NULL DEFAULT 0,
    last_error            TEXT
);
"""

# Counters kept in kv; each is advanced in the same transaction as the change it counts.
K_NEXT_SEQ = "next_batch_seq"
K_READINGS = "readings_committed"
K_ACKED_RECORDS = "records_acked"
K_ACKED_READINGS = "readings_acked"
K_LINK = "link_state"
K_LINK_SINCE = "link_since_ms"


class OutboxError(Exception):
    """The outbox cannot do what was asked (corrupt file, full disk, ...)."""


@dataclass(frozen=True)
class MeterStatus:
    meter_id: str
    online: bool
    last_attempt_ms: int | None
    last_good_ms: int | None
    consecutive_failures: int
    total_failures: int
    last_error: str | None


@dataclass(frozen=True)
class Batch:
    seq: int
    records: tuple[Record, ...]
    attempts: int


@dataclass(frozen=True)
class BacklogStats:
    records: int
    readings: int
    oldest_created_ms: int | None
    bytes: int
    batches_pending: int
    readings_committed: int
    readings_acked: int


class Outbox:
    """The gateway's single SQLite writer."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self._lock = asyncio.Lock()

    # -- life cycle ---------------------------------------------------------

    @classmethod
    async def open(cls, path: str | Path) -> Outbox:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(str(path), isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA busy_timeout=5000")
            async with db.execute("PRAGMA quick_check") as cur:
                row = await cur.fetchone()
            if row is None or row[0] != "ok":
                raise OutboxError(f"{path}: database failed quick_check: {row[0] if row else '?'}")
            await db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            await db.close()
            raise OutboxError(f"{path}: cannot open outbox database: {exc}") from exc
        except BaseException:
            await db.close()
            raise
        return cls(db, path)

    async def close(self) -> None:
        async with self._lock:
            await self._db.close()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; other components (ledger, audit) join it here."""
        async with self._lock:
            try:
                # BEGIN is inside the try: a task cancelled while BEGIN is queued on the
                # connection's thread must still roll back, or the next BEGIN would fail.
                await self._db.execute("BEGIN IMMEDIATE")
                yield self._db
            except BaseException:
                # Shielded: the connection's thread runs statements in order, so this
                # rollback lands after anything the cancelled caller had queued.
                await asyncio.shield(self._db.rollback())
                raise
            await asyncio.shield(self._db.commit())

    # -- writing ------------------------------------------------------------

    @staticmethod
    async def _add(
        db: aiosqlite.Connection, cls: RecordClass, kind: str, created_ms: int, body: dict[str, Any]
    ) -> int:
        cur = await db.execute(
            "INSERT INTO outbox (cls, kind, created_ms, body) VALUES (?, ?, ?, ?)",
            (int(cls), kind, created_ms, dumps(body)),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    async def add_in(
        self,
        db: aiosqlite.Connection,
        cls: RecordClass,
        kind: str,
        created_ms: int,
        body: dict[str, Any],
    ) -> int:
        """Add one record inside a transaction opened with :meth:`transaction`."""
        return await self._add(db, cls, kind, created_ms, body)

    async def commit_cycle(
        self,
        now_ms: int,
        readings: Sequence[Reading],
        statuses: Iterable[MeterStatus] = (),
        events: Sequence[dict[str, Any]] = (),
    ) -> list[int]:
        """Commit one poll cycle: readings, meter statuses and events, atomically."""
        async with self.transaction() as db:
            return await self.commit_cycle_in(db, now_ms, readings, statuses, events)

    async def commit_cycle_in(
        self,
        db: aiosqlite.Connection,
        now_ms: int,
        readings: Sequence[Reading],
        statuses: Iterable[MeterStatus] = (),
        events: Sequence[dict[str, Any]] = (),
    ) -> list[int]:
        ids = []
        for r in readings:
            ids.append(
                await self._add(db, RecordClass.BILLING, RecordKind.READING, r.time_ms, reading_body(r))
            )
        for e in events:
            await self._add(db, RecordClass.EVENT, RecordKind.EVENT, now_ms, e)
        for s in statuses:
            await db.execute(
                "INSERT INTO meter_status (meter_id, online, last_attempt_ms, last_good_ms,"
                " consecutive_failures, total_failures, last_error) VALUES (?,?,?,?,?,?,?)"
                " ON CONFLICT (meter_id) DO UPDATE SET online=excluded.online,"
                " last_attempt_ms=excluded.last_attempt_ms,"
                " last_good_ms=COALESCE(excluded.last_good_ms, meter_status.last_good_ms),"
                " consecutive_failures=excluded.consecutive_failures,"
                " total_failures=excluded.total_failures, last_error=excluded.last_error",
                (
                    s.meter_id,
                    int(s.online),
                    s.last_attempt_ms,
                    s.last_good_ms,
                    s.consecutive_failures,
                    s.total_failures,
                    s.last_error,
                ),
            )
        if readings:
            await self._bump(db, K_READINGS, len(readings))
        return ids

    async def add_event(self, now_ms: int, body: dict[str, Any]) -> int:
        async with self.transaction() as db:
            return await self._add(db, RecordClass.EVENT, RecordKind.EVENT, now_ms, body)

    @staticmethod
    async def _bump(db: aiosqlite.Connection, key: str, n: int) -> None:
        await db.execute(
            "INSERT INTO kv (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
            (key, n),
        )

    async def set_state(self, values: Mapping[str, Any]) -> None:
        async with self.transaction() as db:
            for k, v in values.items():
                await db.execute(
                    "INSERT INTO kv (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (k, v),
                )

    # -- batches ------------------------------------------------------------

    async def next_batch(
        self,
        now_ms: int,
        *,
        exclude: Iterable[int] = (),
        max_records: int = 500,
        max_bytes: int = 64 * 1024,
    ) -> Batch | None:
        """The oldest unacknowledged batch not in ``exclude``, or a new one.

        Existing (already numbered) batches come first, in sequence order, so a
        restart or reconnect retransmits them unchanged before anything new.
        New batches take records by class priority, then FIFO, up to the limits.
        """
        excluded = set(exclude)
        async with self.transaction() as db:
            async with db.execute("SELECT seq, attempts FROM batches ORDER BY seq") as cur:
                pending = [(int(s), int(a)) async for s, a in cur]
            for seq, attempts in pending:
                if seq not in excluded:
                    return Batch(seq, await self._batch_records(db, seq), attempts)
            # One class per batch keeps events from waiting behind a full billing batch.
            async with db.execute(
                "SELECT cls FROM outbox WHERE batch_seq IS NULL ORDER BY cls LIMIT 1"
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                return None
            cls = int(row[0])
            async with db.execute(
                "SELECT id, length(body) FROM outbox WHERE batch_seq IS NULL AND cls = ?"
                " ORDER BY id LIMIT ?",
                (cls, max_records),
            ) as cur:
                candidates = [(int(i), int(n)) async for i, n in cur]
            chosen: list[int] = []
            size = 0
            for rid, n in candidates:
                if chosen and size + n > max_bytes:
                    break
                chosen.append(rid)
                size += n
            async with db.execute("SELECT value FROM kv WHERE key = ?", (K_NEXT_SEQ,)) as cur:
                row = await cur.fetchone()
            seq = int(row[0]) if row else 1
            await db.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (K_NEXT_SEQ, seq + 1),
            )
            await db.execute(
                "INSERT INTO batches (seq, created_ms, n_records) VALUES (?, ?, ?)",
                (seq, now_ms, len(chosen)),
            )
            await db.execute(
                f"UPDATE outbox SET batch_seq = ? WHERE id IN ({','.join('?' * len(chosen))})",
                (seq, *chosen),
            )
            return Batch(seq, await self._batch_records(db, seq), 0)

    @staticmethod
    async def _batch_records(db: aiosqlite.Connection, seq: int) -> tuple[Record, ...]:
        async with db.execute(
            "SELECT id, cls, kind, created_ms, body FROM outbox WHERE batch_seq = ? ORDER BY id",
            (seq,),
        ) as cur:
            return tuple(
                [Record(int(i), RecordClass(c), k, int(t), loads(b)) async for i, c, k, t, b in cur]
            )

    async def mark_sent(self, seq: int, now_ms: int) -> None:
        async with self.transaction() as db:
            await db.execute(
                "UPDATE batches SET attempts = attempts + 1, last_sent_ms = ? WHERE seq = ?",
                (now_ms, seq),
            )

    async def ack(self, seq: int) -> int:
        """The headend committed batch ``seq``: delete it. Idempotent; returns records freed."""
        async with self.transaction() as db:
            async with db.execute(
                "SELECT count(*), coalesce(sum(kind = ?), 0) FROM outbox WHERE batch_seq = ?",
                (RecordKind.READING.value, seq),
            ) as cur:
                row = await cur.fetchone()
            n, n_readings = (int(row[0]), int(row[1])) if row else (0, 0)
            await db.execute("DELETE FROM outbox WHERE batch_seq = ?", (seq,))
            cur2 = await db.execute("DELETE FROM batches WHERE seq = ?", (seq,))
            if cur2.rowcount:
                await self._bump(db, K_ACKED_RECORDS, n)
                await self._bump(db, K_ACKED_READINGS, n_readings)
            return n

    # -- reading state ------------------------------------------------------

    async def stats(self) -> BacklogStats:
        async with self._lock:
            return await backlog_stats(self._db)

    async def meter_statuses(self) -> list[MeterStatus]:
        async with self._lock:
            return await meter_statuses(self._db)

    async def kv(self) -> dict[str, Any]:
        async with self._lock:
            return await read_kv(self._db)


# Read-only helpers, shared with `edgegw status` (which opens its own connection).


async def read_kv(db: aiosqlite.Connection) -> dict[str, Any]:
    async with db.execute("SELECT key, value FROM kv") as cur:
        return {str(k): v async for k, v in cur}


async def backlog_stats(db: aiosqlite.Connection) -> BacklogStats:
    async with db.execute(
        "SELECT count(*), coalesce(sum(kind = ?), 0), min(created_ms), coalesce(sum(length(body)), 0)"
        " FROM outbox",
        (RecordKind.READING.value,),
    ) as cur:
        row = await cur.fetchone()
    assert row is not None
    async with db.execute("SELECT count(*) FROM batches") as cur:
        brow = await cur.fetchone()
    kv = await read_kv(db)
    return BacklogStats(
        records=int(row[0]),
        readings=int(row[1]),
        oldest_created_ms=None if row[2] is None else int(row[2]),
        bytes=int(row[3]),
        batches_pending=int(brow[0]) if brow else 0,
        readings_committed=int(kv.get(K_READINGS, 0)),
        readings_acked=int(kv.get(K_ACKED_READINGS, 0)),
    )


async def meter_statuses(db: aiosqlite.Connection) -> list[MeterStatus]:
    async with db.execute(
        "SELECT meter_id, online, last_attempt_ms, last_good_ms, consecutive_failures,"
        " total_failures, last_error FROM meter_status ORDER BY meter_id"
    ) as cur:
        return [
            MeterStatus(str(m), bool(o), a, g, int(c), int(t), e)
            async for m, o, a, g, c, t, e in cur
        ]

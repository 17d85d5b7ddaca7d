"""The durable outbox: the queue of sealed records and batches towards central.

Everything the gateway must not lose goes through here: readings, events,
and (with the billing package) the ledger entries they cause. The outbox is
the gateway's database (:class:`store_forward.database.Database`: the file, its
one writer connection, its schema, sealing, damage and a full disk) with the
queue on it:

* A poll cycle is one transaction: all of its readings, its meter-status
  updates and its events commit together or not at all. One transaction per
  cycle, never one per row, is also what keeps flash wear down.
* Every record body is sealed at rest under this database's storage key; the
  associated data binds the record id, class and kind, so a blob moved to
  another row no longer opens. What is sealed is the body's JSON deflated
  against a fixed dictionary of such bodies (:mod:`store_forward.compact`):
  about a third of the bytes; bodies stored as plain JSON still open.
* A reading becomes a BILLING record (register values) and, when it has any,
  a TELEMETRY record (instantaneous values). Batches are drained by class:
  EVENT, then BILLING, then TELEMETRY; FIFO within a class.
* Records are assigned to uplink batches in a transaction that also stores
  the batch row (and its sealed payload), so a batch sequence number always
  names the same records and bytes, across retransmissions and restarts.
  Records are deleted only when the headend's ack for their batch arrives.
  Records a transaction numbers at once (:meth:`Outbox.fold_in`, while the
  uplink sends what is committed) are inserted with their batch number, so
  the index of unbatched records is never written for them (flash wear);
  the rest are inserted unbatched, the rows and ids being the same either way.
* A batch is named (gateway, epoch, seq): the database takes a random batch
  epoch with its first batch (:meth:`Outbox.batch_epoch`), and a recreated or
  recovered database takes a new one (:meth:`Outbox.start_batch_epoch`), so a
  sequence that starts again at 1 never repeats a batch the headend knows.
  Sequence numbers only count up within a database, across its epochs.
* Record ids come from ``AUTOINCREMENT`` and are never reused, so the headend
  can see a gap as a loss and a repeated id as a duplicate. A database that
  replaced a damaged one numbers its records and batches above all earlier
  ones (:func:`store_forward.database.numbering_base`) and carries over what
  of the damaged outbox could be salvaged.
* Storage is bounded by policy (:class:`store_forward.storage_policy.StoragePolicy`):
  telemetry is shed first; unacknowledged billing records and events only
  past a hard floor, and then with a critical alarm event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import aiosqlite

from firmware_bridge.events import event
from firmware_bridge.reading import Reading
from store_forward.batch_epoch import LEGACY_EPOCH, new_epoch
from store_forward.compact import pack, unpack
from store_forward.database import (
    ID_BLOCK_BITS,
    K_GENERATION,
    K_SALT,
    K_SALVAGE_SALT,
    K_STORAGE,
    Database,
    OutboxError,
    OutboxFullError,
    SchemaVersionError,
    StorageCorruptError,
    _wall_ms,
    numbering_base,
    read_kv,
)
from store_forward.database import SCHEMA as DATABASE_SCHEMA
from store_forward.records import (
    Record,
    RecordClass,
    RecordKind,
    class_name,
    dumps,
    loads,
    split_reading,
)
from store_forward.salvage import Salvage
from store_forward.salvage import salvage as salvage_images
from store_forward.schema import Schema, SchemaRegistry, Step, statements
from store_forward.sealing import NonceSequence, SealingError, StorageSealer
from store_forward.sqlbatch import Statement
from store_forward.sqlbatch import run as run_statements
from store_forward.storage_keys import StorageKeys, database_key
from store_forward.storage_policy import EvictionPlan, StoragePolicy, plan_eviction

__all__ = [
    "ID_BLOCK_BITS",
    "K_GENERATION",
    "K_SALT",
    "K_STORAGE",
    "SCHEMA",
    "BacklogStats",
    "Batch",
    "BatchPlan",
    "EvictionPlan",
    "MeterStatus",
    "Outbox",
    "OutboxError",
    "OutboxFullError",
    "Packer",
    "SchemaVersionError",
    "StorageCorruptError",
    "StoragePolicy",
    "backlog_stats",
    "meter_statuses",
    "numbering_base",
    "plan_eviction",
    "read_kv",
]

log = logging.getLogger(__name__)

# The queue's tables (the database owner keeps kv: store_forward.database).
_TABLES = """
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    cls         INTEGER NOT NULL,
    kind        TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL,
    key_ver     INTEGER NOT NULL,
    body        BLOB    NOT NULL,   -- sealed: sealing.StorageSealer blob
    batch_seq   INTEGER
);
CREATE INDEX IF NOT EXISTS outbox_unbatched ON outbox (cls, id) WHERE batch_seq IS NULL;
CREATE INDEX IF NOT EXISTS outbox_batch ON outbox (batch_seq) WHERE batch_seq IS NOT NULL;
CREATE TABLE IF NOT EXISTS batches (
    seq          INTEGER PRIMARY KEY,
    cls          INTEGER NOT NULL,
    created_ms   INTEGER NOT NULL,
    n_records    INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_sent_ms INTEGER,
    payload      BLOB,             -- the sealed uplink message, sent as these bytes
    epoch        TEXT NOT NULL DEFAULT ''  -- batch epoch ('' for batches made before epochs)
);
CREATE TABLE IF NOT EXISTS damaged (
    id          INTEGER PRIMARY KEY,
    cls         INTEGER NOT NULL,
    kind        TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL,
    key_ver     INTEGER NOT NULL,
    body        BLOB    NOT NULL,
    error       TEXT    NOT NULL
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


def _seq_from(value: Any) -> int:
    """The next batch number from its kv value (none yet: the first is 1)."""
    return 1 if value is None else int(value)


async def _add_batch_epoch_column(db: aiosqlite.Connection) -> None:
    """Batches of a database made before epochs existed keep the legacy epoch ''."""
    async with db.execute("PRAGMA table_info(batches)") as cur:
        columns = {str(row[1]) async for row in cur}
    if "epoch" not in columns:
        await db.execute("ALTER TABLE batches ADD COLUMN epoch TEXT NOT NULL DEFAULT ''")


SCHEMA = Schema(
    "outbox",
    Step(2, "records, batches, damaged records, meter status", statements(_TABLES)),
    Step(3, "batches numbered in epochs (batches.epoch, for databases from before epochs)", apply=_add_batch_epoch_column),
)

# Counters kept in kv; each is advanced in the same transaction as the change it counts.
K_NEXT_SEQ = "next_batch_seq"
K_BATCH_EPOCH = "batch_epoch"  # the epoch new batches are numbered in (store_forward.batch_epoch)
K_READINGS = "readings_committed"  # BILLING reading records
K_TELEMETRY = "telemetry_committed"  # TELEMETRY reading records
K_ACKED_RECORDS = "records_acked"
K_ACKED_READINGS = "readings_acked"
K_EVICTED_TELEMETRY = "telemetry_evicted"
K_EVICTED_BILLING = "billing_evicted"
K_DAMAGED = "records_damaged"
K_LINK = "link_state"
K_LINK_SINCE = "link_since_ms"

# Counters a new database takes over from a damaged one (the highest salvaged value).
_MAX_COUNTERS = (
    "readings_committed",
    "telemetry_committed",
    "records_acked",
    "readings_acked",
    "telemetry_evicted",
    "billing_evicted",
    "records_damaged",
)

_ROW_OVERHEAD = 48  # bytes of index and row header per record, roughly
# A batch numbered in a commit with at most this many records is sealed on the event
# loop: the encoding costs the same in either thread, and the hand-over to a worker
# thread and back (two wake-ups) is saved. Larger ones are sealed off the loop, which
# is then never held up for long.
PACK_INLINE_RECORDS = 100


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
    payload: bytes | None = None  # sealed uplink message, when packed at creation
    epoch: str = LEGACY_EPOCH  # the batch is (gateway, epoch, seq)


@dataclass(frozen=True)
class BacklogStats:
    records: int
    readings: int
    oldest_created_ms: int | None
    bytes: int
    batches_pending: int
    readings_committed: int
    readings_acked: int
    telemetry: int = 0
    telemetry_evicted: int = 0
    billing_evicted: int = 0


class Packer(Protocol):
    """Seals the longest prefix of the records that fits the byte budget as batch
    (epoch, seq): ``pack(seq, records, max_bytes, epoch=...) -> (payload, count)``."""

    def __call__(
        self, seq: int, records: Sequence[Record], max_bytes: int, *, epoch: str
    ) -> tuple[bytes, int]: ...


@dataclass(frozen=True)
class BatchPlan:
    """What the uplink would take next (see :attr:`Outbox.batch_plan`): a new batch
    of at most ``max_records`` records and ``max_bytes`` bytes, of classes up to
    ``max_cls``."""

    max_records: int
    max_bytes: int
    max_cls: int


# A meter's status row is rewritten when its state changes, else at most this often
# (its last attempt and last good read are otherwise only as fresh as this).
STATUS_REFRESH_MS = 15 * 60 * 1000


def _status_changed(old: MeterStatus | None, new: MeterStatus) -> bool:
    if old is None:
        return True
    if (old.online, old.consecutive_failures, old.total_failures, old.last_error) != (
        new.online, new.consecutive_failures, new.total_failures, new.last_error
    ):  # fmt: skip
        return True
    if new.last_good_ms is not None and old.last_good_ms is None:
        return True
    return (new.last_attempt_ms or 0) - (old.last_attempt_ms or 0) >= STATUS_REFRESH_MS


class Outbox(Database):
    """The gateway's database with the outbox's queue on it."""

    DEFAULT_SCHEMA: ClassVar[SchemaRegistry] = SchemaRegistry([DATABASE_SCHEMA, SCHEMA], oldest=2, marker="outbox")
    SALVAGE_TABLES: ClassVar[frozenset[str]] = frozenset({"kv", "outbox", "batches", "meter_status"})
    MAX_COUNTERS: ClassVar[tuple[str, ...]] = _MAX_COUNTERS

    def __init__(
        self,
        path: Path,
        *,
        keys: StorageKeys,
        policy: StoragePolicy,
        clock_ms: Callable[[], int] = _wall_ms,
        schema: SchemaRegistry | None = None,
    ) -> None:
        super().__init__(path, keys=keys, policy=policy, clock_ms=clock_ms, schema=schema)
        # Set by the gateway's Uplink: how its batches are sealed (also used by
        # the sneakernet export, which must write the very same batches).
        self.packer: Packer | None = None
        self.gateway_id: str | None = None
        self.salvaged: dict[str, int] = {}  # what the last new-line import brought over
        # Set by the uplink while it would send what is committed at once: the
        # writer's transaction then also numbers the next batches (fold_in).
        self.batch_plan: Callable[[], BatchPlan | None] | None = None
        # While there is a batch plan, the records a transaction adds in one statement
        # are inserted by fold_in, those it numbers with their batch number: they never
        # enter the index of unbatched records (False: inserted at once, numbered by an
        # UPDATE; the stored result is the same).
        self.insert_numbered = True
        # Kept in memory, where a loss only causes a resend (which central
        # de-duplicates) or an older meter status row:
        self._sent: dict[int, int] = {}  # batch seq -> sends since this process opened it
        self._acks: dict[
            int, tuple[str | None, float]
        ] = {}  # acks not yet applied: seq -> (epoch, since)
        self._ready: dict[
            int, tuple[int, Batch]
        ] = {}  # pending batches known whole: seq -> (cls, batch)
        self._ready_complete = False  # every pending batch in the database is in _ready
        self._unbatched = True  # records may wait for a batch
        self._status: dict[str, MeterStatus] = {}  # meter_status rows as committed
        # What the open transaction did, taken over at its commit (dropped on rollback).
        self._tx_acked: list[int] = []
        self._tx_ready: dict[int, tuple[int, Batch]] = {}
        self._tx_status: dict[str, MeterStatus] = {}
        self._tx_added = False  # the open transaction added records fold_in did not batch
        self._tx_records: dict[int, Record] = {}  # records added in the open transaction
        # Rows of the open transaction whose INSERT waits (insert_numbered): ids above
        # every row in the table, in order; (id, cls, kind, created_ms, key_ver, body).
        self._tx_deferred: list[tuple[int, int, str, int, int, bytes]] = []
        self.on_commit(self._taken_over)
        self.on_rollback(self._dropped)

    # -- what a transaction leaves in memory ---------------------------------

    def _taken_over(self) -> None:
        for seq in self._tx_acked:
            self._acks.pop(seq, None)
            self._ready.pop(seq, None)
            self._sent.pop(seq, None)
        self._ready.update(self._tx_ready)
        self._status.update(self._tx_status)
        if self._tx_added:
            self._unbatched = True
        self._dropped()

    def _dropped(self) -> None:
        self._tx_acked = []
        self._tx_ready = {}
        self._tx_status = {}
        self._tx_added = False
        self._tx_records = {}
        self._tx_deferred = []

    def _forget_batches(self) -> None:
        """The batches table may hold what this process did not make (a new or
        salvaged database): look at the database again."""
        self._ready.clear()
        self._ready_complete = False
        self._unbatched = True
        self._status.clear()

    # -- a new database -----------------------------------------------------

    async def _new_database_in(
        self, db: aiosqlite.Connection, base: int, salvaged_kv: Mapping[str, Any], replaced: bool
    ) -> None:
        """Record ids and batch numbers start above ``base``; the counters go on from
        the damaged database's; one that replaced a damaged database numbers its
        batches in a new batch epoch (:meth:`start_batch_epoch`)."""
        await self._set_kv(db, K_NEXT_SEQ, max(base + 1, int(salvaged_kv.get(K_NEXT_SEQ) or 1)))
        if base:
            await db.execute("DELETE FROM sqlite_sequence WHERE name = 'outbox'")
            await db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (base,))
        for k in _MAX_COUNTERS:
            if isinstance(salvaged_kv.get(k), int):
                await self._set_kv(db, k, salvaged_kv[k])
        if replaced:
            await self.start_batch_epoch(db)

    async def _import_salvage(self, salvage: Sequence[Salvage] | None) -> None:
        """Bring what the damaged outbox still holds into this (new) database.

        Unsent records are opened with the old database's key (their authenticated
        encryption proves them intact) and sealed again under this one's, keeping
        their ids, so the headend still de-duplicates them; numbered batches keep
        their numbers and stored bytes. Records that do not open stay in the
        evidence. Then a critical ``storage_fault`` event for central.
        """
        fault = self._pending_fault
        assert fault is not None and self._sealer is not None
        if salvage is None:
            salvage = await asyncio.to_thread(
                salvage_images, fault.evidence, set(self.SALVAGE_TABLES)
            )
        async with self._lock:
            async with self._db.execute("SELECT value FROM kv WHERE key = ?", (K_SALVAGE_SALT,)) as cur:
                row = await cur.fetchone()
        old_salt = None if row is None else bytes(row[0])
        old_openers = (
            {}
            if old_salt is None
            else {
                v: StorageSealer(database_key(k, old_salt, v), NonceSequence(1))
                for v, k in self._keys.keys.items()
            }
        )
        records: dict[int, tuple[Any, ...]] = {}
        bad = 0
        for s in salvage:
            t = s.table("outbox")
            if t is None:
                continue
            for r in t.dicts():
                rid = int(r["id"])
                if rid in records:
                    continue
                cls, kind = RecordClass(int(r["cls"])), str(r["kind"])
                opener = old_openers.get(int(r["key_ver"]))
                try:
                    if opener is None:
                        raise SealingError("old key version not loaded")
                    plain = opener.unseal(rid, self._aad_class(cls, kind), bytes(r["body"]))
                except (SealingError, ValueError, TypeError, KeyError):
                    bad += 1
                    continue
                records[rid] = (rid, int(cls), kind, int(r["created_ms"]), plain, r["batch_seq"])
        batches: dict[int, tuple[Any, ...]] = {}
        for s in salvage:
            t = s.table("batches")
            for b in t.dicts() if t is not None else ():
                batches.setdefault(
                    int(b["seq"]),
                    (
                        b["seq"],
                        b["cls"],
                        b["created_ms"],
                        b["n_records"],
                        b["attempts"],
                        b["last_sent_ms"],
                        b["payload"],
                        str(b.get("epoch") or LEGACY_EPOCH),  # the batch keeps its name
                    ),
                )
        statuses = next((s.table("meter_status") for s in salvage if s.table("meter_status")), None)
        async with self.transaction() as db:
            await db.executemany(
                "INSERT OR IGNORE INTO batches (seq, cls, created_ms, n_records, attempts,"
                " last_sent_ms, payload, epoch) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                list(batches.values()),
            )
            assert self._sealer is not None
            await db.executemany(
                "INSERT OR IGNORE INTO outbox (id, cls, kind, created_ms, key_ver, body, batch_seq)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        rid,
                        c,
                        kind,
                        created,
                        self._key_version,
                        self._sealer.seal(rid, self._aad_class(RecordClass(c), kind), plain),
                        seq if seq in batches else None,
                    )
                    for rid, c, kind, created, plain, seq in records.values()
                ],
            )
            if statuses is not None:
                await db.executemany(
                    f"INSERT OR IGNORE INTO meter_status ({', '.join(statuses.columns)})"
                    f" VALUES ({', '.join('?' * len(statuses.columns))})",
                    statuses.rows,
                )
            await db.execute("DELETE FROM kv WHERE key = ?", (K_SALVAGE_SALT,))
            self.salvaged = {
                "records": len(records),
                "records_unopened": bad,
                "batches": len(batches),
                "images": len(salvage),
            }
            await self._add(
                db,
                RecordClass.EVENT,
                RecordKind.EVENT,
                self.clock_ms(),
                event(
                    "storage_fault",
                    kind=fault.kind.value,
                    reason=fault.reason,
                    evidence=str(fault.evidence),
                    generation=self.generation,
                    salvaged=self.salvaged,
                    detail="the damaged database is kept as evidence; billing and relay"
                    " changes stop until the money state is recovered",
                ),
            )
        log.critical(
            "outbox %s: new database (generation %d) in place of the damaged one kept in %s;"
            " %d unsent record(s) and %d batch(es) carried over, %d record(s) could not be opened",
            self.path,
            self.generation,
            fault.evidence,
            len(records),
            len(batches),
            bad,
        )

    # -- a full disk --------------------------------------------------------

    async def recover_in_place(self, kind: Any, reason: str) -> Path:
        self._forget_batches()
        self._acks.clear()
        try:
            return await super().recover_in_place(kind, reason)
        finally:
            self._forget_batches()

    async def relieve_full(self) -> int:
        """After a full disk: release the reserve, then shed telemetry (past the hard
        floor, billing records too, with an alarm). Returns records evicted."""
        return await self._emergency_evict()

    # -- writing ------------------------------------------------------------

    def _aad_class(self, cls: RecordClass, kind: str) -> str:
        return f"{class_name(cls)}/{kind}"

    def _seal(self, rid: int, cls: RecordClass, kind: str, body: dict[str, Any]) -> bytes:
        if self._sealer is None:
            raise OutboxFullError(f"{self.path}: cannot seal records yet ({self.starved})")
        return self._sealer.seal(rid, self._aad_class(cls, kind), pack(dumps(body)))

    async def _add(
        self, db: aiosqlite.Connection, cls: RecordClass, kind: str, created_ms: int, body: dict[str, Any]
    ) -> int:
        await self._insert_deferred(db)  # (AUTOINCREMENT: the rows held back take their ids first)
        cur = await db.execute(
            "INSERT INTO outbox (cls, kind, created_ms, key_ver, body) VALUES (?, ?, ?, ?, x'')",
            (int(cls), kind, created_ms, self._key_version),
        )
        rid = cur.lastrowid
        assert rid is not None
        blob = self._seal(rid, cls, kind, body)
        await db.execute("UPDATE outbox SET body = ? WHERE id = ?", (blob, rid))
        self._tx_added = True
        self._tx_records[rid] = Record(rid, cls, str(kind), created_ms, body)
        return rid

    async def _add_many(
        self, db: aiosqlite.Connection, items: Sequence[tuple[RecordClass, str, int, dict[str, Any]]]
    ) -> int:
        """Insert records with consecutive ids (one statement); returns the first id.

        Inside the write transaction nobody else inserts, so the ids after the
        AUTOINCREMENT high-water mark are ours; inserting them explicitly moves
        the mark, so an id is still never reused."""
        first, insert = await self._prepare_many(db, items)
        if insert is not None:
            await run_statements(db, [insert])
        return first

    INSERT_SQL = "INSERT INTO outbox (id, cls, kind, created_ms, key_ver, body) VALUES (?, ?, ?, ?, ?, ?)"

    def _defer_inserts(self) -> bool:
        """Hold this transaction's new rows back for :meth:`fold_in` (there is a batch
        plan now, or rows are held back already)?"""
        if self._tx_deferred:
            return True
        return (
            self.insert_numbered
            and self.packer is not None
            and self.batch_plan is not None
            and self.batch_plan() is not None
        )

    def _take_deferred(self) -> list[Statement]:
        """The INSERT of the rows held back, unbatched (as if issued when they were
        added); they are no longer held."""
        if not self._tx_deferred:
            return []
        rows, self._tx_deferred = self._tx_deferred, []
        return [Statement(self.INSERT_SQL, rows, many=True)]

    async def _insert_deferred(self, db: aiosqlite.Connection) -> None:
        """Insert the rows held back (before a statement that reads or writes the
        outbox's unbatched records, its ids or the file's size)."""
        if self._tx_deferred:
            await run_statements(db, self._take_deferred())

    async def _before_commit(self, db: aiosqlite.Connection) -> None:
        await self._insert_deferred(db)

    def tx_writes(self) -> bool:
        return bool(self._tx_deferred) or super().tx_writes()

    NEXT_ID_SQL = (
        "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0),"
        " coalesce((SELECT max(id) FROM outbox), 0)"
    )

    @staticmethod
    def _first_free_id(rows: Sequence[Any]) -> int:
        """The id after the AUTOINCREMENT high-water mark, from :data:`NEXT_ID_SQL`."""
        return max(int(rows[0][0]), int(rows[0][1])) + 1 if rows else 1

    async def _prepare_many(
        self,
        db: aiosqlite.Connection,
        items: Sequence[tuple[RecordClass, str, int, dict[str, Any]]],
        first: int | None = None,
    ) -> tuple[int, Statement | None]:
        """:meth:`_add_many` up to the insert, which is returned to be executed next
        (before any other statement that adds records), or None when the rows are
        held back for :meth:`fold_in` (:attr:`insert_numbered`). ``first``: the first
        free id, read by the caller in this transaction since the last insert or
        delete, with no row held back."""
        if first is None:
            if self._tx_deferred:  # (nothing inserted or deleted records since: see _add)
                first = self._tx_deferred[-1][0] + 1
            else:
                first = self._first_free_id(list(await db.execute_fetchall(self.NEXT_ID_SQL)))
        if not items:
            return first, None
        self._tx_added = True
        for i, (cls, kind, created, body) in enumerate(items):
            self._tx_records[first + i] = Record(first + i, cls, str(kind), created, body)
        rows = [
            (
                first + i,
                int(cls),
                kind,
                created,
                self._key_version,
                self._seal(first + i, cls, kind, body),
            )
            for i, (cls, kind, created, body) in enumerate(items)
        ]
        if self._defer_inserts():
            self._tx_deferred.extend(rows)
            return first, None
        return first, Statement(self.INSERT_SQL, rows, many=True)

    async def add_many_in(
        self, db: aiosqlite.Connection, items: Sequence[tuple[RecordClass, str, int, dict[str, Any]]]
    ) -> list[int]:
        """Add records ``(class, kind, created_ms, body)`` in one statement, in order,
        inside a transaction opened with :meth:`transaction`; returns their ids."""
        if not items:
            return []
        first = await self._add_many(db, items)
        return list(range(first, first + len(items)))

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
        """Commit one poll cycle: readings, meter statuses and events, atomically.

        On a full disk, sheds telemetry and tries once more before raising
        :class:`OutboxFullError` (the cycle is then not stored; callers go on).
        """
        if self._ballast_released:
            async with self._lock:
                _, free = await self._usage(self._db)
                reusable = await self._freelist_bytes(self._db)
            if free + reusable < 2 * self.policy.ballast_bytes:
                # What is left is kept for batching and acks, which free space.
                raise OutboxFullError(f"{self.path}: disk full; new records refused until space returns")
            await self.ensure_reserve()
        try:
            async with self.transaction() as db:
                return await self.commit_cycle_in(db, now_ms, readings, statuses, events)
        except OutboxFullError:
            if not await self._emergency_evict():
                raise
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
        """Add a poll cycle inside a transaction; returns one record id per reading.

        Acks waiting are applied here, before the cycle's records are inserted (when
        there are any): the pages the acknowledged records free are dirty in this
        transaction already, and the new records fill them, so each is written to the
        log once, with its new rows, instead of once as a free page and again when a
        later transaction reuses it."""
        # The space check, the first free id and the acknowledged batches: one trip
        # (an eviction reads the id again), after the rows an earlier slice of this
        # transaction holds back (they count for both, and may be evicted).
        acks = self._acks_waiting() if readings or events else {}
        held = self._take_deferred()
        usage, next_id, *ack_rows = (await run_statements(db, [
            *held, Statement(self.USAGE_SQL), Statement(self.NEXT_ID_SQL),
            *([self._acks_query(acks)] if acks else []),
        ]))[len(held):]  # fmt: skip
        first: int | None = self._first_free_id(next_id)
        if await self._enforce_policy(db, now_ms, usage=self._usage_of(usage)):
            first = None
        # The acks' writes go first, before the insert (see above).
        pending: list[Statement] = self._acks_writes(acks, ack_rows[0])[0] if acks else []
        ids = []
        n_billing = n_telemetry = 0
        items: list[tuple[RecordClass, str, int, dict[str, Any]]] = []
        for r in readings:
            # One id per reading, in order (callers pair them): its BILLING record's,
            # or its TELEMETRY record's when it has no register values.
            for k, (cls, body) in enumerate(split_reading(r)):
                if k == 0:
                    ids.append(len(items))
                items.append((cls, RecordKind.READING, r.time_ms, body))
                if cls is RecordClass.BILLING:
                    n_billing += 1
                else:
                    n_telemetry += 1
        for e in events:
            items.append((RecordClass.EVENT, RecordKind.EVENT, now_ms, e))
        # Each class's records take consecutive ids (a class's batches are acknowledged
        # and deleted together: whole pages are freed instead of rewritten).
        order = sorted(range(len(items)), key=lambda i: items[i][0])
        position = [0] * len(items)
        for p, i in enumerate(order):
            position[i] = p
        items = [items[i] for i in order]
        first, insert = await self._prepare_many(db, items, first)
        ids = [first + position[i] for i in ids]
        # The acks, the insert, the meter statuses and the counters go to the connection
        # together.
        if insert is not None:
            pending.append(insert)
        if self.health.pending_alarms:  # (alarms take their ids after the cycle's records)
            await run_statements(db, pending)
            pending = []
            await self._flush_alarms(db, now_ms)
        changed = [
            st
            for st in statuses
            if _status_changed(self._tx_status.get(st.meter_id, self._status.get(st.meter_id)), st)
        ]
        if changed:
            pending.append(Statement(
                "INSERT INTO meter_status (meter_id, online, last_attempt_ms, last_good_ms,"
                " consecutive_failures, total_failures, last_error) VALUES (?,?,?,?,?,?,?)"
                " ON CONFLICT (meter_id) DO UPDATE SET online=excluded.online,"
                " last_attempt_ms=excluded.last_attempt_ms,"
                " last_good_ms=COALESCE(excluded.last_good_ms, meter_status.last_good_ms),"
                " consecutive_failures=excluded.consecutive_failures,"
                " total_failures=excluded.total_failures, last_error=excluded.last_error",
                [
                    (st.meter_id, int(st.online), st.last_attempt_ms, st.last_good_ms,
                     st.consecutive_failures, st.total_failures, st.last_error)
                    for st in changed
                ],
                many=True,
            ))  # fmt: skip
        bumps = [(k, n) for k, n in ((K_READINGS, n_billing), (K_TELEMETRY, n_telemetry)) if n]
        if bumps:
            pending.append(Statement(
                "INSERT INTO kv (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
                bumps,
                many=True,
            ))  # fmt: skip
        await run_statements(db, pending)
        for st in changed:
            self._tx_status[st.meter_id] = st
        return ids

    async def add_event(self, now_ms: int, body: dict[str, Any]) -> int:
        async with self.transaction() as db:
            rid = await self._add(db, RecordClass.EVENT, RecordKind.EVENT, now_ms, body)
            await self._flush_alarms(db, now_ms)
            return rid

    async def _flush_alarms(self, db: aiosqlite.Connection, now_ms: int) -> None:
        alarms, self.health.pending_alarms = self.health.pending_alarms, []
        try:
            for a in alarms:
                await self._add(db, RecordClass.EVENT, RecordKind.EVENT, now_ms, a)
        except BaseException:
            self.health.pending_alarms[:0] = alarms
            raise

    @staticmethod
    async def _bump(db: aiosqlite.Connection, key: str, n: int) -> None:
        await db.execute(
            "INSERT INTO kv (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
            (key, n),
        )

    # -- storage policy -----------------------------------------------------

    async def _enforce_policy(
        self, db: aiosqlite.Connection, now_ms: int, *, usage: tuple[int, int] | None = None
    ) -> bool:
        """Evict what the storage policy asks for (``usage``: :meth:`_usage` as read in
        this transaction); True when it evicted (deleted) anything."""
        live, free = usage if usage is not None else await self._usage(db)
        plan = plan_eviction(live, free, self.policy)
        if plan.shed_bytes or plan.hard_bytes:
            await self._evict(db, now_ms, plan)
            return True
        return False

    async def _emergency_evict(self) -> int:
        """After SQLITE_FULL: give up the ballast, then shed telemetry (and past the
        floor, billing) in its own transaction (freed pages are reused). Returns the
        number of records evicted (0: retrying would not help, unless the reserve
        was just released)."""
        self._release_reserve("a transaction failed for lack of space")
        with contextlib.suppress(OutboxError):
            async with self.transaction() as db:
                live, free = await self._usage(db)
                plan = plan_eviction(live, free, self.policy)
                shed = max(plan.shed_bytes, 256 * 1024)
                return await self._evict(db, self.clock_ms(), EvictionPlan(shed, plan.hard_bytes))
        return 0

    async def _avg_row(self, db: aiosqlite.Connection, where: str) -> int:
        # A sample of the oldest rows: a full scan would read every blob.
        async with db.execute(
            f"SELECT avg(length(body)) FROM (SELECT body FROM outbox WHERE {where} ORDER BY id LIMIT 256)"
        ) as cur:
            row = await cur.fetchone()
        return int((row[0] if row and row[0] else 200) + _ROW_OVERHEAD)

    async def _evict(self, db: aiosqlite.Connection, now_ms: int, plan: EvictionPlan) -> int:
        await self._insert_deferred(db)  # (rows held back are unbatched records too)
        tele = f"cls = {int(RecordClass.TELEMETRY)} AND batch_seq IS NULL"
        freed = 0
        evicted = 0
        if plan.shed_bytes:
            per = await self._avg_row(db, tele)
            # Shed a little more than needed (1/64 of the ceiling), so that a full
            # store sheds in steps, not on every commit.
            want = -(-(plan.shed_bytes + self.policy.max_bytes // 64) // per)
            # 1. telemetry older than the recent window, oldest first
            cutoff = now_ms - self.policy.keep_recent_telemetry_ms
            cur = await db.execute(
                f"DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE {tele}"
                " AND created_ms < ? ORDER BY id LIMIT ?)",
                (cutoff, want),
            )
            evicted += max(cur.rowcount, 0)
            # 2. thin what is left (every second record), as often as needed
            for _ in range(8):
                if evicted >= want:
                    break
                cur = await db.execute(
                    "DELETE FROM outbox WHERE id IN (SELECT id FROM (SELECT id,"
                    f" row_number() OVER (ORDER BY id) AS rn FROM outbox WHERE {tele})"
                    " WHERE rn % 2 = 0 LIMIT ?)",
                    (want - evicted,),
                )
                if cur.rowcount <= 0:
                    break
                evicted += cur.rowcount
            # 3. the last telemetry, oldest first
            if evicted < want:
                cur = await db.execute(
                    f"DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE {tele}"
                    " ORDER BY id LIMIT ?)",
                    (want - evicted,),
                )
                evicted += max(cur.rowcount, 0)
            freed = evicted * per
            if evicted:
                await self._bump(db, K_EVICTED_TELEMETRY, evicted)
                log.warning("outbox: storage limit reached, shed %d telemetry records", evicted)
        if plan.hard_bytes > 0:
            billing = f"cls = {int(RecordClass.BILLING)} AND batch_seq IS NULL"
            per = await self._avg_row(db, billing)
            want = -(-plan.hard_bytes // per)
            cur = await db.execute(
                f"DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE {billing}"
                " ORDER BY id LIMIT ?)",
                (want,),
            )
            lost = max(cur.rowcount, 0)
            if lost:
                await self._bump(db, K_EVICTED_BILLING, lost)
            log.critical(
                "outbox: below the storage hard floor; evicted %d unacknowledged billing records", lost
            )
            await self._add(
                db,
                RecordClass.EVENT,
                RecordKind.EVENT,
                now_ms,
                event(
                    "storage_hard_floor",
                    billing_records_evicted=lost,
                    telemetry_records_evicted=evicted,
                    telemetry_bytes_freed=freed,
                ),
            )
            evicted += lost
        return evicted

    # -- batches ------------------------------------------------------------

    async def next_batch(
        self,
        now_ms: int,
        *,
        exclude: Iterable[int] = (),
        max_records: int = 500,
        max_bytes: int = 64 * 1024,
        pack: Packer | None = None,
        max_cls: int | None = None,
    ) -> Batch | None:
        """The next batch to send: an unacknowledged one not in ``exclude``, or a new one.

        Classes come first: a pending or new EVENT batch before any BILLING one,
        and so on; within a class, already numbered batches (oldest first) come
        before new ones, so a restart or reconnect retransmits them unchanged.
        New batches take records of one class, FIFO, up to the limits; with
        ``pack`` the sealed payload is made (off the event loop) and stored
        with the batch, and the batch holds exactly the records that fitted.
        ``max_cls`` restricts the choice to classes up to it (the uplink asks
        for events only while its window is full).

        With ``pack`` the batch returned always has its payload: one numbered
        without it (by a caller that passed no ``pack``) is sealed whole once
        here and the bytes kept, so every later send is the same.
        """
        async with self._batching:  # one batch maker at a time (uplink, export)
            ready = self._ready_batch(exclude, max_cls)
            if ready is None or isinstance(ready, Batch):
                return ready
            while True:
                try:
                    batch = await self._next_batch(
                        now_ms, exclude=exclude, max_records=max_records, max_bytes=max_bytes,
                        pack=pack, max_cls=max_cls,
                    )  # fmt: skip
                    break
                except OutboxFullError:
                    # A full database may not hold a large batch's numbering and
                    # payload, while a smaller one fits, and its ack frees more
                    # than it took: halve the batch until one record.
                    if max_records <= 1:
                        raise
                    max_records //= 2
                    # (the full disk itself is reported once, by the storage_full alarm)
                    log.info("outbox %s: full; numbering a batch of at most %d records", self.path, max_records)
            if batch is None or batch.payload is not None or pack is None:
                return batch
            payload, n = await asyncio.to_thread(
                functools.partial(pack, batch.seq, batch.records, 1 << 30, epoch=batch.epoch)
            )
            if n != len(batch.records):
                raise OutboxError(f"{self.path}: batch {batch.seq} does not fit one payload")
            return dataclasses.replace(batch, payload=await self.keep_payload(batch.seq, payload))

    def _ready_batch(
        self, exclude: Iterable[int], max_cls: int | None
    ) -> Batch | Literal[False] | None:
        """The next batch from memory, without the database: False when memory does
        not know (batches it did not make may be pending, or records wait)."""
        if not self._ready_complete or self._db is None:
            return False
        limit = 255 if max_cls is None else int(max_cls)
        excluded = set(exclude)
        best: tuple[int, int] | None = None
        for seq, (cls, _) in self._ready.items():
            if seq in excluded or seq in self._acks or cls > limit:
                continue
            if best is None or (cls, seq) < best:
                best = (cls, seq)
        if self._unbatched:
            # New records may belong before the pending batch (a lower class).
            if best is None or best[0] > int(RecordClass.EVENT):
                return False
        if best is None:
            return None
        batch = self._ready[best[1]][1]
        return dataclasses.replace(batch, attempts=self._sent.get(batch.seq, batch.attempts))

    async def _next_batch(
        self,
        now_ms: int,
        *,
        exclude: Iterable[int],
        max_records: int,
        max_bytes: int,
        pack: Packer | None,
        max_cls: int | None,
    ) -> Batch | None:
        limit = 255 if max_cls is None else int(max_cls)
        excluded = set(exclude)
        for _ in range(10):
            async with self.transaction() as db:
                async with db.execute(
                    "SELECT seq, attempts, cls, epoch FROM batches ORDER BY cls, seq"
                ) as cur:
                    pending = [(int(s), int(a), int(c), str(e)) async for s, a, c, e in cur]
                pending = [p for p in pending if p[0] not in self._acks]
                if all(p[0] in self._ready for p in pending):
                    self._ready_complete = True
                first = next((p for p in pending if p[0] not in excluded and p[2] <= limit), None)
                async with db.execute(
                    "SELECT cls FROM outbox WHERE batch_seq IS NULL AND cls <= ? ORDER BY cls LIMIT 1",
                    (limit,),
                ) as cur:
                    row = await cur.fetchone()
                top = None if row is None else int(row[0])
                if top is None and limit == 255:
                    self._unbatched = False
                if first is not None and (top is None or first[2] <= top):
                    seq, attempts, _, batch_epoch = first
                    records, stored = await self._batch_contents(db, seq)
                    attempts = max(attempts, self._sent.get(seq, 0))
                    return Batch(seq, records, attempts, stored, batch_epoch)
                if top is None:
                    return None
                async with db.execute(
                    "SELECT id, cls, kind, created_ms, key_ver, body FROM outbox"
                    " WHERE batch_seq IS NULL AND cls = ? ORDER BY id LIMIT ?",
                    (top, max_records),
                ) as cur:
                    rows = [tuple(r) async for r in cur]
                candidates = await self._open_rows(db, rows, now_ms)
                seq = await self._next_seq(db)
                epoch = await self._batch_epoch_in(db)
            if not candidates:
                continue  # every candidate was damaged and set aside; look again
            payload: bytes | None
            if pack is None:
                payload, count, size = None, 0, 0
                for raw in rows:
                    if count and size + len(raw[5]) > max_bytes:
                        break
                    size += len(raw[5])
                    count += 1
                count = min(count, len(candidates))
            else:
                payload, count = await asyncio.to_thread(
                    functools.partial(pack, seq, candidates, max_bytes, epoch=epoch)
                )
            chosen = candidates[:count]
            async with self.transaction() as db:
                if await self._next_seq(db) != seq or await self._batch_epoch_in(db) != epoch:
                    continue
                ids = [r.id for r in chosen]
                marks = ",".join("?" * len(ids))
                async with db.execute(
                    f"SELECT count(*) FROM outbox WHERE batch_seq IS NULL AND id IN ({marks})", ids
                ) as cur:
                    row = await cur.fetchone()
                if not row or int(row[0]) != len(ids):
                    continue  # evicted meanwhile: make the batch again
                await db.execute(
                    "INSERT INTO kv (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (K_NEXT_SEQ, seq + 1),
                )
                await db.execute(
                    "INSERT INTO batches (seq, cls, created_ms, n_records, payload, epoch)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (seq, top, now_ms, len(ids), payload, epoch),
                )
                await db.execute(f"UPDATE outbox SET batch_seq = ? WHERE id IN ({marks})", (seq, *ids))
                await self.apply_acks_in(db)
                self._ready_complete = False  # a batch memory does not hold
                return Batch(seq, tuple(chosen), 0, payload, epoch)
        raise OutboxError("could not form a batch (records kept changing underneath)")

    @staticmethod
    async def _next_seq(db: aiosqlite.Connection) -> int:
        rows = list(await db.execute_fetchall("SELECT value FROM kv WHERE key = ?", (K_NEXT_SEQ,)))
        return _seq_from(rows[0][0] if rows else None)

    @staticmethod
    async def _batch_epoch_in(db: aiosqlite.Connection) -> str:
        """The epoch new batches take; a database without one gets a random one now."""
        rows = list(await db.execute_fetchall("SELECT value FROM kv WHERE key = ?", (K_BATCH_EPOCH,)))
        if rows:
            return str(rows[0][0])
        epoch = new_epoch()
        await db.execute("INSERT INTO kv (key, value) VALUES (?, ?)", (K_BATCH_EPOCH, epoch))
        log.info("outbox: batches are numbered in the new epoch %s", epoch)
        return epoch

    async def batch_epoch(self) -> str:
        """The epoch of the batches this database numbers now (created with its first
        batch, or here): batches are (gateway, epoch, seq)."""
        async with self.transaction() as db:
            return await self._batch_epoch_in(db)

    async def start_batch_epoch(self, db: aiosqlite.Connection | None = None) -> str:
        """Number new batches in a fresh random epoch; returns it.

        For a database that was recreated or recovered after a fault, whose
        sequence numbers may repeat ones already used: the batches it makes from
        now on can never be mistaken for earlier ones. Batches already numbered
        keep their epoch, and sequence numbers go on counting up. ``db``: join
        the caller's transaction (:meth:`transaction`); without it, one of its own.
        """
        if db is None:
            async with self.transaction() as own:
                return await self.start_batch_epoch(own)
        epoch = new_epoch()
        await db.execute(
            "INSERT INTO kv (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (K_BATCH_EPOCH, epoch),
        )
        log.warning("outbox: new batches are numbered in a new epoch %s", epoch)
        return epoch

    async def _open_rows(
        self, db: aiosqlite.Connection, rows: Sequence[tuple[Any, ...]], now_ms: int
    ) -> list[Record]:
        """Unseal rows; a record that does not open is moved to ``damaged`` with an event."""
        out: list[Record] = []
        bad: list[tuple[int, str]] = []
        for rid, c, kind, created, ver, blob in rows:
            cls = RecordClass(c)
            try:
                opener = self._openers.get(int(ver))
                if opener is None:
                    raise SealingError(f"record {rid}: storage key version {ver} is not loaded")
                body = loads(unpack(opener.unseal(int(rid), self._aad_class(cls, kind), bytes(blob))))
            except (SealingError, ValueError) as exc:
                bad.append((int(rid), str(exc)))
                continue
            out.append(Record(int(rid), cls, str(kind), int(created), body))
        for rid, err in bad:
            log.error("outbox record %d cannot be opened: %s; set aside in table damaged", rid, err)
            await db.execute(
                "INSERT OR REPLACE INTO damaged (id, cls, kind, created_ms, key_ver, body, error)"
                " SELECT id, cls, kind, created_ms, key_ver, body, ? FROM outbox WHERE id = ?",
                (err, rid),
            )
            await db.execute("DELETE FROM outbox WHERE id = ?", (rid,))
        if bad:
            await self._bump(db, K_DAMAGED, len(bad))
            await self._add(
                db,
                RecordClass.EVENT,
                RecordKind.EVENT,
                now_ms,
                event("records_damaged", ids=[r for r, _ in bad][:100]),
            )
        return out

    async def _batch_contents(
        self, db: aiosqlite.Connection, seq: int
    ) -> tuple[tuple[Record, ...], bytes | None]:
        async with db.execute(
            "SELECT id, cls, kind, created_ms, key_ver, body FROM outbox WHERE batch_seq = ? ORDER BY id",
            (seq,),
        ) as cur:
            rows = [tuple(r) async for r in cur]
        async with db.execute("SELECT payload FROM batches WHERE seq = ?", (seq,)) as cur:
            prow = await cur.fetchone()
        payload = None if prow is None or prow[0] is None else bytes(prow[0])
        return tuple(await self._open_rows(db, rows, self.clock_ms())), payload

    async def pending_batches(self) -> list[int]:
        async with self._lock, self._db.execute("SELECT seq FROM batches ORDER BY seq") as cur:
            return [int(r[0]) async for r in cur]

    async def batch_payload(self, seq: int) -> bytes | None:
        async with self._lock, self._db.execute(
            "SELECT payload FROM batches WHERE seq = ?", (seq,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    async def pending_batch(self, seq: int) -> tuple[str, bytes | None] | None:
        """(epoch, stored payload) of unacknowledged batch ``seq``; None if there is none."""
        async with self._lock, self._db.execute(
            "SELECT epoch, payload FROM batches WHERE seq = ?", (seq,)
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return str(row[0]), None if row[1] is None else bytes(row[1])

    async def keep_payload(self, seq: int, payload: bytes) -> bytes:
        """Store ``payload`` for a batch numbered without one, so that every later
        send is these bytes; returns the payload the batch now has."""
        async with self.transaction() as db:
            await db.execute(
                "UPDATE batches SET payload = ? WHERE seq = ? AND payload IS NULL", (payload, seq)
            )
            async with db.execute("SELECT payload FROM batches WHERE seq = ?", (seq,)) as cur:
                row = await cur.fetchone()
        return payload if row is None or row[0] is None else bytes(row[0])

    async def mark_sent(self, seq: int, now_ms: int) -> None:
        """Batch ``seq`` was published: counted in memory only (a count lost in a
        crash only makes the next send look like a first one)."""
        self._sent[seq] = self._sent.get(seq, 0) + 1

    async def ack(self, seq: int, *, epoch: str | None = None) -> int:
        """The headend committed batch ``seq``: delete it. Idempotent; returns records freed.

        With ``epoch``, only a batch of that epoch is deleted."""
        async with self.transaction() as db:
            n = await self._apply_acks_in(db, {seq: epoch})
        return n

    def ack_later(self, seq: int, *, epoch: str | None = None) -> None:
        """The headend committed batch ``seq``: delete it with the next transaction
        (:meth:`apply_acks_in`; the writer's poll-cycle commit). Until then the batch
        is not sent again; an ack lost in a crash makes it go once more, and the
        headend answers that copy as a duplicate."""
        self._acks.setdefault(seq, (epoch, time.monotonic()))

    def ack_waiting(self, seq: int) -> bool:
        """An ack for batch ``seq`` arrived and waits to be applied."""
        return seq in self._acks

    def acks_due(self, max_age_s: float) -> bool:
        """Acks wait longer than ``max_age_s``, or space is short (acks free it)."""
        if not self._acks:
            return False
        if self._ballast_released or self.starved is not None:
            return True
        oldest = min(since for _, since in self._acks.values())
        return time.monotonic() - oldest >= max_age_s

    async def apply_acks(self) -> int:
        """Apply the acks waiting in a transaction of their own; returns records freed."""
        if not self._acks:
            return 0
        async with self.transaction() as db:
            return await self.apply_acks_in(db)

    async def apply_acks_in(self, db: aiosqlite.Connection) -> int:
        """Delete the batches whose acks wait, inside the caller's transaction."""
        waiting = self._acks_waiting()
        if not waiting:
            return 0
        return await self._apply_acks_in(db, waiting)

    def _acks_waiting(self) -> dict[int, str | None]:
        """The acks that arrived and are not yet applied in this transaction (seq -> epoch)."""
        return {seq: epoch for seq, (epoch, _) in self._acks.items() if seq not in self._tx_acked}

    async def _apply_acks_in(
        self, db: aiosqlite.Connection, acks: Mapping[int, str | None], first: Sequence[Statement] = ()
    ) -> int:
        """Delete the acknowledged batches ``acks``; ``first``: statements to run
        before, in the same trip."""
        *_, rows = await run_statements(db, [*first, self._acks_query(acks)])
        writes, n = self._acks_writes(acks, rows)
        await run_statements(db, writes)
        return n

    @staticmethod
    def _acks_query(acks: Mapping[int, str | None]) -> Statement:
        """Each acknowledged batch with its records and billing readings counted, in
        one statement."""
        seqs = list(acks)
        marks = ",".join("?" * len(seqs))
        return Statement(
            "SELECT b.seq, b.epoch, count(o.id), coalesce(sum(o.kind = ? AND o.cls = ?), 0)"
            " FROM batches b LEFT JOIN outbox o ON o.batch_seq = b.seq"
            f" WHERE b.seq IN ({marks}) GROUP BY b.seq",
            (RecordKind.READING.value, int(RecordClass.BILLING), *seqs),
        )

    def _acks_writes(
        self, acks: Mapping[int, str | None], rows: Sequence[Any]
    ) -> tuple[list[Statement], int]:
        """What applies the acks :meth:`_acks_query` found (the batches whose epoch
        matches), and the records that frees."""
        found: list[int] = []
        n = n_readings = 0
        for seq, epoch, records, readings in rows:
            if acks[int(seq)] in (None, str(epoch)):
                found.append(int(seq))
                n += int(records)
                n_readings += int(readings)
        self._tx_acked.extend(acks)
        if not found:
            return [], 0
        marks = ",".join("?" * len(found))
        return [
            Statement(f"DELETE FROM outbox WHERE batch_seq IN ({marks})", found),
            Statement(f"DELETE FROM batches WHERE seq IN ({marks})", found),
            Statement(
                "INSERT INTO kv (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
                [(K_ACKED_RECORDS, n), (K_ACKED_READINGS, n_readings)],
                many=True,
            ),
        ], n  # fmt: skip

    async def fold_in(self, db: aiosqlite.Connection, now_ms: int) -> None:
        """The rest of a poll cycle's transaction: apply the acks that arrived since
        the last one and, while the uplink sends what is committed at once
        (:attr:`batch_plan`), number the next batches: what waits of each class, when
        it fits one batch, is assigned to a new batch whose sealed payload is stored
        with it. The batch is published only after this transaction committed, so its
        records are durable first; every later send is the same bytes.

        The records this transaction added in one statement (a poll cycle's, a billing
        tick's) are inserted here (:attr:`insert_numbered`), those it numbers with their
        batch number already set: they are written to the index of batched records
        only, never to that of unbatched ones. The rest are inserted unbatched, as
        when they were added."""
        # Acks ride only on a transaction that writes anyway (not on a billing tick
        # that changed nothing); alone they wait for the next one, or acks_due.
        acks = self._acks_waiting() if self.tx_writes() else {}
        plan = (
            self.batch_plan() if self.batch_plan is not None and self.packer is not None else None
        )
        if plan is None or not self._tx_added:
            inserts = self._take_deferred()  # (unbatched: no batch is numbered)
            if acks:
                await self._apply_acks_in(db, acks, inserts)
            elif inserts:
                await run_statements(db, inserts)
            return
        classes = [c for c in RecordClass if int(c) <= plan.max_cls]
        per_class = " UNION ALL ".join(
            f"SELECT * FROM (SELECT cls, id FROM outbox WHERE batch_seq IS NULL AND cls = {int(c)}"
            f" ORDER BY id LIMIT {plan.max_records + 1})"
            for c in classes
        )
        # The acknowledged batches, what waits of each class, the next batch number and
        # epoch: one trip (the acks touch only records already in a batch and their
        # own counters, so the order of these reads does not matter).
        *ack_rows, waiting_rows, kv_rows = await run_statements(db, [
            *([self._acks_query(acks)] if acks else []),
            Statement(per_class),
            Statement("SELECT key, value FROM kv WHERE key IN (?, ?)", (K_NEXT_SEQ, K_BATCH_EPOCH)),
        ])  # fmt: skip
        # The acks' writes go first, as when they were applied before the batches.
        writes: list[Statement] = self._acks_writes(acks, ack_rows[0])[0] if acks else []
        # What waits of each class: the rows in the table, then the rows held back
        # (newer than any in the table), up to the same limit.
        held = self._tx_deferred
        self._tx_deferred = []
        rows = [(int(c), int(i)) for c, i in waiting_rows]
        rows += [(c, i) for i, c, *_ in held if c <= plan.max_cls]
        kv = {str(k): v for k, v in kv_rows}
        waiting: dict[int, list[int]] = {}
        for c, i in rows:
            ids_of = waiting.setdefault(c, [])
            if len(ids_of) <= plan.max_records:
                ids_of.append(i)
        numbered: dict[int, int] = {}  # id of a row held back -> its batch
        held_ids = {r[0] for r in held}
        batch_writes: list[Statement] = []
        all_batched = len(classes) == len(RecordClass)
        seq = epoch = None
        # the applied acks, then the batches and their records: written together
        for cls in sorted(waiting):
            ids = waiting[cls]
            missing = [i for i in ids if i not in self._tx_records]
            if len(ids) > plan.max_records or missing:
                all_batched = False  # a backlog, or records of earlier transactions: the uplink's
                continue
            if seq is None:
                seq = _seq_from(kv.get(K_NEXT_SEQ))
                epoch = str(kv[K_BATCH_EPOCH]) if K_BATCH_EPOCH in kv else await self._batch_epoch_in(db)
            assert epoch is not None and self.packer is not None
            records = [self._tx_records[i] for i in ids]
            if len(records) <= PACK_INLINE_RECORDS:
                payload, count = self.packer(seq, records, plan.max_bytes, epoch=epoch)
            else:
                payload, count = await asyncio.to_thread(
                    functools.partial(self.packer, seq, records, plan.max_bytes, epoch=epoch)
                )
            if count < len(records):
                all_batched = False
                if count == 0:
                    continue
            chosen = records[:count]
            cids = [r.id for r in chosen]
            batch_writes.append(Statement(
                "INSERT INTO batches (seq, cls, created_ms, n_records, payload, epoch) VALUES (?, ?, ?, ?, ?, ?)",
                (seq, cls, now_ms, len(cids), payload, epoch),
            ))  # fmt: skip
            numbered.update((i, seq) for i in cids if i in held_ids)
            inserted = [i for i in cids if i not in held_ids]  # (added one by one: _add)
            if inserted:
                marks = ",".join("?" * len(inserted))
                batch_writes.append(
                    Statement(f"UPDATE outbox SET batch_seq = ? WHERE id IN ({marks})", (seq, *inserted))
                )
            self._tx_ready[seq] = (cls, Batch(seq, tuple(chosen), 0, payload, epoch))
            seq += 1
        if held:
            writes.append(Statement(
                "INSERT INTO outbox (id, cls, kind, created_ms, key_ver, body, batch_seq) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(*r, numbered.get(r[0])) for r in held],
                many=True,
            ))  # fmt: skip
        writes += batch_writes
        if seq is not None:
            writes.append(Statement(
                "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (K_NEXT_SEQ, seq),
            ))  # fmt: skip
        await run_statements(db, writes)
        if all_batched:
            self._tx_added = False  # nothing of this transaction waits for a batch

    # -- reading state ------------------------------------------------------

    async def stats(self) -> BacklogStats:
        async with self._lock:
            return await backlog_stats(self._db)

    async def depth(self) -> tuple[int, int | None, int]:
        """(records waiting, created_ms of the oldest, batches not yet acknowledged).

        Cheap enough to ask every few seconds: the counts read the two partial
        indexes, the oldest record is the first by id (unlike :meth:`stats`,
        which reads every record)."""
        async with self._lock, self._db.execute(
            "SELECT (SELECT count(*) FROM outbox WHERE batch_seq IS NULL),"
            " (SELECT count(*) FROM outbox WHERE batch_seq IS NOT NULL),"
            " (SELECT created_ms FROM outbox ORDER BY id LIMIT 1),"
            " (SELECT count(*) FROM batches)"
        ) as cur:
            row = await cur.fetchone()
        assert row is not None
        return int(row[0]) + int(row[1]), None if row[2] is None else int(row[2]), int(row[3])

    async def meter_statuses(self) -> list[MeterStatus]:
        async with self._lock:
            return await meter_statuses(self._db)

    async def nonces(self) -> list[bytes]:
        """Every nonce of the stored record blobs (audits and tests)."""
        async with self._lock, self._db.execute("SELECT body FROM outbox") as cur:
            return [StorageSealer.nonce_of(bytes(b)) async for (b,) in cur]


# Read-only helpers, shared with `edgegw status` (which opens its own connection).


async def backlog_stats(db: aiosqlite.Connection) -> BacklogStats:
    async with db.execute(
        "SELECT count(*), coalesce(sum(kind = ? AND cls = ?), 0), coalesce(sum(cls = ?), 0),"
        " min(created_ms), coalesce(sum(length(body)), 0) FROM outbox",
        (RecordKind.READING.value, int(RecordClass.BILLING), int(RecordClass.TELEMETRY)),
    ) as cur:
        row = await cur.fetchone()
    assert row is not None
    async with db.execute("SELECT count(*) FROM batches") as cur:
        brow = await cur.fetchone()
    kv = await read_kv(db)
    return BacklogStats(
        records=int(row[0]),
        readings=int(row[1]),
        telemetry=int(row[2]),
        oldest_created_ms=None if row[3] is None else int(row[3]),
        bytes=int(row[4]),
        batches_pending=int(brow[0]) if brow else 0,
        readings_committed=int(kv.get(K_READINGS, 0)),
        readings_acked=int(kv.get(K_ACKED_READINGS, 0)),
        telemetry_evicted=int(kv.get(K_EVICTED_TELEMETRY, 0)),
        billing_evicted=int(kv.get(K_EVICTED_BILLING, 0)),
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

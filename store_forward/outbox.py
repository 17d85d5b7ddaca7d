"""The durable outbox: one SQLite file, one writer connection, sealed records.

Everything the gateway must not lose goes through here: readings, events,
and (with the billing package) the ledger entries they cause. The rules:

* One connection owns all writes (WAL, ``synchronous=FULL``); every public
  write is one explicit ``BEGIN IMMEDIATE … COMMIT`` under an asyncio lock,
  so the poll cycle, the uplink and command handling never interleave inside
  a transaction. A failed statement or commit (a full disk included) rolls
  the whole transaction back.
* A poll cycle is one transaction: all of its readings, its meter-status
  updates and its events commit together or not at all. One transaction per
  cycle, never one per row, is also what keeps flash wear down.
* Every record body is sealed at rest (AES-256-GCM, :mod:`store_forward.sealing`)
  under this database's storage key (:mod:`store_forward.storage_keys`); the
  associated data binds the record id, class and kind, so a blob moved to
  another row no longer opens. Nonces are epoch ‖ counter; the epoch is taken
  durably at open, before the first seal, so none repeats across SIGKILL or
  power loss.
* A reading becomes a BILLING record (register values) and, when it has any,
  a TELEMETRY record (instantaneous values). Batches are drained by class:
  EVENT, then BILLING, then TELEMETRY; FIFO within a class.
* Records are assigned to uplink batches in a transaction that also stores
  the batch row (and its sealed payload), so a batch sequence number always
  names the same records and bytes, across retransmissions and restarts.
  Records are deleted only when the headend's ack for their batch arrives.
* A batch is named (gateway, epoch, seq): the database takes a random batch
  epoch with its first batch (:meth:`Outbox.batch_epoch`), and a recreated or
  recovered database takes a new one (:meth:`Outbox.start_batch_epoch`), so a
  sequence that starts again at 1 never repeats a batch the headend knows.
  Sequence numbers only count up within a database, across its epochs.
* Record ids come from ``AUTOINCREMENT`` and are never reused, so the headend
  can see a gap as a loss and a repeated id as a duplicate.
* Storage is bounded by policy (see :class:`StoragePolicy`): telemetry is
  shed first; unacknowledged billing records and events only past a hard
  floor, and then with a critical alarm event.
* A database that fails ``PRAGMA quick_check`` at open is quarantined —
  renamed aside with its ``-wal``/``-shm`` — never deleted; the new database
  starts with an event naming the quarantined file.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiosqlite

from firmware_bridge.reading import Reading
from store_forward.batch_epoch import LEGACY_EPOCH, new_epoch
from store_forward.records import (
    Record,
    RecordClass,
    RecordKind,
    class_name,
    dumps,
    loads,
    split_reading,
)
from store_forward.sealing import (
    FileEpochStore,
    NonceSequence,
    SealingError,
    SqliteEpochStore,
    StorageSealer,
    key_tag,
)
from store_forward.storage_keys import StorageKeys, database_key

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2

SCHEMA = """
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
K_SALT = "storage_salt"

SQLITE_FULL = 13
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26

_ROW_OVERHEAD = 48  # bytes of index and row header per record, roughly


class OutboxError(Exception):
    """The outbox cannot do what was asked (corrupt file, full disk, ...)."""


class OutboxFullError(OutboxError):
    """The disk (or the database's size limit) is full; the transaction was rolled back."""


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


# --------------------------------------------------------------------------- policy (pure)


@dataclass(frozen=True)
class StoragePolicy:
    """How much the outbox may hold.

    ``max_bytes`` is the ceiling on live database bytes; above it telemetry is
    shed. ``reserve_bytes`` is free space kept on the filesystem: below twice
    the reserve telemetry is shed. Billing records and events may grow past
    the ceiling by a margin (the larger of ``reserve_bytes`` and a quarter of
    ``max_bytes``); past that margin, or with less free space than the
    reserve itself (the hard floor), the oldest unbatched billing records go
    too, each time with a critical alarm event. Events, batches already sent
    and the ledger's tables are never evicted.
    """

    max_bytes: int = 256 * 1024 * 1024
    reserve_bytes: int = 16 * 1024 * 1024
    keep_recent_telemetry_ms: int = 24 * 3600 * 1000
    # A file of this size beside the database, given up when the disk is
    # full anyway (another process filled it), so that batching and acks —
    # which need a little space to free a lot — still work.
    ballast_bytes: int = 2 * 1024 * 1024


@dataclass(frozen=True)
class EvictionPlan:
    shed_bytes: int  # telemetry to free
    hard_bytes: int  # billing to free (hard floor)


def plan_eviction(live_bytes: int, free_bytes: int, policy: StoragePolicy) -> EvictionPlan:
    """What to free, given live database bytes and free filesystem bytes (pure)."""
    over_ceiling = max(0, live_bytes - policy.max_bytes)
    short_of_reserve = max(0, 2 * policy.reserve_bytes - free_bytes)
    shed = max(over_ceiling, short_of_reserve)
    hard_ceiling = policy.max_bytes + max(policy.reserve_bytes, policy.max_bytes // 4)
    hard = max(0, policy.reserve_bytes - free_bytes, live_bytes - hard_ceiling)
    return EvictionPlan(shed, hard)


# --------------------------------------------------------------------------- opening


def _is_corruption(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (SQLITE_CORRUPT, SQLITE_NOTADB) or (
        type(exc) is sqlite3.DatabaseError
    )


def check_or_quarantine(path: Path) -> tuple[Path, str] | None:
    """Run ``quick_check``; if the file is corrupt, rename it (and its -wal/-shm)
    aside and return (new path, reason). A missing file is fine (None)."""
    if not path.exists():
        return None
    reason: str | None = None
    try:
        # Read-only: a read-write connection to a file that is not a database
        # deletes its -wal on close, and the WAL may hold the newest commits.
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=5.0)
        try:
            row = conn.execute("PRAGMA quick_check").fetchone()
            if row is None or row[0] != "ok":
                reason = f"quick_check: {row[0] if row else 'no result'}"
        finally:
            conn.close()
    except sqlite3.Error as exc:
        if not _is_corruption(exc):
            raise OutboxError(f"{path}: cannot open outbox database: {exc}") from exc
        reason = str(exc)
    if reason is None:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}-{secrets.token_hex(2)}")
    for suffix in ("-wal", "-shm", ""):
        src = path.with_name(path.name + suffix)
        if src.exists():
            os.replace(src, target.with_name(target.name + suffix))
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    log.critical("outbox database %s failed its check (%s); quarantined as %s", path, reason, target)
    return target, reason


def _open_sealer(path: Path, keys: StorageKeys, salt: bytes) -> StorageSealer:
    """Take a fresh nonce epoch for this database's current key (blocking)."""
    sub = database_key(keys.keys[keys.current], salt, keys.current)
    conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
    try:
        conn.execute("PRAGMA synchronous=FULL")
        try:
            row = conn.execute(
                f"SELECT epoch FROM {SqliteEpochStore.TABLE} WHERE key_tag = ?", (key_tag(sub),)
            ).fetchone()
        except sqlite3.OperationalError:  # table not created yet
            row = None
        # The salt lives in this database, and its epoch row is committed before
        # the first seal: no row here means nothing was ever sealed under `sub`.
        new_key = row is None
        return StorageSealer.open(
            sub,
            [SqliteEpochStore(conn), FileEpochStore(path.with_name(path.name + ".epoch"))],
            new_key=new_key,
        )
    finally:
        conn.close()


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _ensure_ballast(path: Path, size: int) -> bool:
    """Create the ballast file if it is missing and the disk has room for it."""
    if size <= 0 or path.exists():
        return path.exists()
    st = os.statvfs(path.parent)
    if st.f_bavail * st.f_frsize < 4 * size:
        return False
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\xa5" * size)  # real blocks, on every filesystem
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False
    return True


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


async def _add_batch_epoch_column(db: aiosqlite.Connection) -> None:
    """Batches of a database made before epochs existed keep the legacy epoch ''."""
    async with db.execute("PRAGMA table_info(batches)") as cur:
        columns = {str(row[1]) async for row in cur}
    if "epoch" not in columns:
        await db.execute("ALTER TABLE batches ADD COLUMN epoch TEXT NOT NULL DEFAULT ''")


# --------------------------------------------------------------------------- the outbox


@dataclass
class _Health:
    full_errors: int = 0
    last_full_ms: int | None = None
    pending_alarms: list[dict[str, Any]] = field(default_factory=list)


class Outbox:
    """The gateway's single SQLite writer."""

    def __init__(
        self,
        db: aiosqlite.Connection,
        path: Path,
        *,
        sealer: StorageSealer,
        key_version: int,
        openers: Mapping[int, StorageSealer],
        policy: StoragePolicy,
        clock_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        self._db = db
        self.path = path
        self._lock = asyncio.Lock()
        self._rollback_hooks: list[Callable[[], None]] = []
        self._batching = asyncio.Lock()
        self._sealer = sealer
        self._key_version = key_version
        self._openers = dict(openers)
        self.policy = policy
        self.clock_ms = clock_ms
        self.health = _Health()
        # Set by the gateway's Uplink: how its batches are sealed (also used by
        # the sneakernet export, which must write the very same batches).
        self.packer: Packer | None = None
        self.gateway_id: str | None = None
        self.ballast = path.with_name(path.name + ".ballast")
        self._ballast_released = False

    # -- life cycle ---------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        keys: StorageKeys | None = None,
        policy: StoragePolicy | None = None,
        clock_ms: Callable[[], int] = _wall_ms,
    ) -> Outbox:
        """Open (or create) the outbox at ``path``.

        ``keys`` defaults to :meth:`StorageKeys.beside` (``<db>.key``); deployments
        pass the keystore's ``storage`` key or ``storage.key_file``.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        quarantined = await asyncio.to_thread(check_or_quarantine, path)
        db = await aiosqlite.connect(str(path), isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA busy_timeout=5000")
            async with db.execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
            version = int(row[0]) if row else 0
            async with db.execute(
                "SELECT count(*) FROM sqlite_master WHERE type='table' AND name='outbox'"
            ) as cur:
                row = await cur.fetchone()
            has_tables = bool(row and row[0])
            if has_tables and version != SCHEMA_VERSION:
                raise OutboxError(
                    f"{path}: outbox schema version {version}, this gateway needs {SCHEMA_VERSION}"
                    " (drain it with the version that wrote it)"
                )
            await db.executescript(SCHEMA)
            await _add_batch_epoch_column(db)
            await db.execute("BEGIN IMMEDIATE")
            await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            async with db.execute("SELECT value FROM kv WHERE key = ?", (K_SALT,)) as cur:
                row = await cur.fetchone()
            if row is None:
                salt = secrets.token_bytes(16)
                await db.execute("INSERT INTO kv (key, value) VALUES (?, ?)", (K_SALT, salt))
            else:
                salt = bytes(row[0])
            if db.in_transaction:
                await db.commit()
            if keys is None:
                keys = await asyncio.to_thread(StorageKeys.beside, path)
            await cls._check_keys(db, keys, salt, path)
            sealer = await asyncio.to_thread(_open_sealer, path, keys, salt)
        except sqlite3.DatabaseError as exc:
            await db.close()
            raise OutboxError(f"{path}: cannot open outbox database: {exc}") from exc
        except SealingError as exc:
            await db.close()
            raise OutboxError(f"{path}: cannot seal records: {exc}") from exc
        except BaseException:
            await db.close()
            raise
        openers = {
            v: StorageSealer(database_key(k, salt, v), NonceSequence(1))  # open only, never seal
            for v, k in keys.keys.items()
            if v != keys.current
        }
        openers[keys.current] = sealer
        ob = cls(
            db,
            path,
            sealer=sealer,
            key_version=keys.current,
            openers=openers,
            policy=policy or StoragePolicy(),
            clock_ms=clock_ms,
        )
        # The WAL is kept within half the ballast, so that giving the ballast up
        # always leaves room to checkpoint it.
        if ob.policy.ballast_bytes > 0:
            wal_pages = max(8, ob.policy.ballast_bytes // 2 // 4096)
            await db.execute(f"PRAGMA wal_autocheckpoint={wal_pages}")
            await db.execute(f"PRAGMA journal_size_limit={ob.policy.ballast_bytes // 2}")
        await asyncio.to_thread(_ensure_ballast, ob.ballast, ob.policy.ballast_bytes)
        log.info("outbox %s open; sealing under %s, nonce epoch %d", path, keys.source, sealer.epoch)
        if quarantined is not None:
            moved, reason = quarantined
            await ob.add_event(
                clock_ms(),
                {
                    "type": "storage_quarantined",
                    "severity": "critical",
                    "path": str(moved),
                    "reason": reason,
                },
            )
        return ob

    @staticmethod
    async def _check_keys(db: aiosqlite.Connection, keys: StorageKeys, salt: bytes, path: Path) -> None:
        """Refuse a key that is not the one the database was sealed with (a
        misconfigured key must not make every record look damaged)."""
        await db.execute("BEGIN IMMEDIATE")
        try:
            for version, master in sorted(keys.keys.items()):
                tag = key_tag(database_key(master, salt, version))
                name = f"storage_key_tag_v{version}"
                async with db.execute("SELECT value FROM kv WHERE key = ?", (name,)) as cur:
                    row = await cur.fetchone()
                if row is None:
                    await db.execute("INSERT INTO kv (key, value) VALUES (?, ?)", (name, tag))
                elif bytes(row[0]) != tag:
                    raise OutboxError(
                        f"{path}: storage key version {version} ({keys.source}) is not the key"
                        " this database was sealed with; refusing to open it"
                    )
            await db.commit()
        except BaseException:
            await db.rollback()
            raise

    async def close(self) -> None:
        async with self._lock:
            await self._db.close()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; other components (ledger, audit) join it here.

        Any failure, including a failed COMMIT (a full disk), rolls everything
        back; SQLITE_FULL comes out as :class:`OutboxFullError`.
        """
        async with self._lock:
            try:
                # BEGIN is inside the try: a task cancelled while BEGIN is queued on the
                # connection's thread must still roll back, or the next BEGIN would fail.
                await self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                await asyncio.shield(self._db.commit())
            except BaseException as exc:
                # Shielded: the connection's thread runs statements in order, so this
                # rollback lands after anything the cancelled caller had queued.
                with contextlib.suppress(sqlite3.Error):
                    await asyncio.shield(self._db.rollback())
                for hook in self._rollback_hooks:
                    hook()
                if isinstance(exc, sqlite3.Error) and self._note_storage_error(exc):
                    # The WAL may be what filled the disk: fold it back into the
                    # database (whose freed pages are reused) and truncate it.
                    with contextlib.suppress(sqlite3.Error):
                        await asyncio.shield(self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
                    raise OutboxFullError(f"{self.path}: storage full: {exc}") from exc
                raise

    def _note_storage_error(self, exc: sqlite3.Error) -> bool:
        code = getattr(exc, "sqlite_errorcode", None)
        if code == SQLITE_FULL or (code is not None and code & 0xFF == SQLITE_IOERR):
            now = self.clock_ms()
            self.health.full_errors += 1
            first = self.health.last_full_ms is None
            self.health.last_full_ms = now
            if first or not self.health.pending_alarms:
                self.health.pending_alarms.append(
                    {"type": "storage_full", "severity": "critical", "error": str(exc), "at_ms": now}
                )
            log.critical("outbox %s: storage full or failing (%s); transaction rolled back", self.path, exc)
            return True
        return False

    # -- writing ------------------------------------------------------------

    def _aad_class(self, cls: RecordClass, kind: str) -> str:
        return f"{class_name(cls)}/{kind}"

    async def _add(
        self, db: aiosqlite.Connection, cls: RecordClass, kind: str, created_ms: int, body: dict[str, Any]
    ) -> int:
        cur = await db.execute(
            "INSERT INTO outbox (cls, kind, created_ms, key_ver, body) VALUES (?, ?, ?, ?, x'')",
            (int(cls), kind, created_ms, self._key_version),
        )
        rid = cur.lastrowid
        assert rid is not None
        blob = self._sealer.seal(rid, self._aad_class(cls, kind), dumps(body))
        await db.execute("UPDATE outbox SET body = ? WHERE id = ?", (blob, rid))
        return rid

    async def _add_many(
        self, db: aiosqlite.Connection, items: Sequence[tuple[RecordClass, str, int, dict[str, Any]]]
    ) -> int:
        """Insert records with consecutive ids (one statement); returns the first id.

        Inside the write transaction nobody else inserts, so the ids after the
        AUTOINCREMENT high-water mark are ours; inserting them explicitly moves
        the mark, so an id is still never reused."""
        async with db.execute(
            "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0),"
            " coalesce((SELECT max(id) FROM outbox), 0)"
        ) as cur:
            row = await cur.fetchone()
        first = max(int(row[0]), int(row[1])) + 1 if row else 1
        if items:
            await db.executemany(
                "INSERT INTO outbox (id, cls, kind, created_ms, key_ver, body) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        first + i,
                        int(cls),
                        kind,
                        created,
                        self._key_version,
                        self._sealer.seal(first + i, self._aad_class(cls, kind), dumps(body)),
                    )
                    for i, (cls, kind, created, body) in enumerate(items)
                ],
            )
        return first

    def on_rollback(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` whenever a transaction rolls back (components that cache
        what they wrote in a transaction drop that cache)."""
        self._rollback_hooks.append(hook)

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
            self._ballast_released = not await asyncio.to_thread(
                _ensure_ballast, self.ballast, self.policy.ballast_bytes
            )
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
        """Add a poll cycle inside a transaction; returns one record id per reading."""
        await self._enforce_policy(db, now_ms)
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
        first = await self._add_many(db, items)
        ids = [first + i for i in ids]
        await self._flush_alarms(db, now_ms)
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
        if n_billing:
            await self._bump(db, K_READINGS, n_billing)
        if n_telemetry:
            await self._bump(db, K_TELEMETRY, n_telemetry)
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

    async def set_state(self, values: Mapping[str, Any]) -> None:
        async with self.transaction() as db:
            for k, v in values.items():
                await db.execute(
                    "INSERT INTO kv (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (k, v),
                )

    # -- storage policy -----------------------------------------------------

    async def _usage(self, db: aiosqlite.Connection) -> tuple[int, int]:
        """(live database bytes, free filesystem bytes)."""
        vals = []
        for pragma in ("page_size", "page_count", "freelist_count"):
            async with db.execute(f"PRAGMA {pragma}") as cur:
                row = await cur.fetchone()
            vals.append(int(row[0]) if row else 0)
        page_size, pages, free_pages = vals
        return (pages - free_pages) * page_size, _free_bytes(self.path.parent)

    @staticmethod
    async def _freelist_bytes(db: aiosqlite.Connection) -> int:
        async with db.execute("PRAGMA freelist_count") as cur:
            row = await cur.fetchone()
        async with db.execute("PRAGMA page_size") as cur:
            size = await cur.fetchone()
        return int(row[0]) * int(size[0]) if row and size else 0

    async def _enforce_policy(self, db: aiosqlite.Connection, now_ms: int) -> None:
        live, free = await self._usage(db)
        plan = plan_eviction(live, free, self.policy)
        if plan.shed_bytes or plan.hard_bytes:
            await self._evict(db, now_ms, plan)

    async def _emergency_evict(self) -> int:
        """After SQLITE_FULL: give up the ballast, then shed telemetry (and past the
        floor, billing) in its own transaction (freed pages are reused)."""
        if self.ballast.exists():
            with contextlib.suppress(OSError):
                self.ballast.unlink()
                log.critical("outbox %s: disk full; ballast file released", self.path)
            self._ballast_released = True
        """Returns the number of records evicted (0: retrying would not help)."""
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
                {
                    "type": "storage_hard_floor",
                    "severity": "critical",
                    "billing_records_evicted": lost,
                    "telemetry_records_evicted": evicted,
                    "telemetry_bytes_freed": freed,
                },
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
        """
        limit = 255 if max_cls is None else int(max_cls)
        excluded = set(exclude)
        async with self._batching:  # one batch maker at a time (uplink, export)
            for _ in range(10):
                async with self.transaction() as db:
                    async with db.execute(
                        "SELECT seq, attempts, cls, epoch FROM batches ORDER BY cls, seq"
                    ) as cur:
                        pending = [(int(s), int(a), int(c), str(e)) async for s, a, c, e in cur]
                    first = next((p for p in pending if p[0] not in excluded and p[2] <= limit), None)
                    async with db.execute(
                        "SELECT cls FROM outbox WHERE batch_seq IS NULL AND cls <= ? ORDER BY cls LIMIT 1",
                        (limit,),
                    ) as cur:
                        row = await cur.fetchone()
                    top = None if row is None else int(row[0])
                    if first is not None and (top is None or first[2] <= top):
                        seq, attempts, _, batch_epoch = first
                        records, stored = await self._batch_contents(db, seq)
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
                    return Batch(seq, tuple(chosen), 0, payload, epoch)
            raise OutboxError("could not form a batch (records kept changing underneath)")

    @staticmethod
    async def _next_seq(db: aiosqlite.Connection) -> int:
        async with db.execute("SELECT value FROM kv WHERE key = ?", (K_NEXT_SEQ,)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 1

    @staticmethod
    async def _batch_epoch_in(db: aiosqlite.Connection) -> str:
        """The epoch new batches take; a database without one gets a random one now."""
        async with db.execute("SELECT value FROM kv WHERE key = ?", (K_BATCH_EPOCH,)) as cur:
            row = await cur.fetchone()
        if row is not None:
            return str(row[0])
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
                body = loads(opener.unseal(int(rid), self._aad_class(cls, kind), bytes(blob)))
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
                {"type": "records_damaged", "severity": "critical", "ids": [r for r, _ in bad][:100]},
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
        async with self.transaction() as db:
            await db.execute(
                "UPDATE batches SET attempts = attempts + 1, last_sent_ms = ? WHERE seq = ?",
                (now_ms, seq),
            )

    async def ack(self, seq: int, *, epoch: str | None = None) -> int:
        """The headend committed batch ``seq``: delete it. Idempotent; returns records freed.

        With ``epoch``, only a batch of that epoch is deleted."""
        async with self.transaction() as db:
            if epoch is not None:
                async with db.execute("SELECT epoch FROM batches WHERE seq = ?", (seq,)) as cur:
                    row = await cur.fetchone()
                if row is None or str(row[0]) != epoch:
                    return 0
            async with db.execute(
                "SELECT count(*), coalesce(sum(kind = ? AND cls = ?), 0) FROM outbox WHERE batch_seq = ?",
                (RecordKind.READING.value, int(RecordClass.BILLING), seq),
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

    async def nonces(self) -> list[bytes]:
        """Every nonce of the stored record blobs (audits and tests)."""
        async with self._lock, self._db.execute("SELECT body FROM outbox") as cur:
            return [StorageSealer.nonce_of(bytes(b)) async for (b,) in cur]

    @property
    def epoch(self) -> int:
        return self._sealer.epoch


# Read-only helpers, shared with `edgegw status` (which opens its own connection).


async def read_kv(db: aiosqlite.Connection) -> dict[str, Any]:
    async with db.execute(
        "SELECT key, value FROM kv WHERE key != ? AND key NOT LIKE 'storage_key_tag_%'", (K_SALT,)
    ) as cur:
        return {str(k): v async for k, v in cur}


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

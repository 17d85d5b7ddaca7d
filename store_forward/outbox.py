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
* A damaged database (its write-ahead log would silently drop committed
  transactions, ``PRAGMA quick_check`` fails, SQLite refuses it, or it is
  missing behind its lineage marker) is never deleted or silently replaced:
  it is kept byte for byte as evidence (:mod:`store_forward.integrity`), and a
  new database takes over in storage state FAULT
  (:mod:`store_forward.storage_state`) with what of the outbox could be
  salvaged, a critical ``storage_fault`` event, a new batch epoch, and a
  generation (:attr:`Outbox.generation`) above every earlier one, whose record
  ids and batch numbers start above all earlier ones. Damage reported while
  running stops all writing to the file (:class:`StorageCorruptError`).
* A full disk never fails the open (:attr:`Outbox.starved`); a reserve file
  beside the database is given up when the disk fills and re-created when
  space returns (:meth:`Outbox.ensure_reserve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
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
import orjson

from firmware_bridge.durable import write_atomic
from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.events import event
from firmware_bridge.reading import Reading
from store_forward.batch_epoch import LEGACY_EPOCH, new_epoch
from store_forward.integrity import (
    FaultKind,
    Integrity,
    check_database,
    is_corruption,
    known_generations,
    next_generation,
    read_lineage,
    record_successor,
    secure_evidence,
    write_lineage,
)
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
from store_forward.sealing import (
    FileEpochStore,
    NonceSequence,
    SealingError,
    SqliteEpochStore,
    StorageSealer,
    key_tag,
)
from store_forward.storage_keys import StorageKeys, database_key
from store_forward.storage_state import StorageState, describe, detect

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
K_GENERATION = "db_generation"  # see Outbox.generation
K_STORAGE = "storage_state"  # StorageState as JSON (absent: NORMAL)
K_SALVAGE_SALT = "salvage_salt"  # the damaged database's salt, until its records are carried over

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

SQLITE_FULL = 13
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26

_ROW_OVERHEAD = 48  # bytes of index and row header per record, roughly


class OutboxError(EdgeGwError):
    """The outbox cannot do what was asked (corrupt file, full disk, ...)."""

    kind = ErrorKind.STORAGE


class OutboxFullError(OutboxError):
    """The disk (or the database's size limit) is full; the transaction was rolled back."""


def _json_or_empty(value: Any) -> dict[str, Any]:
    if not isinstance(value, (str, bytes)):
        return {}
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


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


class StorageCorruptError(OutboxError):
    """The database was found damaged while in use. Nothing more is written to it;
    the daemon keeps the files as evidence and moves to a new database
    (:meth:`Outbox.recover_in_place`)."""


def _is_full(exc: BaseException | None) -> bool:
    """A full disk (or quota), anywhere in the exception's chain."""
    for _ in range(8):
        if exc is None:
            return False
        code = getattr(exc, "sqlite_errorcode", None)
        if isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF == SQLITE_FULL:
            return True
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


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
    try:  # the name durable too: a reserve lost at a power cut would be written again
        write_atomic(path, b"\xa5" * size)  # real blocks, on every filesystem
    except OSError:
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


ID_BLOCK_BITS = 40


def numbering_base(generation: int) -> int:
    """Record ids and batch sequence numbers of the database of ``generation`` start
    above this (generation 1, every database made before generations were recorded:
    at 1). 2**40 ids per database; ids stay below 2**62 for four million databases."""
    return (max(1, generation) - 1) << ID_BLOCK_BITS


class _OwnerLock:
    """``<db>.owner``: held shared by every process with the outbox open, exclusive
    only while the start-up integrity check runs and evidence is moved, so that
    neither ever happens while another process (the daemon, a USB export) is
    using the database (a live log read mid-checkpoint could look damaged)."""

    def __init__(self, db: Path) -> None:
        self.path = db.with_name(db.name + ".owner")
        self.fd: int | None = None

    def _open(self) -> int:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self.fd

    def exclusive(self, wait_s: float) -> bool:
        fd = self._open()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)

    def shared(self) -> None:
        fcntl.flock(self._open(), fcntl.LOCK_SH)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass(frozen=True)
class _Fault:
    kind: FaultKind
    reason: str
    evidence: Path


# --------------------------------------------------------------------------- the outbox


@dataclass
class _Health:
    full_errors: int = 0
    last_full_ms: int | None = None
    pending_alarms: list[dict[str, Any]] = field(default_factory=list)


class Outbox:
    """The gateway's single SQLite writer."""

    # How long the daemon's start-up integrity check waits for other users of the
    # database to close it (a USB export finishing) before it is left to them.
    CHECK_WAIT_S = 10.0

    def __init__(
        self,
        path: Path,
        *,
        keys: StorageKeys,
        policy: StoragePolicy,
        clock_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        self.path = path
        self._keys = keys
        self._db: aiosqlite.Connection | Any = None
        self._lock = asyncio.Lock()
        self._rollback_hooks: list[Callable[[], None]] = []
        self._batching = asyncio.Lock()
        self._sealer: StorageSealer | None = None
        self._key_version = keys.current
        self._openers: dict[int, StorageSealer] = {}
        self.policy = policy
        self.clock_ms = clock_ms
        self.health = _Health()
        # Set by the gateway's Uplink: how its batches are sealed (also used by
        # the sneakernet export, which must write the very same batches).
        self.packer: Packer | None = None
        self.gateway_id: str | None = None
        self.ballast = path.with_name(path.name + ".ballast")
        self._ballast_released = False
        self._owner = _OwnerLock(path)
        self._pending_fault: _Fault | None = None
        self._schema_ready = False
        # Why the database cannot be written yet (a full disk at open); None when it can.
        self.starved: str | None = None
        self._last_resume_try = 0.0
        self._full_logged = -1e9
        # Set when a statement reported damage: nothing more is written to this file.
        self.corrupt: str | None = None
        # Why the start-up check could not run (a full disk): to be run once there is space.
        self.unchecked: str | None = None
        self.storage = StorageState()
        self._storage_pending: StorageState | None = None
        # The database generation: 1, then one more for every database that replaced
        # a damaged one here; numbering starts at numbering_base(generation).
        self.generation = 1
        self.salvaged: dict[str, int] = {}  # what the last new-line import brought over

    # -- life cycle ---------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        keys: StorageKeys | None = None,
        policy: StoragePolicy | None = None,
        clock_ms: Callable[[], int] = _wall_ms,
        check_wait_s: float | None = None,
    ) -> Outbox:
        """Open (or create) the outbox at ``path``.

        ``keys`` defaults to :meth:`StorageKeys.beside` (``<db>.key``); deployments
        pass the keystore's ``storage`` key or ``storage.key_file``.

        The database is checked first (:func:`store_forward.integrity.check_database`).
        A damaged (or missing) one is kept as evidence and a new database is made in
        its place, in storage state FAULT, with what of the outbox could be salvaged
        (unsent records re-sealed under the new database's key, numbered batches,
        counters) and a batch epoch above the old one's; the money state is the
        daemon's to recover (:mod:`gateway.storage_recovery`). A full disk does not
        fail the open: the outbox comes up :attr:`starved` and finishes opening in
        :meth:`resume_if_space`. The check runs only while no other process has the
        database open; ``check_wait_s`` is how long to wait for that (the daemon
        passes :attr:`CHECK_WAIT_S`; tools opening it beside the daemon do not wait).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if keys is None:
            keys = await asyncio.to_thread(StorageKeys.beside, path)
        ob = cls(path, keys=keys, policy=policy or StoragePolicy(), clock_ms=clock_ms)
        wait = 0.0 if check_wait_s is None else check_wait_s
        try:
            fault = await ob._check(wait)
            await ob._connect(fault)
        except BaseException:
            if ob._db is not None:
                await ob._db.close()
            ob._owner.release()
            raise
        return ob

    async def _check(self, wait_s: float) -> _Fault | None:
        """The start-up integrity check, under the exclusive owner lock; then shared."""
        fault = None
        if await asyncio.to_thread(self._owner.exclusive, wait_s):
            try:
                integrity = await asyncio.to_thread(check_database, self.path)
            except (OSError, sqlite3.Error) as exc:
                if not (_is_full(exc) or await self._disk_nearly_full()):
                    raise OutboxError(f"{self.path}: cannot check the outbox database: {exc}") from exc
                # A full disk: not even a read-only check can start (its shared-memory
                # file needs space). The log was checked; the rest waits for space.
                self.unchecked = f"{exc} (disk full)"
                log.critical("outbox %s: integrity check not possible on a full disk: %s", self.path, exc)
                integrity = Integrity(True)
            if not integrity.ok:
                assert integrity.kind is not None
                evidence = await asyncio.to_thread(
                    secure_evidence,
                    self.path,
                    integrity.kind,
                    integrity.reason,
                    self.clock_ms(),
                    integrity.wal,
                )
                fault = _Fault(integrity.kind, integrity.reason, evidence)
        else:
            log.warning(
                "outbox %s is open in another process: its integrity check is left to that one",
                self.path,
            )
        await asyncio.to_thread(self._owner.shared)
        return fault

    async def _connect(self, fault: _Fault | None, *, shared: bool = False) -> None:
        """Open the connection and everything on it. ``shared``: other tasks already
        use this outbox (a recovery in place), so the work on the connection is done
        under the writer lock; until the schema is there they get OutboxFullError."""
        async with self._lock if shared else contextlib.nullcontext():
            self._db = await aiosqlite.connect(str(self.path), isolation_level=None)
            self._pending_fault = fault
        try:
            await self._finish_open(shared=shared)
        except Exception as exc:
            if not (_is_full(exc) or await self._disk_nearly_full()):
                raise
            # Give up the reserve and try once more; then come up waiting for space.
            self._release_reserve(f"opening the outbox: {exc}")
            try:
                await self._finish_open(shared=shared)
            except Exception as exc2:
                if not (_is_full(exc2) or await self._disk_nearly_full()):
                    raise
                self.starved = str(exc2)
                log.critical(
                    "outbox %s: disk full at start (%s); records wait in memory until space"
                    " returns",
                    self.path,
                    exc2,
                )
                self._note_full_alarm(str(exc2))

    async def _disk_nearly_full(self) -> bool:
        try:
            free = await asyncio.to_thread(_free_bytes, self.path.parent)
        except OSError:
            return False
        return free < max(2 * self.policy.ballast_bytes, 256 * 1024)

    async def _finish_open(self, *, shared: bool = False) -> None:
        """Everything opening needs to write; idempotent, so a full disk can retry it.
        ``shared``: others may be using the connection already (take the lock)."""
        async with self._lock if shared else contextlib.nullcontext():
            salvage = await self._prepare()
        if self._pending_fault is not None:
            await self._import_salvage(salvage or None)
            self._pending_fault = None
        await self.ensure_reserve()
        assert self._sealer is not None
        log.info(
            "outbox %s open; sealing under %s, nonce epoch %d, generation %d, storage %s",
            self.path,
            self._keys.source,
            self._sealer.epoch,
            self.generation,
            describe(self.storage),
        )

    async def _prepare(self) -> list[Salvage]:
        db, path, keys = self._db, self.path, self._keys
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
            self._schema_ready = True
            salvage: list[Salvage] = []
            fault = self._pending_fault
            async with db.execute("SELECT value FROM kv WHERE key = ?", (K_SALT,)) as cur:
                new_db = await cur.fetchone() is None
            if new_db and fault is not None:
                salvage = await asyncio.to_thread(
                    salvage_images, fault.evidence, {"kv", "outbox", "batches", "meter_status"}
                )
            await db.execute("BEGIN IMMEDIATE")
            try:
                await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                await self._init_lineage(db, new_db, fault, salvage)
                await db.commit()
            except BaseException:
                await db.rollback()
                raise
            async with db.execute("SELECT value FROM kv WHERE key = ?", (K_SALT,)) as cur:
                row = await cur.fetchone()
            assert row is not None
            salt = bytes(row[0])
            await self._check_keys(db, keys, salt, path)
            sealer = await asyncio.to_thread(_open_sealer, path, keys, salt)
        except sqlite3.DatabaseError as exc:
            if is_corruption(exc):
                raise StorageCorruptError(f"{path}: damaged while opening: {exc}") from exc
            raise OutboxError(f"{path}: cannot open outbox database: {exc}") from exc
        except SealingError as exc:
            raise OutboxError(f"{path}: cannot seal records: {exc}") from exc
        openers = {
            v: StorageSealer(database_key(k, salt, v), NonceSequence(1))  # open only, never seal
            for v, k in keys.keys.items()
            if v != keys.current
        }
        openers[keys.current] = sealer
        self._sealer, self._openers = sealer, openers
        self.starved = None
        # The WAL is kept within half the ballast, so that giving the ballast up
        # always leaves room to checkpoint it.
        if self.policy.ballast_bytes > 0:
            wal_pages = max(8, self.policy.ballast_bytes // 2 // 4096)
            await db.execute(f"PRAGMA wal_autocheckpoint={wal_pages}")
            await db.execute(f"PRAGMA journal_size_limit={self.policy.ballast_bytes // 2}")
        await self._load_lineage(db)
        return salvage

    async def _init_lineage(
        self,
        db: aiosqlite.Connection,
        new_db: bool,
        fault: _Fault | None,
        salvage: Sequence[Salvage],
    ) -> None:
        """Inside the first transaction: salt, generation, numbering, storage state.

        A new database takes a generation above every one this path is known to
        have had (the lineage marker, earlier evidence, the salvaged database), and
        record ids and batch numbers start above :func:`numbering_base` of it; one
        that replaces a damaged database also numbers its batches in a new batch
        epoch (:meth:`start_batch_epoch`). The marker is written before the commit,
        so it never falls behind a database.
        """
        kv_rows = {str(k): v async for k, v in await db.execute("SELECT key, value FROM kv")}
        if not new_db:
            if K_GENERATION not in kv_rows:  # made before generations were recorded
                generation = max([1, *known_generations(self.path)])
                await self._set_kv(db, K_GENERATION, generation)
            return
        salvaged_kv: dict[str, Any] = {}
        for s in salvage:
            for k, v in s.kv().items():
                if k in _MAX_COUNTERS and isinstance(v, int):
                    salvaged_kv[k] = max(int(salvaged_kv.get(k, 0)), v)
                else:
                    salvaged_kv.setdefault(k, v)
        old = salvaged_kv.get(K_GENERATION)
        if fault is None:
            generation = max([0, *known_generations(self.path)]) + 1
        else:
            generation = next_generation(
                self.path, int(old) if isinstance(old, int) else (1 if salvaged_kv else None)
            )
        base = numbering_base(generation)
        await self._set_kv(db, K_SALT, secrets.token_bytes(16))
        await self._set_kv(db, K_GENERATION, generation)
        await self._set_kv(db, K_NEXT_SEQ, max(base + 1, int(salvaged_kv.get(K_NEXT_SEQ) or 1)))
        if base:
            await db.execute("DELETE FROM sqlite_sequence WHERE name = 'outbox'")
            await db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (base,))
        for k in _MAX_COUNTERS:
            if isinstance(salvaged_kv.get(k), int):
                await self._set_kv(db, k, salvaged_kv[k])
        if fault is not None:
            state = detect(
                StorageState.from_json(_json_or_empty(salvaged_kv.get(K_STORAGE))),
                kind=fault.kind.value,
                reason=fault.reason,
                evidence=str(fault.evidence),
                now_ms=self.clock_ms(),
            )
            await self._set_kv(db, K_STORAGE, orjson.dumps(state.to_json()).decode())
            if isinstance(salvaged_kv.get(K_SALT), bytes):
                await self._set_kv(db, K_SALVAGE_SALT, salvaged_kv[K_SALT])
            await self.start_batch_epoch(db)
            await asyncio.to_thread(record_successor, fault.evidence, generation, self.clock_ms())
        await asyncio.to_thread(write_lineage, self.path, generation, self.clock_ms())

    async def _load_lineage(self, db: aiosqlite.Connection) -> None:
        kv = {str(k): v async for k, v in await db.execute("SELECT key, value FROM kv")}
        self.generation = int(kv.get(K_GENERATION) or 1)
        self.storage = StorageState.from_json(_json_or_empty(kv.get(K_STORAGE)))
        marker = read_lineage(self.path).get("generation")
        if not isinstance(marker, int) or marker < self.generation:
            await asyncio.to_thread(write_lineage, self.path, self.generation, self.clock_ms())

    @staticmethod
    async def _set_kv(db: aiosqlite.Connection, key: str, value: Any) -> None:
        await db.execute(
            "INSERT INTO kv (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

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
                salvage_images, fault.evidence, {"kv", "outbox", "batches", "meter_status"}
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

    async def resume_if_space(self) -> bool:
        """If opening was stopped by a full disk and space is back, finish it (and
        re-create the reserve). True when the outbox can be written."""
        if self.starved is None:
            return True
        now = time.monotonic()
        if now - self._last_resume_try < 1.0:
            return False
        self._last_resume_try = now
        if await self._disk_nearly_full():
            return False
        try:
            await self._finish_open(shared=True)
        except Exception as exc:
            if _is_full(exc) or await self._disk_nearly_full():
                self.starved = str(exc)
                return False
            raise
        log.warning("outbox %s: space is back; the database is writable again", self.path)
        return True

    async def _check_keys(self, db: aiosqlite.Connection, keys: StorageKeys, salt: bytes, path: Path) -> None:
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

    async def recover_in_place(self, kind: FaultKind, reason: str) -> Path:
        """The database turned out damaged while in use: close it, keep its files as
        evidence, and continue on a new database (storage state FAULT, outbox content
        salvaged as at open). Returns the evidence directory."""
        async with self._batching:
            async with self._lock:
                with contextlib.suppress(Exception):
                    await self._db.close()
                if not await asyncio.to_thread(self._owner.exclusive, 30.0):
                    log.error("outbox %s: another process still has it open; moving it anyway", self.path)
                evidence = await asyncio.to_thread(
                    secure_evidence, self.path, kind, reason, self.clock_ms(), None
                )
                self.corrupt = None
                self._sealer = None
                self._schema_ready = False
            await asyncio.to_thread(self._owner.shared)
            await self._connect(_Fault(kind, reason, evidence), shared=True)
        return evidence

    async def integrity_check(self) -> str | None:
        """``PRAGMA quick_check`` on a separate read-only connection (what the writer's
        page cache holds is not what is on disk). Returns what is wrong, or None."""

        def check() -> str | None:
            try:
                conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10.0)
                try:
                    row = conn.execute("PRAGMA quick_check").fetchone()
                finally:
                    conn.close()
            except sqlite3.Error as exc:
                return f"SQLite refuses the file: {exc}" if is_corruption(exc) else None
            return None if row and row[0] == "ok" else f"quick_check: {row[0] if row else 'no result'}"

        return await asyncio.to_thread(check)

    async def ping(self, timeout_s: float = 5.0) -> bool:
        """Does the database still answer (a read through the writer connection)?"""
        try:
            async with asyncio.timeout(timeout_s), self._lock:
                if self._db is None:
                    return False
                async with self._db.execute("SELECT 1") as cur:
                    return await cur.fetchone() is not None
        except (TimeoutError, sqlite3.Error, ValueError):
            return False

    async def close(self) -> None:
        async with self._lock:
            if self._db is not None:
                await self._db.close()
        self._owner.release()


    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; other components (ledger, audit) join it here.

        Any failure, including a failed COMMIT (a full disk), rolls everything
        back; SQLITE_FULL comes out as :class:`OutboxFullError`, damage reported by
        SQLite as :class:`StorageCorruptError` (and nothing is written to the file
        again: see :meth:`recover_in_place`).
        """
        async with self._lock:
            if self.corrupt is not None:
                raise StorageCorruptError(f"{self.path} is damaged ({self.corrupt}); not written to")
            if not self._schema_ready:
                raise OutboxFullError(f"{self.path}: not open yet ({self.starved})")
            self._storage_pending = None
            try:
                # BEGIN is inside the try: a task cancelled while BEGIN is queued on the
                # connection's thread must still roll back, or the next BEGIN would fail.
                await self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                await asyncio.shield(self._db.commit())
            except BaseException as exc:
                self._storage_pending = None
                # Shielded: the connection's thread runs statements in order, so this
                # rollback lands after anything the cancelled caller had queued.
                with contextlib.suppress(sqlite3.Error):
                    await asyncio.shield(self._db.rollback())
                for hook in self._rollback_hooks:
                    hook()
                if isinstance(exc, sqlite3.Error) and is_corruption(exc):
                    self.corrupt = str(exc)
                    log.critical("outbox %s: SQLite reports damage: %s; nothing more is written to it", self.path, exc)
                    raise StorageCorruptError(f"{self.path}: damaged: {exc}") from exc
                if isinstance(exc, sqlite3.Error) and self._note_storage_error(exc):
                    # The WAL may be what filled the disk: fold it back into the
                    # database (whose freed pages are reused) and truncate it.
                    with contextlib.suppress(sqlite3.Error):
                        await asyncio.shield(self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
                    raise OutboxFullError(f"{self.path}: storage full: {exc}") from exc
                raise
            if self._storage_pending is not None:
                self.storage, self._storage_pending = self._storage_pending, None

    @contextlib.asynccontextmanager
    async def dry_run(self) -> AsyncIterator[aiosqlite.Connection]:
        """A transaction that is always rolled back: what work *would* do, with nothing
        written (decisions while the disk is full). Records added inside are sealed
        under a throwaway key and vanish with the rollback; events waiting to be
        written stay waiting."""
        async with self._lock:
            if self.corrupt is not None or not self._schema_ready:
                raise OutboxFullError(f"{self.path}: not open ({self.corrupt or self.starved})")
            sealer, alarms = self._sealer, list(self.health.pending_alarms)
            self._sealer = StorageSealer(secrets.token_bytes(32), NonceSequence(1))
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                yield self._db
            finally:
                self._sealer = sealer
                self.health.pending_alarms = alarms
                self._storage_pending = None
                with contextlib.suppress(sqlite3.Error):
                    await asyncio.shield(self._db.rollback())
                for hook in self._rollback_hooks:
                    hook()

    def _note_storage_error(self, exc: sqlite3.Error) -> bool:
        code = getattr(exc, "sqlite_errorcode", None)
        if code == SQLITE_FULL or (code is not None and code & 0xFF == SQLITE_IOERR):
            self._note_full_alarm(str(exc))
            now = time.monotonic()
            if now - self._full_logged >= 60.0:  # one line per minute while it lasts
                self._full_logged = now
                log.critical(
                    "outbox %s: storage full or failing (%s); transaction rolled back"
                    " (%d such failures so far)",
                    self.path,
                    exc,
                    self.health.full_errors,
                )
            return True
        return False

    def _note_full_alarm(self, error: str) -> None:
        now = self.clock_ms()
        self.health.full_errors += 1
        first = self.health.last_full_ms is None
        self.health.last_full_ms = now
        if first or not any(a.get("type") == "storage_full" for a in self.health.pending_alarms):
            self.health.pending_alarms.append(event("storage_full", error=error, at_ms=now))

    def note_event(self, body: dict[str, Any]) -> None:
        """Keep an event in memory until the next transaction that adds records
        (for what happens while nothing can be written: a full disk)."""
        self.health.pending_alarms.append(body)

    # -- storage state ------------------------------------------------------

    async def storage_state_in(self, db: aiosqlite.Connection) -> StorageState:
        """The storage state as committed (or as changed in this transaction)."""
        async with db.execute("SELECT value FROM kv WHERE key = ?", (K_STORAGE,)) as cur:
            row = await cur.fetchone()
        return StorageState.from_json(_json_or_empty(None if row is None else row[0]))

    async def set_storage_state_in(self, db: aiosqlite.Connection, state: StorageState) -> None:
        """Change the storage state in this transaction (:attr:`storage` follows at commit)."""
        await self._set_kv(db, K_STORAGE, orjson.dumps(state.to_json()).decode())
        self._storage_pending = state

    # -- reserve space ------------------------------------------------------

    @property
    def reserve_released(self) -> bool:
        return self._ballast_released

    async def free_bytes(self) -> int:
        return await asyncio.to_thread(_free_bytes, self.path.parent)

    def _release_reserve(self, why: str) -> bool:
        """Give up the reserve file so that what matters can still commit."""
        released = False
        if self.ballast.exists():
            with contextlib.suppress(OSError):
                self.ballast.unlink()
                released = True
                log.critical("outbox %s: disk full (%s); reserve file released", self.path, why)
        self._ballast_released = self._ballast_released or released or self.policy.ballast_bytes > 0
        return released

    async def ensure_reserve(self) -> bool:
        """Re-create the reserve file if it is missing and the disk has room for it
        (four times its size free). True when the reserve is in place."""
        if self.policy.ballast_bytes <= 0:
            return True
        ok = await asyncio.to_thread(_ensure_ballast, self.ballast, self.policy.ballast_bytes)
        if ok and self._ballast_released:
            log.warning("outbox %s: space is back; reserve file re-created", self.path)
        self._ballast_released = not ok
        return ok

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
        return self._sealer.seal(rid, self._aad_class(cls, kind), dumps(body))

    async def _add(
        self, db: aiosqlite.Connection, cls: RecordClass, kind: str, created_ms: int, body: dict[str, Any]
    ) -> int:
        cur = await db.execute(
            "INSERT INTO outbox (cls, kind, created_ms, key_ver, body) VALUES (?, ?, ?, ?, x'')",
            (int(cls), kind, created_ms, self._key_version),
        )
        rid = cur.lastrowid
        assert rid is not None
        blob = self._seal(rid, cls, kind, body)
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
                        self._seal(first + i, cls, kind, body),
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

    async def kv(self) -> dict[str, Any]:
        async with self._lock:
            return await read_kv(self._db)

    async def nonces(self) -> list[bytes]:
        """Every nonce of the stored record blobs (audits and tests)."""
        async with self._lock, self._db.execute("SELECT body FROM outbox") as cur:
            return [StorageSealer.nonce_of(bytes(b)) async for (b,) in cur]

    @property
    def epoch(self) -> int:
        """The nonce epoch of the sealer (0 while the outbox waits for space)."""
        return 0 if self._sealer is None else self._sealer.epoch


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

"""The owner of the gateway's database: one SQLite file, one writer connection.

Everything the gateway must not lose lives in one SQLite file: the outbox
(:mod:`store_forward.outbox`, the queue of sealed records and batches) and, with
the gateway's components, the ledger, the replay state, the audit log. This
module owns that file; the outbox and every component write through it.

* One connection owns all writes (WAL, ``synchronous=FULL``); every write is
  one explicit ``BEGIN IMMEDIATE … COMMIT`` under an asyncio lock
  (:meth:`Database.transaction`), so the poll cycle, the uplink and command
  handling never interleave inside a transaction. A failed statement or
  commit (a full disk included) rolls the whole transaction back.
* The schema: every table is declared in a registry
  (:mod:`store_forward.schema`); opening runs the migrations a database lacks
  in one transaction with its new ``PRAGMA user_version``, and refuses a
  database written by a newer release (:class:`SchemaVersionError`).
* Records are sealed at rest (AES-256-GCM, :mod:`store_forward.sealing`) under
  this database's storage key (:mod:`store_forward.storage_keys`); the nonce
  epoch is taken durably at open, before the first seal, so no nonce repeats
  across SIGKILL or power loss. A key that is not the one the database was
  sealed with is refused.
* A damaged database (its write-ahead log would silently drop committed
  transactions, ``PRAGMA quick_check`` fails, SQLite refuses it, or it is
  missing behind its lineage marker) is never deleted or silently replaced:
  it is kept byte for byte as evidence (:mod:`store_forward.integrity`), and a
  new database takes over in storage state FAULT
  (:mod:`store_forward.storage_state`) with what could be salvaged and a
  generation (:attr:`Database.generation`) above every earlier one. Damage
  reported while running stops all writing to the file
  (:class:`StorageCorruptError`).
* A full disk never fails the open (:attr:`Database.starved`); a reserve file
  beside the database is given up when the disk fills and re-created when
  space returns (:meth:`Database.ensure_reserve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import aiosqlite
import orjson

from firmware_bridge.durable import write_atomic
from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.events import event
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
from store_forward.salvage import Salvage
from store_forward.salvage import salvage as salvage_images
from store_forward.schema import Schema, SchemaError, SchemaRegistry, Step
from store_forward.sealing import (
    FileEpochStore,
    NonceSequence,
    SealingError,
    SqliteEpochStore,
    StorageSealer,
    key_tag,
)
from store_forward.storage_keys import StorageKeys, database_key
from store_forward.storage_policy import StoragePolicy
from store_forward.storage_state import StorageState, describe, detect

log = logging.getLogger(__name__)

# The database owner's entries in kv.
K_SALT = "storage_salt"
K_GENERATION = "db_generation"  # see Database.generation
K_STORAGE = "storage_state"  # StorageState as JSON (absent: NORMAL)
K_SALVAGE_SALT = "salvage_salt"  # the damaged database's salt, until its records are carried over

# The database owner's own tables: settings and counters (kv), and the nonce
# epochs of the storage key (store_forward.sealing). Version 2 is where the
# schema registry begins: version 1 was the outbox before records were sealed,
# which cannot be migrated.
SCHEMA = Schema(
    "database",
    Step(
        2,
        "settings and counters (kv), nonce epochs of the storage key",
        (
            "CREATE TABLE IF NOT EXISTS kv (\n    key   TEXT PRIMARY KEY,\n    value\n)",
            SqliteEpochStore.CREATE,
        ),
    ),
)

SQLITE_FULL = 13
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26


class OutboxError(EdgeGwError):
    """The outbox cannot do what was asked (corrupt file, full disk, ...)."""

    kind = ErrorKind.STORAGE


class OutboxFullError(OutboxError):
    """The disk (or the database's size limit) is full; the transaction was rolled back."""


# The page size of a new database file (an existing one keeps its own: SQLite
# cannot change it in WAL mode). Each commit writes every page it changed, whole,
# to the write-ahead log, and a poll cycle changes a few bytes in each of a dozen
# small tables and indexes: 1 KiB pages write a quarter of what 4 KiB pages do
# for those. Measured with bench/storage.py (docs/benchmarks.md, back to back):
# 50 meters / 1 s 1,828 -> 1,369 bytes per reading, 1 meter / 60 s 89 -> 42 KB;
# 1,000 meters / 60 s, where checkpoints copying scattered pages dominate,
# 4,097 -> 4,850.
PAGE_SIZE = 1024


def _json_or_empty(value: Any) -> dict[str, Any]:
    if not isinstance(value, (str, bytes)):
        return {}
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


class SchemaVersionError(OutboxError):
    """The database's schema version is one this program cannot use: written by a
    newer release, or older than any it can migrate. Nothing was written to it."""


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


def _ensure_ballast(path: Path, size: int) -> int:
    """Create the ballast file if it is missing, or write it again at ``size`` if it
    is smaller (a site that grew), when the disk has room for it (four times its
    size free). Returns the size of the ballast in place (0: none)."""
    have = path.stat().st_size if path.exists() else 0
    if size <= 0 or have >= size:
        return have
    st = os.statvfs(path.parent)
    if st.f_bavail * st.f_frsize < 4 * size:
        return have
    try:  # the name durable too: a reserve lost at a power cut would be written again
        write_atomic(path, b"\xa5" * size)  # real blocks, on every filesystem
    except OSError:
        return path.stat().st_size if path.exists() else 0
    return size


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


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


@dataclass
class _Health:
    full_errors: int = 0
    last_full_ms: int | None = None
    pending_alarms: list[dict[str, Any]] = field(default_factory=list)


class Database:
    """The gateway's database: the file, its one writer connection, its schema.

    :class:`store_forward.outbox.Outbox` is the database with the outbox's queue on
    it; components (ledger, commands, audit) join its transactions."""

    # How long the daemon's start-up integrity check waits for other users of the
    # database to close it (a USB export finishing) before it is left to them.
    CHECK_WAIT_S = 10.0
    # The schema a database is opened with when none is given.
    DEFAULT_SCHEMA: ClassVar[SchemaRegistry] = SchemaRegistry([SCHEMA], oldest=2, dense=False)
    # What of a damaged database is read back into the new one (see _prepare and
    # _import_salvage); the layer above adds its tables.
    SALVAGE_TABLES: ClassVar[frozenset[str]] = frozenset({"kv"})
    # Counters in kv a new database takes over from a damaged one (the highest salvaged value).
    MAX_COUNTERS: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        path: Path,
        *,
        keys: StorageKeys,
        policy: StoragePolicy,
        clock_ms: Callable[[], int] = _wall_ms,
        schema: SchemaRegistry | None = None,
    ) -> None:
        self.path = path
        self.schema = schema or self.DEFAULT_SCHEMA
        self._keys = keys
        self._db: aiosqlite.Connection | Any = None
        self._lock = asyncio.Lock()
        self._rollback_hooks: list[Callable[[], None]] = []
        self._commit_hooks: list[Callable[[], None]] = []
        self._tx_changes = 0  # total_changes of the connection when the open transaction began
        self._batching = asyncio.Lock()
        self._sealer: StorageSealer | None = None
        self._key_version = keys.current
        self._openers: dict[int, StorageSealer] = {}
        self.policy = policy
        self.clock_ms = clock_ms
        self.health = _Health()
        self.ballast = path.with_name(path.name + ".ballast")
        self._ballast_released = False
        self._log_reserve = 0  # the reserve the connection's log checkpoint follows
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
        schema: SchemaRegistry | None = None,
    ) -> Self:
        """Open (or create) the database at ``path``, migrated to ``schema`` (default:
        :attr:`DEFAULT_SCHEMA`; the gateway passes :data:`gateway.database.SCHEMA`).

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
        A database whose schema version this program cannot use (written by a newer
        release) raises :class:`SchemaVersionError` before anything is written to it.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if keys is None:
            keys = await asyncio.to_thread(StorageKeys.beside, path)
        ob = cls(path, keys=keys, policy=policy or StoragePolicy(), clock_ms=clock_ms, schema=schema)
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
        except SchemaVersionError:
            raise  # never mistaken for a full disk: the program must not run on it
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
            await db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # a new file only (see PAGE_SIZE)
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA busy_timeout=5000")
            # Debian's SQLite (Raspberry Pi OS included) is built with SECURE_DELETE on:
            # every deleted row (each acknowledged record) is overwritten with zeros,
            # which writes the freed pages once more. Records are sealed, so zeroing them
            # protects nothing; FAST zeroes only where it costs no extra write.
            await db.execute("PRAGMA secure_delete=FAST")
            try:
                version = await self.schema.check(db, name=str(path))
            except SchemaError as exc:
                raise SchemaVersionError(str(exc)) from exc
            # A database already at this version has every table: transactions may
            # run even if the rest of opening waits for space.
            self._schema_ready = self._schema_ready or version == self.schema.version
            salvage: list[Salvage] = []
            fault = self._pending_fault
            # One transaction: the pending migrations with the new user_version, and
            # the lineage (a new database's salt, generation and numbering).
            await db.execute("BEGIN IMMEDIATE")
            try:
                try:
                    await self.schema.migrate(db, name=str(path))
                except SchemaError as exc:
                    raise SchemaVersionError(str(exc)) from exc
                async with db.execute("SELECT value FROM kv WHERE key = ?", (K_SALT,)) as cur:
                    new_db = await cur.fetchone() is None
                if new_db and fault is not None:
                    salvage = await asyncio.to_thread(salvage_images, fault.evidence, set(self.SALVAGE_TABLES))
                await self._init_lineage(db, new_db, fault, salvage)
                await db.commit()
            except BaseException:
                await db.rollback()
                raise
            self._schema_ready = True
            if version != self.schema.version:
                # A new or migrated schema goes into the file at once: the log is then
                # never the only holder of the schema's page, which a damaged copy of
                # it there would take every table with (salvage.PAST_DAMAGE_INTACT).
                # Passive: it waits for no reader; a full disk leaves it to the next.
                try:
                    await db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.OperationalError as exc:
                    log.warning("%s: the new schema stays in the write-ahead log for now: %s", path, exc)
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
        self._log_reserve = 0  # (a new connection)
        if self.policy.ballast_bytes > 0:
            await self._size_log(db, self.policy.ballast_bytes)
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
        what the layer above numbers starts above :func:`numbering_base` of it
        (:meth:`_new_database_in`). The marker is written before the commit, so it
        never falls behind a database.
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
                if k in self.MAX_COUNTERS and isinstance(v, int):
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
        await self._new_database_in(db, base, salvaged_kv, fault is not None)
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

    async def _new_database_in(
        self, db: aiosqlite.Connection, base: int, salvaged_kv: Mapping[str, Any], replaced: bool
    ) -> None:
        """Inside a new database's first transaction: what the layer above numbers
        starts above ``base`` (:func:`numbering_base` of its generation), with the
        counters taken over from ``salvaged_kv``; ``replaced``: it takes the place
        of a damaged database."""

    async def _import_salvage(self, salvage: Sequence[Salvage] | None) -> None:
        """Bring what the damaged database still holds into this new one (the
        layer above knows its tables)."""

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
        except SchemaVersionError:
            raise
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
                self._tx_changes = self._db.total_changes
                yield self._db
                await self._before_commit(self._db)
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
            for hook in self._commit_hooks:
                hook()

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
        rows = list(await db.execute_fetchall("SELECT value FROM kv WHERE key = ?", (K_STORAGE,)))
        row = rows[0] if rows else None
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

    async def _size_log(self, db: aiosqlite.Connection, reserve: int) -> None:
        """Checkpoint the write-ahead log when it holds half of ``reserve`` bytes, so
        that giving the reserve up always leaves room to checkpoint it."""
        if reserve == self._log_reserve:
            return
        rows = list(await db.execute_fetchall("PRAGMA page_size"))
        page = int(rows[0][0]) if rows else 4096
        await db.execute(f"PRAGMA wal_autocheckpoint={max(8, reserve // 2 // page)}")
        await db.execute(f"PRAGMA journal_size_limit={reserve // 2}")
        self._log_reserve = reserve

    async def ensure_reserve(self) -> bool:
        """Re-create the reserve file if it is missing or smaller than the policy's and
        the disk has room for it (four times its size free). True when a reserve is
        in place; the log's checkpoint follows the one in place."""
        if self.policy.ballast_bytes <= 0:
            return True
        in_place = await asyncio.to_thread(_ensure_ballast, self.ballast, self.policy.ballast_bytes)
        ok = in_place > 0
        if ok and self._db is not None:
            # An older, smaller reserve the disk has no room to grow: the log stays
            # within half of the reserve actually there (until it grows).
            await self._size_log(self._db, min(in_place, self.policy.ballast_bytes))
        if ok and self._ballast_released:
            log.warning("outbox %s: space is back; reserve file re-created", self.path)
        self._ballast_released = not ok
        return ok

    # -- writing ------------------------------------------------------------

    def on_rollback(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` whenever a transaction rolls back (components that cache
        what they wrote in a transaction drop that cache)."""
        self._rollback_hooks.append(hook)

    async def _before_commit(self, db: aiosqlite.Connection) -> None:
        """Write what the open transaction still holds back (a subclass's), just
        before it commits."""

    def tx_writes(self) -> bool:
        """Has the open transaction changed any row (will its commit write at all)?"""
        return self._db is not None and self._db.total_changes != self._tx_changes

    def on_commit(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` after every transaction that committed (components that keep
        in memory what a transaction wrote take it over only once it is durable)."""
        self._commit_hooks.append(hook)

    async def set_state(self, values: Mapping[str, Any]) -> None:
        async with self.transaction() as db:
            for k, v in values.items():
                await db.execute(
                    "INSERT INTO kv (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (k, v),
                )

    # -- space --------------------------------------------------------------

    # (live pages and their size in one statement: it runs on every commit)
    USAGE_SQL = (
        "SELECT p.page_size, c.page_count, f.freelist_count"
        " FROM pragma_page_size() AS p, pragma_page_count() AS c, pragma_freelist_count() AS f"
    )

    async def _usage(self, db: aiosqlite.Connection) -> tuple[int, int]:
        """(live database bytes, free filesystem bytes)."""
        return self._usage_of(list(await db.execute_fetchall(self.USAGE_SQL)))

    def _usage_of(self, rows: Sequence[Any]) -> tuple[int, int]:
        """:meth:`_usage` from the rows of :data:`USAGE_SQL`."""
        page_size, pages, free_pages = (int(v) for v in rows[0]) if rows else (0, 0, 0)
        return (pages - free_pages) * page_size, _free_bytes(self.path.parent)

    @staticmethod
    async def _freelist_bytes(db: aiosqlite.Connection) -> int:
        async with db.execute("PRAGMA freelist_count") as cur:
            row = await cur.fetchone()
        async with db.execute("PRAGMA page_size") as cur:
            size = await cur.fetchone()
        return int(row[0]) * int(size[0]) if row and size else 0

    # -- reading state ------------------------------------------------------

    async def kv(self) -> dict[str, Any]:
        async with self._lock:
            return await read_kv(self._db)

    @property
    def epoch(self) -> int:
        """The nonce epoch of the sealer (0 while the outbox waits for space)."""
        return 0 if self._sealer is None else self._sealer.epoch


# Read-only helpers, shared with `edgegw status` (which opens its own connection).


# Read-only helpers, shared with `edgegw status` (which opens its own connection).


async def read_kv(db: aiosqlite.Connection) -> dict[str, Any]:
    async with db.execute(
        "SELECT key, value FROM kv WHERE key != ? AND key NOT LIKE 'storage_key_tag_%'", (K_SALT,)
    ) as cur:
        return {str(k): v async for k, v in cur}

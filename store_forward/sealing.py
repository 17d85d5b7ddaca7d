"""Encryption at rest for outbox records, with nonces that never repeat.

Every outbox payload is sealed with AES-256-GCM under the device storage key.
The associated data binds the record id and record class, so a blob copied
into another row (or another class) no longer opens.

Nonce = 32-bit boot epoch || 64-bit in-process counter (both big-endian).
A process takes a fresh epoch exactly once, in :func:`acquire_epoch`, before
it seals anything: it reads the last epoch from every :class:`EpochStore`
(a small file next to the database, and a row in the database itself), takes
the maximum plus one, and writes that durably to *every* store — file
fsynced, then renamed, then its directory fsynced; the database row committed
with ``synchronous=FULL`` — before the first nonce is handed out. Within the
process the counter only counts up under a lock. So:

* Every epoch that has ever been used is ≤ the value held by every store
  that is intact (each store was updated before the epoch was used, and
  stores only ever move up). Taking ``max + 1`` over the intact stores
  therefore yields an epoch never used before, even after SIGKILL or power
  loss at any instant (a crash between the writes and first use only burns
  an epoch number).
* If a store is lost or corrupt, the others still carry the floor. If every
  store is lost or unreadable, :func:`acquire_epoch` refuses
  (:class:`EpochError`): the only safe way forward is a new storage key
  (a fresh key has no nonce history; pass ``new_key=True``).
* Epochs are recorded per key (tagged by a one-way fingerprint of the key),
  so rotating the key starts a new nonce space.

Acquisitions are serialised (an advisory lock on ``<epoch file>.lock`` and a
``BEGIN IMMEDIATE`` transaction on the database row), so several processes
may seal under one key: each holds its own epoch. Restoring the
database *and* the epoch file from an older backup while keeping the key
would roll the floor back: restore only together with a new key.

Start-up, in the process that owns the outbox::

    created = not key_path.exists()
    key = create_storage_key(key_path) if created else load_storage_key(key_path)
    conn = sqlite3.connect(db_path)            # short-lived is fine
    conn.execute("PRAGMA synchronous=FULL")
    sealer = StorageSealer.open(
        key,
        [FileEpochStore(db_path.with_name(db_path.name + ".epoch")), SqliteEpochStore(conn)],
        new_key=created,
    )
    blob = sealer.seal(record_id, "billing", payload)   # id known before the insert

Key files (:func:`create_storage_key`, :func:`load_storage_key`) hold the
32-byte key with a magic, a version and a CRC so that a damaged key is
reported as such rather than as every record failing to open. Key derivation
(HKDF from a device secret) belongs to the keystore; here the key is simply a
parameter.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import sqlite3
import stat
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from firmware_bridge.durable import write_atomic
from firmware_bridge.errors import EdgeGwError, ErrorKind

__all__ = [
    "BLOB_OVERHEAD",
    "KEY_BYTES",
    "MAX_EPOCH",
    "EpochError",
    "EpochStore",
    "FileEpochStore",
    "NonceExhaustedError",
    "NonceSequence",
    "SealingError",
    "SqliteEpochStore",
    "StorageKeyError",
    "StorageSealer",
    "UnsealError",
    "acquire_epoch",
    "create_storage_key",
    "key_tag",
    "load_storage_key",
]

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
BLOB_VERSION = 1
BLOB_OVERHEAD = 1 + NONCE_BYTES + TAG_BYTES
MAX_EPOCH = 0xFFFF_FFFF
MAX_COUNTER = 0xFFFF_FFFF_FFFF_FFFF
MAX_CLASS_BYTES = 255

_AAD_LABEL = b"edgegw/store\x00"
_KEY_MAGIC = b"EGWSKEY"
_KEY_VERSION = 1
_KEY_FILE = struct.Struct(">7sB32sI")
_EPOCH_MAGIC = b"EGWEPOCH"
_EPOCH_VERSION = 1
_EPOCH_FILE = struct.Struct(">8sB8sII")
_TAG_LABEL = b"edgegw/storage-key-tag/v1"


# --------------------------------------------------------------------------- errors


class SealingError(EdgeGwError):
    """Base of every error raised by this module."""

    kind = ErrorKind.STORAGE


class StorageKeyError(SealingError):
    """The storage key file is missing, damaged, too permissive or exists already."""


class EpochError(SealingError):
    """No nonce epoch can be established that is provably unused."""


class NonceExhaustedError(SealingError):
    """The in-process counter ran out (2**64 seals); restart for a new epoch."""


class UnsealError(SealingError):
    """The blob was altered, moved to another row/class, or sealed under another key."""

    kind = ErrorKind.AUTH


# --------------------------------------------------------------------------- key files


def create_storage_key(path: str | os.PathLike[str]) -> bytes:
    """Create a new random 32-byte storage key at ``path`` (mode 0600, atomic).

    Never replaces an existing key file: losing a key makes every record
    sealed under it unreadable. Raises :class:`StorageKeyError` if the file
    exists.
    """
    target = Path(path)
    key = os.urandom(KEY_BYTES)
    body = _KEY_MAGIC + bytes((_KEY_VERSION,)) + key
    data = _KEY_FILE.pack(_KEY_MAGIC, _KEY_VERSION, key, zlib.crc32(body))
    try:
        write_atomic(target, data, 0o600, exclusive=True)
    except FileExistsError as exc:
        raise StorageKeyError(f"storage key file {target} exists; refusing to replace it") from exc
    return key


def load_storage_key(path: str | os.PathLike[str]) -> bytes:
    """Read the storage key from ``path``.

    Refuses (:class:`StorageKeyError`) a missing file, a file readable or
    writable by group or others, or one whose size, magic or CRC is wrong.
    """
    target = Path(path)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError as exc:
        raise StorageKeyError(f"storage key file {target} does not exist") from exc
    except OSError as exc:
        raise StorageKeyError(f"cannot open storage key file {target}: {exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StorageKeyError(f"storage key file {target} is not a regular file")
        if st.st_mode & 0o077:
            raise StorageKeyError(
                f"storage key file {target} has mode {stat.S_IMODE(st.st_mode):04o}; "
                "it must not be accessible to group or others (0600)"
            )
        data = os.read(fd, _KEY_FILE.size + 1)
    finally:
        os.close(fd)
    if len(data) != _KEY_FILE.size:
        raise StorageKeyError(f"storage key file {target} has {len(data)} bytes, not a key")
    magic, version, key, crc = _KEY_FILE.unpack(data)
    if magic != _KEY_MAGIC or version != _KEY_VERSION:
        raise StorageKeyError(f"storage key file {target} has an unknown format")
    if zlib.crc32(data[:-4]) != crc:
        raise StorageKeyError(f"storage key file {target} is damaged (checksum mismatch)")
    return bytes(key)


def key_tag(key: bytes) -> bytes:
    """8-byte one-way fingerprint naming a key in epoch stores (reveals nothing of it)."""
    return hmac.new(key, _TAG_LABEL, hashlib.sha256).digest()[:8]


# --------------------------------------------------------------------------- epoch stores


class EpochStore(Protocol):
    """A durable place that remembers the last nonce epoch taken for a key."""

    @property
    def name(self) -> str: ...

    def read(self, tag: bytes) -> int | None:
        """The last epoch recorded for ``tag``; None when there is no record.

        Raises :class:`EpochError` when the store is unreadable or corrupt.
        """
        ...

    def write(self, tag: bytes, epoch: int) -> None:
        """Record ``epoch`` for ``tag``; durable when this returns."""
        ...

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Exclusive hold across read-increment-write (may be a no-op)."""
        ...


class FileEpochStore:
    """The epoch in a 25-byte file (magic, version, key tag, epoch, CRC-32)."""

    LOCK_WAIT_S = 10.0

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def name(self) -> str:
        return f"epoch file {self.path}"

    def read(self, tag: bytes) -> int | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise EpochError(f"{self.name} is unreadable: {exc}") from exc
        if len(data) != _EPOCH_FILE.size:
            raise EpochError(f"{self.name} is corrupt ({len(data)} bytes)")
        magic, version, file_tag, epoch, crc = _EPOCH_FILE.unpack(data)
        if magic != _EPOCH_MAGIC or version != _EPOCH_VERSION or zlib.crc32(data[:-4]) != crc:
            raise EpochError(f"{self.name} is corrupt (bad magic, version or checksum)")
        return int(epoch) if file_tag == tag else None

    def write(self, tag: bytes, epoch: int) -> None:
        head = struct.pack(">8sB8sI", _EPOCH_MAGIC, _EPOCH_VERSION, tag, epoch)
        write_atomic(self.path, head + struct.pack(">I", zlib.crc32(head)), 0o600)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Advisory lock on ``<file>.lock``; waits up to ``LOCK_WAIT_S``."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + self.LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError as exc:
                    if time.monotonic() >= deadline:
                        raise EpochError(
                            f"{lock_path} stayed locked by another process for {self.LOCK_WAIT_S} s"
                        ) from exc
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # releases the lock


class SqliteEpochStore:
    """The epoch as a row in the outbox database (table ``storage_nonce_epoch``).

    The connection must use ``PRAGMA synchronous=FULL`` (or EXTRA) so that a
    commit is durable, and must not be inside a transaction when
    :func:`acquire_epoch` runs; the read-increment-write happens inside one
    ``BEGIN IMMEDIATE`` transaction, committed before the epoch is used.
    (With aiosqlite, use a short-lived :mod:`sqlite3` connection to the same
    file at start-up.)
    """

    TABLE = "storage_nonce_epoch"
    # The store creates its table on first use (it works on any SQLite file); in the
    # gateway's database the schema registry declares the same statement.
    CREATE = (
        f"CREATE TABLE IF NOT EXISTS {TABLE} "
        "(key_tag BLOB PRIMARY KEY, epoch INTEGER NOT NULL "
        f"CHECK (epoch BETWEEN 1 AND {MAX_EPOCH}))"
    )

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    @property
    def name(self) -> str:
        return f"database table {self.TABLE}"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        conn = self.conn
        try:
            if conn.in_transaction:
                raise EpochError(f"{self.name}: connection is inside a transaction")
            (sync,) = conn.execute("PRAGMA synchronous").fetchone()
            if int(sync) < 2:
                raise EpochError(f"{self.name}: needs PRAGMA synchronous=FULL, found {sync}")
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(self.CREATE)
        except sqlite3.Error as exc:
            raise EpochError(f"{self.name} is unusable: {exc}") from exc
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()
            raise
        try:
            conn.commit()
        except sqlite3.Error as exc:
            raise EpochError(f"{self.name}: commit failed: {exc}") from exc

    def read(self, tag: bytes) -> int | None:
        try:
            row = self.conn.execute(
                f"SELECT epoch FROM {self.TABLE} WHERE key_tag = ?", (tag,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise EpochError(f"{self.name} is unreadable: {exc}") from exc
        if row is None:
            return None
        if type(row[0]) is not int or not 1 <= row[0] <= MAX_EPOCH:
            raise EpochError(f"{self.name} holds an invalid epoch {row[0]!r}")
        return int(row[0])

    def write(self, tag: bytes, epoch: int) -> None:
        if not self.conn.in_transaction:
            raise EpochError(f"{self.name}: write outside the acquisition transaction")
        try:
            self.conn.execute(
                f"INSERT INTO {self.TABLE} (key_tag, epoch) VALUES (?, ?) "
                "ON CONFLICT (key_tag) DO UPDATE SET epoch = max(epoch, excluded.epoch)",
                (tag, epoch),
            )
        except sqlite3.Error as exc:
            raise EpochError(f"{self.name} cannot be written: {exc}") from exc


def acquire_epoch(key: bytes, stores: Sequence[EpochStore], *, new_key: bool = False) -> int:
    """Take a fresh nonce epoch for ``key`` and record it durably in every store.

    Returns ``max(recorded epochs) + 1``; the value is durable in all stores
    when this returns. Corrupt or unreadable stores are skipped while at
    least one store holds a record for this key; with no record anywhere it
    raises :class:`EpochError` unless ``new_key`` says the key has never been
    used (epoch 1 is then safe). Any failure to write raises
    :class:`EpochError` and the epoch must not be used.
    """
    if not stores:
        raise EpochError("no epoch store given")
    tag = key_tag(key)
    with contextlib.ExitStack() as held:
        for store in stores:
            held.enter_context(store.lock())
        found: list[int] = []
        problems: list[str] = []
        for store in stores:
            try:
                value = store.read(tag)
            except EpochError as exc:
                problems.append(str(exc))
                continue
            if value is not None:
                found.append(value)
        if found:
            epoch = max(found) + 1
        elif new_key:
            # A new key has no nonce history, so epoch 1 is safe even if a
            # store is damaged; every store is (re)written below.
            epoch = 1
        else:
            detail = "; ".join(problems) if problems else "no store has a record for this key"
            raise EpochError(
                "cannot prove a fresh nonce epoch for this storage key "
                f"({detail}); refusing to seal. Use a new storage key."
            )
        if epoch > MAX_EPOCH:
            raise EpochError("nonce epochs exhausted for this key; use a new storage key")
        for store in stores:
            store.write(tag, epoch)
    return epoch


# --------------------------------------------------------------------------- nonces


class NonceSequence:
    """96-bit nonces: epoch (32 bits) || counter (64 bits), never repeating
    within one epoch. Thread-safe."""

    def __init__(self, epoch: int, *, start: int = 0) -> None:
        if not 1 <= epoch <= MAX_EPOCH:
            raise EpochError(f"epoch {epoch} outside 1..{MAX_EPOCH}")
        self._epoch = epoch
        self._next = start
        self._lock = threading.Lock()

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def issued(self) -> int:
        return self._next

    def next(self) -> bytes:
        with self._lock:
            n = self._next
            if n > MAX_COUNTER:
                raise NonceExhaustedError(f"nonce counter exhausted in epoch {self._epoch}")
            self._next = n + 1
        return struct.pack(">IQ", self._epoch, n)


# --------------------------------------------------------------------------- sealer


def _aad(record_id: int, record_class: str) -> bytes:
    if type(record_id) is not int or not -(1 << 63) <= record_id < (1 << 63):
        raise SealingError(f"record id must be a 64-bit int, got {record_id!r}")
    try:
        cls = record_class.encode("utf-8")
    except (AttributeError, UnicodeEncodeError) as exc:
        raise SealingError(f"record class must be a UTF-8 string, got {record_class!r}") from exc
    if not 1 <= len(cls) <= MAX_CLASS_BYTES:
        raise SealingError(f"record class must be 1..{MAX_CLASS_BYTES} UTF-8 bytes")
    return _AAD_LABEL + struct.pack(">Bq", BLOB_VERSION, record_id) + bytes((len(cls),)) + cls


class StorageSealer:
    """Seals and opens outbox payloads under the storage key.

    Blob layout: version (1 byte, = 1) || nonce (12) || ciphertext || tag (16).
    Associated data: ``"edgegw/store\\0" || version || record id (i64 BE) ||
    len(class) || class``.
    """

    def __init__(self, key: bytes, nonces: NonceSequence) -> None:
        if len(key) != KEY_BYTES:
            raise StorageKeyError(f"storage key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(bytes(key))
        self._nonces = nonces

    @classmethod
    def open(
        cls, key: bytes, stores: Sequence[EpochStore], *, new_key: bool = False
    ) -> StorageSealer:
        """A sealer with a freshly acquired epoch (see :func:`acquire_epoch`)."""
        if len(key) != KEY_BYTES:
            raise StorageKeyError(f"storage key must be {KEY_BYTES} bytes")
        return cls(key, NonceSequence(acquire_epoch(key, stores, new_key=new_key)))

    @property
    def epoch(self) -> int:
        return self._nonces.epoch

    def seal(self, record_id: int, record_class: str, plaintext: bytes) -> bytes:
        aad = _aad(record_id, record_class)
        nonce = self._nonces.next()
        return bytes((BLOB_VERSION,)) + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def unseal(self, record_id: int, record_class: str, blob: bytes) -> bytes:
        aad = _aad(record_id, record_class)
        if len(blob) < BLOB_OVERHEAD:
            raise UnsealError(f"record {record_id}: blob of {len(blob)} bytes is truncated")
        if blob[0] != BLOB_VERSION:
            raise UnsealError(f"record {record_id}: unknown blob version {blob[0]}")
        try:
            return self._aead.decrypt(blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :], aad)
        except InvalidTag as exc:
            raise UnsealError(
                f"record {record_id} ({record_class}): blob altered, moved from another "
                "row or class, or sealed under another key"
            ) from exc

    @staticmethod
    def nonce_of(blob: bytes) -> bytes:
        """The 12-byte nonce stored in ``blob`` (for audits and tests)."""
        if len(blob) < BLOB_OVERHEAD:
            raise UnsealError("blob is truncated")
        return bytes(blob[1 : 1 + NONCE_BYTES])

    @staticmethod
    def epoch_of(blob: bytes) -> int:
        epoch: int = struct.unpack(">I", StorageSealer.nonce_of(blob)[:4])[0]
        return epoch

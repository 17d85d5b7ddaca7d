"""Tamper-evident audit log: append-only, hash-chained, in the daemon's SQLite.

Each entry is ``(seq, time_ms, time_source, actor, action, details, prev_hash,
hash)`` with ``seq`` counting 1, 2, 3, ... without gaps, ``prev_hash`` the hash
of entry ``seq - 1`` (32 zero bytes for the first) and::

    hash = SHA-256( b"edgegw-audit-v1\\0"
                    || u64be(seq) || i64be(time_ms)
                    || u32be(len) || time_source   (UTF-8)
                    || u32be(len) || actor
                    || u32be(len) || action
                    || u32be(len) || details       (canonical JSON as stored)
                    || prev_hash )

Length prefixes make the encoding unambiguous (no two field tuples hash the
same bytes). :func:`verify` recomputes the chain and names the first entry
that was edited, deleted, inserted or moved.

What the chain can and cannot show: anyone who edits rows without
recomputing every later hash is caught. Someone with write access to the
database *and* this code could rewrite the chain from some point on; signed
checkpoints (:func:`checkpoint`, Ed25519 with the gateway identity key) catch
that for everything up to the newest checkpoint, and heads shipped to central
catch the rest. Dropping entries after the newest checkpoint that central has
not seen is not detectable on the device.

Triggers refuse ``UPDATE`` and ``DELETE`` on the tables, so a bug cannot
rewrite history by accident; they are not a defence against an attacker who
drops them.

:func:`append` and :func:`checkpoint` run on the daemon's writer connection
inside the caller's transaction (an audit entry commits with the action it
records); :func:`verify` is synchronous and opens the file read-only.
"""

from __future__ import annotations

import hashlib
import sqlite3
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiosqlite
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.events import event
from store_forward.integrity import is_hot_journal_refusal
from store_forward.schema import Schema, Step

HASH_CONTEXT = b"edgegw-audit-v1\x00"
CHECKPOINT_CONTEXT = b"edgegw-audit-checkpoint-v1\x00"
GENESIS_HASH = bytes(32)

TABLES: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS audit_log (
        seq INTEGER PRIMARY KEY CHECK (seq >= 1),
        time_ms INTEGER NOT NULL,
        time_source TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        details TEXT NOT NULL,
        prev_hash BLOB NOT NULL,
        hash BLOB NOT NULL
    ) STRICT""",
    """CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
       BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
       BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END""",
    """CREATE TABLE IF NOT EXISTS audit_checkpoint (
        seq INTEGER PRIMARY KEY,
        hash BLOB NOT NULL,
        time_ms INTEGER NOT NULL,
        public_key BLOB NOT NULL,
        signature BLOB NOT NULL
    ) STRICT""",
    """CREATE TRIGGER IF NOT EXISTS audit_checkpoint_no_update BEFORE UPDATE ON audit_checkpoint
       BEGIN SELECT RAISE(ABORT, 'audit_checkpoint is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS audit_checkpoint_no_delete BEFORE DELETE ON audit_checkpoint
       BEGIN SELECT RAISE(ABORT, 'audit_checkpoint is append-only'); END""",
)
# Declared to the gateway database's schema registry (gateway.database).
SCHEMA = Schema("audit", Step(4, "the audit log and its signed checkpoints (append-only)", TABLES))


class AuditError(EdgeGwError):
    """The audit log cannot be read or written."""

    kind = ErrorKind.STORAGE


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    time_ms: int
    time_source: str
    actor: str
    action: str
    details: str  # canonical JSON text, exactly as hashed
    prev_hash: bytes
    hash: bytes

    def details_obj(self) -> Any:
        return orjson.loads(self.details)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    hash: bytes
    time_ms: int
    public_key: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    entries: int
    first_bad_seq: int | None = None
    reason: str = ""
    head_seq: int = 0
    head_hash: bytes = GENESIS_HASH
    checkpoints: int = 0

    def summary(self) -> str:
        if self.ok:
            return (
                f"OK: {self.entries} entries, head seq {self.head_seq} "
                f"hash {self.head_hash.hex()}, {self.checkpoints} signed checkpoints verified"
            )
        return f"TAMPERED: first bad seq {self.first_bad_seq}: {self.reason}"


# ---------------------------------------------------------------------------
# Pure core


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return str(obj)
    if isinstance(obj, bytes):
        return obj.hex()
    raise TypeError(f"cannot put {type(obj).__name__} in audit details")


def canonical_details(details: Mapping[str, Any]) -> str:
    """Details as canonical JSON (sorted keys; Decimal as string, bytes as hex)."""
    return orjson.dumps(dict(details), option=orjson.OPT_SORT_KEYS, default=_default).decode()


def _lp(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack(">I", len(b)) + b


def entry_hash(
    seq: int,
    time_ms: int,
    time_source: str,
    actor: str,
    action: str,
    details: str,
    prev_hash: bytes,
) -> bytes:
    h = hashlib.sha256()
    h.update(HASH_CONTEXT)
    h.update(struct.pack(">Qq", seq, time_ms))
    for field in (time_source, actor, action, details):
        h.update(_lp(field))
    h.update(prev_hash)
    return h.digest()


def checkpoint_message(seq: int, head_hash: bytes, time_ms: int) -> bytes:
    return CHECKPOINT_CONTEXT + struct.pack(">Qq", seq, time_ms) + head_hash


def verify_entries(
    entries: Iterable[AuditEntry],
    checkpoints: Sequence[Checkpoint] = (),
    *,
    public_key: bytes | None = None,
    expect_heads: Sequence[tuple[int, bytes]] = (),
) -> VerifyResult:
    """Check the chain and the checkpoints (pure). Entries must come ordered by seq.

    With ``public_key`` (the gateway's registered identity key) every
    checkpoint must be signed by it; without, checkpoints are checked against
    the key stored beside them, which only proves internal consistency.
    ``expect_heads`` are ``(seq, hash)`` pairs held outside the database (the
    checkpoints central received): the log must contain each of them, which
    catches a tail dropped together with its checkpoints.
    """
    prev = GENESIS_HASH
    expected = 1
    hashes: dict[int, bytes] = {}
    for e in entries:
        if e.seq != expected:
            if e.seq > expected:
                reason = f"entry {expected} is missing (deleted); next entry is {e.seq}"
            else:
                reason = f"entry {e.seq} appears out of order after {expected - 1}"
            return VerifyResult(False, expected - 1, expected, reason)
        if e.prev_hash != prev:
            return VerifyResult(
                False,
                expected - 1,
                e.seq,
                f"prev_hash of entry {e.seq} does not match entry {e.seq - 1} "
                "(entry removed, inserted or reordered)",
            )
        h = entry_hash(e.seq, e.time_ms, e.time_source, e.actor, e.action, e.details, e.prev_hash)
        if h != e.hash:
            return VerifyResult(
                False, expected - 1, e.seq, f"hash of entry {e.seq} does not match its content"
            )
        hashes[e.seq] = h
        prev = h
        expected += 1
    count = expected - 1
    for cp in checkpoints:
        key = public_key if public_key is not None else cp.public_key
        if public_key is not None and cp.public_key != public_key:
            return VerifyResult(
                False, count, cp.seq, f"checkpoint at {cp.seq} was made by another key"
            )
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(
                cp.signature, checkpoint_message(cp.seq, cp.hash, cp.time_ms)
            )
        except (InvalidSignature, ValueError):
            return VerifyResult(
                False, count, cp.seq, f"checkpoint at {cp.seq} has an invalid signature"
            )
        actual = hashes.get(cp.seq)
        if actual is None:
            return VerifyResult(
                False,
                count,
                min(cp.seq, count + 1),
                f"signed checkpoint covers entry {cp.seq} but the log ends at {count} "
                "(entries deleted)",
            )
        if actual != cp.hash:
            return VerifyResult(
                False,
                count,
                cp.seq,
                f"log differs from the signed checkpoint at {cp.seq} (history rewritten)",
            )
    for seq, want in expect_heads:
        actual = hashes.get(seq)
        if actual is None:
            return VerifyResult(
                False,
                count,
                min(seq, count + 1),
                f"central holds a checkpoint at entry {seq} but the log ends at {count} "
                "(entries deleted)",
            )
        if actual != want:
            return VerifyResult(
                False,
                count,
                seq,
                f"log differs from central's checkpoint at {seq} (history rewritten)",
            )
    return VerifyResult(True, count, None, "", count, prev, len(checkpoints))


# ---------------------------------------------------------------------------
# Writer side (caller-owned transaction)


async def create_schema(conn: aiosqlite.Connection) -> None:
    """The tables on a connection of their own (tests, tools); the gateway's database
    gets them from its schema registry (:mod:`gateway.database`)."""
    await SCHEMA.create(conn)


async def head(conn: aiosqlite.Connection) -> tuple[int, bytes]:
    """``(seq, hash)`` of the newest entry, ``(0, GENESIS_HASH)`` when empty."""
    async with conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1") as cur:
        row = await cur.fetchone()
    return (0, GENESIS_HASH) if row is None else (int(row[0]), bytes(row[1]))


async def append(
    conn: aiosqlite.Connection,
    *,
    actor: str,
    action: str,
    details: Mapping[str, Any],
    time_ms: int,
    time_source: str = "system",
) -> AuditEntry:
    """Add one entry in the caller's transaction; returns it with its hash.

    ``actor`` is who caused it (a central key id, ``technician:<name>``,
    ``gateway``), ``action`` a stable dotted name (``command.applied``,
    ``clock.jump_backward``, ``relay.open``).
    """
    if not actor or not action:
        raise AuditError("audit entries need an actor and an action")
    seq, prev = await head(conn)
    seq += 1
    text = canonical_details(details)
    h = entry_hash(seq, time_ms, time_source, actor, action, text, prev)
    await conn.execute(
        "INSERT INTO audit_log (seq, time_ms, time_source, actor, action, details, prev_hash, hash) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (seq, time_ms, time_source, actor, action, text, prev, h),
    )
    return AuditEntry(seq, time_ms, time_source, actor, action, text, prev, h)


async def checkpoint(
    conn: aiosqlite.Connection,
    *,
    sign: Callable[[bytes], bytes],
    public_key: bytes,
    time_ms: int,
) -> Checkpoint | None:
    """Sign the current head with the gateway identity (``Keystore.sign``).

    Returns None when the log is empty or the head already has a checkpoint.
    """
    seq, h = await head(conn)
    if seq == 0:
        return None
    async with conn.execute("SELECT 1 FROM audit_checkpoint WHERE seq = ?", (seq,)) as cur:
        if await cur.fetchone() is not None:
            return None
    sig = sign(checkpoint_message(seq, h, time_ms))
    await conn.execute(
        "INSERT INTO audit_checkpoint (seq, hash, time_ms, public_key, signature) "
        "VALUES (?, ?, ?, ?, ?)",
        (seq, h, time_ms, public_key, sig),
    )
    return Checkpoint(seq, h, time_ms, public_key, sig)


def checkpoint_event(cp: Checkpoint, gateway_id: str) -> dict[str, Any]:
    """The outbox event that gives central its copy of a checkpoint.

    Central keeps the newest one per gateway: a database whose log ends before
    it, or differs from it, was truncated or rewritten (``edgegw audit verify
    --expect-head SEQ:HASH``).
    """
    return event(
        "audit_checkpoint",
        gateway=gateway_id,
        seq=cp.seq,
        hash=cp.hash.hex(),
        time_ms=cp.time_ms,
        public_key=cp.public_key.hex(),
        signature=cp.signature.hex(),
    )


# ---------------------------------------------------------------------------
# Verifier (synchronous, read-only)


def _rows(db: sqlite3.Connection) -> Iterable[AuditEntry]:
    cur = db.execute(
        "SELECT seq, time_ms, time_source, actor, action, details, prev_hash, hash "
        "FROM audit_log ORDER BY seq"
    )
    for r in cur:
        yield AuditEntry(
            int(r[0]),
            int(r[1]),
            str(r[2]),
            str(r[3]),
            str(r[4]),
            str(r[5]),
            bytes(r[6]),
            bytes(r[7]),
        )


def verify(
    db_path: str | Path,
    *,
    public_key: bytes | None = None,
    expect_heads: Sequence[tuple[int, bytes]] = (),
) -> VerifyResult:
    """Verify the audit log in ``db_path`` (opened read-only). See :func:`verify_entries`."""
    p = Path(db_path)
    if not p.exists():
        raise AuditError(f"{p}: no such database")
    try:
        db = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise AuditError(f"{p}: cannot open: {exc}") from exc
    try:
        try:
            cps = [
                Checkpoint(int(r[0]), bytes(r[1]), int(r[2]), bytes(r[3]), bytes(r[4]))
                for r in db.execute(
                    "SELECT seq, hash, time_ms, public_key, signature "
                    "FROM audit_checkpoint ORDER BY seq"
                )
            ]
            return verify_entries(
                _rows(db), cps, public_key=public_key, expect_heads=expect_heads
            )
        except sqlite3.Error as exc:
            if is_hot_journal_refusal(exc):  # read-only: it cannot roll the journal back
                raise AuditError(
                    f"{p}: a transaction that did not complete ({p.name}-journal) waits to be"
                    " rolled back; the daemon does that at its next start (verify again then)"
                ) from exc
            raise AuditError(f"{p}: cannot read the audit log: {exc}") from exc
    finally:
        db.close()

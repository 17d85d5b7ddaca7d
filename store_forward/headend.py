"""Reference headend: the central side of the uplink contract, in code.

For every batch it receives it:

1. verifies and decodes it: a sealed batch (encoding 2) must open under the
   key the headend shares with that gateway (:class:`GatewayRegistry`:
   enrolled, not revoked) and name the gateway whose topic it came on; a
   batch that fails is logged, counted and never stored or acked. Unsealed
   batches (encoding 1) are accepted only by a headend without a registry
   (development) or with ``allow_plain=True``;
2. in one transaction, records the batch (gateway, epoch, seq) with the
   SHA-256 of its payload — if that identity is already known the batch is a
   duplicate (or, with other bytes, a conflict) and nothing else is written —
   and stores its records, each keyed by (gateway, epoch, record id);
3. commits (``synchronous=FULL``), and only then
4. publishes the ack ``{"seq", "epoch", "status": "stored" | "duplicate" |
   "conflict", "records", "mac"}`` at QoS 1; for a sealed batch the ``mac``
   binds it to that batch under a key only this headend and the gateway can
   derive (:mod:`store_forward.acks`).

A crash between 3 and 4 makes the gateway retransmit; step 2 turns that into
a duplicate ack. See docs/protocol.md.

Databases made before batch epochs existed are migrated when opened: their
rows keep the legacy epoch ``''`` (batches in the encodings without an epoch
still get it), and the keys gain the epoch.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiomqtt
import aiosqlite

from store_forward import wire
from store_forward.acks import ack_key, ack_mac, encode_ack
from store_forward.codec import AnyBatch, DecodeError, decode
from store_forward.records import RecordClass, RecordKind, dumps
from store_forward.topics import DEFAULT_PREFIX, Topics, gateway_of, up_filter
from store_forward.uplink import backoff_delay
from store_forward.uplink_keys import GatewayRegistry

log = logging.getLogger(__name__)

Decoder = Callable[[bytes], AnyBatch]

# Seconds to wait for the broker to take an ack (see Headend._handle).
ACK_PUBLISH_TIMEOUT_S = 3.0

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
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""
)


@dataclass(frozen=True)
class StoreResult:
    status: str  # "stored" | "duplicate" | "conflict" (other bytes under this identity)
    records_new: int
    records_dup: int


READING_COLS = "gateway_id, record_id, meter_id, time_ms, time_source, quantities, quality, batch_seq, epoch"
EVENT_COLS = "gateway_id, record_id, kind, created_ms, body, batch_seq, epoch"
BATCH_COLS = "gateway_id, seq, received_ms, n_records, epoch, digest"


def batch_row(batch: AnyBatch, now_ms: int) -> tuple[Any, ...]:
    """The ``batches`` row of ``batch``, in :data:`BATCH_COLS` order."""
    return (batch.gateway_id, batch.seq, now_ms, len(batch.records), batch.epoch, batch.digest or None)


def same_bytes(stored_digest: bytes | None, batch: AnyBatch) -> bool:
    """Whether a known batch identity holds the bytes just received (a row stored
    before digests were kept cannot tell, and counts as the same)."""
    return stored_digest is None or not batch.digest or bytes(stored_digest) == batch.digest


CONFLICT_REASON = "central holds different bytes under this batch's (gateway, epoch, seq)"


def record_row(batch: AnyBatch, r: Any) -> tuple[str, tuple[Any, ...]]:
    """The table a record goes to (``readings``, ``telemetry`` or ``events``) and its
    row, in :data:`READING_COLS` / :data:`EVENT_COLS` order (both stores use it)."""
    if r.kind == RecordKind.READING:
        b = r.body
        table = "telemetry" if int(r.cls) == RecordClass.TELEMETRY else "readings"
        return table, (
            batch.gateway_id,
            r.id,
            str(b["m"]),
            int(b["t"]),
            str(b.get("ts", "system")),
            dumps(b["v"]).decode(),
            dumps(b["q"]).decode() if b.get("q") else None,
            batch.seq,
            batch.epoch,
        )
    body = dumps(r.body).decode()
    return "events", (batch.gateway_id, r.id, r.kind, r.created_ms, body, batch.seq, batch.epoch)


class HeadendStore(Protocol):
    """Where the headend commits batches (SQLite here, PostgreSQL in headend_pg)."""

    async def store(self, batch: AnyBatch, now_ms: int) -> StoreResult: ...

    async def summary(self, gateway_id: str | None = None) -> dict[str, Any]: ...

    async def close(self) -> None: ...


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
        await _migrate(db)
        await db.executescript(SCHEMA)
        return cls(db)

    async def close(self) -> None:
        await self._db.close()

    async def store(self, batch: AnyBatch, now_ms: int) -> StoreResult:
        db = self._db
        await db.execute("BEGIN IMMEDIATE")
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
            new = dup = 0
            for r in batch.records:
                table, row = record_row(batch, r)
                cols = EVENT_COLS if table == "events" else READING_COLS
                cur = await db.execute(
                    f"INSERT OR IGNORE INTO {table} ({cols}) VALUES ({','.join('?' * len(row))})", row
                )
                if cur.rowcount:
                    new += 1
                else:
                    dup += 1
            if dup:
                await self._count(db, "duplicate_records", dup)
            await db.commit()
            return StoreResult("stored", new, dup)
        except BaseException:
            await db.rollback()
            raise

    @staticmethod
    async def _count(db: aiosqlite.Connection, name: str, n: int) -> None:
        await db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (name, n),
        )

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


class Headend:
    """Subscribe, store, then ack. Runs until cancelled; reconnects on its own."""

    def __init__(
        self,
        db: HeadendStore,
        *,
        host: str,
        port: int,
        prefix: str = DEFAULT_PREFIX,
        share_group: str | None = None,
        identifier: str | None = None,
        registry: GatewayRegistry | None = None,
        allow_plain: bool | None = None,
        decode: Decoder | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """``tls_context``: a client-side context for TLS to the broker (with the
        headend's certificate loaded for mutual TLS), e.g.
        :func:`store_forward.uplink.tls_context`; None connects in plain MQTT."""
        self.db = db
        self.host = host
        self.port = port
        self.prefix = prefix
        self.share_group = share_group
        self.identifier = identifier or f"edgegw-headend-{random.randrange(1 << 32):08x}"
        self.registry = registry
        # Unsealed batches only where no registry says which gateways exist.
        self.allow_plain = registry is None if allow_plain is None else allow_plain
        self.decode: Decoder = decode or self._decode
        self.tls_context = tls_context
        self.batches_received = 0
        self.rejected = 0
        self.rejections: dict[str, int] = {}
        self.connected = asyncio.Event()

    async def run(self) -> None:
        attempt = 0
        rng = random.Random()
        while True:
            try:
                async with aiomqtt.Client(
                    self.host,
                    self.port,
                    identifier=self.identifier,
                    clean_session=True,
                    timeout=10,
                    tls_context=self.tls_context,
                ) as client:
                    attempt = 0
                    await client.subscribe(up_filter(self.prefix, self.share_group), qos=1)
                    self.connected.set()
                    log.info(
                        "headend subscribed on %s:%d (%s)",
                        self.host,
                        self.port,
                        "TLS" if self.tls_context is not None else "plain MQTT",
                    )
                    async for msg in client.messages:
                        await self._handle(client, msg)
            except (aiomqtt.MqttError, OSError) as exc:
                log.warning("headend connection lost: %s", exc)
            except Exception:
                # A store error (database down, a bug): nothing was acked, so the
                # gateways send again; reconnect rather than stop ingesting for good.
                log.exception("headend failed; reconnecting")
            self.connected.clear()
            await asyncio.sleep(backoff_delay(attempt, 0.2, 10.0, rng))
            attempt += 1

    def _decode(self, payload: bytes) -> AnyBatch:
        lookup = self.registry.key_lookup if self.registry is not None else None
        return decode(payload, lookup, allow_plain=self.allow_plain)

    def _reject(self, kind: str) -> None:
        self.rejected += 1
        self.rejections[kind] = self.rejections.get(kind, 0) + 1

    def _mac(self, batch: AnyBatch, status: str) -> bytes | None:
        """The ack's MAC for a sealed batch (under a key derived from its batch key)."""
        if not isinstance(batch, wire.DecodedBatch) or self.registry is None:
            return None
        key = self.registry.key_lookup(batch.gateway_id, batch.key_id)
        if key is None:  # revoked since the batch was opened: no ack the gateway would take
            return None
        return ack_mac(
            ack_key(key),
            gateway_id=batch.gateway_id,
            epoch=batch.epoch,
            seq=batch.seq,
            key_id=batch.key_id,
            status=status,
            digest=batch.digest,
        )

    async def _handle(self, client: aiomqtt.Client, msg: aiomqtt.Message) -> None:
        self.batches_received += 1
        topic_gw = gateway_of(msg.topic.value, self.prefix)
        payload = msg.payload if isinstance(msg.payload, bytes) else b""
        if topic_gw is None:
            return
        try:
            batch = self.decode(payload)
        except DecodeError as exc:
            # Nothing authenticated to answer to: record and drop (no ack, so a
            # gateway with a real problem keeps its data and retries).
            self._reject(exc.reason.split(":")[0])
            log.error("refused batch on %s (%d bytes): %s", msg.topic.value, len(payload), exc.reason)
            return
        if batch.gateway_id != topic_gw:
            # Not MAC'd: the gateway of this topic holds no key for another's batch.
            self._reject("topic mismatch")
            reason = f"batch names gateway {batch.gateway_id!r} but came on {topic_gw!r}'s topic"
            log.error("rejecting batch %d: %s", batch.seq, reason)
            reply = encode_ack(seq=batch.seq, epoch=batch.epoch, status="rejected", reason=reason)
        else:
            result = await self.db.store(batch, int(time.time() * 1000))
            if result.status == "conflict":
                self._reject("conflict")
                log.critical(
                    "batch %d of %s (epoch %s): %s; not acked as stored",
                    batch.seq,
                    batch.gateway_id,
                    batch.epoch or "legacy",
                    CONFLICT_REASON,
                )
            reply = encode_ack(
                seq=batch.seq,
                epoch=batch.epoch,
                status=result.status,
                records=result.records_new,
                reason=CONFLICT_REASON if result.status == "conflict" else None,
                mac=self._mac(batch, result.status),
            )
        # A short timeout: on a dead connection aiomqtt does not fail a pending QoS 1
        # publish, and the headend would sit out the client's whole timeout. A lost
        # ack costs nothing: the gateway re-sends and the batch is a duplicate.
        await client.publish(
            Topics(self.prefix, topic_gw).ack, reply, qos=1, timeout=ACK_PUBLISH_TIMEOUT_S
        )

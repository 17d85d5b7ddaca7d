"""Batch identity (gateway, epoch, seq): the outbox's epochs, the headend's keys and
their migration (SQLite and PostgreSQL), conflicts, and sneakernet exports of both forms."""

from __future__ import annotations

import functools
import hashlib
import shutil
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import orjson
import psycopg
import pytest

from headend.store import HeadendDB
from headend.store_pg import PostgresHeadendDB
from headend.usb_import import import_backlog
from store_forward.batch_epoch import LEGACY_EPOCH, check_epoch
from store_forward.codec import AnyBatch, JsonCodec, SealedCodec, decode
from store_forward.outbox import Outbox
from store_forward.records import Record, RecordClass, RecordKind
from store_forward.sneakernet import export_backlog
from store_forward.wire import batch_header
from tests.headend.test_headend_scaleout import pg_dsn  # noqa: F401 (fixture)
from tests.store_forward.helpers import Site, six_quantity_reading

GW = "gw-e"

# The headend's tables as they were before batch epochs (SQLite and PostgreSQL).
OLD_SQLITE = """
CREATE TABLE batches (gateway_id TEXT NOT NULL, seq INTEGER NOT NULL, received_ms INTEGER NOT NULL,
    n_records INTEGER NOT NULL, PRIMARY KEY (gateway_id, seq));
CREATE TABLE readings (gateway_id TEXT NOT NULL, record_id INTEGER NOT NULL, meter_id TEXT NOT NULL,
    time_ms INTEGER NOT NULL, time_source TEXT NOT NULL, quantities TEXT NOT NULL, quality TEXT,
    batch_seq INTEGER NOT NULL, PRIMARY KEY (gateway_id, record_id));
CREATE INDEX readings_meter_time ON readings (gateway_id, meter_id, time_ms);
CREATE TABLE telemetry (gateway_id TEXT NOT NULL, record_id INTEGER NOT NULL, meter_id TEXT NOT NULL,
    time_ms INTEGER NOT NULL, time_source TEXT NOT NULL, quantities TEXT NOT NULL, quality TEXT,
    batch_seq INTEGER NOT NULL, PRIMARY KEY (gateway_id, record_id));
CREATE TABLE events (gateway_id TEXT NOT NULL, record_id INTEGER NOT NULL, kind TEXT NOT NULL,
    created_ms INTEGER NOT NULL, body TEXT NOT NULL, batch_seq INTEGER NOT NULL,
    PRIMARY KEY (gateway_id, record_id));
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO batches VALUES ('gw-e', 1, 100, 2);
INSERT INTO readings VALUES ('gw-e', 1, 'm1', 1000, 'system', '{"energy_import_kwh":"1.00"}', NULL, 1);
INSERT INTO events VALUES ('gw-e', 2, 'event', 1001, '{"type":"x"}', 1);
"""
OLD_PG = (
    OLD_SQLITE.replace("INTEGER", "BIGINT")
    .replace("quantities TEXT", "quantities JSONB")
    .replace("quality TEXT", "quality JSONB")
    .replace("body TEXT", "body JSONB")
)


def events(first_id: int, n: int) -> list[Record]:
    return [Record(first_id + i, RecordClass.EVENT, RecordKind.EVENT, i, {"type": "e", "i": i}) for i in range(n)]


def readings(first_id: int, n: int) -> list[Record]:
    return [
        Record(
            first_id + i,
            RecordClass.BILLING,
            RecordKind.READING,
            1000 + i,
            {"m": "m1", "t": 1000 + i, "ts": "system", "v": {"energy_import_kwh": f"{i}.00"}},
        )
        for i in range(n)
    ]


async def test_a_new_database_numbers_batches_in_a_fresh_random_epoch(tmp_path: Path) -> None:
    codec = SealedCodec(1, bytes(32))
    epochs = []
    for name in ("a.db", "b.db"):
        ob = await Outbox.open(tmp_path / name)
        await ob.add_event(1, {"type": "x"})
        b = await ob.next_batch(1, pack=functools.partial(codec.pack, GW))
        assert b is not None and b.seq == 1 and b.payload is not None
        assert b.epoch == await ob.batch_epoch() == check_epoch(b.epoch, legacy=False)
        assert batch_header(b.payload).epoch == b.epoch  # the sealed header names it
        assert (await ob.pending_batch(1)) == (b.epoch, b.payload)
        epochs.append(b.epoch)
        await ob.close()
    assert epochs[0] != epochs[1]  # both start at seq 1, yet name different batches
    # The epoch is the database's: reopening keeps it.
    ob = await Outbox.open(tmp_path / "a.db")
    assert await ob.batch_epoch() == epochs[0]
    await ob.close()


async def test_a_new_epoch_keeps_pending_batches_and_the_sequence(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "gw.db")
    pack = functools.partial(JsonCodec().pack, GW)
    for i in range(3):
        await ob.add_event(i, {"type": "x", "i": i})
    first = await ob.next_batch(1, max_records=1, pack=pack)
    assert first is not None
    new = await ob.start_batch_epoch()  # what recovery after a storage fault calls
    assert new != first.epoch and await ob.batch_epoch() == new
    second = await ob.next_batch(1, exclude=[first.seq], max_records=1, pack=pack)
    assert second is not None and (second.seq, second.epoch) == (first.seq + 1, new)
    again = await ob.next_batch(1, max_records=1, pack=pack)  # the pending one, unchanged
    assert again is not None and (again.seq, again.epoch, again.payload) == (first.seq, first.epoch, first.payload)
    assert decode(second.payload or b"", None, allow_plain=True).epoch == new
    # An ack naming the wrong epoch deletes nothing; the right one deletes.
    assert await ob.ack(first.seq, epoch=new) == 0
    assert await ob.pending_batches() == [first.seq, second.seq]
    assert await ob.ack(first.seq, epoch=first.epoch) == 1
    assert await ob.pending_batches() == [second.seq]
    await ob.close()


async def test_batches_of_a_database_from_before_epochs_keep_the_legacy_epoch(tmp_path: Path) -> None:
    """A database whose batches table has no epoch column (made before epochs): its
    pending batch keeps the identity (gateway, seq) it was sent under."""
    codec = SealedCodec(1, bytes(32))
    ob = await Outbox.open(tmp_path / "gw.db")
    await ob.add_event(1, {"type": "old"})
    old = await ob.next_batch(
        1, pack=lambda s, r, m, *, epoch: codec.pack(GW, s, r, m, epoch=LEGACY_EPOCH)
    )
    assert old is not None and old.payload is not None
    await ob.close()
    with sqlite3.connect(tmp_path / "gw.db") as db:
        db.executescript(
            """
            CREATE TABLE old_batches (seq INTEGER PRIMARY KEY, cls INTEGER NOT NULL,
                created_ms INTEGER NOT NULL, n_records INTEGER NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0, last_sent_ms INTEGER, payload BLOB);
            INSERT INTO old_batches SELECT seq, cls, created_ms, n_records, attempts,
                last_sent_ms, payload FROM batches;
            DROP TABLE batches;
            ALTER TABLE old_batches RENAME TO batches;
            """
        )
        db.execute("DELETE FROM kv WHERE key = 'batch_epoch'")
        db.execute("PRAGMA user_version = 2")  # the schema version such a database had
    ob = await Outbox.open(tmp_path / "gw.db")
    assert await ob.pending_batch(old.seq) == (LEGACY_EPOCH, old.payload)
    await ob.add_event(2, {"type": "new"})
    again = await ob.next_batch(2, pack=functools.partial(codec.pack, GW))
    assert again is not None and (again.seq, again.epoch) == (old.seq, LEGACY_EPOCH)
    new = await ob.next_batch(2, exclude=[old.seq], pack=functools.partial(codec.pack, GW))
    assert new is not None and new.seq == old.seq + 1 and new.epoch not in ("", old.epoch)
    await ob.close()


def _batch(codec: SealedCodec | JsonCodec, epoch: str, seq: int, records: Sequence[Record]) -> bytes:
    payload, n = codec.pack(GW, seq, records, 1 << 20, epoch=epoch)
    assert n == len(records)
    return payload


async def _store_all(store: HeadendDB | PostgresHeadendDB) -> None:
    """Epochs keep a restarted sequence apart; identical bytes are duplicates; other bytes
    under a known identity are a conflict; legacy batches keep (gateway, seq)."""
    plain = JsonCodec()

    def open_(payload: bytes) -> AnyBatch:
        return decode(payload, None, allow_plain=True)

    old_db = "0000000000000001"
    new_db = "0000000000000002"
    first = _batch(plain, old_db, 1, readings(1, 3))
    r = await store.store(open_(first), 1)
    assert (r.status, r.records_new) == ("stored", 3)
    assert (await store.store(open_(first), 2)).status == "duplicate"
    # A database recreated after a fault starts again at seq 1 and record id 1: stored.
    restarted = _batch(plain, new_db, 1, readings(1, 3))
    r = await store.store(open_(restarted), 3)
    assert (r.status, r.records_new, r.records_dup) == ("stored", 3, 0)
    # The same identity with other bytes (a database restored from a copy): a conflict.
    other = _batch(plain, new_db, 1, readings(1, 2))
    r = await store.store(open_(other), 4)
    assert (r.status, r.records_new) == ("conflict", 0)
    # The legacy form: seq 1 of the legacy epoch is the row the old database holds.
    legacy = _batch(plain, LEGACY_EPOCH, 1, events(2, 1))
    assert (await store.store(open_(legacy), 5)).status == "duplicate"
    legacy2 = _batch(plain, LEGACY_EPOCH, 2, events(3, 1))
    r = await store.store(open_(legacy2), 6)
    assert (r.status, r.records_new) == ("stored", 1)
    s = await store.summary(GW)
    assert s["readings"] == 1 + 3 + 3  # the migrated row, then both epochs' readings
    assert (s["duplicate_batches"], s["conflicting_batches"]) == (2, 1)


async def test_sqlite_headend_migrates_and_keys_on_the_epoch(tmp_path: Path) -> None:
    path = tmp_path / "central.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SQLITE)
    store = await HeadendDB.open(path)
    try:
        await _store_all(store)
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        batches = sorted(db.execute("SELECT epoch, seq, digest IS NULL FROM batches"))
        (ix,) = db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'readings_meter_time'").fetchone()
    assert batches == [
        ("", 1, 1),  # migrated row: no digest
        ("", 2, 0),
        ("0000000000000001", 1, 0),
        ("0000000000000002", 1, 0),
    ]
    assert ix == 1
    # Opening again changes nothing.
    store = await HeadendDB.open(path)
    assert (await store.summary(GW))["readings"] == 7
    await store.close()


async def test_postgres_headend_migrates_and_keys_on_the_epoch(pg_dsn: str) -> None:  # noqa: F811
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for stmt in filter(str.strip, OLD_PG.split(";")):
            conn.execute(stmt)
    store = await PostgresHeadendDB.open(pg_dsn)
    try:
        await _store_all(store)
    finally:
        await store.close()
    with psycopg.connect(pg_dsn) as conn:
        keys = conn.execute(
            "SELECT c.relname, pg_get_constraintdef(k.oid) FROM pg_constraint k"
            " JOIN pg_class c ON c.oid = k.conrelid"
            " WHERE k.contype = 'p' AND c.relnamespace = current_schema()::regnamespace ORDER BY 1"
        ).fetchall()
    # (central's tables, headend.central_db, are made new, not migrated)
    assert {k: v for k, v in keys if not k.startswith("central_")} == {
        "batches": "PRIMARY KEY (gateway_id, epoch, seq)",
        "counters": "PRIMARY KEY (name)",
        "events": "PRIMARY KEY (gateway_id, epoch, record_id)",
        "readings": "PRIMARY KEY (gateway_id, epoch, record_id)",
        "telemetry": "PRIMARY KEY (gateway_id, epoch, record_id)",
        # the caring reminders' queue (headend/notices.py), a new table
        "notify_queue": "PRIMARY KEY (id)",
        # the fleet view (headend/fleet.py), new tables
        "fleet_counters": "PRIMARY KEY (gateway_id, name)",
        "fleet_gateways": "PRIMARY KEY (gateway_id)",
        "fleet_meters": "PRIMARY KEY (gateway_id, meter_id)",
        "fleet_presence": "PRIMARY KEY (gateway_id)",
        "fleet_health": "PRIMARY KEY (gateway_id)",
    }
    store = await PostgresHeadendDB.open(pg_dsn)  # a second open finds nothing to do
    assert (await store.summary(GW))["readings"] == 7
    await store.close()


async def test_sneakernet_exports_name_the_epoch_and_old_exports_still_import(tmp_path: Path) -> None:
    site = Site(tmp_path)
    codec = site.codec(site.gateway(GW))
    registry = site.registry()
    ob = await Outbox.open(tmp_path / "gw.db")
    await ob.commit_cycle(1, [six_quantity_reading("m1", 1, 1)])
    n = await export_backlog(ob, tmp_path / "stick", pack=functools.partial(codec.pack, GW), gateway_id=GW)
    epoch = await ob.batch_epoch()
    await ob.close()
    manifest = orjson.loads((tmp_path / "stick" / "manifest.json").read_bytes())
    assert manifest["format"] == 2 and n == len(manifest["batches"]) == 2
    assert {(e["epoch"], e["file"]) for e in manifest["batches"]} == {
        (epoch, f"{GW}-{epoch}-{e['seq']:012d}.batch") for e in manifest["batches"]
    }
    hdb = await HeadendDB.open(tmp_path / "central.db")
    r = await import_backlog(hdb, tmp_path / "stick", key_lookup=registry.key_lookup, now_ms=1)
    assert (r.stored, r.refused) == (2, [])

    # A manifest that lists a batch under another identity than the batch itself has.
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "stick", bad)
    doc = orjson.loads((bad / "manifest.json").read_bytes())
    doc["batches"][0]["epoch"] = "0123456789abcdef"
    (bad / "manifest.json").write_bytes(orjson.dumps(doc))
    r = await import_backlog(hdb, bad, key_lookup=registry.key_lookup, now_ms=2)
    assert r.stored == 0 and len(r.refused) == 1 and "the manifest lists" in r.refused[0]

    # An export made before epochs (format 1, legacy batches): imported as before.
    old = tmp_path / "old"
    old.mkdir()
    payload = codec.pack(GW, 7, events(50, 2), 1 << 20, epoch=LEGACY_EPOCH)[0]
    (old / f"{GW}-{7:012d}.batch").write_bytes(payload)
    entry = {"seq": 7, "file": f"{GW}-{7:012d}.batch", "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (old / "manifest.json").write_bytes(orjson.dumps({"format": 1, "gateway_id": GW, "batches": [entry]}))
    r = await import_backlog(hdb, old, key_lookup=registry.key_lookup, now_ms=3)
    assert (r.stored, r.records_new, r.refused) == (1, 2, [])
    await hdb.close()
    with sqlite3.connect(tmp_path / "central.db") as db:
        got = sorted(db.execute("SELECT epoch, seq FROM batches"))
    assert got == sorted([("", 7), *((epoch, e["seq"]) for e in manifest["batches"])])


@pytest.mark.parametrize("fmt", [3, "2", None])
async def test_sneakernet_refuses_an_unknown_manifest_format(tmp_path: Path, fmt: object) -> None:
    from store_forward.sneakernet import SneakernetError

    (tmp_path / "manifest.json").write_bytes(orjson.dumps({"format": fmt, "gateway_id": GW, "batches": []}))
    hdb = await HeadendDB.open(tmp_path / "central.db")
    try:
        with pytest.raises(SneakernetError, match="unknown format"):
            await import_backlog(hdb, tmp_path, key_lookup=None, now_ms=1)
    finally:
        await hdb.close()

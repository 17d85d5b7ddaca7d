"""The headend's ingest path: a sealed batch decoded with its readings as rows
(store_forward.wire.decode_batch_rows) must store exactly what the record
decoder's batch stores — the same rows in the same tables and order, the same
duplicates, the same fleet update, notices and command results."""

from __future__ import annotations

import os
import random
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headend import fleet, notices
from headend.store import (
    HeadendDB,
    batch_row,
    batch_rows,
    fresh_of,
    fresh_records,
    new_entries,
    record_count,
)
from store_forward import wire
from store_forward.codec import decode, decode_rows
from store_forward.records import RecordClass
from store_forward.wire import (
    Compression,
    DecodedRows,
    WireError,
    WireRecord,
    decode_batch,
    decode_batch_rows,
    encode_batch,
)

KEY = bytes(range(32))
GW = "gw-rows"
EPOCH = "00112233aabbccdd"
BASE = 1_732_400_000_000


def lookup(gateway_id: str, key_id: int) -> bytes | None:
    return KEY if (gateway_id, key_id) == (GW, 5) else None


BILLING = int(RecordClass.BILLING)
TELEMETRY = int(RecordClass.TELEMETRY)
QUANTITIES = [
    "energy_import_kwh",
    "energy_export_kwh",
    "voltage_v",
    "current_a",
    "power_kw",
    "power_factor",
    "frequency_hz",
    "relay_open",
]

# Values the columns hold (every exponent, negative, zero, exponent notation), and a
# few they cannot (those readings travel as generic records, also kind "reading").
decimal_text = st.one_of(
    st.integers(0, 6).flatmap(lambda p: st.integers(0, 10**9).map(lambda c: str(Decimal(c).scaleb(-p)))),
    st.integers(-(10**9), 10**9).map(str),
    st.builds(lambda c, e: str(Decimal(f"{c}E{e}")), st.integers(-(10**12), 10**12), st.integers(-12, 12)),
)
odd_text = st.sampled_from(["-0.0", " 1.5", "NaN", "1e3", ""])


@st.composite
def reading(draw: st.DrawFn, meters: list[str], rid: int) -> WireRecord:
    meter = draw(st.sampled_from(meters))
    t = BASE + draw(st.integers(0, 96)) * 900_000 + draw(st.integers(-500, 500))
    names = draw(st.lists(st.sampled_from(QUANTITIES), unique=True, max_size=6))
    values = {n: draw(decimal_text) for n in names}
    if values and draw(st.integers(0, 19)) == 0:
        values[names[0]] = draw(odd_text)
    body: dict[str, Any] = {
        "m": meter,
        "t": t,
        "ts": draw(st.sampled_from(["system", "system", "meter", "central"])),
        "v": values,
    }
    if draw(st.booleans()):  # a quality map, sometimes empty, sometimes suspect flags
        flagged = draw(st.lists(st.sampled_from(names), unique=True, max_size=2)) if names else []
        body["q"] = {n: draw(st.sampled_from(["suspect", "invalid", "estimated \"x\""])) for n in flagged}
    cls = draw(st.sampled_from([BILLING, TELEMETRY, TELEMETRY, 0]))
    created = t + draw(st.integers(-100, 100)) if draw(st.booleans()) else draw(st.integers(0, 2**44))
    return WireRecord(rid, "reading", created, body, cls)


@st.composite
def other(draw: st.DrawFn, meters: list[str], rid: int) -> WireRecord:
    kind = draw(st.sampled_from(["event", "event", "charge", "health"]))
    created = BASE + draw(st.integers(0, 10**8))
    if kind == "event":
        body: dict[str, Any] = draw(
            st.sampled_from(
                [
                    {"type": "meter.offline", "meter": meters[0], "time_ms": created - 5},
                    {"type": "meter.online", "meter": meters[-1]},
                    {"type": "cutoff.action.trip", "account": "A-1", "meter": meters[0]},
                    {"type": "relay.alarm", "meter": meters[0]},
                    {"type": "balance.alarm1", "account": "A-2", "balance_micro": 5},
                    {"note": "no type"},
                ]
            )
        )
    elif kind == "charge":
        body = {"account": "A-1", "kind": "debit", "amount_micro": draw(st.integers(0, 10**9))}
    else:
        body = {"cpu": draw(st.integers(0, 100))}
    return WireRecord(rid, kind, created, body, draw(st.integers(0, 255)))


@st.composite
def batches(draw: st.DrawFn) -> list[WireRecord]:
    meters = [f"0000{410_000 + i:08d}" for i in range(draw(st.integers(1, 40)))]
    n = draw(st.integers(0, 60))
    rid = draw(st.integers(0, 2**40))
    out = []
    for _ in range(n):
        # mostly rising ids, sometimes a repeat or a jump
        step = draw(st.sampled_from([1, 1, 1, 1, 0, -3, 1000]))
        rid = max(0, rid + step)
        if draw(st.integers(0, 5)) == 0:
            out.append(draw(other(meters, rid)))
        else:
            out.append(draw(reading(meters, rid)))
    return out


def both(records: list[WireRecord], compression: Compression | None = None) -> tuple[Any, DecodedRows]:
    payload = encode_batch(GW, 41, records, epoch=EPOCH, key=KEY, key_id=5, compression=compression)
    return decode_batch(payload, lookup), decode_batch_rows(payload, lookup)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.sampled_from([None, *Compression]), st.data())
def test_rows_decoder_stores_what_the_record_decoder_stores(
    records: list[WireRecord], compression: Compression | None, data: st.DataObject
) -> None:
    by_records, by_rows = both(records, compression)
    assert list(by_records.records) == records  # (the record path is the reference)
    assert (by_rows.gateway_id, by_rows.seq, by_rows.epoch, by_rows.key_id, by_rows.digest) == (
        by_records.gateway_id,
        by_records.seq,
        by_records.epoch,
        by_records.key_id,
        by_records.digest,
    )
    assert record_count(by_rows) == record_count(by_records) == len(records)
    assert batch_row(by_rows, 7) == batch_row(by_records, 7)
    # the records that are not readings' rows come as the same records, at their positions
    in_rows = {p for p, _ in by_rows.others}
    assert all(by_records.records[p] == r for p, r in by_rows.others)
    assert len(by_rows.reading_rows) + len(in_rows) == len(records)

    a, b = batch_rows(by_records), batch_rows(by_rows)
    assert a.repeated == b.repeated
    assert a.tables.keys() == b.tables.keys()
    for table in a.tables:
        # the same rows, in batch order
        assert [e[2] for e in a.tables[table]] == [e[2] for e in b.tables[table]]
        assert a.ids(table) == b.ids(table)

    # whatever the tables already hold, the same records are new, with the same effects
    stored = {
        table: set(data.draw(st.lists(st.sampled_from(a.ids(table)), max_size=5))) if a.ids(table) else set()
        for table in a.tables
    }
    ins_a = [new_entries(es, stored[t]) for t, es in a.tables.items()]
    ins_b = [new_entries(es, stored[t]) for t, es in b.tables.items()]
    fresh_a, fresh_b = fresh_of(ins_a), fresh_of(ins_b)
    assert fresh_a.records == fresh_records(ins_a) and fresh_a.reading_times == []
    assert len(fresh_a) == len(fresh_b)
    assert fresh_b.records == [r for r in fresh_a.records if _at_any(r, by_records, in_rows)]
    u_a = fleet.fleet_update(GW, fresh_a.records, BASE, fresh_a.reading_times)
    u_b = fleet.fleet_update(GW, fresh_b.records, BASE, fresh_b.reading_times)
    assert u_a == u_b
    assert notices.notices_of(GW, EPOCH, fresh_a.records) == notices.notices_of(GW, EPOCH, fresh_b.records)


def _at_any(r: WireRecord, batch: Any, positions: set[int]) -> bool:
    """Whether record ``r`` of the record-decoded ``batch`` is at one of ``positions``."""
    return any(batch.records[p] is r for p in positions)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_rows_decoder_refuses_what_the_record_decoder_refuses(data: st.DataObject) -> None:
    """A body altered by the key's holder: both decoders fail (a WireError), or both
    decode, to the same rows."""
    rnd = random.Random(data.draw(st.integers(0, 2**32)))
    records = [
        *_backlog(rnd, meters=5, intervals=2),
        WireRecord(1, "event", BASE, {"type": "relay.alarm"}),
        WireRecord(2, "reading", BASE, {"m": "x", "t": BASE, "ts": "system", "v": {"voltage_v": "NaN"}}),
    ]
    plain = bytearray(wire._encode_plaintext([wire._analyse(r) for r in records]))
    for _ in range(data.draw(st.integers(1, 4))):
        plain[data.draw(st.integers(0, len(plain) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(plain)))
    payload = _seal_raw(bytes(plain[:cut]))
    try:
        by_records = decode_batch(payload, lookup)
    except WireError:
        with pytest.raises(WireError):
            decode_batch_rows(payload, lookup)
        return
    by_rows = decode_batch_rows(payload, lookup)
    a, b = batch_rows(by_records), batch_rows(by_rows)
    assert {t: [e[2] for e in es] for t, es in a.tables.items()} == {
        t: [e[2] for e in es] for t, es in b.tables.items()
    }


def _seal_raw(body: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    header = wire._header(GW, EPOCH, 1, 5, Compression.NONE)
    nonce = os.urandom(12)
    return header + nonce + AESGCM(KEY).encrypt(nonce, body, wire._AAD_LABEL + header)


def _backlog(rnd: random.Random, meters: int, intervals: int, rid: int = 1000) -> list[WireRecord]:
    """Billing and telemetry readings as a poller makes them, some suspect."""
    out = []
    for k in range(intervals):
        for i in range(meters):
            t = BASE + k * 900_000 + i * 1_100 + rnd.randint(0, 400)
            body: dict[str, Any] = {
                "m": f"m{i:03d}",
                "t": t,
                "ts": "system",
                "v": {"energy_import_kwh": f"{1000 + k * 0.37 + i:.2f}"},
            }
            out.append(WireRecord(rid, "reading", t + 3, body, BILLING))
            tele: dict[str, Any] = {
                "m": f"m{i:03d}",
                "t": t,
                "ts": "system",
                "v": {
                    "voltage_v": f"{rnd.uniform(215, 245):.1f}",
                    "current_a": f"{rnd.uniform(0, 40):.3f}",
                    "power_kw": f"{rnd.uniform(0, 9):.4f}",
                    "power_factor": f"{rnd.uniform(0.8, 0.99):.3f}",
                    "frequency_hz": f"{rnd.uniform(49.8, 50.2):.2f}",
                },
            }
            if rnd.random() < 0.1:
                tele["q"] = {"voltage_v": "suspect"}
            if rnd.random() < 0.1:
                del tele["v"]["frequency_hz"]  # a gap
            out.append(WireRecord(rid + 1, "reading", t + 4, tele, TELEMETRY))
            rid += 2
    return out


def test_the_ingest_decoder_gives_rows_for_sealed_batches_only() -> None:
    records = _backlog(random.Random(3), meters=3, intervals=2)
    payload = encode_batch(GW, 9, records, epoch=EPOCH, key=KEY, key_id=5)
    assert isinstance(decode_rows(payload, lookup, allow_plain=False), DecodedRows)
    assert decode(payload, lookup, allow_plain=False).records == tuple(records)


def _dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(path)
    try:
        names = [
            n
            for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            if not n.startswith("sqlite_")
        ]
        out = {}
        for n in names:  # every row with its rowid (in insertion order), where the table has one
            try:
                out[n] = conn.execute(f"SELECT rowid, * FROM {n} ORDER BY rowid").fetchall()
            except sqlite3.OperationalError:
                out[n] = conn.execute(f"SELECT * FROM {n} ORDER BY 1, 2, 3").fetchall()
        return out
    finally:
        conn.close()


async def test_both_paths_leave_the_same_sqlite_database(tmp_path: Path) -> None:
    """A drain with resends, overlapping batches, events and repeats, stored once from
    record-decoded batches and once from row-decoded ones: every table the same."""
    rnd = random.Random(11)
    records = _backlog(rnd, meters=30, intervals=6)
    events = [
        WireRecord(10**6 + i, "event", BASE + i, {"type": t, "account": "A-1", "meter": "m001"})
        for i, t in enumerate(["cutoff.action.trip", "meter.offline", "balance.alarm1", "relay.alarm"])
    ]
    for i, e in enumerate(events):
        records.insert(50 * (i + 1), e)
    payloads = []
    seq = 0
    pos = 0
    while pos < len(records):
        n = rnd.randint(20, 90)
        start = max(0, pos - rnd.choice([0, 0, 5]))  # sometimes overlapping the last batch
        part = records[start : pos + n]
        if rnd.random() < 0.2:
            part = part + part[:3]  # repeats within the batch
        seq += 1
        payloads.append(encode_batch(GW, seq, part, epoch=EPOCH, key=KEY, key_id=5))
        if rnd.random() < 0.2:
            payloads.append(payloads[-1])  # a resend
        pos += n
    results = {}
    for name, dec in (("records", decode_batch), ("rows", decode_batch_rows)):
        db = await HeadendDB.open(tmp_path / f"{name}.db")
        try:
            results[name] = [await db.store(dec(p, lookup), BASE + i) for i, p in enumerate(payloads)]
            summary = await db.summary()
        finally:
            await db.close()
        assert summary["readings"] > 0
    assert results["records"] == results["rows"]
    assert any(r.records_dup for r in results["rows"])
    assert any(r.status == "duplicate" for r in results["rows"])
    a, b = _dump(tmp_path / "records.db"), _dump(tmp_path / "rows.db")
    assert a.keys() == b.keys()
    for table in a:
        assert a[table] == b[table], table
    assert len(a["telemetry"]) > 0 and len(a["events"]) == len(events)

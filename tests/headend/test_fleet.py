"""The headend's fleet tables: what each stored batch changes, in SQLite and PostgreSQL,
and the metrics built from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from headend.fleet import fleet_update
from headend.metrics import HeadendMetrics
from headend.store import HeadendDB, HeadendStore
from store_forward.presence import parse
from store_forward.records import Record, RecordClass
from store_forward.wire_json import DecodedBatch
from tests.headend.test_headend_scaleout import pg_dsn

__all__ = ["pg_dsn"]  # the fixture, imported


def event(rid: int, body: dict[str, Any], created_ms: int = 1_000) -> Record:
    return Record(rid, RecordClass.EVENT, "event", created_ms, body)


def reading(rid: int, t: int) -> Record:
    return Record(rid, RecordClass.BILLING, "reading", t + 5, {"m": "m1", "t": t, "ts": "system", "v": {}})


def meter(rid: int, m: str, state: str, t: int) -> Record:
    return event(rid, {"type": f"meter.{state}", "meter": m, "time_ms": t})


def batch(seq: int, records: list[Record], gw: str = "gw-1") -> DecodedBatch:
    return DecodedBatch(gw, seq, tuple(records), epoch="e1")


def test_a_batch_updates_times_meters_and_counters() -> None:
    u = fleet_update(
        "gw-1",
        [
            reading(1, 10_000),
            meter(2, "m1", "offline", 20_000),
            meter(3, "m1", "quarantined", 30_000),
            meter(4, "m2", "online", 5_000),
            event(5, {"type": "cutoff.action.trip", "meter": "m1"}),
            event(6, {"type": "cutoff.action.close_allowed"}),
            event(7, {"type": "command_result", "outcome": "applied"}),
            event(8, {"type": "command_rejections", "count": 7}),
            event(9, {"type": "relay.alarm"}),
            event(10, {"type": "meter.offline"}),  # no meter: ignored
        ],
        received_ms=60_000,
    )
    assert (u.records, u.oldest_ms, u.newest_ms, u.lag_ms) == (10, 1_000, 10_000, 59_000)  # events: created
    assert {m: (s.state, s.since_ms) for m, s in u.meters.items()} == {
        "m1": ("quarantined", 30_000), "m2": ("online", 5_000),
    }  # fmt: skip
    assert dict(u.counts) == {
        "cutoffs": 1, "restores": 1, "command.applied": 1, "command.rejected": 7, "relay_alarms": 1,
    }  # fmt: skip


@given(st.lists(st.tuples(st.sampled_from(["online", "offline", "quarantined"]), st.integers(0, 100)), min_size=1, max_size=20))
def test_the_latest_transition_wins_whatever_the_order(transitions: list[tuple[str, int]]) -> None:
    records = [meter(i + 1, "m", s, t) for i, (s, t) in enumerate(transitions)]
    u = fleet_update("gw", records, 0)
    latest = max(t for _, t in transitions)
    assert u.meters["m"].since_ms == latest
    assert u.meters["m"].state in {s for s, t in transitions if t == latest}


async def exercise(store: HeadendStore) -> None:
    await store.store(batch(1, [reading(1, 10_000), meter(2, "m1", "offline", 20_000)]), 30_000)
    # the same batch again: a duplicate changes nothing
    await store.store(batch(1, [reading(1, 10_000), meter(2, "m1", "offline", 20_000)]), 31_000)
    # an older transition arriving later does not replace the newer one
    await store.store(batch(2, [meter(3, "m1", "online", 15_000), meter(4, "m2", "quarantined", 16_000)]), 40_000)
    await store.store(batch(3, [event(5, {"type": "cutoff.action.trip"}), event(6, {"type": "cutoff.action.trip"})]), 50_000)
    await store.store(batch(1, [reading(1, 99_000)], gw="gw-2"), 100_000)
    snap = await store.fleet()
    rows = {g.gateway: g for g in snap.gateways}
    assert (rows["gw-1"].last_batch_ms, rows["gw-1"].batches, rows["gw-1"].records) == (50_000, 3, 6)
    assert rows["gw-1"].newest_record_ms == 10_000 and rows["gw-1"].last_batch_lag_ms == 49_000
    assert (rows["gw-2"].newest_record_ms, rows["gw-2"].last_batch_lag_ms) == (99_000, 1_000)
    assert set(snap.meters) == {("gw-1", "offline", 1), ("gw-1", "quarantined", 1)}
    assert set(snap.counters) == {("gw-1", "cutoffs", 2)}

    m = HeadendMetrics(clock_ms=lambda: 120_000)
    for gw, payload in (("gw-1", b"online"), ("gw-2", b'{"state": "offline", "version": "0.2.0"}')):
        p = parse(payload)
        assert p is not None
        m.on_presence(gw, p)
    assert parse(b"garbage") is None  # not understood: the ingest logs it, nothing counted
    await m.refresh(store)
    m.on_batch("stored", 3)
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(generate_latest(m.registry).decode())
        for s in fam.samples
    }
    assert values[("edgegw_headend_gateways", (("state", "online"),))] == 1
    assert values[("edgegw_headend_gateways", (("state", "offline"),))] == 1
    assert values[("edgegw_headend_gateway_online", (("gateway", "gw-2"),))] == 0
    assert values[("edgegw_headend_meters", (("gateway", "gw-1"), ("state", "offline")))] == 1
    assert values[("edgegw_headend_meters", (("gateway", "gw-2"), ("state", "offline")))] == 0
    assert values[("edgegw_headend_cutoffs_total", (("gateway", "gw-1"),))] == 2
    assert values[("edgegw_headend_cutoffs_total", (("gateway", "gw-2"),))] == 0
    # backlog age: the larger of the last lag (49 s) and the time since the newest record (110 s)
    assert values[("edgegw_headend_gateway_backlog_age_seconds", (("gateway", "gw-1"),))] == 110
    assert values[("edgegw_headend_gateway_backlog_age_seconds", (("gateway", "gw-2"),))] == 21
    assert values[("edgegw_headend_batches_total", (("status", "stored"),))] == 1
    assert values[("edgegw_headend_records_stored_total", ())] == 3


async def test_fleet_tables_in_sqlite(tmp_path: Path) -> None:
    db = await HeadendDB.open(tmp_path / "central.db")
    try:
        await exercise(db)
    finally:
        await db.close()


async def test_fleet_tables_in_postgresql(pg_dsn: str) -> None:
    from headend.store_pg import PostgresHeadendDB

    db = await PostgresHeadendDB.open(pg_dsn)
    try:
        await exercise(db)
    finally:
        await db.close()


def test_presence_payloads() -> None:
    parsed = [parse(p) for p in (b"online", b"offline\n", b'{"status":"online"}', b"{", b"[1]", b"")]
    assert [None if p is None else p.online for p in parsed] == [True, False, True, None, None, None]

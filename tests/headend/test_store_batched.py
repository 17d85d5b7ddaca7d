"""A batch's records are stored in one statement per table (SQLite and PostgreSQL):
every record exactly once, whether it repeats a record stored by an earlier batch,
one earlier in the same batch, or one another headend is storing at that moment."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headend.store import HeadendDB, StoreResult, batch_rows, fresh_records, new_entries
from headend.store_pg import PostgresHeadendDB
from store_forward.records import RecordClass
from store_forward.wire import DecodedBatch, WireRecord
from tests.headend.test_headend_scaleout import pg_dsn  # noqa: F401 (fixture)

EPOCH = "0123456789abcdef"
T0 = 1_732_400_000_000

# What a record is: a billing reading, a telemetry reading or an event.
KINDS = ("billing", "telemetry", "event")
TABLE = {"billing": "readings", "telemetry": "telemetry", "event": "events"}


def record(kind: str, rid: int) -> WireRecord:
    if kind == "event":
        body: dict[str, Any] = {"type": "meter.offline", "meter": f"m{rid % 3}", "time_ms": T0 + rid}
        return WireRecord(rid, "event", T0 + rid, body, int(RecordClass.EVENT))
    cls = RecordClass.TELEMETRY if kind == "telemetry" else RecordClass.BILLING
    v = {"voltage": f"{220 + rid}.5"} if kind == "telemetry" else {"energy_import": f"{rid}.25"}
    body = {"m": f"m{rid % 3}", "t": T0 + rid * 1000, "ts": "system", "v": v}
    if rid % 4 == 0:
        body["q"] = {next(iter(v)): "suspect"}
    return WireRecord(rid, "reading", T0 + rid, body, int(cls))


def batch(gw: str, seq: int, items: list[tuple[str, int]]) -> DecodedBatch:
    recs = tuple(record(k, i) for k, i in items)
    return DecodedBatch(gw, seq, 1, recs, EPOCH, f"{gw}/{seq}/{items}".encode().ljust(32, b"."))


class Model:
    """What the store must do, one record at a time."""

    def __init__(self) -> None:
        self.stored: dict[tuple[str, int], int] = {}  # (table, id) -> seq of the batch that stored it
        self.batches: set[int] = set()

    def store(self, seq: int, items: list[tuple[str, int]]) -> StoreResult:
        if seq in self.batches:
            return StoreResult("duplicate", 0, 0)
        self.batches.add(seq)
        new = 0
        for kind, rid in items:
            key = (TABLE[kind], rid)
            if key not in self.stored:
                self.stored[key] = seq
                new += 1
        return StoreResult("stored", new, len(items) - new)


items_st = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(1, 25)), min_size=1, max_size=30)
# a scenario: batches in arrival order; None resends the batch before it (same seq, same bytes)
scenario_st = st.lists(st.one_of(items_st, st.none()), min_size=1, max_size=8)


def expand(scenario: list[list[tuple[str, int]] | None]) -> list[tuple[int, list[tuple[str, int]]]]:
    out: list[tuple[int, list[tuple[str, int]]]] = []
    for items in scenario:
        if items is None:
            if out:
                out.append(out[-1])
        else:
            out.append((len(out) + 1, items))
    return out


# --------------------------------------------------------------------------- the pure part


@given(items_st, st.sets(st.tuples(st.sampled_from(KINDS), st.integers(1, 25))))
def test_rows_of_a_batch_are_its_first_occurrences_not_yet_stored(
    items: list[tuple[str, int]], stored: set[tuple[str, int]]
) -> None:
    b = batch("gw", 1, items)
    rows = batch_rows(b)
    inserted = [
        new_entries(entries, {i for k, i in stored if TABLE[k] == table})
        for table, entries in rows.tables.items()
    ]
    fresh = [(TABLE[_kind_of(r)], r.id) for r in fresh_records(inserted)]
    before = {(TABLE[k], i) for k, i in stored}
    expected: list[tuple[str, int]] = []
    for kind, rid in items:
        key = (TABLE[kind], rid)
        if key not in expected and key not in before:
            expected.append(key)
    assert fresh == expected  # each once, in batch order
    firsts = {(TABLE[k], i) for k, i in items}
    assert rows.repeated == len(items) - len(firsts)
    for table, entries in rows.tables.items():
        assert [e[0] for e in entries] == sorted(e[0] for e in entries)
        assert all(e[2][1] == e[1].id and e[1] is b.records[e[0]] for e in entries)
        assert len({e[1].id for e in entries}) == len(entries)
        assert table in TABLE.values()


def _kind_of(r: WireRecord) -> str:
    if r.kind == "event":
        return "event"
    return "telemetry" if r.cls == int(RecordClass.TELEMETRY) else "billing"


# --------------------------------------------------------------------------- the stores


async def run_scenario(store: Any, gw: str, scenario: list[list[tuple[str, int]] | None]) -> None:
    model = Model()
    for seq, items in expand(scenario):
        got = await store.store(batch(gw, seq, items), T0 + 10_000_000)
        assert got == model.store(seq, items), (seq, items)
    assert await stored_rows(store, gw) == model.stored
    new_total = sum(1 for _ in model.stored)
    assert await fleet_records(store, gw) == (new_total or None)


async def stored_rows(store: Any, gw: str) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for table in ("readings", "telemetry", "events"):
        q = f"SELECT record_id, batch_seq FROM {table} WHERE gateway_id = ? AND epoch = ?"
        for rid, seq in await fetch(store, q, (gw, EPOCH)):
            assert (table, int(rid)) not in out
            out[(table, int(rid))] = int(seq)
    return out


async def fleet_records(store: Any, gw: str) -> int | None:
    rows = await fetch(store, "SELECT records FROM fleet_gateways WHERE gateway_id = ?", (gw,))
    return int(rows[0][0]) if rows else None


async def fetch(store: Any, q: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    if isinstance(store, PostgresHeadendDB):
        async with store._conn.transaction():
            cur = await store._conn.execute(q.replace("?", "%s"), args)
            return [tuple(r) for r in await cur.fetchall()]
    return [tuple(r) for r in await store._db.execute_fetchall(q, args)]


EXAMPLES = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@EXAMPLES
@given(scenario_st)
def test_sqlite_stores_each_record_once(tmp_path: Path, scenario: list[Any]) -> None:
    # one database for every example; each example is a gateway of its own
    async def go() -> None:
        db = await HeadendDB.open(tmp_path / "central.db")
        try:
            await run_scenario(db, f"gw-{secrets.token_hex(4)}", scenario)
        finally:
            await db.close()

    asyncio.run(go())


@EXAMPLES
@given(scenario_st)
def test_postgres_stores_each_record_once(pg_dsn: str, scenario: list[Any]) -> None:  # noqa: F811
    async def go() -> None:
        db = await PostgresHeadendDB.open(pg_dsn)
        try:
            await run_scenario(db, f"gw-{secrets.token_hex(4)}", scenario)
        finally:
            await db.close()

    asyncio.run(go())


SPARSE = [("billing", 1), ("telemetry", 2), ("billing", 10**9), ("event", 3), ("billing", 1)]


async def test_sqlite_sparse_ids_and_repeats(tmp_path: Path) -> None:
    # ids far apart (looked up one by one, not by range) and a repeat within the batch
    db = await HeadendDB.open(tmp_path / "central.db")
    try:
        await run_scenario(db, "gw-sparse", [SPARSE, [("billing", 10**9), ("billing", 5)], None])
    finally:
        await db.close()


async def test_postgres_sparse_ids_and_repeats(pg_dsn: str) -> None:  # noqa: F811
    db = await PostgresHeadendDB.open(pg_dsn)
    try:
        await run_scenario(db, "gw-sparse", [SPARSE, [("billing", 10**9), ("billing", 5)], None])
    finally:
        await db.close()


async def test_postgres_record_stored_meanwhile_by_another_headend(pg_dsn: str) -> None:  # noqa: F811
    # Another headend's transaction holds reading 5 uncommitted: this batch's insert waits
    # for it, then leaves reading 5 out (and counts it a duplicate), without an error.
    db = await PostgresHeadendDB.open(pg_dsn)
    other = await psycopg.AsyncConnection.connect(pg_dsn)
    try:
        async with other.transaction():
            await other.execute(
                "INSERT INTO readings (gateway_id, record_id, meter_id, time_ms, time_source,"
                " quantities, batch_seq, epoch) VALUES ('gw', 5, 'm2', 1, 'system', '{}', 99, %s)",
                (EPOCH,),
            )
            task = asyncio.create_task(db.store(batch("gw", 1, [("billing", i) for i in range(1, 11)]), T0))
            await asyncio.sleep(0.5)
            assert not task.done()  # waiting on the other transaction's row
        result = await asyncio.wait_for(task, 10)
        assert result == StoreResult("stored", 9, 1)
        rows = await stored_rows(db, "gw")
        assert rows == {("readings", i): (99 if i == 5 else 1) for i in range(1, 11)}
        assert await fleet_records(db, "gw") == 9
    finally:
        await other.close()
        await db.close()

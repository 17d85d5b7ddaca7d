"""Debit ids: derived from the charge, in time order, and ledgers holding ids of the
older form (written before ids were ordered by time) keep working.

The older form is ``debit:`` + sha256(meter, start reading id, end reading id)[:32];
the database of the previous release (tests/fixtures/previous_release) holds
only such ids.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path

import aiosqlite
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import storage_setup
from gateway.billing import ledger_store as ls
from gateway.billing import retention
from gateway.billing.ledger import (
    Entry,
    EntryKind,
    Ledger,
    LedgerConflict,
    adjustment_entry,
    debit_entry,
)
from gateway.billing.ledger_cache import LedgerCache
from gateway.billing.rating import (
    LEGACY_DEBIT_RANGE,
    RegisterReading,
    TierState,
    debit_id,
    is_legacy_debit_id,
    legacy_debit_id,
    rate_chain,
    rate_interval,
)
from gateway.billing.reconcile import CentralSnapshot, SnapshotStatus
from gateway.billing.tariff_file import load_book
from gateway.config import load_config
from gateway.database import open_database
from store_forward.outbox import Outbox
from tests.gateway.billing._util import FLAT, book, ms
from tests.gateway.test_previous_release import copy_site

FLAT_BOOK = book(FLAT)
T0 = ms("2026-03-02T00:00")
# ms since the epoch from 2001 to 2100: every time a gateway's clock can be trusted with
times = st.integers(min_value=978_307_200_000, max_value=4_102_444_800_000)
ids = st.text(st.characters(codec="utf-8", exclude_characters="\x1f"), min_size=1, max_size=24)


def reading(meter: str, rid: str, t: int, kwh: Decimal) -> RegisterReading:
    return RegisterReading(rid, meter, t, kwh)


# --------------------------------------------------------------------------- the form


@settings(max_examples=300, deadline=None)
@given(meter=ids, start=ids, end=ids, t=times)
def test_an_id_is_38_characters_of_the_new_form_and_keeps_the_older_id_s_hash(
    meter: str, start: str, end: str, t: int
) -> None:
    i = debit_id(meter, start, end, t)
    assert len(i) == 38 == len(legacy_debit_id(meter, start, end))
    assert i.startswith("debit:t") and int(i[7:18], 16) == t
    assert not is_legacy_debit_id(i) and is_legacy_debit_id(legacy_debit_id(meter, start, end))
    # the same hash: the first 20 of the older id's 32 hex digits
    assert i[18:] == legacy_debit_id(meter, start, end)[6:26]


@settings(max_examples=200, deadline=None)
@given(
    meter=st.sampled_from(["m1", "000001020304", "meter with spaces"]),
    t=st.lists(
        st.integers(min_value=T0, max_value=T0 + 86_400_000), min_size=2, max_size=2, unique=True
    ).map(sorted),
    kwh=st.lists(st.integers(min_value=0, max_value=500_000), min_size=2, max_size=2).map(sorted),
    rids=st.lists(ids, min_size=2, max_size=2, unique=True),
)
def test_rating_the_same_pair_again_gives_the_same_id(
    meter: str, t: list[int], kwh: list[int], rids: list[str]
) -> None:
    a = reading(meter, rids[0], t[0], Decimal(kwh[0]) / 100)
    b = reading(meter, rids[1], t[1], Decimal(kwh[1]) / 100)
    one, two = (
        rate_interval(a, b, FLAT_BOOK, TierState()),
        rate_interval(a, b, FLAT_BOOK, TierState(None, 12345)),
    )
    assert one.charge is not None and two.charge is not None
    assert one.charge.charge_id == two.charge.charge_id == debit_id(meter, rids[0], rids[1], t[1])
    assert debit_entry("acc", one.charge).entry_id == one.charge.charge_id


@settings(max_examples=300, deadline=None)
@given(
    pair=st.lists(st.tuples(ids, ids, ids), min_size=2, max_size=2, unique=True),
    t=times,
)
def test_ids_differ_when_the_meter_or_a_reading_differs(
    pair: list[tuple[str, str, str]], t: int
) -> None:
    (m1, s1, e1), (m2, s2, e2) = pair
    assert debit_id(m1, s1, e1, t) != debit_id(
        m2, s2, e2, t
    )  # same end time: the hash tells them apart


@settings(max_examples=300, deadline=None)
@given(
    a=st.tuples(ids, ids, ids),
    b=st.tuples(ids, ids, ids),
    t=st.lists(times, min_size=2, max_size=2, unique=True).map(sorted),
)
def test_ids_sort_by_end_time_whatever_the_meter(
    a: tuple[str, str, str], b: tuple[str, str, str], t: list[int]
) -> None:
    assert debit_id(*a, t[0]) < debit_id(*b, t[1])


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(1, 3_600_000), st.integers(0, 500)), min_size=1, max_size=30
    )
)
def test_the_debits_of_a_meter_sort_as_they_were_rated(steps: list[tuple[int, int]]) -> None:
    t, kwh, chain = T0, Decimal("100.00"), [reading("m1", "r0", T0, Decimal("100.00"))]
    for i, (dt, dk) in enumerate(steps, 1):
        t, kwh = t + dt, kwh + Decimal(dk) / 100
        chain.append(reading("m1", f"r{i}", t, kwh))
    results, _ = rate_chain(chain, FLAT_BOOK, TierState())
    charged = [r.charge.charge_id for r in results if r.charge is not None]
    assert len(charged) == len(steps)
    assert charged == sorted(charged) and len(set(charged)) == len(charged)


def test_times_outside_the_eleven_digits_are_clamped_and_stay_distinct() -> None:
    low, high = debit_id("m", "a", "b", -5), debit_id("m", "a", "b", 16**11 + 7)
    assert low == debit_id("m", "a", "b", 0) and low[7:18] == "0" * 11
    assert high == debit_id("m", "a", "b", 16**11 - 1) and high[7:18] == "f" * 11
    assert debit_id("m", "a", "c", 16**11 + 7) != high
    assert len(low) == len(high) == 38


def test_the_older_form_sorts_apart_from_every_new_id_and_every_other_kind() -> None:
    lo, hi = LEGACY_DEBIT_RANGE
    others = ["adjust:x", "fixed:acc:flat:standing:1", "snapshot:acc:3", "topup:sale-1",
              debit_id("m", "a", "b", 0), debit_id("m", "a", "b", 16**11 - 1)]  # fmt: skip
    assert not any(lo <= o < hi for o in others)
    assert all(lo <= legacy_debit_id("m", str(i), str(i + 1)) < hi for i in range(200))


# --------------------------------------------------------------------------- a ledger of old ids


def legacy(entry: Entry) -> Entry:
    """``entry`` as the release before time-ordered ids recorded it."""
    b = entry.body
    return replace(
        entry, entry_id=legacy_debit_id(b["meter"], b["start_reading_id"], b["end_reading_id"])
    )


def test_the_in_memory_ledger_finds_a_pair_recorded_under_its_older_id() -> None:
    a, b = (
        reading("m1", "1", T0, Decimal("10.00")),
        reading("m1", "2", T0 + 60_000, Decimal("10.50")),
    )
    r = rate_interval(a, b, FLAT_BOOK, TierState())
    assert r.charge is not None
    led = Ledger("acc")
    old = led.append(legacy(debit_entry("acc", r.charge)))
    again = led.append(debit_entry("acc", r.charge))
    assert not again.applied and again.entry == old.entry and len(led.entries) == 1
    other = rate_interval(a, replace(b, import_kwh=Decimal("10.60")), FLAT_BOOK, TierState())
    assert other.charge is not None
    with pytest.raises(LedgerConflict, match=old.entry.entry_id):
        led.append(debit_entry("acc", other.charge))
    assert led.refold() == led.view and len(led.entries) == 1


async def open_fixture(tmp: Path) -> tuple[Path, Outbox]:
    """A copy of the previous release's site, its database opened (and migrated)."""
    site = copy_site(tmp)
    cfg = load_config(site / "gateway.toml")
    return site, await open_database(site / "gw.db", keys=storage_setup.storage_keys(cfg))


@dataclass(frozen=True)
class Stored:
    account: str
    entry_id: str
    seq: int
    start: RegisterReading
    end: RegisterReading


def last_pair(db: Path, meter: str) -> Stored:
    """The meter's newest debit in the fixture and its two readings (the end one is the
    meter's baseline; the start register is that less the energy debited)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        acc, eid, seq, b = next(
            (acc, eid, seq, b)
            for acc, eid, seq, body in conn.execute(
                "SELECT account, entry_id, seq, body FROM billing_entry WHERE kind = 'debit' ORDER BY seq DESC"
            )
            if (b := ls.body_from_column(body, eid))["meter"] == meter
        )
        rid, t, kwh = conn.execute(
            "SELECT reading_id, time_ms, import_kwh FROM billing_baseline WHERE meter = ?", (meter,)
        ).fetchone()
    assert (b["end_reading_id"], b["end_ms"]) == (rid, t)
    end = reading(meter, rid, t, Decimal(kwh))
    start = reading(
        meter, b["start_reading_id"], b["start_ms"], end.import_kwh - Decimal(b["ckwh"]) / 100
    )
    return Stored(str(acc), str(eid), int(seq), start, end)


def debit_ids(db: Path) -> list[tuple[str, int, str]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return [(str(a), int(s), str(e)) for a, s, e in conn.execute(
            "SELECT account, seq, entry_id FROM billing_entry WHERE kind = 'debit' ORDER BY account, seq"
        )]  # fmt: skip


@pytest.mark.parametrize("cached", [True, False], ids=["daemon-cache", "store"])
async def test_a_ledger_of_the_previous_release_refuses_a_pair_rated_again(
    tmp_path: Path, cached: bool
) -> None:
    site, ob = await open_fixture(tmp_path)
    db = site / "gw.db"
    flat = load_book([site / "flat.toml"])  # version 1: what those debits were rated by
    before = debit_ids(db)
    assert before and all(is_legacy_debit_id(e) for _, _, e in before)
    cache = LedgerCache()

    async def rate(conn: aiosqlite.Connection, account: str, r: RegisterReading) -> ls.RatedReading:
        if cached:
            return await cache.rate(conn, account, r, flat)
        return await ls.rate_reading(conn, account, r, flat)

    try:
        for meter in ("m001", "m002"):
            p = last_pair(db, meter)
            held = debit_ids(db)
            async with ob.transaction() as conn:
                balance = (await ls.verify(conn, p.account)).balance_micro
            # the baseline is moved back to the pair's start, and its end reading comes again
            async with ob.transaction() as conn:
                await ls.set_baseline(conn, p.account, p.start)
                cache.forget()
                out = await rate(conn, p.account, p.end)
                assert out.appended is not None and not out.appended.applied
                assert (out.appended.entry.entry_id, out.appended.entry.seq) == (p.entry_id, p.seq)
                assert out.view.balance_micro == balance
                await cache.flush(conn)
            # with different registers the same pair is a conflict, and nothing is written
            with pytest.raises(LedgerConflict, match=p.entry_id):
                async with ob.transaction() as conn:
                    await ls.set_baseline(conn, p.account, p.start)
                    cache.forget()
                    await rate(
                        conn,
                        p.account,
                        replace(p.end, import_kwh=p.end.import_kwh + Decimal("0.05")),
                    )
            cache.forget()
            assert debit_ids(db) == held
            # the next reading is debited under a new id, after every id of its time
            nxt = reading(
                meter, "after-upgrade", p.end.time_ms + 60_000, p.end.import_kwh + Decimal("0.10")
            )
            async with ob.transaction() as conn:
                out = await rate(conn, p.account, nxt)
                await cache.flush(conn)
            assert out.appended is not None and out.appended.applied
            new = out.appended.entry
            assert new.entry_id == debit_id(meter, p.end.reading_id, "after-upgrade", nxt.time_ms)
            assert new.seq > p.seq and out.view.balance_micro == balance - 56_000
            async with ob.transaction() as conn:
                assert (await ls.verify(conn, p.account)).balance_micro == balance - 56_000
                # and rating it again is a duplicate under its own id
                await ls.set_baseline(conn, p.account, p.end)
                cache.forget()
                again = await rate(conn, p.account, nxt)
                assert again.appended is not None and not again.appended.applied
                assert again.appended.entry.entry_id == new.entry_id
    finally:
        await ob.close()
    after = debit_ids(db)
    assert set(before) < set(after) and len(after) == len(before) + 2


async def test_snapshots_and_retention_match_the_older_ids(tmp_path: Path) -> None:
    site, ob = await open_fixture(tmp_path)
    db = site / "gw.db"
    flat = load_book([site / "flat.toml"])
    p = last_pair(db, "m001")
    try:
        async with ob.transaction() as conn:
            view = await ls.verify(conn, p.account)
            older = [e for e in await ls.entries(conn, p.account) if e.kind is EntryKind.DEBIT]
            # central counted the newest old debit in its balance as of the seq before it
            as_of = p.seq - 1
            upto = sum(e.amount_micro for e in await ls.entries(conn, p.account) if e.seq <= as_of)
            debited = next(e for e in older if e.entry_id == p.entry_id)
            snap = CentralSnapshot(
                "snap-1", p.account, 1, as_of, upto + debited.amount_micro, p.end.time_ms + 1000,
                included_ids=frozenset({p.entry_id}), purchase_counter=view.purchase_counter,
            )  # fmt: skip
            decision = await ls.apply_snapshot(conn, snap)
            assert decision.status is SnapshotStatus.APPLIED
            assert (await ls.verify(conn, p.account)).balance_micro == view.balance_micro
        cache = LedgerCache()
        nxt = reading(
            "m001", "after-upgrade", p.end.time_ms + 60_000, p.end.import_kwh + Decimal("0.10")
        )
        async with ob.transaction() as conn:
            out = await cache.rate(conn, p.account, nxt, flat)
            await cache.flush(conn)
        assert out.appended is not None and out.appended.applied
        async with ob.transaction() as conn:
            assert (await ls.verify(conn, p.account)).balance_micro == view.balance_micro - 56_000
            # retention lets the old debits go (central acknowledged everything, long ago)
            top = (await (await conn.execute("SELECT max(rowid) FROM billing_entry")).fetchone())[0]
            state = retention.RetentionState(acked_rowid=top)
            pruned = await retention.prune_account_in(
                conn, p.account, state, out.appended.entry.time_ms + 1, 0
            )
            assert pruned.entries > 0
            left = [e for e in await ls.entries(conn, p.account) if e.kind is EntryKind.DEBIT]
            assert not any(is_legacy_debit_id(e.entry_id) for e in left if e.seq <= as_of)
            assert (await ls.verify(conn, p.account)).balance_micro == view.balance_micro - 56_000
    finally:
        await ob.close()


async def test_the_daemon_cache_looks_for_older_ids_only_in_a_ledger_that_holds_them(
    tmp_path: Path,
) -> None:
    ob = await open_database(tmp_path / "gw.db")
    statements: list[str] = []
    cache = LedgerCache()
    kwh = Decimal("100.00")
    try:
        conn = ob._db  # the outbox's one connection (statements of the transactions below)
        await conn.set_trace_callback(statements.append)

        async def rate(i: int) -> ls.RatedReading:
            async with ob.transaction() as c:
                out = await cache.rate(
                    c, "acc", reading("m1", str(i), T0 + i * 60_000, kwh + i), FLAT_BOOK
                )
                await cache.flush(c)
            return out

        for i in range(5):
            await rate(i)
        # (the cache also looks once for the highest time-ordered id: "entry_id >= 'debit:t'")
        probes = [s for s in statements if "entry_id >= 'debit:0'" in s]
        lookups = [s for s in statements if "WHERE entry_id = " in s]
        assert (
            len(probes) == 1 and not lookups
        )  # one look for older ids, none found: none looked up
        # a debit of the older form written to this ledger (as a restored one may hold)
        a, b = reading("m2", "x", T0, Decimal(1)), reading("m2", "y", T0 + 60_000, Decimal(2))
        r = rate_interval(a, b, FLAT_BOOK, TierState())
        assert r.charge is not None
        async with ob.transaction() as c:
            await cache.append(c, legacy(debit_entry("acc", r.charge)))
            again = await cache.append(c, debit_entry("acc", r.charge))
            await cache.flush(c)
        assert not again.applied and is_legacy_debit_id(again.entry.entry_id)
        statements.clear()
        cache.forget()  # as after a rollback: looked for again, and found
        await rate(5)
        assert len([s for s in statements if "entry_id >= 'debit:0'" in s]) == 1
        assert len([s for s in statements if "WHERE entry_id = " in s]) == 1
    finally:
        await ob.close()


# --------------------------------------------------------------------------- debits that wait for flush


def one_debit() -> Entry:
    """The debit of one reading pair of meter m1 on account acc."""
    a, b = reading("m1", "x", T0, Decimal(1)), reading("m1", "y", T0 + 60_000, Decimal(2))
    r = rate_interval(a, b, FLAT_BOOK, TierState())
    assert r.charge is not None
    return debit_entry("acc", r.charge)


async def test_a_new_reading_s_debit_goes_in_with_the_views_in_append_order(tmp_path: Path) -> None:
    """A debit above every time-ordered id waits for flush (no look-up, no insert of
    its own); an entry of another kind appended after it puts the waiting ones in
    first, so rowids follow the order of appending."""
    ob = await open_database(tmp_path / "gw.db")
    statements: list[str] = []
    cache = LedgerCache()
    try:
        conn = ob._db
        await conn.set_trace_callback(statements.append)
        async with ob.transaction() as c:
            for m in ("m1", "m2"):
                await cache.rate(c, "acc", reading(m, f"{m}-0", T0, Decimal("10.00")), FLAT_BOOK)
            await cache.flush(c)
        statements.clear()
        async with ob.transaction() as c:
            a = await cache.rate(c, "acc", reading("m1", "m1-1", T0 + 60_000, Decimal("11.00")), FLAT_BOOK)
            b = await cache.rate(c, "acc", reading("m2", "m2-1", T0 + 61_000, Decimal("10.50")), FLAT_BOOK)
            assert a.appended is not None and a.appended.applied and a.appended.entry.seq == 1
            assert b.appended is not None and b.appended.applied and b.appended.entry.seq == 2
            assert not [s for s in statements if "INSERT INTO billing_entry" in s]  # both wait
            assert not [s for s in statements if "WHERE entry_id = " in s]  # nothing looked up
            assert cache.pending
            adj = await cache.append(c, adjustment_entry("a1", "acc", 5_000_000, T0 + 62_000, "test", "op"))
            assert adj.applied and adj.entry.seq == 3
            inserts = [s for s in statements if "INSERT INTO billing_entry" in s]
            # the two debits (one statement, executemany), then the adjustment
            assert len(inserts) == 3 and "adjust:a1" in inserts[-1]
            await cache.flush(c)
            assert not cache.pending
        async with conn.execute("SELECT seq, entry_id FROM billing_entry ORDER BY rowid") as cur:
            rows = [tuple(r) for r in await cur.fetchall()]
        assert [s for s, _ in rows] == [1, 2, 3]
        assert rows[0][1] == a.appended.entry.entry_id and rows[1][1] == b.appended.entry.entry_id
        # what the cache says is what the ledger folds to
        async with ob.transaction() as c:
            stored = await ls.load_view(c, "acc")
        assert stored == cache._views["acc"]
    finally:
        await ob.close()


async def test_a_debit_at_or_below_the_highest_id_is_looked_up_and_not_debited_twice(tmp_path: Path) -> None:
    """The same pair rated again in the same transaction (its id no longer above every
    one): the waiting debit goes in first and the second append finds it."""
    ob = await open_database(tmp_path / "gw.db")
    cache = LedgerCache()
    try:
        async with ob.transaction() as c:
            first = await cache.append(c, one_debit())
            again = await cache.append(c, one_debit())
            await cache.flush(c)
        assert first.applied and not again.applied and again.entry == first.entry
        async with ob.transaction() as c:
            async with c.execute("SELECT count(*) FROM billing_entry") as cur:
                assert (await cur.fetchone()) == (1,)
            assert (await ls.load_view(c, "acc")).balance_micro == cache._views["acc"].balance_micro
    finally:
        await ob.close()


async def test_a_debit_written_behind_the_cache_s_back_fails_the_transaction(tmp_path: Path) -> None:
    """The cache's ceiling holds only while it is the ledger's one writer. Were a debit
    with a higher id written around it, the waiting copy fails the transaction at
    flush (a plain INSERT): never skipped, never counted twice."""
    ob = await open_database(tmp_path / "gw.db")
    cache = LedgerCache()
    try:
        entry = one_debit()
        async with ob.transaction() as c:
            await cache.view(c, "acc")
            assert await cache._above_every_debit(c, entry.entry_id)  # ceiling looked up: none
            await c.execute(ls.INSERT_ENTRY_SQL, ls.entry_params(replace(entry, seq=1)))
        with pytest.raises(sqlite3.IntegrityError):
            async with ob.transaction() as c:
                await cache.append(c, entry)
                await cache.flush(c)
        cache.forget()
        async with ob.transaction() as c:
            again = await cache.append(c, entry)  # looked up afresh: found
            await cache.flush(c)
        assert not again.applied
    finally:
        await ob.close()

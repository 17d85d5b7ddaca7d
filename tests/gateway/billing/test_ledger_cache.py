"""The daemon's cached ledger writes what the uncached ledger store writes.

Two real SQLite databases receive the same random story — readings (rising,
repeated, running backwards), fixed-charge scans, top-ups, cutoff state
changes, and transactions that roll back — one through
:mod:`gateway.billing.ledger_store` directly, one through
:class:`gateway.billing.ledger_cache.LedgerCache`. After every transaction
the ledgers, account rows and baselines must be identical (the scan position
of fixed charges may lag by design until it is persisted), and the cached
side's views must equal a full fold of its entries.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.billing import ledger_store as ls
from gateway.billing.cutoff import CutoffState, Level
from gateway.billing.ledger import EntryKind, LedgerConflict, adjustment_entry
from gateway.billing.ledger_cache import LedgerCache
from gateway.billing.rating import MeterReplacement, RegisterReading, ReplacementError
from gateway.billing.tariff import TariffBook
from gateway.billing.topup import Channel, Source, TopUp, TopUpPolicy
from tests.gateway.billing._util import FLAT, book, ms

DAILY = """
id = "daily"
version = 1
effective_from = "2026-01-01"
price = "0.9500"
[[fixed]]
name = "standing"
period = "daily"
amount = "0.2000"
"""

T0 = ms("2026-03-01T23:00")
METERS = {"m1": "acc-a", "m2": "acc-a", "m3": "acc-b"}
BOOKS = {"acc-a": book(DAILY), "acc-b": book(FLAT)}

op = st.one_of(
    st.tuples(
        st.just("read"),
        st.sampled_from(sorted(METERS)),
        # register step in 0.001 kWh (negative: backwards; -60 kWh: a register reset)
        st.one_of(st.integers(-200, 5_000), st.just(-60_000)),
        st.booleans(),  # repeat the previous reading id
    ),
    st.tuples(st.just("fixed"), st.sampled_from(sorted(BOOKS))),
    # a declared replacement: old final = register + x, new initial y (0.01 kWh)
    st.tuples(st.just("replace"), st.sampled_from(sorted(METERS)), st.integers(-100, 300), st.integers(0, 500)),
    st.tuples(st.just("topup"), st.sampled_from(sorted(BOOKS)), st.integers(1, 50_000_000)),
    st.tuples(st.just("cutoff"), st.sampled_from(sorted(BOOKS)), st.sampled_from(list(Level))),
)
transaction = st.tuples(st.lists(op, min_size=1, max_size=8), st.booleans())  # ops, roll back


async def _rows(db: aiosqlite.Connection) -> dict[str, list[Any]]:
    out = {}
    for table, cols in (
        ("billing_entry", "*"),
        ("billing_account", "account, balance_micro, last_seq, purchase_counter, tier_period_start_ms,"
         " tier_cumulative_ckwh, snapshot_seq, cutoff_state"),
        ("billing_baseline", "*"),
        ("billing_meter_reset", "*"),
    ):
        async with db.execute(f"SELECT {cols} FROM {table} ORDER BY 1, 2") as cur:
            out[table] = [tuple(r) for r in await cur.fetchall()]
    return out


class Story:
    """Drives both databases with the same operations."""

    def __init__(self, plain: aiosqlite.Connection, cached: aiosqlite.Connection) -> None:
        self.plain, self.cached = plain, cached
        self.cache = LedgerCache()
        self.now = T0
        self.kwh = dict.fromkeys(METERS, Decimal("100"))
        self.last_id: dict[str, str] = {}
        self.n = 0
        self.counters = dict.fromkeys(BOOKS, 0)

    async def step(self, o: tuple[Any, ...]) -> None:
        self.now += 3_600_000  # an hour per operation: fixed charges fall due across days
        if o[0] == "read":
            _, meter, step, repeat = o
            if repeat and meter in self.last_id:
                rid = self.last_id[meter]
            else:
                self.n += 1
                rid = self.last_id[meter] = str(self.n)
                self.kwh[meter] += Decimal(step) / 1000
            r = RegisterReading(rid, meter, self.now, self.kwh[meter], {})
            acct = METERS[meter]
            a = await ls.rate_reading(self.plain, acct, r, BOOKS[acct])
            b = await self.cache.rate(self.cached, acct, r, BOOKS[acct])
            assert a.view == b.view
            assert a.reset == b.reset
            if a.reset is not None:
                event("undeclared register reset")
            assert (a.appended is None) == (b.appended is None)
            if a.appended and b.appended:
                assert a.appended.entry == b.appended.entry
        elif o[0] == "replace":
            _, meter, extra, new_initial = o
            acct = METERS[meter]
            rep = MeterReplacement(f"rep-{self.n}", meter, self.now, self.kwh[meter] + Decimal(extra) / 100,
                                   Decimal(new_initial) / 100)
            outcome = []
            for f in (lambda: ls.record_meter_replacement(self.plain, acct, rep, BOOKS[acct]),
                      lambda: self.cache.replace_meter(self.cached, acct, rep, BOOKS[acct])):
                try:
                    res = await f()
                    outcome.append(([x.entry for x in res.appended], res.view))
                except ReplacementError as exc:
                    outcome.append((exc.code, None))
            assert outcome[0] == outcome[1]
            if outcome[0][1] is not None:
                self.kwh[meter] = Decimal(new_initial) / 100
                self.last_id[meter] = rep.new_initial.reading_id
            self.n += 1
        elif o[0] == "fixed":
            acct = o[1]
            a2 = await ls.charge_fixed(self.plain, acct, BOOKS[acct], self.now)
            b2 = await self.cache.charge_fixed(self.cached, acct, BOOKS[acct], self.now)
            assert [x.entry for x in a2] == [x.entry for x in b2]
        elif o[0] == "topup":
            _, acct, amount = o
            self.counters[acct] += 1
            t = TopUp(f"pay-{self.n}-{self.counters[acct]}", acct, self.counters[acct], amount,
                      Channel.BANK, Source.MQTT, self.now)
            da = await ls.apply_topup(self.plain, t, TopUpPolicy(), self.now)
            # What the daemon does around the uncached path: flush, write, forget.
            await self.cache.flush(self.cached)
            db = await ls.apply_topup(self.cached, t, TopUpPolicy(), self.now)
            self.cache.forget_account(acct)
            assert da == db
        else:
            _, acct, level = o
            s = replace(CutoffState(), level=level)
            await ls.save_cutoff_state(self.plain, acct, s)
            await self.cache.save_cutoff_state(self.cached, acct, s)
            assert await self.cache.cutoff_state(self.cached, acct) == s

    async def transaction(self, ops: list[tuple[Any, ...]], roll_back: bool) -> None:
        for db in (self.plain, self.cached):
            await db.execute("BEGIN IMMEDIATE")
        saved = (self.now, dict(self.kwh), dict(self.last_id), self.n, dict(self.counters))
        for o in ops:
            await self.step(o)
        if roll_back:
            for db in (self.plain, self.cached):
                await db.rollback()
            self.cache.forget()
            self.now, self.kwh, self.last_id, self.n, self.counters = saved
            self.now += 1
        else:
            await self.cache.flush(self.cached)
            assert not self.cache.pending
            for db in (self.plain, self.cached):
                await db.commit()
        assert await _rows(self.plain) == await _rows(self.cached)
        for acct in BOOKS:
            assert await ls.verify(self.cached, acct) == await self.cache.view(self.cached, acct)


async def _run(tmp: Path, txs: list[tuple[list[tuple[Any, ...]], bool]]) -> None:
    async with (
        aiosqlite.connect(tmp / "plain.db", isolation_level=None) as plain,
        aiosqlite.connect(tmp / "cached.db", isolation_level=None) as cached,
    ):
        for db in (plain, cached):
            await ls.init_schema(db)
            await db.commit()
        for db in (plain, cached):  # as the daemon does at start
            await db.execute("PRAGMA synchronous = OFF")  # no crash here: spare the fsyncs
            await ls.init_schema(db)
            for acct in BOOKS:
                await ls.open_account(db, acct)
        story = Story(plain, cached)
        for ops, roll_back in txs:
            await story.transaction(ops, roll_back)
        # The stored scan position may lag behind the uncached store's; a later scan
        # (as after a restart, from the stored position) still raises the same charges.
        for acct in BOOKS:
            await story.cache.persist_fixed_until(cached, acct)
            c, p = await ls.load_fixed_until(cached, acct), await ls.load_fixed_until(plain, acct)
            assert (c is None) == (p is None) and (c is None or p is None or c <= p)
        # A restart: the cache warmed in bulk holds what was stored.
        story.cache = LedgerCache()
        await story.cache.warm(cached, list(BOOKS))
        for acct in BOOKS:
            assert await story.cache.view(cached, acct) == await ls.load_view(cached, acct)
            assert await story.cache.cutoff_state(cached, acct) == await ls.load_cutoff_state(cached, acct)
        for meter in METERS:
            assert await story.cache.baseline(cached, meter) == await ls.get_baseline(cached, meter)
            assert await story.cache.track(cached, meter) == await ls.get_track(cached, meter)
        await story.transaction([("fixed", acct) for acct in BOOKS], False)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(txs=st.lists(transaction, min_size=1, max_size=6))
def test_cached_ledger_writes_what_the_ledger_store_writes(tmp_path_factory: pytest.TempPathFactory,
                                                           txs: list[tuple[list[tuple[Any, ...]], bool]]) -> None:
    asyncio.run(_run(tmp_path_factory.mktemp("cache"), txs))


async def test_fixed_charges_after_a_lagging_scan_position_are_raised_once(tmp_path: Path) -> None:
    """Between charges the stored scan position lags; a restart rescans without double charges."""
    daily: TariffBook = book(DAILY)
    async with aiosqlite.connect(tmp_path / "g.db") as db:
        await ls.init_schema(db)
        cache = LedgerCache()
        t = ms("2026-03-01T12:00")
        assert await cache.charge_fixed(db, "acc", daily, t) == []  # first scan: starting point
        for h in range(1, 30):  # through midnight: one daily charge
            await cache.charge_fixed(db, "acc", daily, t + h * 3_600_000)
        await cache.flush(db)
        await db.commit()
        fixed = [e for e in await ls.entries(db, "acc") if e.kind is EntryKind.FIXED]
        assert len(fixed) == 1
        stored = await ls.load_fixed_until(db, "acc")
        assert stored is not None and stored < t + 29 * 3_600_000  # lagging: no write per scan
        restarted = LedgerCache()
        assert [r.applied for r in await restarted.charge_fixed(db, "acc", daily, t + 30 * 3_600_000)] == []
        await db.commit()
        assert len([e for e in await ls.entries(db, "acc") if e.kind is EntryKind.FIXED]) == 1


async def test_append_compares_an_existing_id_like_the_store(tmp_path: Path) -> None:
    async with aiosqlite.connect(tmp_path / "g.db") as db:
        await ls.init_schema(db)
        cache = LedgerCache()
        e = adjustment_entry("adj-1", "acc", 5_000_000, T0, "goodwill", "central")
        first = await cache.append(db, e)
        again = await cache.append(db, e)
        assert first.applied and not again.applied and again.entry.seq == 1
        with pytest.raises(LedgerConflict):
            await cache.append(db, replace(e, amount_micro=1))
        await cache.flush(db)
        await db.commit()
        assert (await ls.load_view(db, "acc")).balance_micro == 5_000_000


async def test_forgetting_an_account_with_unflushed_changes_is_refused(tmp_path: Path) -> None:
    async with aiosqlite.connect(tmp_path / "g.db") as db:
        await ls.init_schema(db)
        cache = LedgerCache()
        await cache.append(db, adjustment_entry("adj-1", "acc", 1, T0, "x", "central"))
        with pytest.raises(RuntimeError, match="unflushed"):
            cache.forget_account("acc")

"""Property: the SQLite store applies exactly the rules of the in-memory ledger.

Random streams of readings, top-ups (including duplicates and bad counters),
adjustments and snapshots go through ``ledger_store`` and through the pure
``Ledger``/decision functions; decisions, entries and views must agree, and
the stored view must equal a full fold.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

import aiosqlite
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.billing import ledger_store as ls
from gateway.billing.ledger import Ledger, adjustment_entry, debit_entry
from gateway.billing.rating import RegisterReading, rate_interval
from gateway.billing.reconcile import CentralSnapshot, decide_snapshot
from gateway.billing.topup import Channel, Source, TopUp, TopUpPolicy, decide_topup
from tests.gateway.billing._util import FLAT_TIER, book, ms

BOOK = book(FLAT_TIER)
T0 = ms("2026-12-30T00:00")  # streams cross the annual settlement on 1 January
POLICY = TopUpPolicy(minimum_purchase_micro=1_000_000, hoarding_limit_micro=300_000_000)

ops = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.integers(1, 720), st.integers(0, 800)),
        st.tuples(st.just("topup"), st.integers(1, 5), st.integers(0, 120)),
        st.tuples(st.just("again"), st.just(0), st.just(0)),  # the last top-up command once more
        st.tuples(st.just("adjust"), st.integers(1, 4), st.integers(-5_000_000, 5_000_000)),
        st.tuples(st.just("snapshot"), st.integers(1, 6), st.integers(-50, 200)),
    ),
    max_size=40,
)


async def _run(stream: list[tuple[str, int, int]]) -> None:
    async with aiosqlite.connect(":memory:") as conn:
        await ls.init_schema(conn)
        led = Ledger("acc")
        t, reg, n = T0, 0, 0
        prev: RegisterReading | None = None
        last_topup: tuple[str, int, int] | None = None
        for kind, a, b in stream:
            if kind == "again":
                if last_topup is None:
                    continue
                kind, a, b = last_topup
            if kind == "read":
                t += a * 60_000
                reg += b
                cur = RegisterReading(f"r{n}", "m1", t, Decimal(reg) / 100)
                n += 1
                stored = await ls.rate_reading(conn, "acc", cur, BOOK)
                if prev is not None:
                    res = rate_interval(prev, cur, BOOK, led.view.tier)
                    assert res.charge is not None
                    if res.charge.ckwh > 0:
                        led.append(debit_entry("acc", res.charge))
                    assert stored.result == res
                prev = cur
            elif kind == "topup":
                last_topup = (kind, a, b)
                tu = TopUp(f"t{a}", "acc", a, b * 1_000_000, Channel.AGENT, Source.CLI, t)
                d_mem = decide_topup(tu, led.view, led.get(tu.entry_id), POLICY, t)
                if d_mem.entry is not None:
                    led.append(d_mem.entry)
                d_db = await ls.apply_topup(conn, tu, POLICY, t)
                assert (d_db.status, d_db.reason) == (d_mem.status, d_mem.reason)
            elif kind == "adjust":
                e = adjustment_entry(f"adj{a}", "acc", b, t, "test", "central")
                if led.get(e.entry_id) is None:
                    led.append(e)
                    await ls.append(conn, e)
            else:
                view = led.view
                as_of = min(view.last_seq, max(0, view.last_seq - a))
                snap = CentralSnapshot(f"s{a}", "acc", a, as_of, b * 1_000_000, t,
                                       frozenset({f"topup:t{a + 1}"}), a)
                d_mem = decide_snapshot(snap, view, led.get(snap.entry_id))
                if d_mem.entry is not None:
                    led.append(d_mem.entry)
                d_db = await ls.apply_snapshot(conn, snap)
                assert d_db.status == d_mem.status
            assert await ls.load_view(conn, "acc") == led.view
        stored_entries = await ls.entries(conn, "acc")
        assert [e.entry_id for e in stored_entries] == [e.entry_id for e in led.entries]
        assert all(x.same_content(y) for x, y in zip(stored_entries, led.entries, strict=True))
        assert await ls.verify(conn, "acc") == led.refold()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=ops)
def test_store_applies_the_same_rules_as_the_pure_ledger(stream: list[tuple[str, int, int]]) -> None:
    asyncio.run(_run(stream))

"""Ledger persistence on real SQLite files, in transactions the caller owns."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from decimal import Decimal
from pathlib import Path

import aiosqlite
import pytest

from gateway.billing import ledger_store as ls
from gateway.billing.cutoff import CutoffState, Level
from gateway.billing.ledger import Entry, LedgerConflict, adjustment_entry, debit_entry
from gateway.billing.rating import (
    AnomalyKind,
    MeterReplacement,
    RegisterReading,
    TierState,
    rate_interval,
)
from gateway.billing.reconcile import CentralSnapshot, SnapshotStatus
from gateway.billing.tariff_file import load_book
from gateway.billing.topup import Channel, Source, TopUp, TopUpPolicy, TopUpStatus
from tests.gateway.billing._util import FLAT, book, ms, rr

ROOT = Path(__file__).resolve().parents[3]
Y = 1_000_000


async def test_append_is_idempotent_and_conflicts_are_refused(conn: aiosqlite.Connection) -> None:
    r = rate_interval(rr("a", "2026-03-02T10:00", "0"), rr("b", "2026-03-02T11:00", "1"), book(FLAT), TierState())
    assert r.charge is not None
    e = debit_entry("acc", r.charge)
    first = await ls.append(conn, e)
    again = await ls.append(conn, e)
    assert first.applied and not again.applied and again.entry.seq == first.entry.seq == 1
    await conn.commit()
    assert (await ls.load_view(conn, "acc")).balance_micro == -560_000
    with pytest.raises(LedgerConflict):
        await ls.append(conn, Entry(e.entry_id, "acc", e.kind, -1, e.time_ms, e.body))
    assert await ls.get_entry(conn, e.entry_id) == first.entry


async def test_functions_never_commit(tmp_path: Path, conn: aiosqlite.Connection) -> None:
    await ls.append(conn, adjustment_entry("a1", "acc", 5 * Y, 1, "opening", "central"))
    assert conn.in_transaction
    async with aiosqlite.connect(tmp_path / "billing.db") as other:
        async with other.execute("SELECT COUNT(*) FROM billing_entry") as cur:
            assert (await cur.fetchone()) == (0,)  # not visible before the caller commits
    await conn.rollback()
    assert (await ls.load_view(conn, "acc")).balance_micro == 0
    assert await ls.entries(conn, "acc") == []


async def test_rate_reading_flow_and_baseline(conn: aiosqlite.Connection) -> None:
    b = book(FLAT)
    first = await ls.rate_reading(conn, "acc", rr("r0", "2026-03-02T10:00", "100.00"), b)
    assert first.result is None  # baseline only
    step = await ls.rate_reading(conn, "acc", rr("r1", "2026-03-02T11:00", "101.00"), b)
    assert step.appended is not None and step.view.balance_micro == -560_000
    redelivered = await ls.rate_reading(conn, "acc", rr("r1", "2026-03-02T11:00", "101.00"), b)
    assert redelivered.result is None and redelivered.view.balance_micro == -560_000
    idle = await ls.rate_reading(conn, "acc", rr("r1b", "2026-03-02T11:30", "101.00"), b)
    assert idle.result is not None and idle.appended is None  # zero energy: no row
    assert len(await ls.entries(conn, "acc")) == 1
    back = await ls.rate_reading(conn, "acc", rr("r2", "2026-03-02T12:00", "99.00"), b)
    assert back.result is not None and back.result.anomalies[0].kind is AnomalyKind.REGISTER_BACKWARDS
    base = await ls.get_baseline(conn, "m1")
    assert base is not None and base.reading_id == "r1b"  # kept
    # explicit replacement: old meter ends at 101.50, new starts at 0.20
    await ls.record_meter_replacement(
        conn, "acc", MeterReplacement("ex", "m1", ms("2026-03-02T12:30"), Decimal("101.50"), Decimal("0.20")), b
    )
    step = await ls.rate_reading(conn, "acc", rr("r3", "2026-03-02T13:00", "1.20"), b)
    assert step.view.balance_micro == -(100 + 50 + 100) * 5600
    await conn.commit()
    assert (await ls.verify(conn, "acc")).balance_micro == -250 * 5600


async def test_topups_snapshots_fixed_and_cutoff_state(conn: aiosqlite.Connection) -> None:
    t = TopUp("t1", "acc", 1, 50 * Y, Channel.COUNTER, Source.USB, 0)
    d = await ls.apply_topup(conn, t, TopUpPolicy(), 10)
    assert d.status is TopUpStatus.APPLIED and d.balance_after_micro == 50 * Y
    assert (await ls.apply_topup(conn, t, TopUpPolicy(), 11)).status is TopUpStatus.DUPLICATE
    snap = CentralSnapshot("s1", "acc", 1, 1, 70 * Y, 20, frozenset({"topup:t2"}), 2)
    assert (await ls.apply_snapshot(conn, snap)).status is SnapshotStatus.APPLIED
    assert (await ls.apply_snapshot(conn, snap)).status is SnapshotStatus.DUPLICATE
    t2 = TopUp("t2", "acc", 2, 20 * Y, Channel.BANK, Source.MQTT, 0)
    assert (await ls.apply_topup(conn, t2, TopUpPolicy(), 30)).status is TopUpStatus.ALREADY_COUNTED
    assert (await ls.load_view(conn, "acc")).balance_micro == 70 * Y
    mb = load_book([ROOT / "examples" / "tariffs" / "minigrid-daily.toml"])
    assert await ls.charge_fixed(conn, "acc", mb, ms("2026-01-01T12:00:00+03:00")) == []  # start point
    out = await ls.charge_fixed(conn, "acc", mb, ms("2026-01-03T12:00:00+03:00"))
    assert [r.applied for r in out] == [True, True]
    assert await ls.charge_fixed(conn, "acc", mb, ms("2026-01-03T13:00:00+03:00")) == []
    st = CutoffState(Level.GRACE, False, True, None, None, 5)
    await ls.save_cutoff_json(conn, "acc", st.to_json())
    loaded = await ls.load_cutoff_json(conn, "acc")
    assert loaded is not None and CutoffState.from_json(loaded) == st
    await conn.commit()
    v = await ls.verify(conn, "acc")
    assert v.balance_micro == 70 * Y - 2 * 200_000 and v.purchase_counter == 2


async def test_store_view_matches_fold_after_a_mixed_stream(conn: aiosqlite.Connection) -> None:
    b = book(FLAT)
    for i in range(30):
        await ls.rate_reading(conn, "acc", RegisterReading(f"r{i}", "m1", ms("2026-03-02T00:00") + i * 600_000,
                                                           Decimal(i * i) / 10), b)
        if i % 7 == 3:
            await ls.apply_topup(conn, TopUp(f"t{i}", "acc", i // 7 + 1, 5 * Y, Channel.AGENT, Source.MQTT, 0),
                                 TopUpPolicy(), i)
        if i == 20:
            view = await ls.load_view(conn, "acc")
            await ls.apply_snapshot(conn, CentralSnapshot("s", "acc", 1, view.last_seq - 3, 3 * Y, 1))
    await conn.commit()
    await ls.verify(conn, "acc")



async def _start(db: Path, n: int) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.gateway.billing.crash_child", str(db), str(n),
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def test_crash_consistency_sigkill_mid_stream(tmp_path: Path, long_run: bool) -> None:
    """Kill the writer with SIGKILL several times mid-stream, restart it, then check that
    every reading pair was charged exactly once and the stored view equals the fold."""
    db = tmp_path / "crash.db"
    n = 2000 if long_run else 400
    kills = 8 if long_run else 3
    deadline = time.monotonic() + (600 if long_run else 60)
    for k in range(kills):
        proc = await _start(db, n)
        assert proc.stdout is not None
        seen = 0
        target = 20 + 37 * k  # lines to see before the kill
        while seen < target and time.monotonic() < deadline:
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), timeout=10)
            except TimeoutError:
                break
            if not line:
                break
            seen += 1
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    async with aiosqlite.connect(db) as c:
        async with c.execute("SELECT COUNT(*) FROM reading") as cur:
            row = await cur.fetchone()
    assert row is not None and 0 < row[0] < n  # the kills really interrupted the stream
    proc = await _start(db, n)
    _, err = await asyncio.wait_for(proc.communicate(), timeout=max(5.0, deadline - time.monotonic()))
    assert proc.returncode == 0, err.decode()

    async with aiosqlite.connect(db) as c:
        async with c.execute("SELECT COUNT(*) FROM reading") as cur:
            assert (await cur.fetchone()) == (n,)
        entries = await ls.entries(c, "acc-1")
        pairs = [(e.body["start_reading_id"], e.body["end_reading_id"]) for e in entries]
        assert pairs == [(f"r{i:05d}", f"r{i + 1:05d}") for i in range(n - 1)]  # each once, in order
        view = await ls.verify(c, "acc-1")
        # register i*0.37 kWh: total (n-1)*37 ckwh at 0.5600
        assert view.balance_micro == -(n - 1) * 37 * 5600

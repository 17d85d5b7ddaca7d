"""Where the outbox's records sit in the database file: a poll cycle's records of
each class take consecutive ids, so acknowledging a class's batches frees whole
pages; acks waiting are applied before the next cycle's records are inserted, so
the pages they free are filled again in the same transaction (real SQLite files,
observed through the file's free list)."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

from firmware_bridge.reading import Measurement, Quantity, Reading
from store_forward.outbox import Outbox
from store_forward.records import RecordClass


def reading(meter: int, t: int) -> Reading:
    return Reading(
        f"m{meter:03d}",
        t,
        {
            Quantity.ENERGY_IMPORT: Measurement(Decimal(f"{1000 + meter}.{t % 100:02d}")),
            Quantity.VOLTAGE: Measurement(Decimal("229.7")),
            Quantity.CURRENT: Measurement(Decimal("2.174")),
            Quantity.POWER: Measurement(Decimal("0.499")),
        },
    )


def cycle(t: int, meters: int = 60) -> list[Reading]:
    return [reading(m, t) for m in range(meters)]


def pages(path: Path) -> tuple[int, int]:
    """(page_count, freelist_count) of the committed database."""
    conn = sqlite3.connect(path)
    try:
        (count,) = conn.execute("PRAGMA page_count").fetchone()
        (free,) = conn.execute("PRAGMA freelist_count").fetchone()
        return int(count), int(free)
    finally:
        conn.close()


def records(path: Path) -> list[tuple[int, int, int]]:
    """(id, class, sealed body length) of every record, by id."""
    conn = sqlite3.connect(path)
    try:
        return [
            (int(i), int(c), int(n))
            for i, c, n in conn.execute("SELECT id, cls, length(body) FROM outbox ORDER BY id")
        ]
    finally:
        conn.close()


async def number_all(ob: Outbox, now_ms: int) -> dict[int, RecordClass]:
    """Number every waiting record into batches; seq -> the batch's class."""
    out: dict[int, RecordClass] = {}
    for _ in range(100):
        batch = await ob.next_batch(now_ms, exclude=out, max_records=50)
        if batch is None:
            return out
        out[batch.seq] = batch.records[0].cls
    raise AssertionError("more batches than expected")


async def test_a_cycles_records_take_consecutive_ids_per_class(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "gw.db")
    try:
        ids = await ob.commit_cycle(1000, cycle(1000, 5), events=[{"type": "a"}, {"type": "b"}])
    finally:
        await ob.close()
    rows = records(tmp_path / "gw.db")
    # events, then the billing records (one per reading, in order), then telemetry
    e, b, t = int(RecordClass.EVENT), int(RecordClass.BILLING), int(RecordClass.TELEMETRY)
    assert [c for _, c, _ in rows] == [e] * 2 + [b] * 5 + [t] * 5
    assert [i for i, _, _ in rows] == list(range(1, 13))
    assert ids == [3, 4, 5, 6, 7]  # each reading's id is its billing record's


async def test_acknowledging_one_class_frees_its_pages_whole(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    ob = await Outbox.open(path)
    try:
        for k in range(4):
            await ob.commit_cycle(1000 + k, cycle(1000 + k))
        billing_bytes = sum(n for _, c, n in records(path) if c == int(RecordClass.BILLING))
        batches = await number_all(ob, 2000)
        _, free_before = pages(path)
        for seq, cls in batches.items():
            if cls is RecordClass.BILLING:
                assert await ob.ack(seq) > 0
        _, free_after = pages(path)
    finally:
        await ob.close()
    assert all(c != int(RecordClass.BILLING) for _, c, _ in records(path))
    # Most of the pages that held billing records are free now: they held nothing
    # else (records of both classes on one page would only have been rewritten).
    page_size = 1024
    assert free_after - free_before >= billing_bytes // page_size // 2 > 0


async def test_acks_are_applied_before_a_cycles_records_so_its_records_fill_the_freed_pages(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gw.db"
    ob = await Outbox.open(path)
    try:
        await ob.commit_cycle(1000, cycle(1000))
        batches = await number_all(ob, 1500)
        count_before, free_before = pages(path)
        for seq in batches:
            ob.ack_later(seq)
        # The next cycle (as the daemon's writer commits one: the cycle, then fold_in),
        # of the same size, deletes the acknowledged batches first and stores its
        # records in the pages they freed: the file neither grows nor keeps those pages
        # on its free list.
        async with ob.transaction() as db:
            await ob.commit_cycle_in(db, 2000, cycle(2000))
            await ob.fold_in(db, 2000)
        count_after, free_after = pages(path)
        assert not any(ob.ack_waiting(seq) for seq in batches)
        stats = await ob.stats()
    finally:
        await ob.close()
    assert (stats.records, stats.readings_acked, stats.readings_committed) == (120, 60, 120)
    assert [r[0] for r in records(path)] == list(range(121, 241))
    assert count_after - count_before <= 2, (count_before, count_after)
    assert free_after <= free_before + 2, (free_before, free_after)

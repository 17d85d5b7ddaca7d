"""Records that a poll cycle's transaction numbers into a batch at once are inserted
with their batch number already set (``Outbox.fold_in``), so the index of unbatched
records is not written for them; records that are not numbered at once are inserted
unbatched and numbered later, as before. Real SQLite files: the write-ahead log is
decoded frame by frame (``store_forward.walcheck``) and each frame's page named by
its b-tree (``dbstat``); record bodies are unsealed from the file with the
database's key. Each scenario runs twice, with the rows held back for ``fold_in``
and with them inserted at once (``Outbox.insert_numbered = False``, the order of
writes before), and the two databases must hold the same."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_bridge.reading import Measurement, Quantity, Reading
from store_forward.batch_epoch import new_epoch
from store_forward.codec import JsonCodec
from store_forward.compact import unpack
from store_forward.database import K_SALT
from store_forward.outbox import (
    _MAX_COUNTERS,
    K_BATCH_EPOCH,
    K_NEXT_SEQ,
    Batch,
    BatchPlan,
    MeterStatus,
    Outbox,
)
from store_forward.records import Record, RecordClass, RecordKind, class_name, loads
from store_forward.sealing import NonceSequence, StorageSealer
from store_forward.storage_keys import StorageKeys, database_key
from store_forward.walcheck import WalVerdict, check_wal

GATEWAY = "gw-numbered"
UP = BatchPlan(max_records=500, max_bytes=64 * 1024, max_cls=255)
COUNTERS = (K_NEXT_SEQ, *_MAX_COUNTERS)  # the batch number and every counter a database keeps


@dataclass
class Link:
    """The uplink as the outbox asks it: what a send would take now (None: down)."""

    plan: BatchPlan | None = UP
    epoch: str = field(default_factory=new_epoch)

    def pack(
        self, seq: int, records: Sequence[Record], max_bytes: int, *, epoch: str
    ) -> tuple[bytes, int]:
        return JsonCodec().pack(GATEWAY, seq, records, max_bytes, epoch=epoch)


async def open_outbox(path: Path, link: Link, *, insert_numbered: bool = True) -> Outbox:
    ob = await Outbox.open(path, clock_ms=lambda: 1)
    ob.packer = link.pack
    ob.gateway_id = GATEWAY
    ob.batch_plan = lambda: link.plan
    ob.insert_numbered = insert_numbered
    await ob.set_state({K_BATCH_EPOCH: link.epoch})  # (the same in both databases compared)
    return ob


def reading(meter: int, t: int, *, telemetry: bool = True) -> Reading:
    q = {Quantity.ENERGY_IMPORT: Measurement(Decimal(f"{1000 + meter}.{t % 100:02d}"))}
    if telemetry:
        q[Quantity.VOLTAGE] = Measurement(Decimal("229.7"))
        q[Quantity.CURRENT] = Measurement(Decimal("2.174"))
    return Reading(f"m{meter:03d}", t, q)


def cycle(t: int, meters: int, *, telemetry: bool = True) -> list[Reading]:
    return [reading(m, t, telemetry=telemetry) for m in range(meters)]


async def slice_tx(
    ob: Outbox, t: int, readings: Sequence[Reading], events: Sequence[dict[str, Any]] = ()
) -> list[int]:
    """One slice as the daemon's writer commits it: the cycle, then fold_in."""
    statuses = [MeterStatus(r.meter_id, True, t, t, 0, 0, None) for r in readings]
    async with ob.transaction() as db:
        ids = await ob.commit_cycle_in(db, t, readings, statuses, events)
        await ob.fold_in(db, t)
    return ids


# -- the write-ahead log, frame by frame ---------------------------------------


def empty_log(path: Path) -> None:
    """Checkpoint and truncate the log: it then holds only what is written next."""
    conn = sqlite3.connect(path)
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.close()
    assert busy == 0
    assert Path(f"{path}-wal").stat().st_size == 0


def logged_btrees(path: Path) -> Counter[str]:
    """The log's frames (those SQLite applies), counted by the b-tree their page
    belongs to now (``(free)``: a page on the free list)."""
    report = check_wal(Path(f"{path}-wal").read_bytes())
    assert report.verdict is WalVerdict.OK, report.reason
    conn = sqlite3.connect(path)
    try:
        owners = {
            int(pg): str(name) for name, pg in conn.execute("SELECT name, pageno FROM dbstat")
        }
    finally:
        conn.close()
    return Counter(owners.get(f.page_no, "(free)") for f in report.frames[: report.sqlite_frames])


# -- what a database holds --------------------------------------------------------


def content(path: Path) -> dict[str, Any]:
    """Every row of the queue's tables (record bodies unsealed with the database's
    key), the counters and the AUTOINCREMENT high-water mark, read from the file."""
    master = StorageKeys.beside(path).keys
    conn = sqlite3.connect(path)
    try:
        (salt,) = conn.execute("SELECT value FROM kv WHERE key = ?", (K_SALT,)).fetchone()
        openers = {
            v: StorageSealer(database_key(k, bytes(salt), v), NonceSequence(1))
            for v, k in master.items()
        }
        records = []
        for rid, cls, kind, created, ver, blob, seq in conn.execute(
            "SELECT id, cls, kind, created_ms, key_ver, body, batch_seq FROM outbox ORDER BY id"
        ):
            aad = f"{class_name(RecordClass(cls))}/{kind}"
            body = loads(unpack(openers[int(ver)].unseal(int(rid), aad, bytes(blob))))
            records.append((rid, cls, kind, created, ver, seq, body))
        marks = ",".join("?" * len(COUNTERS))
        return {
            "records": records,
            "batches": conn.execute("SELECT * FROM batches ORDER BY seq").fetchall(),
            "counters": dict(
                conn.execute(f"SELECT key, value FROM kv WHERE key IN ({marks})", COUNTERS)
            ),
            "sequence": conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'"
            ).fetchall(),
            "status": conn.execute("SELECT * FROM meter_status ORDER BY meter_id").fetchall(),
            "damaged": conn.execute("SELECT count(*) FROM damaged").fetchone(),
            "integrity": conn.execute("PRAGMA integrity_check").fetchall(),
        }
    finally:
        conn.close()


def unbatched(path: Path) -> list[int]:
    conn = sqlite3.connect(path)
    try:
        return [
            int(i)
            for (i,) in conn.execute("SELECT id FROM outbox WHERE batch_seq IS NULL ORDER BY id")
        ]
    finally:
        conn.close()


def batch_view(b: Batch | None) -> tuple[Any, ...] | None:
    return None if b is None else (b.seq, b.records, b.attempts, b.payload, b.epoch)


async def drain(ob: Outbox, link: Link, now_ms: int) -> list[tuple[Any, ...] | None]:
    """Every batch the uplink would send from here (numbering what waits), in order."""
    out: list[tuple[Any, ...] | None] = []
    sent: list[int] = []
    for _ in range(200):
        b = await ob.next_batch(now_ms, exclude=sent, max_records=4, pack=link.pack)
        out.append(batch_view(b))
        if b is None:
            return out
        sent.append(b.seq)
    raise AssertionError("more batches than records")


# -- a slice numbered at once ----------------------------------------------------


@pytest.mark.parametrize("insert_numbered", [True, False])
async def test_a_slice_numbered_at_once_writes_no_page_of_the_unbatched_index(
    tmp_path: Path, insert_numbered: bool
) -> None:
    path = tmp_path / "gw.db"
    link = Link()
    ob = await open_outbox(path, link, insert_numbered=insert_numbered)
    try:
        # steady state: every slice is numbered in its own transaction, acks follow
        for k in range(3):
            await slice_tx(ob, 1000 + k, cycle(1000 + k, 5), [{"type": "warm", "k": k}])
        for seq in await ob.pending_batches():
            ob.ack_later(seq)
        empty_log(path)
        ids = await slice_tx(ob, 2000, cycle(2000, 5), [{"type": "x"}])
        written = logged_btrees(path)
    finally:
        await ob.close()
    # (3 slices of 11 records before; the event first, then the billing records)
    assert ids == list(range(35, 40)) and unbatched(path) == []
    c = content(path)
    # the acknowledged batches are gone; this slice's: one per class
    assert [(b[1], b[3]) for b in c["batches"]] == [(0, 1), (1, 5), (2, 5)]
    assert written["outbox"] and written["outbox_batch"] and written["batches"]
    if insert_numbered:
        # the records went straight into the index of batched records
        assert "outbox_unbatched" not in written, written
    else:
        # inserted unbatched, then moved by the UPDATE: the index's page is logged
        # (this decoder sees it when it is written)
        assert written["outbox_unbatched"] >= 1, written


async def test_numbered_at_once_logs_fewer_frames_for_the_same_rows(tmp_path: Path) -> None:
    """One meter, one reading a minute: the commit that stores and numbers it logs one
    page fewer (the unbatched index's leaf), and both databases hold the same."""
    frames: dict[bool, Counter[str]] = {}
    contents = {}
    link = Link()
    for numbered in (True, False):
        path = tmp_path / f"gw-{numbered}.db"
        ob = await open_outbox(path, link, insert_numbered=numbered)
        try:
            for k in range(3):
                await slice_tx(ob, 60_000 * k, cycle(60_000 * k, 1))
                for seq in await ob.pending_batches():
                    ob.ack_later(seq)
            empty_log(path)
            await slice_tx(ob, 60_000 * 3, cycle(60_000 * 3, 1))
            frames[numbered] = logged_btrees(path)
        finally:
            await ob.close()
        contents[numbered] = content(path)
    assert contents[True] == contents[False]
    assert sum(frames[True].values()) < sum(frames[False].values()), frames
    assert frames[False] - frames[True] == Counter(
        {"outbox_unbatched": frames[False]["outbox_unbatched"]}
    )


# -- slices not numbered at once --------------------------------------------------


async def _scenario(
    path: Path, link: Link, name: str, numbered: bool
) -> tuple[list[int], Counter[str]]:
    """Run scenario ``name``; returns the ids of the last slice's records left
    unbatched and the b-trees its commit logged."""
    ob = await open_outbox(path, link, insert_numbered=numbered)
    try:
        if name == "backlog":
            # a slice committed while the link was down waits; the next one joins it
            link.plan = None
            await slice_tx(ob, 1000, cycle(1000, 3))
            link.plan = UP
        else:
            await slice_tx(ob, 1000, cycle(1000, 3))
        link.plan = {
            "link down": None,
            "events only": BatchPlan(500, 64 * 1024, int(RecordClass.EVENT)),
            "class over max_records": BatchPlan(3, 64 * 1024, 255),
            "payload does not fit": BatchPlan(500, 160, 255),
            "backlog": UP,
        }[name]
        empty_log(path)
        await slice_tx(ob, 2000, cycle(2000, 6), [{"type": "e1"}, {"type": "e2"}])
        written = logged_btrees(path)
        left = unbatched(path)
        link.plan = UP
        await drain(ob, link, 3000)
    finally:
        await ob.close()
    return left, written


@pytest.mark.parametrize(
    "name",
    ["link down", "events only", "class over max_records", "payload does not fit", "backlog"],
)
async def test_a_slice_not_numbered_at_once_goes_through_the_unbatched_index_as_before(
    tmp_path: Path, name: str
) -> None:
    link = Link()
    new_left, new_written = await _scenario(
        tmp_path / "new.db", Link(link.plan, link.epoch), name, True
    )
    old_left, _ = await _scenario(tmp_path / "old.db", Link(link.plan, link.epoch), name, False)
    # the records left waiting are the same, inserted unbatched (the index is written)
    assert new_left == old_left and new_left
    assert new_written["outbox_unbatched"] >= 1
    # and numbered later into the same batches, records and bytes
    assert content(tmp_path / "new.db") == content(tmp_path / "old.db")


async def test_rows_held_back_are_inserted_before_a_record_added_one_by_one(tmp_path: Path) -> None:
    """An alarm added in the middle of a slice (AUTOINCREMENT) takes its id after the
    slice's records, and a transaction without fold_in still stores every record."""
    results = {}
    link = Link()
    for numbered in (True, False):
        path = tmp_path / f"gw-{numbered}.db"
        ob = await open_outbox(path, link, insert_numbered=numbered)
        try:
            ob.health.pending_alarms.append({"type": "alarm", "n": 1})
            ids = await slice_tx(ob, 1000, cycle(1000, 2), [{"type": "e"}])
            async with ob.transaction() as db:  # no fold_in: rows held back go in at the commit
                more = await ob.commit_cycle_in(db, 2000, cycle(2000, 2))
                charge = await ob.add_many_in(
                    db, [(RecordClass.BILLING, RecordKind.CHARGE, 2000, {"c": 1})]
                )
                ev = await ob.add_in(db, RecordClass.EVENT, RecordKind.EVENT, 2000, {"type": "one"})
            results[numbered] = (ids, more, charge, ev, await drain(ob, link, 3000))
        finally:
            await ob.close()
        results[numbered] += (content(path),)
    assert results[True] == results[False]
    ids, more, charge, ev, _, c = results[True]
    # event 1, billing 2-3, telemetry 4-5, the alarm 6; then billing 7-8, telemetry
    # 9-10, the charge 11, the event 12
    assert (ids, more, charge, ev) == ([2, 3], [7, 8], [11], 12)
    assert [r[0] for r in c["records"]] == list(range(1, 13))
    assert all(r[5] is not None for r in c["records"])  # every record numbered


# -- property: the same database whichever the order of writes ------------------

plans = st.one_of(
    st.none(),
    st.just(UP),
    st.builds(
        BatchPlan,
        max_records=st.integers(1, 6),
        max_bytes=st.sampled_from([145, 160, 175, 64 * 1024]),  # (compressed: ~140 + ~10 a record)
        max_cls=st.sampled_from([0, 1, 2, 255]),
    ),
)
# a slice: (readings, with telemetry, events)
slices = st.tuples(st.integers(0, 4), st.booleans(), st.integers(0, 2))
transactions = st.tuples(
    st.just("tx"),
    st.fixed_dictionaries(
        {
            "slices": st.lists(slices, min_size=1, max_size=3),  # (more than one: a group commit)
            "charges": st.integers(0, 3),  # add_many_in (a billing tick's records)
            "event": st.booleans(),  # add_in (one record, AUTOINCREMENT)
            "alarm": st.booleans(),  # an alarm added in the middle of the slice
            "fold": st.booleans(),  # False: a transaction without fold_in
        }
    ),
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("plan"), plans),
        transactions,
        transactions,
        # which pending batch, and whether the ack waits for the next transaction
        st.tuples(st.just("ack"), st.tuples(st.integers(0, 10), st.booleans())),
        st.tuples(st.just("send"), st.integers(1, 6)),
    ),
    min_size=2,
    max_size=14,
)


async def _apply(ob: Outbox, link: Link, script: list[tuple[str, Any]]) -> list[Any]:
    """Run ``script`` on ``ob``; every result the outbox returned, in order."""
    out: list[Any] = []
    t = 10_000
    sent: list[int] = []
    for op, arg in script:
        t += 1000
        if op == "plan":
            link.plan = arg
        elif op == "tx":
            if arg["alarm"]:
                ob.health.pending_alarms.append({"type": "alarm", "t": t})
            async with ob.transaction() as db:
                for k, (n, telemetry, n_events) in enumerate(arg["slices"]):
                    readings = [reading(m + 10 * k, t, telemetry=telemetry) for m in range(n)]
                    events = [{"type": "ev", "t": t, "i": i} for i in range(n_events)]
                    statuses = [MeterStatus(r.meter_id, True, t, t, 0, 0, None) for r in readings]
                    out.append(await ob.commit_cycle_in(db, t, readings, statuses, events))
                items = [
                    (RecordClass.BILLING, RecordKind.CHARGE, t, {"c": i, "t": t})
                    for i in range(arg["charges"])
                ]
                out.append(await ob.add_many_in(db, items))
                if arg["event"]:
                    out.append(
                        await ob.add_in(
                            db, RecordClass.EVENT, RecordKind.EVENT, t, {"type": "one", "t": t}
                        )
                    )
                if arg["fold"]:
                    await ob.fold_in(db, t)
        elif op == "ack":
            pending = await ob.pending_batches()
            index, later = arg
            if pending:
                seq = pending[index % len(pending)]
                if later:
                    ob.ack_later(seq)
                else:
                    out.append(await ob.ack(seq))
        elif op == "send":
            b = await ob.next_batch(t, exclude=sent, max_records=arg, pack=link.pack)
            out.append(batch_view(b))
            if b is not None:
                sent.append(b.seq)
                await ob.mark_sent(b.seq, t)
    return out


async def _both(root: Path, script: list[tuple[str, Any]]) -> None:
    epoch = new_epoch()
    results = {}
    for numbered in (True, False):
        path = root / f"gw-{numbered}.db"
        link = Link(UP, epoch)
        ob = await open_outbox(path, link, insert_numbered=numbered)
        try:
            outcome = await _apply(ob, link, script)
            link.plan = UP
            outcome.append(await drain(ob, link, 99_000_000))
            stats = await ob.stats()
        finally:
            await ob.close()
        results[numbered] = (outcome, stats, content(path))
    new, old = results[True], results[False]
    assert new[2]["integrity"] == [("ok",)]
    assert new[0] == old[0]  # every id, batch, payload and count returned
    assert new[1] == old[1]
    assert new[2] == old[2]  # rows, ids, batch numbers, batches, bodies, counters


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=ops)
def test_the_database_is_the_same_whichever_the_order_of_writes(
    script: list[tuple[str, Any]],
) -> None:
    with tempfile.TemporaryDirectory(prefix="numbered-") as tmp:
        asyncio.run(asyncio.wait_for(_both(Path(tmp), script), 120))

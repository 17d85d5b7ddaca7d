from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from firmware_bridge.reading import Measurement, Quantity, Reading
from store_forward.codec import JsonCodec
from store_forward.outbox import MeterStatus, Outbox
from store_forward.records import RecordClass, reading_from_body


def reading(meter: str, t: int, kwh: str) -> Reading:
    return Reading(meter, t, {Quantity.ENERGY_IMPORT: Measurement(Decimal(kwh))})


async def test_cycle_commits_readings_and_status_together(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "gw.db")
    try:
        ids = await ob.commit_cycle(
            1000,
            [reading("m1", 1000, "1.50"), reading("m2", 1000, "7.25")],
            [MeterStatus("m1", True, 1000, 1000, 0, 0, None)],
            [{"type": "x"}],
        )
        assert ids == [2, 3]  # (each class takes consecutive ids: the event first)
        st = await ob.stats()
        assert (st.records, st.readings, st.readings_committed) == (3, 2, 2)
        [m1] = await ob.meter_statuses()
        assert m1.online and m1.last_good_ms == 1000
    finally:
        await ob.close()


async def test_failed_cycle_leaves_nothing(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "gw.db")
    try:
        with pytest.raises(RuntimeError):
            async with ob.transaction() as db:
                await ob.commit_cycle_in(db, 1, [reading("m1", 1, "1")])
                raise RuntimeError("power cut in the middle")
        assert (await ob.stats()).records == 0
        assert (await ob.stats()).readings_committed == 0
    finally:
        await ob.close()


async def test_batches_are_stable_prioritised_and_acked_once(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    ob = await Outbox.open(path)
    await ob.commit_cycle(1, [reading("m1", t, str(t)) for t in range(1, 6)])
    await ob.add_event(7, {"type": "alarm"})
    first = await ob.next_batch(10, max_records=3)
    assert first is not None and first.seq == 1
    # events jump the queue
    assert [r.cls for r in first.records] == [RecordClass.EVENT]
    second = await ob.next_batch(10, exclude=[1], max_records=3)
    assert second is not None and second.seq == 2
    assert [reading_from_body(r.body).time_ms for r in second.records] == [1, 2, 3]
    await ob.close()

    # after a restart the same numbered batches come back unchanged, oldest first
    ob = await Outbox.open(path)
    again = await ob.next_batch(20, max_records=3)
    assert again is not None and again.seq == 1
    again2 = await ob.next_batch(20, exclude=[1], max_records=3)
    assert again2 == second
    assert await ob.ack(2) == 3
    assert await ob.ack(2) == 0  # duplicate ack changes nothing
    st = await ob.stats()
    assert st.readings_acked == 3 and st.records == 3
    third = await ob.next_batch(30, exclude=[1], max_records=10)
    assert third is not None and third.seq == 3 and len(third.records) == 2
    await ob.close()


async def test_batch_respects_byte_budget(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "gw.db")
    await ob.commit_cycle(1, [reading("m1", t, "1") for t in range(50)])
    b = await ob.next_batch(1, max_records=500, max_bytes=400)
    assert b is not None and 1 <= len(b.records) < 50
    await ob.close()


async def test_corrupt_database_is_kept_as_evidence_not_replaced_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gw.db"
    garbage = b"SQLite format 3\x00" + b"\xff" * 4000
    path.write_bytes(garbage)
    path.with_name("gw.db-wal").write_bytes(b"wal bytes")
    ob = await Outbox.open(path)
    try:
        [evidence] = list((tmp_path / "gw.db.evidence").iterdir())
        assert (evidence / "gw.db").read_bytes() == garbage  # kept byte for byte
        assert (evidence / "gw.db-wal").read_bytes() == b"wal bytes"  # the WAL kept too
        assert "file is not a database" in (evidence / "manifest.json").read_text()
        assert str(evidence) in caplog.text  # the log line names the path
        assert ob.storage.mode.value == "fault" and ob.storage.evidence == str(evidence)
        assert ob.generation == 2  # never the numbering of the database it replaces
        batch = await ob.next_batch(1)
        assert batch is not None and batch.seq > 2**40
        [event] = batch.records
        assert event.body["type"] == "storage_fault" and event.body["evidence"] == str(evidence)
        assert event.body["severity"] == "critical" and event.id > 2**40
    finally:
        await ob.close()


async def test_cancelled_transactions_never_leave_one_open(tmp_path: Path) -> None:
    """Tasks cancelled at any point of a transaction must not wedge the writer."""
    import asyncio

    ob = await Outbox.open(tmp_path / "gw.db")
    try:
        for delay_steps in range(40):
            task = asyncio.create_task(ob.commit_cycle(1, [reading("m1", delay_steps, "1")]))
            for _ in range(delay_steps % 8):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            # the next transaction always works
            await ob.add_event(2, {"type": "probe", "i": delay_steps})
        st = await ob.stats()
        assert st.records - st.readings == 40  # every probe event committed
        assert st.readings == st.readings_committed  # counters match what is stored
    finally:
        await ob.close()


async def test_a_batch_numbered_without_its_payload_is_sealed_once_when_a_packer_asks(tmp_path: Path) -> None:
    """A tool may number a batch without its payload (``next_batch`` with no packer);
    the uplink and the export ask with a packer and get the batch sealed whole, once:
    every later send is the same bytes."""
    calls: list[int] = []

    def pack(seq: int, records: Any, max_bytes: int, *, epoch: str) -> tuple[bytes, int]:
        calls.append(seq)
        return JsonCodec().pack("gw-1", seq, records, max_bytes, epoch=epoch)

    ob = await Outbox.open(tmp_path / "o.db")
    try:
        await ob.commit_cycle(1, [reading(f"m{i}", 1_000 + i, "1.00") for i in range(3)])
        bare = await ob.next_batch(2)
        assert bare is not None and bare.payload is None
        first = await ob.next_batch(3, pack=pack)
        assert first is not None and first.seq == bare.seq and first.payload is not None
        assert [r.id for r in first.records] == [r.id for r in bare.records]
        again = await ob.next_batch(4, pack=pack)
        assert again is not None and again.payload == first.payload
        assert calls == [bare.seq]  # sealed once; then the stored bytes
        assert await ob.batch_payload(bare.seq) == first.payload
    finally:
        await ob.close()

"""A full database still numbers batches: one too large to fit is made smaller
until it fits, so that its ack frees space (the database capped with
``max_page_count``, a real SQLite file)."""

from __future__ import annotations

import functools
from decimal import Decimal
from pathlib import Path

from firmware_bridge.reading import Measurement, Quantity, Reading
from store_forward.codec import SealedCodec
from store_forward.outbox import Outbox, StoragePolicy
from tests.store_forward.test_outbox_sealed import _fill_until_full


async def test_a_batch_too_large_for_a_full_database_is_made_smaller(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "gw.db", policy=StoragePolicy(max_bytes=1 << 40, reserve_bytes=0))
    try:
        await ob._db.execute("PRAGMA max_page_count = 100")
        committed = await _fill_until_full(ob)
        assert committed > 40
        # Every record in one sealed batch: its numbering and payload need pages the
        # file cannot have.
        pack = functools.partial(SealedCodec(1, bytes(32)).pack, "gw-full")
        batch = await ob.next_batch(1, max_records=committed, max_bytes=1 << 20, pack=pack)
        assert batch is not None
        assert 0 < len(batch.records) < committed and batch.payload is not None
        freed = await ob.ack(batch.seq)
        assert freed == len(batch.records)
        # What the ack freed takes the next cycle.
        await ob.commit_cycle(9000, [Reading("after", 9000, {Quantity.ENERGY_IMPORT: Measurement(Decimal(1))})])
        st = await ob.stats()
        assert st.readings_committed == committed + 1
    finally:
        await ob.close()


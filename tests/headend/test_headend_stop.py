"""The headend stops when it is cancelled, also when something it awaited lost the
cancellation (Python 3.11's ``asyncio.wait_for``, which aiomqtt's publish uses,
drops a cancel that arrives in the step its future completes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt

from headend.ingest import Headend
from headend.store import HeadendDB
from store_forward.topics import DEFAULT_PREFIX
from tests.harness.mosquitto import Mosquitto


class LosesOneCancellation(Headend):
    """Handles a message as a publish under ``asyncio.wait_for`` can on 3.11: the
    cancellation lands while it waits, and it returns as if its work completed."""

    def __init__(self, db: HeadendDB, port: int) -> None:
        super().__init__(db, host="127.0.0.1", port=port)
        self.handling = asyncio.Event()
        self.lost = 0

    async def _handle(self, client: aiomqtt.Client, msg: aiomqtt.Message) -> None:
        self.handling.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.lost += 1


async def test_a_cancellation_lost_while_handling_a_message_still_stops_the_headend(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    db = await HeadendDB.open(tmp_path / "central.db")
    headend = LosesOneCancellation(db, mosquitto.port)
    task = asyncio.create_task(headend.run())
    try:
        await asyncio.wait_for(headend.connected.wait(), 10)
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as gw:
            await gw.publish(f"{DEFAULT_PREFIX}/gw-1/up", b"\x00not a batch", qos=1)
        await asyncio.wait_for(headend.handling.wait(), 10)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert headend.lost == 1
        assert done == {task}, "the headend went on waiting for messages after it was cancelled"
        assert task.cancelled()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=5)
        await db.close()

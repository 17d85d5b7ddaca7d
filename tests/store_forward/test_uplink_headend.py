"""Uplink ⇄ real mosquitto ⇄ headend: delivered exactly once, deleted only after the ack."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import aiosqlite

from firmware_bridge.reading import Measurement, Quantity, Reading
from gateway.config import BrokerSection, UplinkSection
from store_forward.headend import Headend, HeadendDB
from store_forward.outbox import Outbox
from store_forward.uplink import LinkState, Uplink
from tests.harness.mosquitto import Mosquitto


def reading(i: int) -> Reading:
    return Reading(f"m{i % 3}", 1_000_000 + i, {Quantity.ENERGY_IMPORT: Measurement(Decimal(i) / 100)})


async def wait_for(pred, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@contextlib.asynccontextmanager
async def running(*coros) -> AsyncIterator[list[asyncio.Task[None]]]:  # type: ignore[no-untyped-def]
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield tasks
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def headend_record_ids(path: Path) -> list[int]:
    async with aiosqlite.connect(path) as db, db.execute(
        "SELECT record_id FROM readings ORDER BY record_id"
    ) as cur:
        return [int(r[0]) async for r in cur]


def settings(**kw: float) -> UplinkSection:
    base = {"batch_max_records": 20, "ack_timeout_s": 2.0, "window": 3, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5}
    base.update(kw)
    return UplinkSection(**base)  # type: ignore[arg-type]


async def test_backlog_delivered_once_and_deleted_after_ack(tmp_path: Path, mosquitto: Mosquitto) -> None:
    ob = await Outbox.open(tmp_path / "gw.db")
    hdb = await HeadendDB.open(tmp_path / "central.db")
    for k in range(10):
        await ob.commit_cycle(k, [reading(10 * k + j) for j in range(10)])
    up = Uplink(ob, gateway_id="gw1", broker=BrokerSection(port=mosquitto.port), settings=settings())
    he = Headend(hdb, host="127.0.0.1", port=mosquitto.port)
    async with running(he.run()):
        await asyncio.wait_for(he.connected.wait(), 10)
        async with running(up.run()):
            async def drained() -> bool:
                return (await ob.stats()).records == 0 and up.stats.state is LinkState.UP
            await wait_for(drained, 20, "backlog drained")
    ids = await headend_record_ids(tmp_path / "central.db")
    assert ids == list(range(1, 101))
    st = await ob.stats()
    assert st.readings_acked == 100 and st.batches_pending == 0
    await ob.close()
    await hdb.close()


async def test_broker_killed_repeatedly_while_producing(tmp_path: Path, mosquitto: Mosquitto) -> None:
    ob = await Outbox.open(tmp_path / "gw.db")
    hdb = await HeadendDB.open(tmp_path / "central.db")
    up = Uplink(ob, gateway_id="gw1", broker=BrokerSection(port=mosquitto.port), settings=settings())
    he = Headend(hdb, host="127.0.0.1", port=mosquitto.port)
    produced = 0

    async def produce() -> None:
        nonlocal produced
        for k in range(60):
            await ob.commit_cycle(k, [reading(produced + j) for j in range(5)])
            produced += 5
            up.notify()
            await asyncio.sleep(0.05)

    async with running(he.run(), up.run()):
        producer = asyncio.create_task(produce())
        for _ in range(4):
            await asyncio.sleep(0.6)
            mosquitto.kill()
            await asyncio.sleep(0.4)
            mosquitto.start()
        await producer

        async def drained() -> bool:
            return (await ob.stats()).records == 0
        await wait_for(drained, 60, "backlog drained after broker restarts")
    ids = await headend_record_ids(tmp_path / "central.db")
    assert ids == list(range(1, produced + 1)), "every record exactly once"
    assert up.stats.connects >= 2
    await ob.close()
    await hdb.close()


async def test_commands_reach_the_handler_on_the_uplink_connection(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    import aiomqtt

    ob = await Outbox.open(tmp_path / "gw.db")
    got: list[bytes] = []

    async def handler(raw: bytes) -> None:
        got.append(raw)

    up = Uplink(
        ob, gateway_id="gw1", broker=BrokerSection(port=mosquitto.port), settings=settings(),
        on_command=handler,
    )
    async with running(up.run()):
        async def is_up() -> bool:
            return up.stats.state is LinkState.UP
        await wait_for(is_up, 10, "uplink up")
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as central:
            await central.publish("edgegw/v1/gw1/cmd", b"signed-envelope-1", qos=1)
            await central.publish("edgegw/v1/gw2/cmd", b"for another gateway", qos=1)
            async def received() -> bool:
                return bool(got)
            await wait_for(received, 10, "command delivered")
    assert got == [b"signed-envelope-1"]
    assert up.stats.commands == 1 and up.stats.last_ack_ms is not None
    await ob.close()

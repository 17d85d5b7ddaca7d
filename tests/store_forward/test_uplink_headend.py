"""Uplink ⇄ real mosquitto ⇄ headend: delivered exactly once, deleted only after the ack."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import aiomqtt
import aiosqlite
import pytest

from firmware_bridge.reading import Measurement, Quantity, Reading
from gateway.config import BrokerSection, UplinkSection
from headend.ingest import Headend
from headend.store import HeadendDB
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


@pytest.fixture
async def ob(tmp_path: Path) -> AsyncIterator[Outbox]:
    """The gateway's outbox, closed even when the test fails (an open aiosqlite
    connection's thread would keep the test process from exiting)."""
    outbox = await Outbox.open(tmp_path / "gw.db")
    try:
        yield outbox
    finally:
        await outbox.close()


@pytest.fixture
async def hdb(tmp_path: Path) -> AsyncIterator[HeadendDB]:
    db = await HeadendDB.open(tmp_path / "central.db")
    try:
        yield db
    finally:
        await db.close()


async def test_backlog_delivered_once_and_deleted_after_ack(
    tmp_path: Path, mosquitto: Mosquitto, ob: Outbox, hdb: HeadendDB
) -> None:
    for k in range(10):
        await ob.commit_cycle(k, [reading(10 * k + j) for j in range(10)])
    up = Uplink(ob, gateway_id="gw1", broker=BrokerSection(port=mosquitto.port), settings=settings(), unauthenticated_acks=True)
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


async def test_broker_killed_repeatedly_while_producing(
    tmp_path: Path, mosquitto: Mosquitto, ob: Outbox, hdb: HeadendDB, caplog: pytest.LogCaptureFixture
) -> None:
    """Four SIGKILLs of the broker while readings are produced: every record is
    stored once. The drain after the last restart takes well under a second to
    about 12 s on a loaded 2-core machine (the longer runs are a headend waiting
    out its ack publish on the killed connection); 60 s is the bound."""
    caplog.set_level(logging.WARNING, logger="store_forward.uplink")
    up = Uplink(ob, gateway_id="gw1", broker=BrokerSection(port=mosquitto.port), settings=settings(), unauthenticated_acks=True)
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
    # A broker kill is a link loss, nothing else: no error the uplink only survives
    # by its catch-all reconnect (e.g. a send loop that outlived its session).
    errors = [r.getMessage() for r in caplog.records if r.name == "store_forward.uplink" and r.levelno >= logging.ERROR]
    assert errors == []


async def _drop_link_as_the_sender_wakes(
    up: Uplink, client: aiomqtt.Client
) -> tuple[BaseException | None, float]:
    """The uplink's session (a TaskGroup with a receiver and ``Uplink._send``), where
    the receiver fails with a link loss in the same step as new records wake the
    parked sender: a broker killed while meters are being polled. Returns the
    TaskGroup's error (None if the session did not end within 10 s; the sender is
    then stopped by force) and how long the session took to end."""
    sender: asyncio.Task[None] | None = None

    async def receiver_loses_the_link() -> None:
        deadline = time.monotonic() + 10
        while not up._wake._waiters:  # type: ignore[attr-defined]  # the sender is parked
            assert time.monotonic() < deadline, "the sender never waited for a wake-up"
            await asyncio.sleep(0)
        up.notify()
        raise aiomqtt.MqttError("Disconnected during message iteration")

    async def session() -> None:
        nonlocal sender
        async with asyncio.TaskGroup() as tg:
            tg.create_task(receiver_loses_the_link())
            sender = tg.create_task(up._send(client, tg))

    t0 = time.monotonic()
    s = asyncio.create_task(session())
    await asyncio.wait({s}, timeout=10)
    took = time.monotonic() - t0
    if s.done():
        return s.exception(), took
    for _ in range(100):  # the sender ignored its cancellation: stop it for good
        assert sender is not None
        sender.cancel()
        await asyncio.sleep(0.05)
        if s.done():
            break
    if s.done() and not s.cancelled():
        s.exception()  # retrieved: no "never retrieved" report from the garbage collector
    gc.collect()  # (such a report during pytest's failure formatting breaks it on 3.11.7)
    return None, took


@pytest.mark.parametrize("in_flight", [False, True], ids=["idle", "batch-in-flight"])
async def test_link_loss_as_records_arrive_ends_the_session_at_once(
    mosquitto: Mosquitto, ob: Outbox, in_flight: bool
) -> None:
    """Regression: the sender waited for wake-ups with ``asyncio.wait_for``, which on
    Python 3.11 swallows a cancellation that arrives in the same loop iteration as
    the wake-up. The session then did not end with the link: idle, the sender
    looped on a dead client for good (no reconnect while nothing was produced);
    with a batch in flight, its retransmission was started on the TaskGroup that
    was shutting down (RuntimeError; before the catch-all in ``run`` that ended
    delivery for good, and the backlog stopped draining under load)."""
    if in_flight:
        await ob.commit_cycle(1, [reading(j) for j in range(5)])
    up = Uplink(ob, gateway_id="gw1", broker=BrokerSection(port=mosquitto.port), settings=settings(), unauthenticated_acks=True)
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="edgegw-gw1") as client:
        error, took = await _drop_link_as_the_sender_wakes(up, client)
    assert error is not None, "the session did not end after the link loss"
    assert isinstance(error, BaseExceptionGroup)
    assert [type(e) for e in error.exceptions] == [aiomqtt.MqttError], error.exceptions
    assert took < 5  # at once; 10 s would be the sender's own timers
    assert up.stats.published == (1 if in_flight else 0) and up.stats.retransmits == 0


async def test_commands_reach_the_handler_on_the_uplink_connection(
    mosquitto: Mosquitto, ob: Outbox
) -> None:
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
    assert up.stats.commands == 1
    # An unverified message on the command topic is no contact with central (the
    # handler's owner notes contact once a signature verified).
    assert up.last_contact_ms is None


class FlakyStore:
    """The real SQLite store behind a fault: the first ``failures`` commits raise
    (a database that went away), the later ones go through."""

    def __init__(self, db: HeadendDB, failures: int) -> None:
        self.db, self.failures, self.raised = db, failures, 0

    async def store(self, batch, now_ms):  # type: ignore[no-untyped-def]
        if self.raised < self.failures:
            self.raised += 1
            raise RuntimeError("database connection lost")
        return await self.db.store(batch, now_ms)

    async def summary(self, gateway_id=None):  # type: ignore[no-untyped-def]
        return await self.db.summary(gateway_id)

    async def close(self) -> None:
        await self.db.close()


async def test_headend_survives_store_errors_and_nothing_is_lost(
    tmp_path: Path, mosquitto: Mosquitto, ob: Outbox, hdb: HeadendDB, caplog: pytest.LogCaptureFixture
) -> None:
    for k in range(3):
        await ob.commit_cycle(k, [reading(10 * k + j) for j in range(10)])
    store = FlakyStore(hdb, failures=2)
    up = Uplink(ob, gateway_id="gw1", broker=BrokerSection(port=mosquitto.port), settings=settings(), unauthenticated_acks=True)
    he = Headend(store, host="127.0.0.1", port=mosquitto.port)
    with caplog.at_level(logging.ERROR, logger="headend.ingest"):
        async with running(he.run()) as tasks, running(up.run()):
            async def drained() -> bool:
                return (await ob.stats()).records == 0
            await wait_for(drained, 30, "backlog drained after the store came back")
            assert not tasks[0].done(), "the headend stopped on a store error"
    assert store.raised == 2
    assert await headend_record_ids(tmp_path / "central.db") == list(range(1, 31))
    # once per cause, not once per failure (the second is counted on recovery)
    assert caplog.text.count("headend: failed; reconnecting: RuntimeError('database connection lost')") == 1

"""The link's "since" (shown by ``edgegw status``): when the link last came up or last
went down, not when the latest retry began, and carried over a restart while the link
stays down."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.config import BrokerSection, UplinkSection
from store_forward.outbox import K_LINK, K_LINK_SINCE, Outbox
from store_forward.uplink import LinkState, Uplink
from tests.harness.mosquitto import Mosquitto


def settings() -> UplinkSection:
    return UplinkSection(reconnect_min_s=0.05, reconnect_max_s=0.1, ack_timeout_s=1.0)


async def until(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s: {what}")


@pytest.fixture
async def ob(tmp_path: Path) -> AsyncIterator[Outbox]:
    outbox = await Outbox.open(tmp_path / "gw.db")
    try:
        yield outbox
    finally:
        await outbox.close()


class Clock:
    """Wall time in ms, a second further at each reading: every write of the link
    state happens at a distinct instant."""

    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        self.now += 1000
        return self.now


def tries(up: Uplink) -> int:
    """Connection attempts so far (each one connects or fails)."""
    return up.stats.connects + up.stats.connect_failures


async def run_uplink(ob: Outbox, port: int, clock: Clock) -> tuple[Uplink, asyncio.Task[None]]:
    up = Uplink(
        ob, gateway_id="gw1", broker=BrokerSection(port=port), settings=settings(),
        clock_ms=clock, unauthenticated_acks=True,
    )
    return up, asyncio.create_task(up.run())


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_down_since_survives_retries_and_a_restart(
    ob: Outbox, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="store_forward.uplink")
    clock = Clock()
    up, task = await run_uplink(ob, mosquitto.port, clock)
    try:
        await until(lambda: up.stats.state is LinkState.UP, 10, "link up")
        await asyncio.sleep(0.1)
        up_since = (await ob.kv())[K_LINK_SINCE]
        mosquitto.kill()
        await until(lambda: up.stats.state is not LinkState.UP, 10, "link down")
        await asyncio.sleep(0.1)
        kv = await ob.kv()
        down_since = kv[K_LINK_SINCE]
        assert int(down_since) > int(up_since)
        connects = up.stats.connects
        # several retries go by (each between down and connecting): the since stays
        seen = tries(up)
        await until(lambda: tries(up) >= seen + 3, 10, "retries")
        kv = await ob.kv()
        assert kv[K_LINK] in ("down", "connecting") and kv[K_LINK_SINCE] == down_since
        assert up.stats.connects == connects
    finally:
        await stop(task)
    # a restart while the broker stays away: still down since the same instant
    up, task = await run_uplink(ob, mosquitto.port, clock)
    try:
        before = clock.now
        seen = tries(up)
        await until(lambda: tries(up) >= seen + 3, 10, "retries after restart")
        assert (await ob.kv())[K_LINK_SINCE] == down_since
        mosquitto.start()
        await until(lambda: up.stats.state is LinkState.UP, 10, "link up again")
        await asyncio.sleep(0.1)
        kv = await ob.kv()
        assert kv[K_LINK] == "up" and int(kv[K_LINK_SINCE]) > before
    finally:
        await stop(task)


async def test_a_restart_after_the_link_was_up_starts_a_new_since(
    ob: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """The last run ended with the link up (a crash or a stop): how long it has been
    down is unknown, so the new run counts from its own start."""
    await ob.set_state({K_LINK: "up", K_LINK_SINCE: 5})
    clock = Clock()
    up, task = await run_uplink(ob, 1, clock)  # port 1: nothing listens
    try:
        caplog.set_level(logging.INFO, logger="store_forward.uplink")
        await until(lambda: tries(up) >= 2, 10, "retries")
        kv = await ob.kv()
        assert kv[K_LINK] in ("down", "connecting") and int(kv[K_LINK_SINCE]) > 1_000_000
    finally:
        await stop(task)

"""The gateway daemon: supervisors under one TaskGroup.

::

    bus pollers (one task per bus) ──► cycle queue ──► writer (one SQLite writer)
                                                          │ notify
                                                          ▼
                                                       uplink ──► MQTT broker

* A bus poller owns its bus. If the bus cannot be opened or fails, the poller
  logs it, waits a back-off and opens it again; other buses are not affected.
* The writer commits each poll cycle as one transaction.
* The uplink reconnects on its own; nothing upstream waits for it.
* Stopping (SIGTERM): pollers stop first, the writer then commits every cycle
  already polled, then the uplink stops (unacknowledged batches stay in the
  outbox and are sent again after the restart), and the database is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from firmware_bridge.bus import open_bus
from firmware_bridge.reading import Reading
from firmware_bridge.scheduler import MeterHealth
from gateway.config import BusSection, Config
from store_forward.outbox import MeterStatus, Outbox
from store_forward.uplink import Uplink, backoff_delay

log = logging.getLogger(__name__)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Cycle:
    bus: str
    time_ms: int
    readings: list[Reading]
    statuses: list[MeterStatus]
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class DaemonStats:
    cycles: int = 0
    readings: int = 0
    commit_failures: int = 0
    bus_failures: dict[str, int] = field(default_factory=dict)


def status_from_health(meter_id: str, health: MeterHealth) -> MeterStatus:
    """The scheduler's per-meter health as the row kept for `edgegw status`."""
    err = health.last_error
    return MeterStatus(
        meter_id=meter_id,
        online=health.online,
        last_attempt_ms=health.last_attempt_ms,
        last_good_ms=health.last_good_ms,
        consecutive_failures=health.consecutive_failures,
        total_failures=health.total_failures,
        last_error=None if err is None else f"{err.kind}: {err.text}",
    )


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        clock_ms: Callable[[], int] = wall_ms,
        on_cycle: Callable[[Cycle], None] | None = None,
    ) -> None:
        self.config = config
        self.clock_ms = clock_ms
        self.on_cycle = on_cycle
        self.stats = DaemonStats()
        self.outbox: Outbox | None = None
        self.uplink: Uplink | None = None
        self.ready = asyncio.Event()
        self._pollers: list[asyncio.Task[None]] = []
        self._cycles: asyncio.Queue[Cycle] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        outbox = await Outbox.open(cfg.storage.path)
        self.outbox = outbox
        uplink = Uplink(
            outbox,
            gateway_id=cfg.gateway.id,
            broker=cfg.broker,
            settings=cfg.uplink,
            clock_ms=self.clock_ms,
        )
        self.uplink = uplink
        cycles: asyncio.Queue[Cycle] = asyncio.Queue(maxsize=256)
        self._cycles = cycles
        try:
            await outbox.add_event(
                self.clock_ms(), {"type": "gateway_started", "gateway": cfg.gateway.id}
            )
            async with asyncio.TaskGroup() as tg:
                self._pollers = [
                    tg.create_task(self._bus_loop(bus, cycles), name=f"bus:{bus.name}")
                    for bus in cfg.buses
                ]
                writer = tg.create_task(self._writer(outbox, cycles, uplink), name="writer")
                up = tg.create_task(uplink.run(), name="uplink")
                self.ready.set()
                log.info(
                    "gateway %s running: %d buses, %d meters",
                    cfg.gateway.id,
                    len(cfg.buses),
                    len(cfg.meters),
                )
                await stop.wait()
                log.info("stopping: finishing polls and committing what was read")
                await self.stop_polling()
                writer.cancel()
                up.cancel()
        finally:
            await outbox.close()
            log.info("stopped")

    async def stop_polling(self) -> None:
        """Stop every bus poller and wait until all cycles already read are committed.

        The uplink keeps running, so the backlog can still drain.
        """
        for t in self._pollers:
            t.cancel()
        await asyncio.gather(*self._pollers, return_exceptions=True)
        if self._cycles is not None:
            await self._cycles.join()

    async def _bus_loop(self, bus: BusSection, out: asyncio.Queue[Cycle]) -> None:
        cfg = self.config
        meters = cfg.meters_on(bus.name)
        interval = cfg.gateway.poll_interval_s
        rng = random.Random()
        attempt = 0
        while True:
            try:
                async with open_bus(bus, meters, cfg.profiles) as scheduler:
                    attempt = 0
                    next_at = time.monotonic()
                    while True:
                        now = self.clock_ms()
                        result = await scheduler.run_cycle(now)
                        statuses = [
                            status_from_health(mid, h) for mid, h in result.health.items()
                        ]
                        await out.put(Cycle(bus.name, now, list(result.readings), statuses))
                        next_at += interval
                        delay = next_at - time.monotonic()
                        if delay < 0:  # overran: start the next cycle now, do not bunch up
                            next_at = time.monotonic()
                            delay = 0
                        await asyncio.sleep(delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.bus_failures[bus.name] = self.stats.bus_failures.get(bus.name, 0) + 1
                log.error("bus %s failed: %s", bus.name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                await asyncio.sleep(backoff_delay(attempt, 1.0, 60.0, rng))
                attempt += 1

    async def _writer(self, outbox: Outbox, cycles: asyncio.Queue[Cycle], uplink: Uplink) -> None:
        while True:
            cycle = await cycles.get()
            try:
                for attempt in range(5):
                    try:
                        await outbox.commit_cycle(
                            cycle.time_ms, cycle.readings, cycle.statuses, cycle.events
                        )
                        break
                    except Exception as exc:
                        self.stats.commit_failures += 1
                        log.error("commit of %s cycle failed (attempt %d): %s", cycle.bus, attempt + 1, exc)
                        await asyncio.sleep(0.2 * (attempt + 1))
                else:
                    log.critical(
                        "dropping %d readings of bus %s after repeated commit failures",
                        len(cycle.readings),
                        cycle.bus,
                    )
                    continue
                self.stats.cycles += 1
                self.stats.readings += len(cycle.readings)
                uplink.notify()
                if self.on_cycle is not None:
                    with contextlib.suppress(Exception):
                        self.on_cycle(cycle)
            finally:
                cycles.task_done()

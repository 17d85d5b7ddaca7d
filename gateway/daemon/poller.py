"""A bus poller: owns one bus, polls its meters, hands readings to the writer.

The poller opens its bus (the same way the CLI does), polls every poll
interval and hands the readings to the writer in slices while a cycle runs
(:class:`Slicer`), then the cycle's end with the meters' statuses and state
changes. Beside the polling it runs the bus's relay worker, and it reads the
relays of prepaid meters back when the bus opens and every few cycles, so a
decision committed but lost before it reached the relay is re-driven. If the
bus cannot be opened or fails, the poller logs it, waits a back-off and opens
it again; other buses are not affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from firmware_bridge.backoff import backoff_delay
from firmware_bridge.bus import open_site_bus
from firmware_bridge.cause_log import CauseLog
from firmware_bridge.faults import FaultEvents
from firmware_bridge.reading import Reading, TimeSource, new_reading
from firmware_bridge.relay import controller_for
from firmware_bridge.scheduler import MeterHealth
from firmware_bridge.settings import BusSettings
from gateway import meter_health
from gateway.daemon.writer import Cycle, Work
from store_forward.outbox import MeterStatus

if TYPE_CHECKING:
    from gateway.daemon.supervisor import Daemon

log = logging.getLogger(__name__)

# Readings of a poll cycle reach the writer at most this late (see Slicer).
CYCLE_SLICE_S = 0.2
# The relays of prepaid meters are read back when a bus opens and then, for meters
# whose readings do not carry the relay state (Modbus coil relays), every this many
# poll cycles while no relay operation is in hand: a decision committed but lost
# before it reached the relay (a crash, a bus error) is re-driven.
RELAY_CHECK_CYCLES = 10


class Slicer:
    """Hands a poll cycle's readings to the writer in slices while the cycle runs.

    A reading is money: the debit it causes and a cutoff it triggers should not
    wait for the rest of a long bus cycle (200 meters on RS-485 take tens of
    seconds). Readings go to the writer when a reading arrives and the oldest
    unsent one is ``slice_s`` old (so a slice waits at most ``slice_s`` plus one
    meter's read), still batched: one transaction per slice, never per row.
    The rest goes with the cycle's end and the meters' statuses.
    """

    def __init__(
        self,
        bus: str,
        out: Work,
        clock_ms: Callable[[], int],
        slice_s: float,
        faults: FaultEvents | None = None,
        time_source: TimeSource = TimeSource.SYSTEM,
    ) -> None:
        self.bus, self.out, self.clock_ms, self.slice_s = bus, out, clock_ms, slice_s
        self.time_source = time_source  # how far the cycle's (trusted) time can be trusted
        self.pending: list[Reading] = []
        self.events: list[dict[str, Any]] = []  # meter faults (a bad date...) with their evidence
        self.faults = faults or FaultEvents()
        self.since = 0.0

    async def add(self, reading: Reading) -> None:
        if reading.time_source is not self.time_source:
            reading = with_time_source(reading, self.time_source)
        if not self.pending:
            self.since = time.monotonic()
        self.pending.append(reading)
        self.events += self.faults.events(reading)
        if time.monotonic() - self.since >= self.slice_s:
            batch, self.pending = self.pending, []
            events, self.events = self.events, []
            await self.out.put(Cycle(self.bus, self.clock_ms(), batch, [], events, final=False))

    async def finish(
        self, now_ms: int, statuses: list[MeterStatus], health: list[meter_health.Change] | None = None
    ) -> None:
        batch, self.pending = self.pending, []
        events, self.events = self.events, []
        await self.out.put(Cycle(self.bus, now_ms, batch, statuses, events, health=health or []))


def with_time_source(reading: Reading, time_source: TimeSource) -> Reading:
    """``dataclasses.replace(reading, time_source=time_source)``, built directly for a
    plain Reading (once per reading: replace costs several times as much)."""
    if type(reading) is not Reading:
        return replace(reading, time_source=time_source)
    return new_reading(reading.meter_id, reading.time_ms, reading.values, time_source, reading.meta, reading.faults)


def status_from_health(meter_id: str, health: MeterHealth) -> MeterStatus:
    """The scheduler's per-meter health as the row kept for `edgegw status`."""
    err = health.last_error
    # by position, in MeterStatus' field order (every meter, every cycle: keywords cost more)
    return MeterStatus(
        meter_id,
        health.online,
        health.last_attempt_ms,
        health.last_good_ms,
        health.consecutive_failures,
        health.total_failures,
        None if err is None else f"{err.kind}: {err.text}",
    )


class BusPoller:
    """Polls one bus for ever (until the daemon stops)."""

    def __init__(self, daemon: Daemon, bus: BusSettings, out: Work) -> None:
        self.daemon, self.bus, self.out = daemon, bus, out

    async def run(self, *, phase_s: float = 0.0) -> None:
        """The first cycle starts ``phase_s`` late: buses are spread over the poll
        interval, so their readings (and the rating work they bring) reach the
        single writer evenly instead of all at once."""
        d = self.daemon
        bus, out = self.bus, self.out
        cfg = d.config
        meters = cfg.meters_on(bus.name)
        interval = cfg.gateway.poll_interval_s
        rng = random.Random()
        attempt = 0
        failing = CauseLog(log, f"bus {bus.name}", level=logging.ERROR, fields={"bus": bus.name})
        while True:
            try:
                async with open_site_bus(
                    cfg.site, bus, meters, owner=f"edgegw daemon (gateway {cfg.gateway.id})", policy=d.backoff
                ) as scheduler:
                    controller = controller_for(scheduler)
                    attempt = 0
                    failing.ok("open again")
                    async with asyncio.TaskGroup() as tg:
                        relay_worker = tg.create_task(
                            d.relays.worker(bus.name, controller, out).run(),
                            name=f"relays:{bus.name}",
                        )
                        next_at = time.monotonic() + phase_s
                        phase_s = 0.0  # a reopened bus polls at once
                        await self.sleep_unless_stopping(next_at)
                        cycles = 0
                        while not d.stopping.is_set():
                            if cycles % RELAY_CHECK_CYCLES == 0 and (cycles == 0 or d.relays_idle()):
                                await self.read_back_relays(controller)
                            cycles += 1
                            trusted = d.clock.now() if d.clock is not None else None
                            now = trusted.time_ms if trusted is not None else d.clock_ms()
                            slicer = Slicer(
                                bus.name, out, d.time_ms, CYCLE_SLICE_S, d.meter_faults,
                                trusted.time_source if trusted is not None else TimeSource.SYSTEM,
                            )  # fmt: skip
                            # each reading stamped with trusted time when the bus is its read's: the
                            # daemon's one clock, never the process's monotonic clock beside it
                            result = await scheduler.run_cycle(now, on_reading=slicer.add, clock_ms=d.time_ms)
                            statuses = [status_from_health(mid, h) for mid, h in result.health.items()]
                            await slicer.finish(now, statuses, self.health_changes(result.health, now))
                            d.watchdog.note_poll_progress()
                            d.watchdog.note(f"poll:{bus.name}")
                            next_at += interval
                            if next_at < time.monotonic():  # overran: start now, do not bunch up
                                next_at = time.monotonic()
                            await self.sleep_unless_stopping(next_at)
                        # The relay worker takes no new operation now and finishes the
                        # ones in hand, so a relay that moved always has its event.
                        await relay_worker
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                d.stats.bus_failures[bus.name] = d.stats.bus_failures.get(bus.name, 0) + 1
                # once per change of cause, not once per attempt to open it again
                failing.failed(f"failed: {exc}", exc_info=log.isEnabledFor(logging.DEBUG))
                await asyncio.sleep(backoff_delay(attempt, 1.0, 60.0, rng))
                attempt += 1

    def health_changes(self, health: Mapping[str, MeterHealth], now_ms: int) -> list[meter_health.Change]:
        """Meters of this bus whose state changed this cycle: logged once here, sent
        to central as events with the cycle's commit."""
        d = self.daemon
        found = meter_health.changes(d.meter_states, health, self.bus.name, now_ms)
        for c in found:
            d.meter_states[c.meter] = meter_health.Known(c.after, c.at_ms)
        meter_health.log_changes(log, found)
        return found

    async def read_back_relays(self, controller: Any) -> None:
        """Read the relays of this bus's prepaid meters; the writer re-drives any that
        differ from the committed cutoff decision (:meth:`Prepaid.on_relay_states_in`)."""
        d = self.daemon
        if d.prepaid is None:
            return
        states: list[tuple[str, bool]] = []
        for meter in controller.actuators:
            if meter not in d.prepaid.meter_account or meter in d.writer.relay_in_readings:
                continue
            try:
                states.append((meter, await controller.read_open(meter)))
            except Exception as exc:  # a dead meter: its next read-back or reading tells
                log.debug("relay of %s not read back: %s", meter, exc)
        if states:
            await self.out.put(Cycle(self.bus.name, d.time_ms(), [], [], final=False, relay_states=states))

    async def sleep_unless_stopping(self, until_monotonic: float) -> None:
        stopping = self.daemon.stopping
        delay = until_monotonic - time.monotonic()
        if delay > 0 and not stopping.is_set():
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives in the same step as the event.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stopping.wait()

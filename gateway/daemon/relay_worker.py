"""Relay operations: one queue per bus, and the worker that carries them out.

The writer decides relay operations (cutoff, restore) and the command handler
asks for them (remote relay, alarm, power-protect); :meth:`Relays.request`
queues each for the bus of its meter, once the storage state permits it. Beside
each bus poller a :class:`RelayWorker` runs them as soon as they arrive: each
operation is its own task whose bus transactions (read, write, read back) take
turns with the polls through the bus scheduler, and whose settle time holds
neither the bus nor the other relays. Every operation ends in an event for
central, handed to the writer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from firmware_bridge.events import event
from firmware_bridge.relay import RelayRateLimited, RelayRefused, RelayResult
from firmware_bridge.relay_ops import RelayIntent, RelayOp
from gateway.daemon.writer import Cycle, Work
from store_forward.storage_state import Action, permits

if TYPE_CHECKING:
    from gateway.daemon.supervisor import Daemon

log = logging.getLogger(__name__)

# Relay operations in progress at once per bus: their settle times overlap while
# their bus transactions take turns with the polls. Closing is held to fewer at
# once than tripping: many supplies coming back together load the transformer
# with their in-rush (cold load pickup); a trip has no such cost and is urgent.
TRIP_CONCURRENCY = 32
CLOSE_CONCURRENCY = 8


def relay_event(
    intent: RelayIntent, result: RelayResult | None, error: str | None
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "account": intent.account,
        "meter": intent.meter,
        "action": intent.op.value,
        "want_open": intent.open,
        "reason": intent.reason,
    }
    if result is not None:
        fields |= {
            "ok": result.ok,
            "final_open": result.final_open,
            "drives": len(result.attempts),
            "detail": result.reason,
            "pending_customer": result.pending_customer,
        }
    else:
        fields |= {"ok": False, "detail": error}
    return event("relay.alarm" if (result is not None and result.alarm) else "relay.operation", fields)


class Relays:
    """The relay operations waiting for each bus, and how many are in progress."""

    def __init__(self, daemon: Daemon, buses: list[str]) -> None:
        self.daemon = daemon
        self.queues: dict[str, asyncio.Queue[RelayIntent]] = {b: asyncio.Queue() for b in buses}
        self.in_flight = 0

    def idle(self) -> bool:
        """No relay operation is waiting for its bus."""
        return self.in_flight == 0 and all(q.empty() for q in self.queues.values())

    def request(self, intent: RelayIntent) -> None:
        """Queue a relay operation for the bus of ``intent.meter`` (after a commit)."""
        d = self.daemon
        bus = d.bus_of.get(intent.meter)
        if bus is None:
            log.error("relay intent for unknown meter %s: %s", intent.meter, intent)
            return
        if d.outbox is not None:
            action = Action.COMMANDED_RELAY if intent.commanded else Action.CUTOFF
            v = permits(d.outbox.storage, action, intent.account or None)
            if not v.allowed:
                d.stats.relays_refused += 1
                d.metrics.relay_requested(intent, refused=True)
                log.warning("relay %s for %s not operated: %s", intent.op, intent.meter, v.why)
                d.outbox.note_event(
                    event(
                        "relay.refused",
                        account=intent.account,
                        meter=intent.meter,
                        action=intent.op.value,
                        reason=v.why,
                    )
                )
                return
        d.metrics.relay_requested(intent)
        self.queues[bus].put_nowait(intent)

    def worker(self, bus: str, controller: Any, out: Work) -> RelayWorker:
        return RelayWorker(self, bus, controller, out)


class RelayWorker:
    """Runs the relay operations of one bus as soon as they are decided, beside the
    polling, until the daemon stops (then it finishes the ones in hand)."""

    def __init__(self, relays: Relays, bus: str, controller: Any, out: Work) -> None:
        self.relays, self.bus, self.controller, self.out = relays, bus, controller, out
        self.daemon = relays.daemon

    async def run(self) -> None:
        """Each operation is its own task: its bus transactions (read, write, read
        back) take turns with the polls through the scheduler, and its settle
        time holds neither the bus nor the other relays. Operations on one
        relay are serialised by the controller.
        """
        trips = asyncio.Semaphore(TRIP_CONCURRENCY)
        others = asyncio.Semaphore(CLOSE_CONCURRENCY)

        async def one(intent: RelayIntent, limit: asyncio.Semaphore) -> None:
            try:
                async with limit:
                    body = await self.operate(intent)
                if body is not None:
                    await self.out.put(Cycle(self.bus, self.daemon.time_ms(), [], [], [body]))
            finally:
                self.relays.in_flight -= 1

        async with asyncio.TaskGroup() as tg:
            while (intent := await self.next_intent()) is not None:
                self.relays.in_flight += 1
                limit = trips if intent.op is RelayOp.TRIP else others
                tg.create_task(one(intent, limit), name=f"relay:{intent.meter}")

    async def next_intent(self) -> RelayIntent | None:
        """The next relay operation; None once the daemon is stopping."""
        relays = self.relays.queues[self.bus]
        stopping = self.daemon.stopping
        if not relays.empty():
            return None if stopping.is_set() else relays.get_nowait()
        if stopping.is_set():
            return None
        getter = asyncio.ensure_future(relays.get())
        stopper = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        return None

    async def operate(self, intent: RelayIntent) -> dict[str, Any] | None:
        if intent.op.is_signal:
            return await self.signal(intent)
        d = self.daemon
        d.stats.relay_operations += 1
        d.risk.relay_commanded(intent.meter, intent.open, d.time_ms())
        try:
            result = await self.controller.set_open(intent.meter, intent.open)
        except (RelayRateLimited, RelayRefused, KeyError) as exc:
            log.warning("relay %s for %s not operated: %s", intent.op, intent.meter, exc)
            return relay_event(intent, None, str(exc))
        except Exception as exc:  # a bus error: reassert re-drives on a later reading
            log.error("relay %s for %s failed: %s", intent.op, intent.meter, exc)
            return relay_event(intent, None, f"{type(exc).__name__}: {exc}")
        if result.alarm:
            d.stats.relay_alarms += 1
            log.error("relay alarm on %s: %s", intent.meter, result.reason)
        return relay_event(intent, result, None)

    async def signal(self, intent: RelayIntent) -> dict[str, Any] | None:
        """A meter alarm or power-protect command; None (nothing to report) when the
        meter has no such command and the intent came from the cutoff policy."""
        sig = intent.op

        def signalled(ok: bool, detail: str) -> dict[str, Any]:
            return event(
                "meter.signal",
                account=intent.account,
                meter=intent.meter,
                signal=sig.value,
                reason=intent.reason,
                ok=ok,
                detail=detail,
            )

        if not self.controller.supports_signals(intent.meter):
            if intent.commanded:
                return signalled(False, f"{sig.value} is not supported by this meter")
            log.debug("meter %s has no %s command", intent.meter, sig.value)
            return None
        try:
            result = await self.controller.signal(intent.meter, sig)
        except Exception as exc:
            log.error("%s for %s failed: %s", sig.value, intent.meter, exc)
            return signalled(False, f"{type(exc).__name__}: {exc}")
        if not result.ok:
            log.warning("%s for %s not acknowledged: %s", sig.value, intent.meter, result.detail)
        return signalled(result.ok, result.detail)


class CommandRelays:
    """The command handler's relay port: remote relay operations go to the meter's bus."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def request(self, meter_id: str, op: RelayOp, *, reason: str, command_id: str) -> None:
        """Queue the operation for the meter's bus. Meter alarm and power-protect are
        sent where the meter has them; the meter.signal event says whether it
        acknowledged or cannot."""
        account = self.daemon.prepaid.meter_account.get(meter_id, "") if self.daemon.prepaid else ""
        why = f"command {command_id}: {reason}"
        self.daemon.request_relay(RelayIntent(meter_id, op, why, account, command_id=command_id))

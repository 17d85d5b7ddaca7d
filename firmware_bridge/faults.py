"""Meter faults carried by readings, as events for central.

A :class:`~firmware_bridge.reading.MeterFault` rides on every reading while
the meter keeps sending the bad field (``edgegw meters read`` shows it each
time). Central hears about it once per change of cause: :class:`FaultEvents`
turns the faults of a stream of readings into ``meter.<kind>_fault`` events
(``meter.clock_fault``), each with the raw bytes as evidence, and forgets a
fault once the meter sends that part cleanly again, so a recurrence is
reported anew.
"""

from __future__ import annotations

from typing import Any

from firmware_bridge.events import event
from firmware_bridge.reading import Quality, Quantity, Reading

# The quantity whose clean reading clears a fault of this kind.
CLEARED_BY: dict[str, Quantity] = {"clock": Quantity.METER_CLOCK}


def fault_event(reading: Reading, index: int) -> dict[str, Any]:
    f = reading.faults[index]
    return event(
        f"meter.{f.kind}_fault",
        meter=reading.meter_id,
        time_ms=reading.time_ms,
        cause=f.cause,
        detail=f.detail,
        raw=f.raw,
    )


class FaultEvents:
    """See the module documentation. Pure bookkeeping: no I/O, no clock."""

    def __init__(self) -> None:
        self._cause: dict[tuple[str, str], str] = {}  # (meter, kind) -> cause reported

    def events(self, reading: Reading) -> list[dict[str, Any]]:
        if not reading.faults and not self._cause:
            return []  # nothing to report and nothing to clear (most readings)
        out: list[dict[str, Any]] = []
        kinds = set()
        for i, f in enumerate(reading.faults):
            kinds.add(f.kind)
            key = (reading.meter_id, f.kind)
            if self._cause.get(key) != f.cause:
                self._cause[key] = f.cause
                out.append(fault_event(reading, i))
        for kind, quantity in CLEARED_BY.items():
            m = reading.values.get(quantity)
            if kind not in kinds and m is not None and m.quality is Quality.GOOD:
                self._cause.pop((reading.meter_id, kind), None)
        return out

"""The poller's per-reading hand-over to the writer (gateway/daemon/poller.py)."""

from __future__ import annotations

import asyncio
import dataclasses
from decimal import Decimal

from firmware_bridge.faults import FaultEvents
from firmware_bridge.reading import Measurement, MeterFault, Quantity, Reading, TimeSource
from firmware_bridge.scheduler import ErrorInfo, MeterHealth
from gateway.daemon.poller import Slicer, status_from_health, with_time_source
from gateway.daemon.writer import Cycle, Work
from store_forward.outbox import MeterStatus


def _reading(**kw: object) -> Reading:
    base: dict[str, object] = {
        "meter_id": "m1",
        "time_ms": 1_700_000_000_000,
        "values": {Quantity.ENERGY_IMPORT: Measurement(Decimal("12.34"))},
        "meta": {"protocol": "modbus"},
    }
    return Reading(**(base | kw))  # type: ignore[arg-type]


class _Stamped(Reading):
    __slots__ = ()


def test_with_time_source_is_replace() -> None:
    faults = (MeterFault("clock", "clock.weekday", "weekday 9", "0901"),)
    for r in (_reading(), _reading(faults=faults), _reading(time_source=TimeSource.METER)):
        got = with_time_source(r, TimeSource.CENTRAL)
        assert got == dataclasses.replace(r, time_source=TimeSource.CENTRAL) and type(got) is Reading
    sub = _Stamped("m2", 1, {})
    got = with_time_source(sub, TimeSource.SYSTEM_SYNCED)
    assert type(got) is _Stamped and got == dataclasses.replace(sub, time_source=TimeSource.SYSTEM_SYNCED)


def test_status_from_health() -> None:
    h = MeterHealth("m1", online=False, consecutive_failures=2, total_failures=3, total_successes=4,
                    last_good_ms=5, last_attempt_ms=6, last_error=ErrorInfo("timeout", "no answer", 6))  # fmt: skip
    assert status_from_health("m1", h) == MeterStatus(
        meter_id="m1", online=False, last_attempt_ms=6, last_good_ms=5,
        consecutive_failures=2, total_failures=3, last_error="timeout: no answer",
    )  # fmt: skip
    assert status_from_health("m2", MeterHealth("m2")).last_error is None


async def test_slicer_stamps_the_cycles_time_source_and_reports_faults_once() -> None:
    out: Work = asyncio.Queue()
    slicer = Slicer("b", out, lambda: 7, 3600.0, FaultEvents(), TimeSource.SYSTEM_SYNCED)
    fault = MeterFault("clock", "clock.weekday", "weekday 9", "0901")
    await slicer.add(_reading())
    await slicer.add(_reading(meter_id="m2", faults=(fault,)))
    await slicer.add(_reading(meter_id="m2", faults=(fault,)))
    await slicer.finish(9, [])
    cycle = out.get_nowait()
    assert isinstance(cycle, Cycle) and cycle.final and out.empty()
    assert [r.time_source for r in cycle.readings] == [TimeSource.SYSTEM_SYNCED] * 3
    assert [r.meter_id for r in cycle.readings] == ["m1", "m2", "m2"]
    assert [e["meter"] for e in cycle.events] == ["m2"]  # once per change of cause

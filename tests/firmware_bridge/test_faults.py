"""Meter faults to events: once per change of cause, cleared by a clean read."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.faults import FaultEvents
from firmware_bridge.reading import Measurement, MeterFault, Quality, Quantity, Reading

CLOCK_OK = {Quantity.METER_CLOCK: Measurement(Decimal(1_790_000_000))}
ENERGY = {Quantity.ENERGY_IMPORT: Measurement(Decimal("406.00"))}


def reading(meter: str, t: int, cause: str | None) -> Reading:
    if cause is None:
        return Reading(meter, t, {**ENERGY, **CLOCK_OK})
    fault = MeterFault("clock", cause, f"detail of {cause}", "04000101: 01 30 02 26")
    values = dict(ENERGY)
    if cause == "clock.weekday":
        values[Quantity.METER_CLOCK] = Measurement(Decimal(1_790_000_000), Quality.SUSPECT)
    return Reading(meter, t, values, faults=(fault,))


def test_once_per_change_of_cause_and_again_after_a_clean_read() -> None:
    f = FaultEvents()
    first = f.events(reading("m1", 1, "clock.invalid_date"))
    assert first == [
        {
            "type": "meter.clock_fault",
            "meter": "m1",
            "time_ms": 1,
            "cause": "clock.invalid_date",
            "detail": "detail of clock.invalid_date",
            "raw": "04000101: 01 30 02 26",
        }
    ]
    assert f.events(reading("m1", 2, "clock.invalid_date")) == []
    assert f.events(reading("m2", 2, "clock.invalid_date")) != []  # per meter
    assert [e["cause"] for e in f.events(reading("m1", 3, "clock.unset"))] == ["clock.unset"]
    assert f.events(reading("m1", 4, "clock.weekday"))[0]["cause"] == "clock.weekday"
    assert f.events(reading("m1", 5, None)) == []
    assert len(f.events(reading("m1", 6, "clock.weekday"))) == 1  # a recurrence is news
    # a reading without the clock at all (not asked, or the read ended early) clears nothing
    f.events(reading("m3", 7, "clock.unset"))
    assert f.events(Reading("m3", 8, ENERGY)) == []
    assert f.events(reading("m3", 9, "clock.unset")) == []


@given(st.lists(st.sampled_from([None, "clock.unset", "clock.invalid_date", "clock.weekday"]), max_size=30))
def test_events_follow_the_changes(causes: list[str | None]) -> None:
    f = FaultEvents()
    events = [e for i, c in enumerate(causes) for e in f.events(reading("m", i, c))]
    expected, last = [], None
    for c in causes:
        if c is not None and c != last:
            expected.append(c)
        last = c
    assert [e["cause"] for e in events] == expected

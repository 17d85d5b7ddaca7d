"""The fast constructors of the polling path build what the classes build."""

from __future__ import annotations

import dataclasses
import pickle
from decimal import Decimal

import pytest

from firmware_bridge.reading import (
    Measurement,
    MeterFault,
    Quality,
    Quantity,
    Reading,
    TimeSource,
    new_measurement,
    new_reading,
)


def test_new_measurement_is_a_measurement() -> None:
    for args in [(Decimal("230.1"),), (Decimal("NaN"), Quality.INVALID), (Decimal("-0.00"), Quality.SUSPECT)]:
        m, want = new_measurement(*args), Measurement(*args)
        assert type(m) is Measurement and repr(m) == repr(want)
        assert dataclasses.astuple(m) == dataclasses.astuple(want)
        assert repr(pickle.loads(pickle.dumps(m))) == repr(m)
    assert new_measurement(Decimal(1)) == Measurement(Decimal(1))
    assert hash(new_measurement(Decimal(1))) == hash(Measurement(Decimal(1)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        new_measurement(Decimal(1)).value = Decimal(2)  # type: ignore[misc]


def test_new_reading_is_a_reading() -> None:
    values = {Quantity.ENERGY_IMPORT: Measurement(Decimal("1206.42"))}
    faults = (MeterFault("clock", "clock.weekday", "weekday 9", "0901"),)
    for extra in [(), (faults,)]:
        r = new_reading("m1", 5, values, TimeSource.SYSTEM_SYNCED, {"protocol": "modbus"}, *extra)
        want = Reading("m1", 5, values, TimeSource.SYSTEM_SYNCED, {"protocol": "modbus"}, *extra)
        assert type(r) is Reading and r == want and repr(r) == repr(want)
        assert pickle.loads(pickle.dumps(r)) == r
        assert dataclasses.replace(r, time_ms=6) == dataclasses.replace(want, time_ms=6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.time_ms = 7  # type: ignore[misc]

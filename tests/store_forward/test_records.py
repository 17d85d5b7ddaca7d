"""Outbox record bodies: a reading's canonical JSON form and its split by class."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.reading import Measurement, Quality, Quantity, Reading, TimeSource
from store_forward.records import (
    TELEMETRY_QUANTITIES,
    RecordClass,
    reading_body,
    reading_from_body,
    split_reading,
)


def _reference_body(reading: Reading, values: dict[Quantity, Measurement]) -> dict[str, Any]:
    """The body written out the plain way (what the faster builder must equal)."""
    body: dict[str, Any] = {
        "m": reading.meter_id,
        "t": reading.time_ms,
        "ts": reading.time_source.value,
        "v": {q.value: str(m.value) for q, m in sorted(values.items())},
    }
    bad = {q.value: m.quality.value for q, m in values.items() if m.quality is not Quality.GOOD}
    if bad:
        body["q"] = dict(sorted(bad.items()))
    return body


readings = st.builds(
    Reading,
    st.sampled_from(["m1", "000000410001", "仪表-4"]),
    st.integers(0, 2**45),
    st.dictionaries(
        st.sampled_from(list(Quantity)),
        st.builds(
            Measurement,
            st.decimals(allow_nan=False, allow_infinity=False, places=3),
            st.sampled_from(list(Quality)),
        ),
        max_size=len(Quantity),
    ),
    st.sampled_from(list(TimeSource)),
)


@given(readings)
def test_bodies_are_the_plain_form_in_order(reading: Reading) -> None:
    values = dict(reading.values)
    body = reading_body(reading)
    assert body == _reference_body(reading, values)
    # key order too (the wire encoder carries a reading's values in this order)
    assert list(body["v"]) == sorted(body["v"])
    assert list(body.get("q", {})) == sorted(body.get("q", {}))
    assert all(type(k) is str for k in [*body["v"], *body.get("q", {})])
    assert type(body["ts"]) is str
    assert reading_from_body(body).values == reading.values


@given(readings)
def test_a_reading_splits_into_billing_and_telemetry(reading: Reading) -> None:
    billing = {q: m for q, m in reading.values.items() if q not in TELEMETRY_QUANTITIES}
    telemetry = {q: m for q, m in reading.values.items() if q in TELEMETRY_QUANTITIES}
    expected = []
    if billing or not telemetry:
        expected.append((RecordClass.BILLING, _reference_body(reading, billing)))
    if telemetry:
        expected.append((RecordClass.TELEMETRY, _reference_body(reading, telemetry)))
    out = split_reading(reading)
    assert out == expected
    for (_, got), (_, want) in zip(out, expected, strict=True):
        assert list(got["v"]) == list(want["v"])
        assert list(got.get("q", {})) == list(want.get("q", {}))


def test_a_suspect_value_is_marked() -> None:
    reading = Reading(
        "m1",
        1_732_400_000_000,
        {
            Quantity.VOLTAGE: Measurement(Decimal("229.8"), Quality.SUSPECT),
            Quantity.ENERGY_IMPORT: Measurement(Decimal("1206.42")),
        },
        TimeSource.SYSTEM_SYNCED,
    )
    assert split_reading(reading) == [
        (RecordClass.BILLING, {"m": "m1", "t": 1_732_400_000_000, "ts": "system_synced",
                               "v": {"energy_import_kwh": "1206.42"}}),
        (RecordClass.TELEMETRY, {"m": "m1", "t": 1_732_400_000_000, "ts": "system_synced",
                                 "v": {"voltage_v": "229.8"}, "q": {"voltage_v": "suspect"}}),
    ]

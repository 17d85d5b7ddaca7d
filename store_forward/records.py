"""What the outbox holds: records of a few kinds, each in a priority class.

A record body is a small JSON object. Readings are stored in a stable,
protocol-neutral form (quantity names from :mod:`firmware_bridge.reading`,
values as exact decimal strings) so that every encoder and the headend see
exactly the digits the meter reported.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

from firmware_bridge.reading import Measurement, Quality, Quantity, Reading, TimeSource


class RecordClass(enum.IntEnum):
    """Priority classes, drained in this order (FIFO within a class)."""

    EVENT = 0  # relay operations, alarms, command results, audit
    BILLING = 1  # register readings, interval charges
    TELEMETRY = 2  # instantaneous values


class RecordKind(enum.StrEnum):
    READING = "reading"
    EVENT = "event"
    CHARGE = "charge"


# Instantaneous values: useful for network analysis, never needed to bill. They
# travel in TELEMETRY-class records of their own, so that a full disk can shed
# them without touching a single register reading.
TELEMETRY_QUANTITIES: frozenset[Quantity] = frozenset(
    {
        Quantity.VOLTAGE,
        Quantity.VOLTAGE_B,
        Quantity.VOLTAGE_C,
        Quantity.CURRENT,
        Quantity.CURRENT_B,
        Quantity.CURRENT_C,
        Quantity.POWER,
        Quantity.POWER_FACTOR,
        Quantity.FREQUENCY,
    }
)


# Each quantity's and time source's name as a plain string, looked up for every value
# of every reading (a member's ``.value`` is a property call, several times dearer
# than a dict look-up).
_QUANTITY_NAMES: dict[Quantity, str] = {q: q.value for q in Quantity}
_TIME_SOURCE_NAMES: dict[TimeSource, str] = {s: s.value for s in TimeSource}
_GOOD = Quality.GOOD


def class_name(cls: RecordClass) -> str:
    """The class as text (bound into each record's at-rest seal)."""
    return cls.name.lower()


@dataclass(frozen=True, slots=True)
class Record:
    id: int
    cls: RecordClass
    kind: str
    created_ms: int
    body: dict[str, Any]


def reading_body(reading: Reading) -> dict[str, Any]:
    """The canonical JSON form of a reading (see docs/protocol.md)."""
    return _body(reading, sorted(reading.values.items()))


def _body(reading: Reading, items: list[tuple[Quantity, Measurement]]) -> dict[str, Any]:
    """The body of ``reading`` with the values ``items``, sorted by quantity (so by
    name: a quantity is its name as a string)."""
    names = _QUANTITY_NAMES
    body: dict[str, Any] = {
        "m": reading.meter_id,
        "t": reading.time_ms,
        "ts": _TIME_SOURCE_NAMES[reading.time_source],
        "v": {names[q]: str(m.value) for q, m in items},
    }
    bad = {names[q]: m.quality.value for q, m in items if m.quality is not _GOOD}
    if bad:
        body["q"] = bad
    return body


def split_reading(reading: Reading) -> list[tuple[RecordClass, dict[str, Any]]]:
    """A reading as outbox records: register values (BILLING), then instantaneous
    values (TELEMETRY), each only when present. Both carry the meter and time."""
    items = sorted(reading.values.items())
    billing = [item for item in items if item[0] not in TELEMETRY_QUANTITIES]
    telemetry = [item for item in items if item[0] in TELEMETRY_QUANTITIES]
    out: list[tuple[RecordClass, dict[str, Any]]] = []
    if billing or not telemetry:
        out.append((RecordClass.BILLING, _body(reading, billing)))
    if telemetry:
        out.append((RecordClass.TELEMETRY, _body(reading, telemetry)))
    return out


def reading_from_body(body: dict[str, Any]) -> Reading:
    quality = body.get("q", {})
    values = {
        Quantity(k): Measurement(Decimal(v), Quality(quality.get(k, Quality.GOOD.value)))
        for k, v in body["v"].items()
    }
    return Reading(
        meter_id=body["m"],
        time_ms=int(body["t"]),
        values=values,
        time_source=TimeSource(body.get("ts", TimeSource.SYSTEM.value)),
    )


def dumps(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def loads(blob: bytes) -> dict[str, Any]:
    value = orjson.loads(blob)
    if not isinstance(value, dict):
        raise ValueError("record body is not a JSON object")
    return value

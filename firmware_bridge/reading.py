"""Canonical readings: one model of quantities and units across protocols.

Every protocol driver (DL/T 645, Modbus RTU/TCP) turns what a meter answered
into a :class:`Reading`. Values are :class:`decimal.Decimal` — never floats —
so that energy registers keep the exact digits the meter reported. Each value
carries a :class:`Quality` flag, and the reading carries where its timestamp
came from (:class:`TimeSource`).

The quantity names are stable identifiers used on the wire, in the database
and in the documentation (docs/architecture.md, "Canonical readings").
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from firmware_bridge.slots import slot_setters


class Quantity(enum.StrEnum):
    """A measured quantity with a fixed unit (the unit is part of the name)."""

    ENERGY_IMPORT = "energy_import_kwh"  # forward active energy, total
    ENERGY_IMPORT_T1 = "energy_import_t1_kwh"  # rate 1 (sharp / 尖)
    ENERGY_IMPORT_T2 = "energy_import_t2_kwh"  # rate 2 (peak / 峰)
    ENERGY_IMPORT_T3 = "energy_import_t3_kwh"  # rate 3 (flat / 平)
    ENERGY_IMPORT_T4 = "energy_import_t4_kwh"  # rate 4 (valley / 谷)
    ENERGY_EXPORT = "energy_export_kwh"  # reverse active energy, total
    VOLTAGE = "voltage_v"  # phase A (or the only phase)
    VOLTAGE_B = "voltage_b_v"
    VOLTAGE_C = "voltage_c_v"
    CURRENT = "current_a"  # phase A (or the only phase), signed
    CURRENT_B = "current_b_a"
    CURRENT_C = "current_c_a"
    POWER = "power_kw"  # total active power, signed
    POWER_FACTOR = "power_factor"
    FREQUENCY = "frequency_hz"
    RELAY_OPEN = "relay_open"  # 0 = closed (supply on), 1 = open (supply cut)
    METER_CLOCK = "meter_clock_s"  # meter's own clock, Unix seconds (UTC)

    @property
    def is_register(self) -> bool:
        """Billing registers (cumulative energy) as opposed to telemetry."""
        return self.value.startswith("energy_")


RATE_QUANTITIES: tuple[Quantity, ...] = (
    Quantity.ENERGY_IMPORT_T1,
    Quantity.ENERGY_IMPORT_T2,
    Quantity.ENERGY_IMPORT_T3,
    Quantity.ENERGY_IMPORT_T4,
)

# Stable small integers for compact encodings; never renumber, only append.
QUANTITY_CODES: dict[Quantity, int] = {q: i for i, q in enumerate(Quantity)}
CODE_QUANTITIES: dict[int, Quantity] = {i: q for q, i in QUANTITY_CODES.items()}


class Quality(enum.StrEnum):
    GOOD = "good"  # answered correctly, value plausible
    SUSPECT = "suspect"  # answered, but a plausibility check flagged it
    INVALID = "invalid"  # answered, but the value cannot be used (e.g. NaN)


class TimeSource(enum.StrEnum):
    """Where a reading's timestamp came from, best first."""

    CENTRAL = "central"  # signed central time sync, carried forward
    SYSTEM_SYNCED = "system_synced"  # system clock known to be NTP-synchronised
    SYSTEM = "system"  # system clock, not known to be synchronised
    METER = "meter"  # a meter's own clock


@dataclass(frozen=True, slots=True)
class Measurement:
    value: Decimal
    quality: Quality = Quality.GOOD


@dataclass(frozen=True, slots=True)
class MeterFault:
    """Something a meter sent that could not be used, kept as evidence.

    The rest of the reading is kept: a bad date must not lose the energy
    register. ``kind`` names the part (``clock``), ``cause`` is a stable code
    (``clock.weekday``, ``clock.invalid_date``...), ``raw`` the bytes as the
    meter sent them (hex, wire order, 33H already removed).
    """

    kind: str
    cause: str
    detail: str
    raw: str = ""


@dataclass(frozen=True, slots=True)
class Reading:
    """What one meter said at one time.

    ``time_ms`` is the gateway's time of the poll in Unix milliseconds (UTC);
    ``time_source`` says how far that time can be trusted.
    """

    meter_id: str
    time_ms: int
    values: Mapping[Quantity, Measurement]
    time_source: TimeSource = TimeSource.SYSTEM
    meta: Mapping[str, str] = field(default_factory=dict)
    faults: tuple[MeterFault, ...] = ()  # what the meter sent that could not be used

    def get(self, quantity: Quantity) -> Decimal | None:
        m = self.values.get(quantity)
        return None if m is None else m.value

    def good(self, quantity: Quantity) -> Decimal | None:
        m = self.values.get(quantity)
        if m is None or m.quality is not Quality.GOOD:
            return None
        return m.value


# ---------------------------------------------------------------------------
# Fast construction for the polling path (firmware_bridge.slots): every reading
# builds a Reading (or two) and a Measurement per changed value.

_new = object.__new__
_SET_VALUE, _SET_QUALITY = slot_setters(Measurement, ("value", "quality"))
_SET_METER, _SET_TIME, _SET_VALUES, _SET_SOURCE, _SET_META, _SET_FAULTS = slot_setters(
    Reading, ("meter_id", "time_ms", "values", "time_source", "meta", "faults")
)


def new_measurement(value: Decimal, quality: Quality = Quality.GOOD) -> Measurement:
    """``Measurement(value, quality)``, built faster: the same object in every way."""
    m = _new(Measurement)
    _SET_VALUE(m, value)
    _SET_QUALITY(m, quality)
    return m


def new_reading(
    meter_id: str,
    time_ms: int,
    values: Mapping[Quantity, Measurement],
    time_source: TimeSource,
    meta: Mapping[str, str],
    faults: tuple[MeterFault, ...] = (),
) -> Reading:
    """``Reading(meter_id, time_ms, values, time_source, meta, faults)``, built faster:
    the same object in every way."""
    r = _new(Reading)
    _SET_METER(r, meter_id)
    _SET_TIME(r, time_ms)
    _SET_VALUES(r, values)
    _SET_SOURCE(r, time_source)
    _SET_META(r, meta)
    _SET_FAULTS(r, faults)
    return r

"""Modbus meter register maps, as data.

A :class:`Profile` says which function code a meter answers, in which word
order its 32-bit values are sent, and where each canonical
:class:`~firmware_bridge.reading.Quantity` lives. Built-in maps are plain
Python literals (``BUILTIN_PROFILES_RAW``) run through the same validator as
user-defined maps from the configuration file (``[profiles.NAME]``), so a
built-in map can never express something a user map cannot.

Addresses are 0-based protocol addresses (the number sent in the request
PDU), not the 30001/40001-style "register numbers" of vendor manuals:
Eastron documents voltage as input register 30001 = address 0x0000.

Value pipeline (see :mod:`firmware_bridge.modbus.decode`)::

    registers --word order--> raw (int or IEEE-754 float32)
              --× scale--> value in the field's ``unit``
              --× unit factor--> value in the canonical unit of the quantity
              --quantise to ``resolution`` (half-even)--> Decimal
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.identifiers import is_name
from firmware_bridge.reading import Quantity


class ProfileError(EdgeGwError, ValueError):
    """A register map is invalid.

    ``path`` is the key path inside the configuration (``profiles.NAME.fields.power_kw.unit``),
    ``problem`` what is wrong with it.
    """

    kind = ErrorKind.INVALID

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class DataType(enum.StrEnum):
    FLOAT32 = "float32"
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"

    @property
    def registers(self) -> int:
        return _REGISTERS[self]


_REGISTERS = {t: 1 if t in (DataType.INT16, DataType.UINT16) else 2 for t in DataType}


class WordOrder(enum.StrEnum):
    BIG = "big"  # high word first (Eastron, CHINT)
    LITTLE = "little"  # low word first


# Canonical unit of each quantity and the meter-side units that convert to it.
_UNIT_FACTORS: dict[Quantity, dict[str, Decimal]] = {}
_ENERGY = {"kWh": Decimal(1), "Wh": Decimal("0.001"), "MWh": Decimal(1000)}
_POWER = {"kW": Decimal(1), "W": Decimal("0.001")}
_VOLT = {"V": Decimal(1), "kV": Decimal(1000)}
_AMP = {"A": Decimal(1), "mA": Decimal("0.001")}
for _q in Quantity:
    if _q.is_register:
        _UNIT_FACTORS[_q] = _ENERGY
_UNIT_FACTORS.update(
    {
        Quantity.VOLTAGE: _VOLT,
        Quantity.VOLTAGE_B: _VOLT,
        Quantity.VOLTAGE_C: _VOLT,
        Quantity.CURRENT: _AMP,
        Quantity.CURRENT_B: _AMP,
        Quantity.CURRENT_C: _AMP,
        Quantity.POWER: _POWER,
        Quantity.POWER_FACTOR: {"": Decimal(1)},
        Quantity.FREQUENCY: {"Hz": Decimal(1)},
    }
)

# Resolution the canonical value is quantised to (documented in docs/modbus.md).
# Energy matches DL/T 645 (XXXXXX.XX kWh) so both protocols bill on the same digits.
DEFAULT_RESOLUTION: dict[Quantity, Decimal] = {}
for _q in Quantity:
    if _q.is_register:
        DEFAULT_RESOLUTION[_q] = Decimal("0.01")
DEFAULT_RESOLUTION.update(
    {
        Quantity.VOLTAGE: Decimal("0.1"),
        Quantity.VOLTAGE_B: Decimal("0.1"),
        Quantity.VOLTAGE_C: Decimal("0.1"),
        Quantity.CURRENT: Decimal("0.001"),
        Quantity.CURRENT_B: Decimal("0.001"),
        Quantity.CURRENT_C: Decimal("0.001"),
        Quantity.POWER: Decimal("0.0001"),
        Quantity.POWER_FACTOR: Decimal("0.001"),
        Quantity.FREQUENCY: Decimal("0.01"),
    }
)

MODBUS_QUANTITIES: frozenset[Quantity] = frozenset(_UNIT_FACTORS)


@dataclass(frozen=True, slots=True)
class Field:
    """Where one quantity lives and how to turn its registers into a value."""

    quantity: Quantity
    address: int
    dtype: DataType = DataType.FLOAT32
    scale: Decimal = Decimal(1)
    unit: str = ""
    resolution: Decimal = Decimal("0.01")

    @property
    def count(self) -> int:
        return self.dtype.registers

    @property
    def end(self) -> int:
        """One past the last register address."""
        return self.address + self.dtype.registers

    @property
    def factor(self) -> Decimal:
        """scale × unit factor: raw value → canonical unit."""
        return self.scale * _UNIT_FACTORS[self.quantity][self.unit]


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    function_code: int  # 3 = holding registers, 4 = input registers
    fields: tuple[Field, ...]
    word_order: WordOrder = WordOrder.BIG
    verified: bool = True  # False: scaling taken from a source that could not be confirmed
    max_gap: int = 8  # registers read and discarded to save a transaction
    max_count: int = 60  # registers per request (below the protocol's 125: many meters cap lower)
    description: str = ""

    def field(self, quantity: Quantity) -> Field | None:
        for f in self.fields:
            if f.quantity is quantity:
                return f
        return None


# ---------------------------------------------------------------------------
# Built-in maps (data). Same schema as a user's [profiles.NAME] table.

BUILTIN_PROFILES_RAW: dict[str, dict[str, Any]] = {
    "sdm120": {
        "description": "Eastron SDM120 single-phase (Modbus), input registers, float32 high word first",
        "function_code": 4,
        "word_order": "big",
        "fields": {
            "voltage_v": {"address": 0x0000, "type": "float32", "unit": "V"},
            "current_a": {"address": 0x0006, "type": "float32", "unit": "A"},
            "power_kw": {"address": 0x000C, "type": "float32", "unit": "W"},
            "frequency_hz": {"address": 0x0046, "type": "float32", "unit": "Hz"},
            "energy_import_kwh": {"address": 0x0048, "type": "float32", "unit": "kWh"},
            "energy_export_kwh": {"address": 0x004A, "type": "float32", "unit": "kWh"},
        },
    },
    # Eastron numbers the parameters 30001, 30003, ... ("register 30001" = address 0).
    # The addresses below are the 0-based request addresses (decimal), as in the
    # "Modbus protocol start address" column of the Eastron SDM630 protocol sheet.
    "sdm630": {
        "description": "Eastron SDM630 three-phase, input registers, float32 high word first",
        "function_code": 4,
        "word_order": "big",
        "fields": {
            "voltage_v": {"address": 0, "type": "float32", "unit": "V"},
            "voltage_b_v": {"address": 2, "type": "float32", "unit": "V"},
            "voltage_c_v": {"address": 4, "type": "float32", "unit": "V"},
            "current_a": {"address": 6, "type": "float32", "unit": "A"},
            "current_b_a": {"address": 8, "type": "float32", "unit": "A"},
            "current_c_a": {"address": 10, "type": "float32", "unit": "A"},
            # phase powers 12/14/16 have no canonical quantity; total power is used
            "power_kw": {"address": 52, "type": "float32", "unit": "W"},
            "energy_import_kwh": {"address": 72, "type": "float32", "unit": "kWh"},
            "energy_export_kwh": {"address": 74, "type": "float32", "unit": "kWh"},
        },
    },
    "ddsu666": {
        "description": "CHINT DDSU666 single-phase, input registers, float32 high word first",
        "function_code": 4,
        "word_order": "big",
        "fields": {
            "voltage_v": {"address": 0x2000, "type": "float32", "unit": "V"},
            "current_a": {"address": 0x2002, "type": "float32", "unit": "A"},
            "power_kw": {"address": 0x2004, "type": "float32", "unit": "kW"},
            "power_factor": {"address": 0x200A, "type": "float32", "unit": ""},
            "frequency_hz": {"address": 0x200E, "type": "float32", "unit": "Hz"},
            "energy_import_kwh": {"address": 0x4000, "type": "float32", "unit": "kWh"},
            "energy_export_kwh": {"address": 0x400A, "type": "float32", "unit": "kWh"},
        },
    },
    # Sources disagree on DTSU666 scaling (some apply PT/CT ratios and 0.1 V /
    # 0.001 A / 0.1 W steps to the float values, some do not). Marked unverified:
    # check against the meter's display before billing from it.
    "dtsu666": {
        "description": "CHINT DTSU666 three-phase, holding registers, float32 (scaling UNVERIFIED)",
        "function_code": 3,
        "word_order": "big",
        "verified": False,
        "fields": {
            "voltage_v": {"address": 0x2006, "type": "float32", "unit": "V", "scale": "0.1"},
            "current_a": {"address": 0x200C, "type": "float32", "unit": "A", "scale": "0.001"},
            "power_kw": {"address": 0x2012, "type": "float32", "unit": "W", "scale": "0.1"},
            "energy_import_kwh": {"address": 0x401E, "type": "float32", "unit": "kWh"},
            "energy_export_kwh": {"address": 0x4028, "type": "float32", "unit": "kWh"},
        },
    },
}


# ---------------------------------------------------------------------------
# Schema validation

_PROFILE_KEYS = {
    "description",
    "function_code",
    "word_order",
    "verified",
    "max_gap",
    "max_count",
    "fields",
}
_FIELD_KEYS = {"address", "type", "unit", "scale", "resolution"}


def _int(value: Any, path: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProfileError(path, f"must be an integer, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        raise ProfileError(path, f"must be in {lo}..{hi}, got {value}")
    return value


def _decimal(value: Any, path: str) -> Decimal:
    """Accept an int or a decimal string; a TOML float is accepted through its repr."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ProfileError(path, f"must be a number or a decimal string, got {value!r}")
    try:
        d = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation:
        raise ProfileError(path, f"not a decimal number: {value!r}") from None
    if not d.is_finite() or d == 0:
        raise ProfileError(path, f"must be a finite non-zero number, got {value!r}")
    return d


def parse_profile(name: str, raw: Any, *, path: str | None = None) -> Profile:
    """Validate one ``[profiles.NAME]`` table; raise :class:`ProfileError` on the first problem."""
    base = path or f"profiles.{name}"
    if not is_name(name):
        raise ProfileError(base, f"{name!r} is not a valid profile name (letters, digits, _ . -)")
    if not isinstance(raw, Mapping):
        raise ProfileError(base, f"must be a table, got {type(raw).__name__}")
    for k in raw:
        if k not in _PROFILE_KEYS:
            raise ProfileError(f"{base}.{k}", f"unknown key (allowed: {', '.join(sorted(_PROFILE_KEYS))})")
    if "function_code" not in raw:
        raise ProfileError(f"{base}.function_code", "missing (3 = holding, 4 = input registers)")
    fc = raw["function_code"]
    if fc not in (3, 4) or isinstance(fc, bool):
        raise ProfileError(f"{base}.function_code", f"must be 3 or 4, got {fc!r}")
    wo_raw = raw.get("word_order", "big")
    try:
        word_order = WordOrder(wo_raw)
    except ValueError:
        raise ProfileError(f"{base}.word_order", f"must be 'big' or 'little', got {wo_raw!r}") from None
    verified = raw.get("verified", True)
    if not isinstance(verified, bool):
        raise ProfileError(f"{base}.verified", f"must be true or false, got {verified!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ProfileError(f"{base}.description", "must be a string")
    max_gap = _int(raw.get("max_gap", 8), f"{base}.max_gap", 0, 120)
    max_count = _int(raw.get("max_count", 60), f"{base}.max_count", 2, 125)
    rf = raw.get("fields")
    if not isinstance(rf, Mapping) or not rf:
        raise ProfileError(f"{base}.fields", "must be a non-empty table of quantity = {address, type, ...}")
    fields: list[Field] = []
    for qname, spec in rf.items():
        fpath = f"{base}.fields.{qname}"
        try:
            quantity = Quantity(qname)
        except ValueError:
            allowed = ", ".join(sorted(q.value for q in MODBUS_QUANTITIES))
            raise ProfileError(fpath, f"unknown quantity (allowed: {allowed})") from None
        if quantity not in MODBUS_QUANTITIES:
            raise ProfileError(fpath, "quantity cannot be read from Modbus registers")
        fields.append(_parse_field(quantity, spec, fpath))
    fields.sort(key=lambda f: f.address)
    for a, b in itertools.pairwise(fields):
        if b.address < a.end:
            raise ProfileError(
                f"{base}.fields.{b.quantity.value}.address",
                f"register {b.address:#06x} overlaps {a.quantity.value} ({a.address:#06x}..{a.end - 1:#06x})",
            )
    if any(f.count > max_count for f in fields):
        raise ProfileError(f"{base}.max_count", "smaller than a single value")
    return Profile(
        name=name,
        function_code=fc,
        fields=tuple(fields),
        word_order=word_order,
        verified=verified,
        max_gap=max_gap,
        max_count=max_count,
        description=description,
    )


def _parse_field(quantity: Quantity, spec: Any, fpath: str) -> Field:
    if not isinstance(spec, Mapping):
        raise ProfileError(fpath, "must be a table {address = ..., type = ..., unit = ...}")
    for k in spec:
        if k not in _FIELD_KEYS:
            raise ProfileError(f"{fpath}.{k}", f"unknown key (allowed: {', '.join(sorted(_FIELD_KEYS))})")
    if "address" not in spec:
        raise ProfileError(f"{fpath}.address", "missing (0-based register address, e.g. 0x0048)")
    t_raw = spec.get("type", "float32")
    try:
        dtype = DataType(t_raw)
    except ValueError:
        allowed = ", ".join(t.value for t in DataType)
        raise ProfileError(f"{fpath}.type", f"must be one of {allowed}, got {t_raw!r}") from None
    address = _int(spec["address"], f"{fpath}.address", 0, 0x10000 - dtype.registers)
    units = _UNIT_FACTORS[quantity]
    default_unit = next(iter(units))
    unit = spec.get("unit", default_unit)
    if unit not in units:
        allowed = ", ".join(repr(u) for u in units)
        raise ProfileError(f"{fpath}.unit", f"must be one of {allowed} for {quantity.value}, got {unit!r}")
    scale = _decimal(spec.get("scale", 1), f"{fpath}.scale")
    resolution = DEFAULT_RESOLUTION[quantity]
    if "resolution" in spec:
        resolution = _decimal(spec["resolution"], f"{fpath}.resolution")
        if resolution < 0 or resolution != Decimal(1).scaleb(resolution.adjusted()):
            raise ProfileError(f"{fpath}.resolution", f"must be a power of ten (e.g. 0.01), got {spec['resolution']!r}")
    return Field(quantity, address, dtype, scale, unit, resolution)


def parse_profiles(raw: Mapping[str, Any] | None) -> dict[str, Profile]:
    """Built-in profiles plus the user's ``[profiles.*]`` tables (a user map may shadow a built-in)."""
    out = dict(BUILTIN_PROFILES)
    if raw is None:
        return out
    if not isinstance(raw, Mapping):
        raise ProfileError("profiles", "must be a table of [profiles.NAME] tables")
    for name, spec in raw.items():
        out[name] = parse_profile(name, spec)
    return out


BUILTIN_PROFILES: dict[str, Profile] = {
    name: parse_profile(name, raw) for name, raw in BUILTIN_PROFILES_RAW.items()
}

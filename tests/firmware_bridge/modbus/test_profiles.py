from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from firmware_bridge.modbus.profiles import (
    BUILTIN_PROFILES,
    DataType,
    ProfileError,
    WordOrder,
    parse_profile,
    parse_profiles,
)
from firmware_bridge.reading import Quantity


def test_builtins() -> None:
    assert set(BUILTIN_PROFILES) >= {"sdm120", "sdm630", "ddsu666", "dtsu666"}
    sdm = BUILTIN_PROFILES["sdm120"]
    assert sdm.function_code == 4 and sdm.word_order is WordOrder.BIG
    addr = {f.quantity: f.address for f in sdm.fields}
    assert addr == {
        Quantity.VOLTAGE: 0x00,
        Quantity.CURRENT: 0x06,
        Quantity.POWER: 0x0C,
        Quantity.FREQUENCY: 0x46,
        Quantity.ENERGY_IMPORT: 0x48,
        Quantity.ENERGY_EXPORT: 0x4A,
    }
    power = sdm.field(Quantity.POWER)
    assert power is not None and power.factor == Decimal("0.001")
    assert BUILTIN_PROFILES["dtsu666"].verified is False
    assert BUILTIN_PROFILES["dtsu666"].function_code == 3
    assert BUILTIN_PROFILES["ddsu666"].field(Quantity.ENERGY_IMPORT).address == 0x4000  # type: ignore[union-attr]
    sdm630 = BUILTIN_PROFILES["sdm630"]
    assert sdm630.field(Quantity.ENERGY_IMPORT).address == 72  # type: ignore[union-attr]


def good() -> dict[str, Any]:
    return {
        "function_code": 3,
        "word_order": "little",
        "fields": {
            "energy_import_kwh": {"address": 100, "type": "uint32", "scale": 0.01, "unit": "kWh"},
            "power_kw": {"address": 104, "type": "int16", "unit": "W"},
        },
    }


def test_user_profile() -> None:
    p = parse_profile("acme", good())
    e = p.field(Quantity.ENERGY_IMPORT)
    assert e is not None and e.dtype is DataType.UINT32 and e.scale == Decimal("0.01")
    assert p.word_order is WordOrder.LITTLE
    merged = parse_profiles({"acme": good()})
    assert "acme" in merged and "sdm120" in merged


@pytest.mark.parametrize(
    ("mutate", "path", "needle"),
    [
        (lambda d: d.pop("function_code"), "profiles.acme.function_code", "missing"),
        (lambda d: d.update(function_code=6), "profiles.acme.function_code", "3 or 4"),
        (lambda d: d.update(word_order="middle"), "profiles.acme.word_order", "'big' or 'little'"),
        (lambda d: d.update(colour="red"), "profiles.acme.colour", "unknown key"),
        (lambda d: d.update(fields={}), "profiles.acme.fields", "non-empty"),
        (lambda d: d["fields"].update(bogus_q={"address": 1}), "profiles.acme.fields.bogus_q", "unknown quantity"),
        (lambda d: d["fields"].update(relay_open={"address": 1}), "profiles.acme.fields.relay_open", "cannot be read"),
        (lambda d: d["fields"]["power_kw"].update(type="float16"), "profiles.acme.fields.power_kw.type", "float32"),
        (lambda d: d["fields"]["power_kw"].update(unit="kWh"), "profiles.acme.fields.power_kw.unit", "'kW', 'W'"),
        (lambda d: d["fields"]["power_kw"].update(address=-1), "profiles.acme.fields.power_kw.address", "0..65535"),
        (lambda d: d["fields"]["power_kw"].update(address="0x10"), "profiles.acme.fields.power_kw.address", "integer"),
        (lambda d: d["fields"]["power_kw"].update(address=101), "profiles.acme.fields.power_kw.address", "overlaps"),
        (lambda d: d["fields"]["power_kw"].update(scale=0), "profiles.acme.fields.power_kw.scale", "non-zero"),
        (lambda d: d["fields"]["power_kw"].update(scale="abc"), "profiles.acme.fields.power_kw.scale", "not a decimal"),
        (lambda d: d["fields"]["power_kw"].update(resolution=0.05), "profiles.acme.fields.power_kw.resolution", "power of ten"),
        (lambda d: d["fields"]["power_kw"].update(colour=1), "profiles.acme.fields.power_kw.colour", "unknown key"),
        (lambda d: d["fields"]["power_kw"].pop("address"), "profiles.acme.fields.power_kw.address", "missing"),
        (lambda d: d.update(max_count=1), "profiles.acme.max_count", "2..125"),
    ],
)
def test_user_profile_errors(mutate: Any, path: str, needle: str) -> None:
    raw = good()
    mutate(raw)
    with pytest.raises(ProfileError) as ei:
        parse_profile("acme", raw)
    assert ei.value.path == path
    assert needle in ei.value.problem
    assert isinstance(ei.value, ValueError)
    assert str(ei.value).startswith(path + ": ")


def test_bad_name_and_shape() -> None:
    with pytest.raises(ProfileError, match="not a valid profile name"):
        parse_profile("bad name", good())
    with pytest.raises(ProfileError, match="must be a table"):
        parse_profiles({"x": 3})


def test_documented_user_map_is_valid() -> None:
    import re
    import tomllib
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[3] / "docs" / "modbus.md").read_text(encoding="utf-8")
    blocks = [tomllib.loads(b) for b in re.findall(r"```toml\n(.*?)```", doc, re.S)]
    profiles = [b["profiles"] for b in blocks if "profiles" in b]
    assert profiles, "docs/modbus.md shows a [profiles.NAME] example"
    merged = parse_profiles(profiles[0])
    p = merged["acme_em1"]
    assert p.word_order is WordOrder.LITTLE and p.function_code == 3
    e = p.field(Quantity.ENERGY_IMPORT)
    assert e is not None and e.scale == Decimal("0.01") and e.dtype is DataType.UINT32

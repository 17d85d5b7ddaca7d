"""Gateway configurations for the tests that run the daemon.

:func:`gateway_config` writes a configuration file from its tables. Its
defaults are what most of those tests want: one Modbus TCP bus ``lan`` on the
simulator's port, a poll every 0.2 s, the database ``gw.db`` beside the file
and a broker port nobody listens on (the link stays down). :func:`meter`
makes a ``[[meter]]`` table (an SDM120 on ``lan``; with ``account`` it bills
to it and trips by coil 0), :func:`prepaid_account` writes an account file and
its tariff and returns the ``[[account]]`` table.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.harness.mosquitto import free_port
from tests.harness.product import REPO

FLAT_TARIFF = REPO / "examples" / "tariffs" / "flat.toml"
# What the daemon tests use to reach a development headend quickly.
DEV_UPLINK: Mapping[str, Any] = {
    "allow_unauthenticated_acks": True,  # unsealed batches to a development headend
    "ack_timeout_s": 2.0,
    "reconnect_min_s": 0.1,
    "reconnect_max_s": 0.5,
}


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def _table(header: str, table: Mapping[str, Any], array: bool = False) -> list[str]:
    """``[header]`` (``[[header]]``) with its values, then its sub-tables."""
    values = [f"{k} = {_value(v)}" for k, v in table.items() if not isinstance(v, Mapping)]
    out = [f"[[{header}]]" if array else f"[{header}]", *values] if values or array else []
    for k, v in table.items():
        if isinstance(v, Mapping):
            out += _table(f"{header}.{k}", v)
    return out


def toml_text(doc: Mapping[str, Any]) -> str:
    """``doc`` as TOML the way the examples lay it out: a header per table and per
    entry of an array of tables (``[[meter]]``), sub-tables after their values."""
    lines: list[str] = []
    for name, value in doc.items():
        entries = value if isinstance(value, list) else [value]
        for entry in entries:
            lines += ["", *_table(name, entry, array=isinstance(value, list))]
    return "\n".join(lines).lstrip("\n") + "\n"


def bus(port: int, name: str = "lan", **extra: Any) -> dict[str, Any]:
    """A Modbus TCP bus on 127.0.0.1 that gives up on a meter quickly."""
    return {"name": name, "type": "tcp", "host": "127.0.0.1", "port": port, "timeout_s": 0.5, "retries": 0} | extra


def meter(
    meter_id: str = "m001", *, unit: int = 1, bus: str = "lan", account: str | None = None, relay: bool = True
) -> dict[str, Any]:
    """An SDM120; with ``account`` it bills to it and (``relay``) trips by coil 0."""
    table: dict[str, Any] = {"id": meter_id, "bus": bus, "protocol": "modbus", "unit_id": unit, "profile": "sdm120"}
    if account is not None:
        table["account"] = account
        if relay:
            table["relay"] = {"kind": "coil", "address": 0, "min_interval_s": 0}
    return table


def prepaid_account(
    tmp: Path,
    *,
    opening: str,
    alarm1: str,
    alarm2: str,
    close_permit: str,
    account: str = "acct-001",
    meters: Sequence[str] = ("m001",),
    tariff_text: str | None = None,
    tariff_name: str = "flat.toml",
) -> dict[str, Any]:
    """Write the account file (no overdraft, direct close, no delays) and its tariff
    (the flat example unless ``tariff_text``); the ``[[account]]`` table."""
    limits = {
        "alarm1": alarm1,
        "alarm2": alarm2,
        "overdraft": "0.00",
        "close_permit": close_permit,
        "close_mode": "direct",
        "reconnect_delay_s": 0,
        "relay_min_interval_s": 0,
    }
    doc = {
        "account": account,
        "timezone": "Asia/Shanghai",
        "opening_balance": opening,
        "meters": list(meters),
        "protected": False,
        "limits": limits,
    }
    values = {k: v for k, v in doc.items() if k != "limits"}
    text = "\n".join(f"{k} = {_value(v)}" for k, v in values.items())
    (tmp / f"{account}.toml").write_text(text + "\n\n" + toml_text({"limits": limits}), encoding="utf-8")
    if tariff_text is None:
        shutil.copy(FLAT_TARIFF, tmp / tariff_name)
    else:
        (tmp / tariff_name).write_text(tariff_text, encoding="utf-8")
    return {"id": account, "settings": f"{account}.toml", "tariffs": [tariff_name]}


def gateway_config(
    tmp: Path,
    gateway_id: str,
    *,
    modbus_port: int | None = None,
    buses: Sequence[Mapping[str, Any]] | None = None,
    meters: Sequence[Mapping[str, Any]] = (),
    accounts: Sequence[Mapping[str, Any]] = (),
    gateway: Mapping[str, Any] | None = None,
    storage: Mapping[str, Any] | None = None,
    broker: Mapping[str, Any] | None = None,
    uplink: Mapping[str, Any] | None = None,
    security: Mapping[str, Any] | None = None,
    profiles: Mapping[str, Any] | None = None,
    name: str = "site.toml",
) -> Path:
    """Write ``tmp/name``; see the module documentation for the defaults."""
    extra = dict(gateway or {})
    head = {"id": gateway_id, "site": extra.pop("site", "test")}
    if "timezone" in extra:
        head["timezone"] = extra.pop("timezone")
    doc: dict[str, Any] = {
        "gateway": {**head, "poll_interval_s": extra.pop("poll_interval_s", 0.2), **extra},
        "storage": dict(storage or {"path": "gw.db"}),
        "broker": dict(broker or {"port": free_port()}),  # nobody listens unless given
    }
    for table, value in (("uplink", uplink), ("security", security), ("profiles", profiles)):
        if value is not None:
            doc[table] = dict(value)
    if buses is None and modbus_port is not None:
        buses = [bus(modbus_port)]
    if buses:
        doc["bus"] = [dict(b) for b in buses]
    if meters:
        doc["meter"] = [dict(m) for m in meters]
    if accounts:
        doc["account"] = [dict(a) for a in accounts]
    path = tmp / name
    path.write_text(toml_text(doc), encoding="utf-8")
    return path

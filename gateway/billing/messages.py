"""Strict parsing of the billing commands with bodies of their own: balance
snapshots and meter replacements (the registry of every command body,
:mod:`gateway.commands.bodies`, reads them with these).

Money on the wire is integer micro-yuan (``balance_micro``): no decimal text,
no floats. Every problem names the key: ``snapshot.central_seq: must be an
integer >= 1, got '7'``.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from firmware_bridge.errors import ProblemsError
from gateway.billing.rating import MeterReplacement
from gateway.billing.reconcile import CentralSnapshot
from gateway.billing.topup import Authorization
from gateway.problems import Problems

MAX_BALANCE_MICRO = 10**15  # a billion yuan; keeps every sum far inside SQLite's 64-bit integers


class MessageError(ProblemsError, ValueError):
    """A billing command is malformed. ``problems``: one line each."""

    separator = "; "


class _Reader:
    def __init__(self, what: str, d: Any) -> None:
        self.problems = Problems(prefix=(what,))
        if not isinstance(d, Mapping):
            self.problems.add((), "must be a JSON object")
            d = {}
        self.d: Mapping[str, Any] = d

    def add(self, key: str, msg: str) -> None:
        self.problems.add(key, msg)

    def string(self, key: str) -> str:
        v = self.d.get(key)
        if not isinstance(v, str) or not v or len(v) > 128:
            self.add(key, f"must be a non-empty string (max 128), got {v!r}")
            return ""
        return v

    def integer(self, key: str, minimum: int | None = None, required: bool = True) -> int | None:
        if key not in self.d and not required:
            return None
        v = self.d.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or (minimum is not None and v < minimum):
            bound = "" if minimum is None else f" >= {minimum}"
            self.add(key, f"must be an integer{bound}, got {v!r}")
            return None
        return v

    def done(self, allowed: set[str]) -> None:
        self.problems.unknown("", self.d, allowed)
        self.problems.check(MessageError)


def parse_snapshot(d: Any, authorization: Authorization | None = None) -> CentralSnapshot:
    r = _Reader("snapshot", d)
    sid = r.string("id")
    account = r.string("account")
    central_seq = r.integer("central_seq", 1)
    as_of = r.integer("as_of_seq", 0)
    balance = r.integer("balance_micro")
    if balance is not None and abs(balance) > MAX_BALANCE_MICRO:
        r.add("balance_micro", f"out of range (|balance| <= {MAX_BALANCE_MICRO})")
    time_ms = r.integer("time_ms", 0)
    counter = r.integer("purchase_counter", 0, required=False) or 0
    inc = r.d.get("included_ids", [])
    if not isinstance(inc, list) or not all(isinstance(x, str) and x for x in inc):
        r.add("included_ids", "must be a list of ledger entry ids")
        inc = []
    tier_ps = r.integer("tier_period_start_ms", required=False)
    tier_ck = r.integer("tier_cumulative_ckwh", 0, required=False)
    r.done({"id", "account", "central_seq", "as_of_seq", "balance_micro", "time_ms", "purchase_counter",
            "included_ids", "tier_period_start_ms", "tier_cumulative_ckwh"})
    assert central_seq is not None and as_of is not None and balance is not None and time_ms is not None
    return CentralSnapshot(sid, account, central_seq, as_of, balance, time_ms, frozenset(inc), counter,
                           tier_ps, tier_ck, authorization)


_REGISTER_KEYS = {"import_kwh", "t1_kwh", "t2_kwh", "t3_kwh", "t4_kwh"}
MAX_REGISTER_KWH = Decimal(10) ** 12


def _registers(r: _Reader, key: str) -> tuple[Decimal, dict[str, Decimal]]:
    """``{"import_kwh": "1234.56", "t1_kwh": "..."}``: decimal strings (exact), >= 0."""
    v = r.d.get(key)
    if not isinstance(v, Mapping):
        r.add(key, 'must be an object of registers, e.g. {"import_kwh": "1234.56"}')
        return Decimal(0), {}
    out: dict[str, Decimal] = {}
    for k, x in v.items():
        if k not in _REGISTER_KEYS:
            r.add(f"{key}.{k}", f"unknown register (allowed: {', '.join(sorted(_REGISTER_KEYS))})")
            continue
        try:
            d = Decimal(x) if isinstance(x, str) else None
        except InvalidOperation:
            d = None
        if d is None or not d.is_finite() or not 0 <= d < MAX_REGISTER_KWH:
            r.add(f"{key}.{k}", f'must be a decimal string of kWh >= 0 (e.g. "1234.56"), got {x!r}')
            continue
        out[k] = d
    if "import_kwh" not in v:
        r.add(f"{key}.import_kwh", "missing (the import total register)")
    total = out.pop("import_kwh", Decimal(0))
    return total, {k[:2].upper(): d for k, d in out.items()}


def parse_meter_replacement(d: Any, event_id: str) -> MeterReplacement:
    """The body of a signed ``meter.replace`` command::

        {"meter": "m1", "time_ms": 1772443800000,
         "old_final": {"import_kwh": "2905.31", "t1_kwh": "0", ...},
         "new_initial": {"import_kwh": "0.00"},
         "note": "exchanged after a fault, new serial 4409"}

    ``time_ms`` is when the old meter was read for the last time and the new one
    for the first (the exchange); registers are decimal strings of kWh."""
    r = _Reader("meter.replace", d)
    meter = r.string("meter")
    t = r.integer("time_ms", 0)
    old_total, old_rates = _registers(r, "old_final")
    new_total, new_rates = _registers(r, "new_initial")
    note = r.d.get("note", "")
    if not isinstance(note, str) or len(note) > 200:
        r.add("note", "must be text of at most 200 characters")
    r.done({"meter", "time_ms", "old_final", "new_initial", "note"})
    assert t is not None
    return MeterReplacement(event_id, meter, t, old_total, new_total, old_rates, new_rates)

"""Account settings as data (TOML): opening state, cutoff limits, windows, protection.

Used by ``edgegw tariff simulate --account`` and usable by the daemon for
per-account policy. Format and example: docs/billing.md, examples/accounts/.
Problems are reported as ``file: key.path: problem`` in an :class:`AccountError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from firmware_bridge.errors import ProblemsError
from gateway.billing.cutoff import CloseMode, CutoffConfig, CutoffConfigError, Window
from gateway.billing.daytypes import DayType, parse_calendar
from gateway.billing.money import AmountError, kwh_to_ckwh_exact, yuan_to_micro
from gateway.billing.rating import TierState
from gateway.billing.topup import Channel, Source, TopUp, TopUpPolicy
from gateway.problems import KeyPath, Problems, read_toml


class AccountError(ProblemsError):
    """An account file is invalid. ``problems`` holds one line per problem."""


@dataclass(frozen=True)
class AccountSettings:
    account: str
    opening_balance_micro: int
    opening_tier: TierState
    cutoff: CutoffConfig
    topup_policy: TopUpPolicy
    topups: tuple[TopUp, ...]  # scripted top-ups (simulation); applied at issued_ms
    source: str = ""


_TOP = {"account", "timezone", "opening_balance", "tier", "limits", "protected", "no_disconnect",
        "calendar", "topup_policy", "topup", "meters"}
_LIMITS = {"alarm1", "alarm2", "overdraft", "close_permit", "close_mode", "reconnect_delay_s",
           "relay_min_interval_s", "contact_protect_after_s", "startup_protect_s"}


def parse_account(
    raw: Mapping[str, Any],
    source: str,
    default_timezone: str | None = None,
    *,
    line: Callable[[KeyPath], int | None] | None = None,
) -> AccountSettings:
    """Validate a parsed account file; raise :class:`AccountError` with every problem
    (each with the line of its key, given ``line``: the file's :class:`Lines`)."""
    found = Problems(source, line=line)
    add = found.add
    found.unknown("", raw, _TOP)
    acc = raw.get("account")
    if not isinstance(acc, str) or not acc:
        add("account", "missing or not a non-empty string")
    tz_name = raw.get("timezone", default_timezone or "UTC")
    try:
        tz = ZoneInfo(str(tz_name))
    except (ZoneInfoNotFoundError, ValueError):
        add("timezone", f"unknown time zone {tz_name!r}")
        tz = ZoneInfo("UTC")

    def money(key: str, v: Any, default: int | None = None) -> int | None:
        if v is None:
            return default
        try:
            return yuan_to_micro(v)
        except AmountError as exc:
            add(key, str(exc))
            return default

    def when(key: str, v: Any) -> int | None:
        if isinstance(v, str):
            try:
                v = datetime.fromisoformat(v)
            except ValueError:
                add(key, f"not an ISO 8601 date-time: {v!r}")
                return None
        if isinstance(v, datetime):
            return int((v if v.tzinfo else v.replace(tzinfo=tz)).timestamp() * 1000)
        add(key, f"must be a date-time, got {v!r}")
        return None

    opening = money("opening_balance", raw.get("opening_balance"), 0) or 0
    tier = TierState()
    rt = raw.get("tier", {})
    if not isinstance(rt, dict):
        add("tier", "must be a table")
    else:
        found.unknown("tier", rt, ("cumulative_kwh", "period_start"))
        cum = 0
        if "cumulative_kwh" in rt:
            try:
                cum = kwh_to_ckwh_exact(rt["cumulative_kwh"])
            except AmountError as exc:
                add("tier.cumulative_kwh", str(exc))
        ps = when("tier.period_start", rt["period_start"]) if "period_start" in rt else None
        tier = TierState(ps, cum)

    lim = raw.get("limits", {})
    if not isinstance(lim, dict):
        add("limits", "must be a table")
        lim = {}
    found.unknown("limits", lim, _LIMITS)

    def seconds(key: str, default: float | None) -> int | None:
        v = lim.get(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            add(f"limits.{key}", f"must be a number of seconds >= 0, got {v!r}")
            return None if default is None else int(default * 1000)
        return int(v * 1000)

    alarm1 = money("limits.alarm1", lim.get("alarm1"), 20_000_000)
    alarm2 = money("limits.alarm2", lim.get("alarm2"), 10_000_000)
    overdraft = money("limits.overdraft", lim.get("overdraft"), 0)
    permit = money("limits.close_permit", lim.get("close_permit"), 0)
    mode = lim.get("close_mode", "direct")
    if mode not in ("direct", "allowed"):
        add("limits.close_mode", f"must be 'direct' or 'allowed', got {mode!r}")
        mode = "direct"
    protected = raw.get("protected", False)
    if not isinstance(protected, bool):
        add("protected", "must be true or false")
        protected = False

    windows: list[Window] = []
    rw = raw.get("no_disconnect", [])
    if not isinstance(rw, list):
        add("no_disconnect", "must be an array of tables [[no_disconnect]]")
        rw = []
    for i, w in enumerate(rw):
        key = f"no_disconnect[{i}]"
        if not isinstance(w, dict):
            add(key, "must be a table")
            continue
        mins = []
        for part in ("start", "end"):
            v = w.get(part)
            ok = isinstance(v, str) and len(v) == 5 and v[2] == ":" and v[:2].isdigit() and v[3:].isdigit()
            m = int(v[:2]) * 60 + int(v[3:]) if ok else -1  # type: ignore[index]
            if not ok or not 0 <= m <= 1440 or (part == "start" and m == 1440):
                add(f"{key}.{part}", f"must be 'HH:MM' (end may be '24:00'), got {v!r}")
            mins.append(m)
        days = w.get("days", [d.value for d in DayType])
        valid = {d.value for d in DayType}
        if not isinstance(days, list) or not days or not all(d in valid for d in days):
            add(f"{key}.days", f"must be a list of {sorted(valid)}")
            days = list(valid)
        if all(0 <= m <= 1440 for m in mins):
            windows.append(Window(mins[0], mins[1], frozenset(DayType(d) for d in days)))
    calendar = parse_calendar(raw.get("calendar"), "calendar", found)

    meters = raw.get("meters", [])
    if not isinstance(meters, list) or not all(isinstance(m, str) for m in meters):
        add("meters", "must be a list of meter ids")
        meters = []

    tp = raw.get("topup_policy", {})
    policy = TopUpPolicy()
    if not isinstance(tp, dict):
        add("topup_policy", "must be a table")
    else:
        found.unknown("topup_policy", tp, ("minimum_purchase", "hoarding_limit"))
        policy = TopUpPolicy(
            money("topup_policy.minimum_purchase", tp.get("minimum_purchase"), 0) or 0,
            money("topup_policy.hoarding_limit", tp.get("hoarding_limit"), None),
        )

    topups: list[TopUp] = []
    rtu = raw.get("topup", [])
    if not isinstance(rtu, list):
        add("topup", "must be an array of tables [[topup]]")
        rtu = []
    for i, t in enumerate(rtu):
        key = f"topup[{i}]"
        if not isinstance(t, dict):
            add(key, "must be a table")
            continue
        found.unknown(key, t, ("id", "counter", "amount", "time", "channel"))
        ts = when(f"{key}.time", t.get("time"))
        amount = money(f"{key}.amount", t.get("amount"), None)
        counter = t.get("counter", i + 1)
        channel = t.get("channel", "counter")
        if channel not in {c.value for c in Channel}:
            add(f"{key}.channel", f"must be one of {[c.value for c in Channel]}")
            channel = "counter"
        if not isinstance(counter, int) or isinstance(counter, bool):
            add(f"{key}.counter", "must be an integer")
            continue
        if ts is None or amount is None or not isinstance(acc, str):
            if amount is None:
                add(f"{key}.amount", "missing")
            continue
        topups.append(TopUp(str(t.get("id", f"sim-{i + 1}")), acc, counter, amount, Channel(channel),
                            Source.CLI, ts))

    cutoff: CutoffConfig | None = None
    if alarm1 is not None and alarm2 is not None and overdraft is not None and permit is not None:
        try:
            cutoff = CutoffConfig(
                alarm1_micro=alarm1,
                alarm2_micro=alarm2,
                overdraft_micro=overdraft,
                close_permit_micro=permit,
                close_mode=CloseMode(mode),
                meters=tuple(meters),
                windows=tuple(windows),
                calendar=calendar,
                tz=tz,
                protected=protected,
                contact_protect_after_ms=seconds("contact_protect_after_s", None),
                startup_protect_ms=seconds("startup_protect_s", 0) or 0,
                reconnect_delay_ms=seconds("reconnect_delay_s", 0) or 0,
                relay_min_interval_ms=seconds("relay_min_interval_s", 10) or 0,
            )
        except CutoffConfigError as exc:
            add("limits", str(exc))
    found.check(AccountError)
    assert cutoff is not None and isinstance(acc, str)
    return AccountSettings(acc, opening, tier, cutoff, policy, tuple(sorted(topups, key=lambda t: t.issued_ms)),
                           source)


def load_account(path: str | Path, default_timezone: str | None = None) -> AccountSettings:
    src = Path(path)
    found = Problems(src)
    doc = read_toml(src, found)
    if doc is None:
        raise AccountError(found.problems)
    return parse_account(doc.raw, str(src), default_timezone, line=doc.lines().line)

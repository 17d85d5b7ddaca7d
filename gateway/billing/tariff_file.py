"""Tariff files (TOML): parsing and validation into the model of
:mod:`gateway.billing.tariff`.

A tariff file holds one *version* of one tariff (docs/tariffs.md has the
format and worked examples). Every problem is reported as
``file: key.path: problem`` in a :class:`gateway.billing.tariff.TariffError`,
all problems of a file at once. ``[tier] preset`` names a tier structure of
:data:`TIER_PRESETS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.billing.daytypes import DayType, parse_calendar
from gateway.billing.money import (
    AmountError,
    kwh_to_ckwh_exact,
    price_to_e4,
    yuan_to_micro,
)
from gateway.billing.tariff import (
    FLAT_RATE,
    RATE_NAMES,
    DayPlan,
    FixedCharge,
    Season,
    Tariff,
    TariffBook,
    TariffError,
    TierSpec,
    TouSchedule,
    local_ms,
)
from gateway.problems import KeyPath, Problems, read_toml

CN_RESIDENTIAL_ANNUAL = {
    "period": "annual",
    "settlement_month": 1,
    "settlement_day": 1,
    "settlement_hour": 0,
    "thresholds_kwh": [2880, 4800],
    "surcharges": ["0", "0.05", "0.30"],
}
TIER_PRESETS: Mapping[str, Mapping[str, Any]] = {"cn-residential-annual": CN_RESIDENTIAL_ANNUAL}

_TOP_KEYS = {
    "id",
    "version",
    "effective_from",
    "timezone",
    "description",
    "price",
    "prices",
    "tou",
    "calendar",
    "tier",
    "fixed",
}
_TIER_KEYS = {
    "preset",
    "period",
    "settlement_month",
    "settlement_day",
    "settlement_hour",
    "thresholds_kwh",
    "surcharges",
    "prices",
}
_SEASON_KEYS = {"name", "start", "workday", "weekend", "holiday"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _price(p: Problems, key: str, v: Any) -> int | None:
    try:
        e4 = price_to_e4(v)
    except AmountError as exc:
        p.add(key, str(exc))
        return None
    if e4 < 0:
        p.add(key, f"must be >= 0, got {v!r}")
        return None
    return e4


def _hhmm(p: Problems, key: str, v: Any) -> int | None:
    if isinstance(v, time):
        if v.second or v.microsecond:
            p.add(key, "must be a whole minute")
            return None
        return v.hour * 60 + v.minute
    if isinstance(v, str):
        parts = v.split(":")
        if len(parts) == 2 and all(x.isdigit() and len(x) == 2 for x in parts):
            h, m = int(parts[0]), int(parts[1])
            if h < 24 and m < 60:
                return h * 60 + m
    p.add(key, f"must be a time of day 'HH:MM' (00:00..23:59), got {v!r}")
    return None


def _day_plan(p: Problems, key: str, v: Any, rate_names: set[str]) -> DayPlan | None:
    if not isinstance(v, list) or not v:
        p.add(key, "must be a non-empty list of [\"HH:MM\", \"Tn\"] pairs")
        return None
    starts: list[int] = []
    rates: list[str] = []
    ok = True
    for i, item in enumerate(v):
        k = f"{key}[{i}]"
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], str)):
            p.add(k, f"must be a pair [\"HH:MM\", \"Tn\"], got {item!r}")
            ok = False
            continue
        m = _hhmm(p, k, item[0])
        if m is None:
            ok = False
            continue
        if item[1] not in rate_names:
            known = ", ".join(sorted(rate_names)) or "none: [prices] is missing"
            p.add(k, f"rate {item[1]!r} has no price (priced rates: {known})")
            ok = False
        if starts and m <= starts[-1]:
            p.add(k, "periods must be in increasing order of start time")
            ok = False
        starts.append(m)
        rates.append(item[1])
    if ok and starts[0] != 0:
        p.add(f"{key}[0]", "the first period must start at 00:00 so that the day is covered")
        ok = False
    return DayPlan(tuple(starts), tuple(rates)) if ok else None


def _season(p: Problems, key: str, raw: Any, rate_names: set[str], need_name: bool) -> Season | None:
    if not isinstance(raw, dict):
        p.add(key, "must be a table")
        return None
    p.unknown(key, raw, _SEASON_KEYS | ({"season"} if not need_name else set()))
    name = raw.get("name", "all-year")
    start = (1, 1)
    if need_name:
        if not isinstance(raw.get("name"), str):
            p.add(f"{key}.name", "missing or not a string")
        s = raw.get("start")
        ok = isinstance(s, str) and len(s) == 5 and s[2] == "-"
        if ok:
            try:
                date(2000, int(s[:2]), int(s[3:]))  # type: ignore[index]
                start = (int(s[:2]), int(s[3:]))  # type: ignore[index]
            except ValueError:
                ok = False
        if not ok:
            p.add(f"{key}.start", f"must be a month-day 'MM-DD', got {s!r}")
    if "workday" not in raw:
        p.add(f"{key}.workday", "missing required day plan")
        return None
    workday = _day_plan(p, f"{key}.workday", raw["workday"], rate_names)
    weekend = _day_plan(p, f"{key}.weekend", raw["weekend"], rate_names) if "weekend" in raw else workday
    holiday = _day_plan(p, f"{key}.holiday", raw["holiday"], rate_names) if "holiday" in raw else weekend
    if workday is None or weekend is None or holiday is None:
        return None
    return Season(
        str(name),
        start,
        {DayType.WORKDAY: workday, DayType.WEEKEND: weekend, DayType.HOLIDAY: holiday},
    )


def _tier(p: Problems, raw: Any) -> TierSpec | None:
    if not isinstance(raw, dict):
        p.add("tier", "must be a table")
        return None
    p.unknown("tier", raw, _TIER_KEYS)
    merged: dict[str, Any] = {}
    if "preset" in raw:
        preset = TIER_PRESETS.get(raw["preset"]) if isinstance(raw["preset"], str) else None
        if preset is None:
            p.add("tier.preset", f"unknown preset {raw['preset']!r} (known: {', '.join(TIER_PRESETS)})")
            return None
        merged.update(preset)
        if "prices" in raw:
            merged.pop("surcharges", None)
    merged.update({k: v for k, v in raw.items() if k != "preset"})
    n_bad = len(p)
    period = merged.get("period")
    if period not in ("annual", "monthly"):
        p.add("tier.period", f"must be 'annual' or 'monthly', got {period!r}")

    def small_int(k: str, lo: int, hi: int, default: int) -> int:
        v = merged.get(k, default)
        if not _is_int(v) or not lo <= v <= hi:
            p.add(f"tier.{k}", f"must be an integer {lo}..{hi}, got {v!r}")
            return default
        return int(v)

    if period == "monthly" and "settlement_month" in merged:
        p.add("tier.settlement_month", "only for an annual period")
    month = small_int("settlement_month", 1, 12, 1)
    day = small_int("settlement_day", 1, 28, 1)
    hour = small_int("settlement_hour", 0, 23, 0)

    thresholds: list[int] = []
    raw_t = merged.get("thresholds_kwh")
    if not isinstance(raw_t, list) or not raw_t:
        p.add("tier.thresholds_kwh", "must be a non-empty list of kWh values")
    else:
        for i, v in enumerate(raw_t):
            try:
                c = kwh_to_ckwh_exact(v)
            except AmountError as exc:
                p.add(f"tier.thresholds_kwh[{i}]", str(exc))
                continue
            if c <= 0 or (thresholds and c <= thresholds[-1]):
                p.add(f"tier.thresholds_kwh[{i}]", "thresholds must be > 0 and strictly increasing")
            thresholds.append(c)
    has_s, has_p = "surcharges" in merged, "prices" in merged
    if has_s == has_p:
        p.add("tier", "give exactly one of 'surcharges' (added to the rate price) or 'prices' (tier prices)")
        return None
    mode = "surcharge" if has_s else "price"
    key = "surcharges" if has_s else "prices"
    raw_v = merged[key]
    values: list[int] = []
    if not isinstance(raw_v, list):
        p.add(f"tier.{key}", "must be a list")
    else:
        if raw_t is not None and isinstance(raw_t, list) and len(raw_v) != len(raw_t) + 1:
            p.add(f"tier.{key}", f"needs {len(raw_t) + 1} values (one more than thresholds), got {len(raw_v)}")
        for i, v in enumerate(raw_v):
            e4 = _price(p, f"tier.{key}[{i}]", v)
            if e4 is not None:
                values.append(e4)
    if len(p) > n_bad:
        return None
    return TierSpec(str(period), month, day, hour, mode, tuple(thresholds), tuple(values))


def _effective_from(p: Problems, v: Any, tz: ZoneInfo | None) -> int | None:
    if isinstance(v, str):
        try:
            v = datetime.fromisoformat(v) if "T" in v or " " in v else date.fromisoformat(v)
        except ValueError:
            p.add("effective_from", f"not an ISO 8601 date or date-time: {v!r}")
            return None
    if isinstance(v, datetime):
        if v.tzinfo is None:
            if tz is None:
                p.add("effective_from", "local date-time needs a timezone")
                return None
            v = v.replace(tzinfo=tz)
        return int(v.timestamp() * 1000)
    if isinstance(v, date):
        if tz is None:
            p.add("effective_from", "a date needs a timezone")
            return None
        return local_ms(tz, v)
    p.add("effective_from", f"must be a date or a date-time with offset, got {v!r}")
    return None


def parse_tariff(
    raw: Mapping[str, Any],
    source: str,
    default_timezone: str | None = None,
    *,
    line: Callable[[KeyPath], int | None] | None = None,
) -> Tariff:
    """Validate a parsed TOML document; raise :class:`TariffError` with every problem
    (each with the line of its key, given ``line``: the file's :class:`Lines`)."""
    p = Problems(source, line=line)
    p.unknown("", raw, _TOP_KEYS)
    tid = raw.get("id")
    if not isinstance(tid, str) or not tid:
        p.add("id", "missing or not a non-empty string")
    version = raw.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        p.add("version", f"must be an integer >= 1, got {version!r}")
    tz_name = raw.get("timezone", default_timezone)
    tz: ZoneInfo | None = None
    if tz_name is None:
        p.add("timezone", "missing (and no site timezone given)")
    elif not isinstance(tz_name, str):
        p.add("timezone", "must be a string such as 'Asia/Shanghai'")
    else:
        try:
            tz = ZoneInfo(tz_name)
        except (ZoneInfoNotFoundError, ValueError):
            p.add("timezone", f"unknown time zone {tz_name!r}")
    eff = None
    if "effective_from" not in raw:
        p.add("effective_from", "missing required key")
    else:
        eff = _effective_from(p, raw["effective_from"], tz)

    tier = _tier(p, raw["tier"]) if "tier" in raw else None
    rates: dict[str, int] = {}
    if "price" in raw and "prices" in raw:
        p.add("price", "give either 'price' (flat) or '[prices]' (T1..T4), not both")
    if "price" in raw:
        e4 = _price(p, "price", raw["price"])
        if e4 is not None:
            rates[FLAT_RATE] = e4
        if "tou" in raw:
            p.add("tou", "a flat 'price' has no time-of-use schedule; use [prices] T1..T4")
    elif "prices" in raw:
        pr = raw["prices"]
        if not isinstance(pr, dict) or not pr:
            p.add("prices", "must be a table of T1..T4 = price")
        else:
            for k, v in pr.items():
                if k not in RATE_NAMES:
                    p.add(f"prices.{k}", f"unknown rate (allowed: {', '.join(RATE_NAMES)})")
                    continue
                e4 = _price(p, f"prices.{k}", v)
                if e4 is not None:
                    rates[k] = e4
        if "tou" not in raw:
            p.add("tou", "missing: [prices] T1..T4 need a [tou] schedule")
    elif not (tier is not None and tier.mode == "price"):
        if not ("tier" in raw and isinstance(raw["tier"], dict) and "prices" in raw["tier"]):
            p.add("price", "missing: give 'price', '[prices]' + '[tou]', or [tier] prices")
    if "tou" in raw and "price" not in raw and "prices" not in raw:
        p.add("tou", "a time-of-use schedule needs [prices] T1..T4")
    if tier is not None and tier.mode == "price" and rates:
        p.add("tier.prices", "tier prices replace rate prices; remove 'price'/'[prices]'")

    calendar = parse_calendar(raw.get("calendar"), "calendar", p)
    tou: TouSchedule | None = None
    if "tou" in raw and "prices" in raw:
        rt = raw["tou"]
        names = set(rates)
        if not isinstance(rt, dict):
            p.add("tou", "must be a table")
        elif "season" in rt:
            p.unknown("tou", rt, {"season"})
            seasons: list[Season] = []
            if not isinstance(rt["season"], list) or not rt["season"]:
                p.add("tou.season", "must be a non-empty array of tables")
            else:
                for i, rs in enumerate(rt["season"]):
                    s = _season(p, f"tou.season[{i}]", rs, names, need_name=True)
                    if s is not None:
                        seasons.append(s)
                starts = [s.start for s in seasons]
                if len(set(starts)) != len(starts):
                    p.add("tou.season", "two seasons start on the same day")
            if seasons:
                tou = TouSchedule(tuple(sorted(seasons, key=lambda s: s.start)), calendar)
        else:
            s = _season(p, "tou", rt, names, need_name=False)
            if s is not None:
                tou = TouSchedule((s,), calendar)
        if tou is not None:
            used = {r for s in tou.seasons for plan in s.plans.values() for r in plan.rates}
            for r in sorted(set(rates) - used):
                p.add(f"prices.{r}", "priced but never used by the [tou] schedule")

    fixed: list[FixedCharge] = []
    rf = raw.get("fixed", [])
    if not isinstance(rf, list):
        p.add("fixed", "must be an array of tables [[fixed]]")
    else:
        names_seen: set[str] = set()
        for i, f in enumerate(rf):
            k = f"fixed[{i}]"
            if not isinstance(f, dict):
                p.add(k, "must be a table")
                continue
            p.unknown(k, f, {"name", "period", "amount"})
            name = f.get("name")
            if not isinstance(name, str) or not name:
                p.add(f"{k}.name", "missing or not a string")
                continue
            if name in names_seen:
                p.add(f"{k}.name", f"duplicate fixed charge {name!r}")
            names_seen.add(name)
            period = f.get("period")
            if period not in ("daily", "monthly"):
                p.add(f"{k}.period", f"must be 'daily' or 'monthly', got {period!r}")
                continue
            try:
                amount = yuan_to_micro(f.get("amount"))
            except AmountError as exc:
                p.add(f"{k}.amount", str(exc))
                continue
            if amount <= 0:
                p.add(f"{k}.amount", "must be > 0")
                continue
            fixed.append(FixedCharge(name, str(period), amount))

    desc = raw.get("description", "")
    if not isinstance(desc, str):
        p.add("description", "must be a string")
        desc = ""
    p.check(TariffError)
    assert tz is not None and eff is not None and isinstance(tid, str) and isinstance(version, int)
    return Tariff(
        tariff_id=tid,
        version=version,
        effective_from_ms=eff,
        tz=tz,
        rates=rates,
        tou=tou,
        tier=tier,
        fixed=tuple(fixed),
        source=source,
        description=desc,
    )


def load_tariff(path: str | Path, default_timezone: str | None = None) -> Tariff:
    """Load one tariff version from a TOML file."""
    src = Path(path)
    found = Problems(src)
    doc = read_toml(src, found)
    if doc is None:
        raise TariffError(found.problems)
    return parse_tariff(doc.raw, str(src), default_timezone, line=doc.lines().line)


def load_book(paths: Sequence[str | Path], default_timezone: str | None = None) -> TariffBook:
    """Load several versions of one tariff (all problems of all files together)."""
    found = Problems()
    versions: list[Tariff] = []
    for path in paths:
        try:
            versions.append(load_tariff(path, default_timezone))
        except TariffError as exc:
            found.extend(exc.problems)
    found.check(TariffError)
    return TariffBook(tuple(versions))

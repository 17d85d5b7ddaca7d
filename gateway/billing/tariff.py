"""Tariffs as versioned data (TOML), validated at load.

A tariff file holds one *version* of one tariff: ``id`` + ``version`` +
``effective_from``. A :class:`TariffBook` holds the versions of one tariff id
and answers "which version is in force at time t"; a new version applies from
its ``effective_from`` instant exactly (the rating engine splits an interval
there).

Pricing model (docs/tariffs.md has the file format and worked examples):

* energy price per rate: a single ``price`` (flat) or ``[prices]`` T1..T4
  (sharp / peak / flat / valley) selected by a ``[tou]`` schedule of
  time-of-day periods per day type (workday / weekend / holiday) and season;
* optional ``[tier]`` (阶梯) on cumulative consumption in a monthly or annual
  billing period that starts at a settlement day and hour: either an additive
  ``surcharges`` list on top of the rate price (Chinese residential model) or
  plain tier ``prices`` that replace rate prices;
* optional ``[[fixed]]`` daily or monthly charges.

Prices have at most 4 decimals (yuan/kWh); amounts at most 6 (yuan).
Every problem is reported as ``file: key.path: problem`` in a
:class:`TariffError`, all problems of a file at once.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from firmware_bridge.errors import EdgeGwError, ErrorKind, ProblemsError
from gateway.billing.daytypes import DayCalendar, DayType, parse_calendar
from gateway.billing.money import (
    AmountError,
    kwh_to_ckwh_exact,
    price_to_e4,
    yuan_to_micro,
)
from gateway.problems import Problems, read_toml

RATE_NAMES: tuple[str, ...] = ("T1", "T2", "T3", "T4")  # sharp, peak, flat, valley
FLAT_RATE = "flat"  # the rate name of a single-price tariff

CN_RESIDENTIAL_ANNUAL = {
    "period": "annual",
    "settlement_month": 1,
    "settlement_day": 1,
    "settlement_hour": 0,
    "thresholds_kwh": [2880, 4800],
    "surcharges": ["0", "0.05", "0.30"],
}
TIER_PRESETS: Mapping[str, Mapping[str, Any]] = {"cn-residential-annual": CN_RESIDENTIAL_ANNUAL}


class TariffError(ProblemsError):
    """A tariff file (or set of versions) is invalid. ``problems``: one line each."""


class NoTariffInForce(EdgeGwError, LookupError):
    """No tariff version is in force at the requested time."""

    kind = ErrorKind.NOT_FOUND


# ---------------------------------------------------------------------------
# Model


def local_ms(tz: ZoneInfo, d: date, hour: int = 0, minute: int = 0) -> int:
    """Unix ms of a local wall-clock time (fold=0 for ambiguous/nonexistent times)."""
    return int(datetime.combine(d, time(hour, minute), tzinfo=tz).timestamp() * 1000)


def to_local(tz: ZoneInfo, t_ms: int) -> datetime:
    return datetime.fromtimestamp(t_ms / 1000, tz=tz)


@dataclass(frozen=True)
class DayPlan:
    """Rates over one day: ``starts`` are minutes after midnight, first is 0."""

    starts: tuple[int, ...]
    rates: tuple[str, ...]

    def rate_at(self, minute: int) -> str:
        return self.rates[bisect.bisect_right(self.starts, minute) - 1]


@dataclass(frozen=True)
class Season:
    name: str
    start: tuple[int, int]  # (month, day)
    plans: Mapping[DayType, DayPlan]


@dataclass(frozen=True)
class TouSchedule:
    seasons: tuple[Season, ...]  # sorted by start
    calendar: DayCalendar

    def plan_for(self, d: date) -> DayPlan:
        md = (d.month, d.day)
        season = self.seasons[-1]  # wraps around the new year
        for s in self.seasons:
            if s.start <= md:
                season = s
        return season.plans[self.calendar.day_type(d)]


@dataclass(frozen=True)
class TierSpec:
    period: str  # "annual" | "monthly"
    settlement_month: int  # annual only (1..12)
    settlement_day: int  # 1..28
    settlement_hour: int  # 0..23
    mode: str  # "surcharge" | "price"
    thresholds_ckwh: tuple[int, ...]  # strictly increasing upper bounds of tiers 1..n-1
    values_e4: tuple[int, ...]  # len(thresholds) + 1: surcharge or price per tier

    def tier_of_next_unit(self, cumulative_ckwh: int) -> tuple[int, int | None]:
        """(tier index, room left in that tier or None) for usage after ``cumulative``.

        Usage that brings the cumulative exactly onto a threshold stays in the
        lower tier: tier k holds cumulative values in (T[k-1], T[k]].
        """
        k = bisect.bisect_left(self.thresholds_ckwh, cumulative_ckwh + 1)
        if k >= len(self.thresholds_ckwh):
            return k, None
        return k, self.thresholds_ckwh[k] - cumulative_ckwh


@dataclass(frozen=True)
class FixedCharge:
    name: str
    period: str  # "daily" | "monthly"
    amount_micro: int


@dataclass(frozen=True)
class Tariff:
    tariff_id: str
    version: int
    effective_from_ms: int
    tz: ZoneInfo
    rates: Mapping[str, int]  # rate name -> price, 1e-4 yuan/kWh (empty in tier price mode)
    tou: TouSchedule | None
    tier: TierSpec | None
    fixed: tuple[FixedCharge, ...] = ()
    source: str = ""
    description: str = ""

    @property
    def key(self) -> str:
        return f"{self.tariff_id}@{self.version}"

    # -- time-of-use ------------------------------------------------------
    def rate_at(self, t_ms: int) -> str:
        if self.tou is None:
            return FLAT_RATE
        lt = to_local(self.tz, t_ms)
        return self.tou.plan_for(lt.date()).rate_at(lt.hour * 60 + lt.minute)

    def rate_boundaries(self, t0_ms: int, t1_ms: int) -> list[int]:
        """Instants in (t0, t1) where the rate may change (period starts, midnights)."""
        if self.tou is None:
            return []
        out: list[int] = []
        d = to_local(self.tz, t0_ms).date()
        last = to_local(self.tz, t1_ms).date()
        while d <= last:
            plan = self.tou.plan_for(d)
            for m in plan.starts:
                t = local_ms(self.tz, d, m // 60, m % 60)
                if t0_ms < t < t1_ms:
                    out.append(t)
            d += timedelta(days=1)
        return sorted(set(out))

    # -- tiers ------------------------------------------------------------
    def _settlement(self, year: int, month: int) -> int:
        assert self.tier is not None
        sp = self.tier
        m = sp.settlement_month if sp.period == "annual" else month
        return local_ms(self.tz, date(year, m, sp.settlement_day), sp.settlement_hour)

    def tier_period_start(self, t_ms: int) -> int | None:
        """Start (Unix ms) of the tier billing period containing ``t``; None without tiers."""
        if self.tier is None:
            return None
        lt = to_local(self.tz, t_ms)
        y, m = lt.year, lt.month
        s = self._settlement(y, m)
        if s <= t_ms:
            return s
        if self.tier.period == "annual":
            return self._settlement(y - 1, m)
        y, m = (y, m - 1) if m > 1 else (y - 1, 12)
        return self._settlement(y, m)

    def settlement_boundaries(self, t0_ms: int, t1_ms: int) -> list[int]:
        """Tier period starts strictly inside (t0, t1)."""
        if self.tier is None:
            return []
        out: list[int] = []
        s = self.tier_period_start(t0_ms)
        assert s is not None
        while True:
            s = self.next_settlement(s)
            if s >= t1_ms:
                return out
            out.append(s)

    def next_settlement(self, period_start_ms: int) -> int:
        assert self.tier is not None
        lt = to_local(self.tz, period_start_ms)
        if self.tier.period == "annual":
            return self._settlement(lt.year + 1, lt.month)
        y, m = (lt.year, lt.month + 1) if lt.month < 12 else (lt.year + 1, 1)
        return self._settlement(y, m)

    # -- prices -----------------------------------------------------------
    def unit_price_e4(self, rate: str, tier_index: int | None) -> int:
        if self.tier is not None and self.tier.mode == "price":
            assert tier_index is not None
            return self.tier.values_e4[tier_index]
        base = self.rates[rate]
        if self.tier is not None:
            assert tier_index is not None
            return base + self.tier.values_e4[tier_index]
        return base

    # -- fixed charges ----------------------------------------------------
    def fixed_period_starts(self, period: str, t0_ms: int, t1_ms: int) -> list[int]:
        """Starts of daily (local midnight) / monthly (1st, 00:00) periods in (t0, t1]."""
        out: list[int] = []
        d = to_local(self.tz, t0_ms).date()
        last = to_local(self.tz, t1_ms).date()
        while d <= last:
            if period == "daily" or d.day == 1:
                t = local_ms(self.tz, d)
                if t0_ms < t <= t1_ms:
                    out.append(t)
            d += timedelta(days=1)
        return out


@dataclass(frozen=True)
class TariffBook:
    """All known versions of one tariff id, ordered by ``effective_from``."""

    versions: tuple[Tariff, ...]
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        vs = tuple(sorted(self.versions, key=lambda t: t.effective_from_ms))
        problems: list[str] = []
        if not vs:
            problems.append("tariff book: no versions")
        ids = {t.tariff_id for t in vs}
        if len(ids) > 1:
            problems.append(f"tariff book: mixes tariff ids {sorted(ids)}")
        for a, b in itertools.pairwise(vs):
            if a.effective_from_ms == b.effective_from_ms:
                problems.append(
                    f"{b.source}: effective_from: same instant as version {a.version} ({a.source})"
                )
            if b.version <= a.version:
                problems.append(
                    f"{b.source}: version: {b.version} takes effect after version {a.version}; "
                    "versions must increase with effective_from"
                )
        if problems:
            raise TariffError(problems)
        object.__setattr__(self, "versions", vs)
        object.__setattr__(self, "_starts", tuple(t.effective_from_ms for t in vs))

    @property
    def tariff_id(self) -> str:
        return self.versions[0].tariff_id

    def at(self, t_ms: int) -> Tariff:
        i = bisect.bisect_right(self._starts, t_ms) - 1
        if i < 0:
            raise NoTariffInForce(
                f"tariff {self.tariff_id}: no version in force at {t_ms} "
                f"(first is effective from {self._starts[0]})"
            )
        return self.versions[i]

    def version_boundaries(self, t0_ms: int, t1_ms: int) -> list[int]:
        return [s for s in self._starts if t0_ms < s < t1_ms]

    def with_version(self, tariff: Tariff) -> TariffBook:
        """A new book with ``tariff`` added (or replacing the same version)."""
        kept = [t for t in self.versions if t.version != tariff.version]
        return TariffBook((*kept, tariff))


# ---------------------------------------------------------------------------
# Loading


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


def parse_tariff(raw: Mapping[str, Any], source: str, default_timezone: str | None = None) -> Tariff:
    """Validate a parsed TOML document; raise :class:`TariffError` with every problem."""
    p = Problems(source)
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
    return parse_tariff(doc.raw, str(src), default_timezone)


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

"""Tariffs as versioned data: the model (pure).

A tariff *version* is one :class:`Tariff`: ``id`` + ``version`` +
``effective_from``. A :class:`TariffBook` holds the versions of one tariff id
and answers "which version is in force at time t"; a new version applies from
its ``effective_from`` instant exactly (the rating engine splits an interval
there). The file format, its parser and its checks are
:mod:`gateway.billing.tariff_file`.

Pricing model (docs/tariffs.md has the file format and worked examples):

* energy price per rate: a single ``price`` (flat) or ``[prices]`` T1..T4
  (sharp / peak / flat / valley) selected by a ``[tou]`` schedule of
  time-of-day periods per day type (workday / weekend / holiday) and season;
* optional ``[tier]`` (阶梯) on cumulative consumption in a monthly or annual
  billing period that starts at a settlement day and hour: either an additive
  ``surcharges`` list on top of the rate price (Chinese residential model) or
  plain tier ``prices`` that replace rate prices;
* optional ``[[fixed]]`` daily or monthly charges.

Prices have at most 4 decimals (yuan/kWh), in 1e-4 yuan units; amounts at
most 6 (yuan), in micro-yuan.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from firmware_bridge.errors import EdgeGwError, ErrorKind, ProblemsError
from gateway.billing.daytypes import DayCalendar, DayType

RATE_NAMES: tuple[str, ...] = ("T1", "T2", "T3", "T4")  # sharp, peak, flat, valley
FLAT_RATE = "flat"  # the rate name of a single-price tariff
MEMO_SIZE = 1024  # values a Tariff remembers (the period starts of a day, settlement instants)



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
            for t in self._period_starts(d):
                if t0_ms < t < t1_ms:
                    out.append(t)
            d += timedelta(days=1)
        return sorted(set(out))

    def _period_starts(self, d: date) -> tuple[int, ...]:
        """The instants the periods of local day ``d`` start (remembered: every reading
        asks for the day it falls in)."""
        assert self.tou is not None
        memo = self._memo("_period_starts_memo")
        starts: tuple[int, ...] | None = memo.get(d)
        if starts is None:
            starts = memo[d] = tuple(local_ms(self.tz, d, m // 60, m % 60) for m in self.tou.plan_for(d).starts)
        return starts

    def _memo(self, name: str) -> dict[Any, Any]:
        """Values of a pure function of this (immutable) tariff, by argument; emptied
        when it holds :data:`MEMO_SIZE` of them."""
        memo: dict[Any, Any] | None = self.__dict__.get(name)
        if memo is None:
            memo = {}
            object.__setattr__(self, name, memo)  # (not a field: not compared, not shown)
        elif len(memo) >= MEMO_SIZE:
            memo.clear()
        return memo

    # -- tiers ------------------------------------------------------------
    def _settlement(self, year: int, month: int) -> int:
        assert self.tier is not None
        sp = self.tier
        m = sp.settlement_month if sp.period == "annual" else month
        memo = self._memo("_settlement_memo")
        s: int | None = memo.get((year, m))
        if s is None:
            s = memo[year, m] = local_ms(self.tz, date(year, m, sp.settlement_day), sp.settlement_hour)
        return s

    def tier_period_start(self, t_ms: int) -> int | None:
        """Start (Unix ms) of the tier billing period containing ``t``; None without tiers."""
        if self.tier is None:
            return None
        # The period found last, [start, next settlement): every reading falls in the
        # period of the one before it, nearly always.
        last = self._memo("_tier_period_memo")
        p: tuple[int, int] | None = last.get(0)
        if p is not None and p[0] <= t_ms < p[1]:
            return p[0]
        s = self._period_start(t_ms)
        last[0] = (s, self._next_settlement(s))
        return s

    def _period_start(self, t_ms: int) -> int:
        assert self.tier is not None
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
        p: tuple[int, int] | None = self._memo("_tier_period_memo").get(0)
        if p is not None and p[0] == period_start_ms:
            return p[1]
        return self._next_settlement(period_start_ms)

    def _next_settlement(self, period_start_ms: int) -> int:
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

"""Hypothesis properties of rating, the ledger and the cutoff policy."""

from __future__ import annotations

import itertools
from decimal import Decimal
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge.relay_ops import RelayOp
from gateway.billing.cutoff import (
    Contact,
    CutoffConfig,
    CutoffState,
    Window,
    evaluate,
    in_no_disconnect_window,
)
from gateway.billing.ledger import Ledger, LedgerConflict, adjustment_entry, debit_entry
from gateway.billing.rating import (
    RegisterReading,
    TierState,
    _Segment,
    _segments,
    rate_chain,
    rate_interval,
)
from gateway.billing.tariff import RATE_NAMES, TariffBook
from gateway.billing.topup import Channel, Source, TopUp, TopUpPolicy, decide_topup
from tests.gateway.billing._util import (
    FLAT,
    FLAT_TIER,
    TIER_PRICES_MONTHLY,
    TOU,
    TOU_TIER,
    book,
    ms,
)

BOOKS = {name: book(text) for name, text in
         [("flat", FLAT), ("flat_tier", FLAT_TIER), ("tier_prices", TIER_PRICES_MONTHLY),
          ("tou", TOU), ("tou_tier", TOU_TIER)]}
V1 = FLAT.replace('price = "0.5600"', 'price = "0.5000"')
V2 = (V1.replace("version = 1", "version = 2")
      .replace('effective_from = "2026-01-01"', 'effective_from = "2026-03-10T13:17:00+08:00"')
      .replace('price = "0.5000"', 'price = "0.6000"'))
BOOKS["versions"] = book(V1, V2)

# 2026-03-02 .. 2026-03-22 local: inside one monthly period of TOU_TIER (settles on the 1st)
# and of TIER_PRICES_MONTHLY (settles on the 25th), and of the annual FLAT_TIER period.
START = ms("2026-03-02T00:00")
SPAN = 20 * 86_400_000
times = st.integers(min_value=START, max_value=START + SPAN)
ckwh = st.integers(min_value=0, max_value=3000)
tiers = st.builds(lambda c: TierState(None, c), st.integers(min_value=0, max_value=30000))


def reading(rid: str, t: int, c: int, rates: dict[str, int] | None = None) -> RegisterReading:
    rk = {k: Decimal(v) / 100 for k, v in (rates or {}).items()}
    return RegisterReading(rid, "m1", t, Decimal(c) / 100, rk)


@settings(max_examples=100, deadline=None)
@given(
    name=st.sampled_from(["flat", "flat_tier", "tier_prices"]),
    t=st.lists(times, min_size=3, max_size=3, unique=True).map(sorted),
    e=st.tuples(ckwh, ckwh),
    tier=tiers,
)
def test_splitting_never_changes_the_total_single_rate(
    name: str, t: list[int], e: tuple[int, int], tier: TierState
) -> None:
    """Without rates to apportion, the price depends only on cumulative energy."""
    b = BOOKS[name]
    a, m, z = reading("a", t[0], 10_000), reading("m", t[1], 10_000 + e[0]), reading("z", t[2], 10_000 + sum(e))
    whole = rate_interval(a, z, b, tier)
    r1 = rate_interval(a, m, b, tier)
    r2 = rate_interval(m, z, b, r1.tier_state)
    assert whole.charge and r1.charge and r2.charge
    assert whole.charge.amount_micro == r1.charge.amount_micro + r2.charge.amount_micro
    assert whole.tier_state == r2.tier_state


def _rates_used(b: TariffBook, t0: int, t1: int) -> list[str]:
    tar = b.at(t0)
    return sorted({tar.rate_at(x) for x in [t0, *tar.rate_boundaries(t0, t1)]})


@st.composite
def tou_split(draw: st.DrawFn) -> tuple[list[int], dict[str, int], dict[str, int]]:
    t = sorted(draw(st.lists(times, min_size=3, max_size=3, unique=True)))
    b = BOOKS["tou_tier"]
    parts = []
    for lo, hi in [(t[0], t[1]), (t[1], t[2])]:
        used = _rates_used(b, lo, hi)
        parts.append({r: draw(ckwh) if r in used else 0 for r in RATE_NAMES})
    return t, parts[0], parts[1]


@settings(max_examples=100, deadline=None)
@given(case=tou_split(), tier=tiers)
def test_splitting_never_changes_the_total_with_rate_registers(
    case: tuple[list[int], dict[str, int], dict[str, int]], tier: TierState
) -> None:
    """With per-rate registers and an additive tier surcharge the total is order-free."""
    t, p1, p2 = case
    b = BOOKS["tou_tier"]
    base = dict.fromkeys(RATE_NAMES, 1000)
    mid = {r: base[r] + p1[r] for r in RATE_NAMES}
    end = {r: mid[r] + p2[r] for r in RATE_NAMES}
    a = reading("a", t[0], sum(base.values()), base)
    m = reading("m", t[1], sum(mid.values()), mid)
    z = reading("z", t[2], sum(end.values()), end)
    whole = rate_interval(a, z, b, tier)
    r1 = rate_interval(a, m, b, tier)
    r2 = rate_interval(m, z, b, r1.tier_state)
    assert whole.charge and r1.charge and r2.charge
    assert whole.anomalies == r1.anomalies == r2.anomalies == ()
    assert whole.charge.amount_micro == r1.charge.amount_micro + r2.charge.amount_micro
    assert whole.charge.ckwh_by_rate() == {
        r: v for r in RATE_NAMES if (v := p1[r] + p2[r]) > 0
    }


@settings(max_examples=100, deadline=None)
@given(
    name=st.sampled_from(sorted(BOOKS)),
    steps=st.lists(st.tuples(st.integers(1, 3 * 86_400_000), st.integers(0, 99_999)), min_size=1, max_size=12),
    start=st.integers(ms("2026-03-02T00:00"), ms("2027-12-01T00:00")),
    tier=tiers,
)
def test_energy_is_conserved_and_amounts_are_exact(
    name: str, steps: list[tuple[int, int]], start: int, tier: TierState
) -> None:
    """Any chain (crossing TOU, settlement and version boundaries): kWh telescope to the
    truncated register difference; each line is ckwh x price; nothing is negative."""
    b = BOOKS[name]
    t, reg = start, Decimal("1234.567")
    items = [RegisterReading("r0", "m1", t, reg)]
    for i, (dt, de) in enumerate(steps, 1):
        t += dt
        reg += Decimal(de) / 1000  # meter with 0.001 kWh resolution
        items.append(RegisterReading(f"r{i}", "m1", t, reg))
    results, _ = rate_chain(items, b, tier)
    charges = [r.charge for r in results]
    assert all(c is not None for c in charges)
    total = sum(c.ckwh for c in charges if c)
    assert total == int(reg * 100) - 123456
    for c in charges:
        assert c is not None
        assert sum(ln.ckwh for ln in c.lines) == c.ckwh
        assert all(ln.ckwh > 0 and ln.amount_micro == ln.ckwh * ln.price_e4 >= 0 for ln in c.lines)


# --------------------------------------------------------------------------- ledger


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("debit"), st.integers(0, 20), st.integers(0, 500)),
            st.tuples(st.just("topup"), st.integers(1, 6), st.integers(1, 100)),
            st.tuples(st.just("adjust"), st.integers(0, 5), st.integers(-50, 50)),
        ),
        max_size=30,
    ),
    order=st.randoms(use_true_random=False),
)
def test_replaying_the_ledger_is_idempotent(ops: list[tuple[str, int, int]], order: object) -> None:
    led = Ledger("acc")
    for kind, k, v in ops:
        if kind == "debit":
            r = rate_interval(reading(f"r{k}", START + k * 60_000, 0),
                              reading(f"r{k + 1}", START + (k + 1) * 60_000, v), BOOKS["flat"], TierState())
            if r.charge is not None:
                try:
                    led.append(debit_entry("acc", r.charge))
                except LedgerConflict:  # same pair with a different amount: refused
                    pass
        elif kind == "topup":
            tu = TopUp(f"t{k}", "acc", k, v * 1_000_000, Channel.BANK, Source.MQTT, 0)
            d = decide_topup(tu, led.view, led.get(tu.entry_id), TopUpPolicy(), 0)
            if d.entry is not None:
                led.append(d.entry)
        else:
            try:
                led.append(adjustment_entry(f"a{k}", "acc", v, 0, "x", "y"))
            except LedgerConflict:  # same id with another amount: refused
                pass
    before = (led.entries, led.view)
    replay = list(led.entries)
    order.shuffle(replay)  # type: ignore[attr-defined]
    for e in replay:
        res = led.append(e)
        assert not res.applied
    assert (led.entries, led.view) == before
    assert led.refold() == led.view


# --------------------------------------------------------------------------- cutoff

Y = 1_000_000
windows = st.lists(
    st.builds(Window, st.integers(0, 1439), st.integers(1, 1440)), min_size=1, max_size=3
).map(tuple)
steps = st.lists(
    st.tuples(st.integers(1, 6 * 3_600_000), st.integers(-100 * Y, 100 * Y), st.booleans()),
    min_size=1,
    max_size=40,
)


def _cfg(**kw: object) -> CutoffConfig:
    base: dict[str, object] = dict(alarm1_micro=20 * Y, alarm2_micro=10 * Y, overdraft_micro=5 * Y,
                                   close_permit_micro=1 * Y, relay_min_interval_ms=0)
    base.update(kw)
    return CutoffConfig(**base)  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(steps=steps, start=times)
def test_protected_account_never_trips(steps: list[tuple[int, int, bool]], start: int) -> None:
    cfg = _cfg(protected=True)
    s, t = CutoffState(), start
    for dt, bal, contact in steps:
        t += dt
        d = evaluate(s, bal, t, Contact(t if contact else None), cfg, "acc")
        assert RelayOp.TRIP not in [a.kind for a in d.actions]
        s = d.state


@settings(max_examples=100, deadline=None)
@given(steps=steps, start=times, w=windows)
def test_no_trip_inside_a_no_disconnect_window(
    steps: list[tuple[int, int, bool]], start: int, w: tuple[Window, ...]
) -> None:
    cfg = _cfg(windows=w)
    s, t = CutoffState(), start
    tripped_when_due_outside = True
    for dt, bal, _ in steps:
        t += dt
        d = evaluate(s, bal, t, Contact(t), cfg, "acc")
        inside = in_no_disconnect_window(t, cfg)
        trips = RelayOp.TRIP in [a.kind for a in d.actions]
        assert not (trips and inside)
        if not inside and not s.relay_open and bal <= -5 * Y:
            tripped_when_due_outside = tripped_when_due_outside and trips
        s = d.state
    assert tripped_when_due_outside  # and a due trip outside windows is never skipped


def test_window_edges() -> None:
    w = Window(22 * 60, 6 * 60)
    cfg = _cfg(windows=(w,), tz=ZoneInfo("Asia/Shanghai"))
    base = ms("2026-03-02T00:00")
    inside = [base + 22 * 3_600_000, base + 23 * 3_600_000 + 59 * 60_000, base + 86_400_000 + 5 * 3_600_000]
    for t in inside:
        assert in_no_disconnect_window(t, cfg)
    assert not in_no_disconnect_window(base + 86_400_000 + 6 * 3_600_000, cfg)
    assert not in_no_disconnect_window(base + 21 * 3_600_000 + 59 * 60_000, cfg)


def _segments_cut_by_cut(b: TariffBook, t0: int, t1: int) -> list[_Segment]:
    """rating._segments without its quick path for one flat price."""
    cuts = {t0, t1, *b.version_boundaries(t0, t1)}
    for x, y in itertools.pairwise(sorted(cuts)):
        tariff = b.at(x)
        cuts.update(tariff.rate_boundaries(x, y))
        cuts.update(tariff.settlement_boundaries(x, y))
    return [_Segment(x, y, b.at(x), b.at(x).rate_at(x)) for x, y in itertools.pairwise(sorted(cuts))]


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(BOOKS)), t0=times, t1=times, dt=st.integers(-2, 5_000), near=st.booleans())
def test_segments_are_the_cuts_of_every_price_change(name: str, t0: int, t1: int, dt: int, near: bool) -> None:
    b = BOOKS[name]
    t1 = t0 + dt if near else t1 + SPAN // 4  # (past the monthly settlement on the 25th)
    assert _segments(b, t0, t1) == _segments_cut_by_cut(b, t0, t1)

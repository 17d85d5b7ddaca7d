"""The cutoff policy over time: when a decision can change, following it, labels.

The daemon evaluates on a one-second tick and after every balance change;
``tariff simulate`` evaluates only at balance changes and at the instants
:func:`next_change_ms` names. They agree only if evaluating anywhere between
two such instants changes nothing, and if splitting a run into ticks at
arbitrary instants gives the same decisions: both are tested here as
properties, next to hand-made stories.
"""

from __future__ import annotations

from datetime import date
from zoneinfo import ZoneInfo

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from firmware_bridge.relay_ops import RelayOp
from gateway.billing.cutoff import (
    CloseMode,
    Contact,
    CutoffConfig,
    CutoffDecision,
    CutoffState,
    Level,
    Pending,
    PolicyPoint,
    Window,
    describe,
    evaluate,
    follow,
    in_no_disconnect_window,
    next_change_ms,
    next_window_change_ms,
)
from gateway.billing.daytypes import DayCalendar, DayType
from tests.gateway.billing._util import ms

Y = 1_000_000
SH = ZoneInfo("Asia/Shanghai")
MIN = 60_000
HOUR = 3_600_000
T0 = ms("2026-03-02T00:00")  # a Monday

zones = st.sampled_from([SH, ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York"), ZoneInfo("UTC")])
windows = st.lists(
    st.builds(
        Window,
        st.integers(0, 1439),
        st.integers(1, 1440),
        st.sets(st.sampled_from(list(DayType)), min_size=1).map(frozenset),
    ),
    min_size=0,
    max_size=3,
).map(tuple)
calendars = st.builds(
    DayCalendar,
    weekend=st.just(frozenset({6, 7})),
    holidays=st.sets(st.dates(date(2026, 3, 1), date(2026, 3, 20)), max_size=3).map(frozenset),
)


@st.composite
def configs(draw: st.DrawFn) -> CutoffConfig:
    return CutoffConfig(
        alarm1_micro=20 * Y,
        alarm2_micro=10 * Y,
        overdraft_micro=draw(st.sampled_from([0, 2 * Y])),
        close_permit_micro=draw(st.sampled_from([0, Y])),
        close_mode=draw(st.sampled_from(list(CloseMode))),
        meters=("m1",),
        windows=draw(windows),
        calendar=draw(calendars),
        tz=draw(zones),
        contact_protect_after_ms=draw(st.sampled_from([None, HOUR, 30 * HOUR])),
        startup_protect_ms=draw(st.sampled_from([0, 10 * MIN])),
        reconnect_delay_ms=draw(st.sampled_from([0, MIN, 90 * MIN])),
        relay_min_interval_ms=draw(st.sampled_from([0, 10_000, 20 * MIN])),
    )


balances = st.sampled_from([30 * Y, 15 * Y, 5 * Y, 0, -Y, -2 * Y, -3 * Y, 2 * Y])
# balance changes: (ms after the previous one, balance after)
stories = st.lists(st.tuples(st.integers(0, 30 * HOUR), balances), min_size=1, max_size=12)


def _points(
    story: list[tuple[int, int]], start: int
) -> list[tuple[int, int]]:
    out, t = [], start
    for dt, b in story:
        t += dt
        out.append((t, b))
    return out


def _summary(ds: list[CutoffDecision]) -> list[tuple[object, ...]]:
    return [
        (d.time_ms, tuple((a.kind, a.meter, a.reason) for a in d.actions),
         tuple((e.type, e.from_level, e.to_level, e.reason, e.time_ms) for e in d.events))
        for d in ds
    ]


@settings(max_examples=120, deadline=None)
@given(cfg=configs(), story=stories, opening=balances, last_contact=st.sampled_from([None, 0, 20 * HOUR]),
       probe=st.floats(0.0, 1.0))
def test_nothing_changes_between_change_instants(
    cfg: CutoffConfig, story: list[tuple[int, int]], opening: int, last_contact: int | None, probe: float
) -> None:
    contact = Contact(None if last_contact is None else T0 + last_contact, T0)
    state = evaluate(CutoffState(), opening, T0, contact, cfg, "acc").state
    t = T0
    for at, bal in _points(story, T0):
        state, _, _ = follow(state, PolicyPoint(t, bal), [], at, contact, cfg, "acc")
        t = at
        # settled at t: up to the next change instant, a new evaluation is a no-op
        n = next_change_ms(state, bal, t, contact, cfg)
        horizon = (n - 1) if n is not None else t + 3 * 24 * HOUR
        assume(horizon > t)
        u = t + 1 + int(probe * (horizon - t - 1))
        d = evaluate(state, bal, u, contact, cfg, "acc")
        assert (d.actions, d.events) == ((), ()), (t, u, n, state, bal)
        assert d.state == state
        if n is not None:  # and at the instant itself something may happen: never before it
            assert n > t


@settings(max_examples=120, deadline=None)
@given(cfg=configs(), story=stories, opening=balances,
       ticks=st.lists(st.integers(0, 40 * 24 * HOUR), max_size=25))
def test_ticking_at_any_instants_changes_no_decision(
    cfg: CutoffConfig, story: list[tuple[int, int]], opening: int, ticks: list[int]
) -> None:
    """One run over the whole story (simulate) == the same story cut into ticks (daemon)."""
    contact = Contact(T0, T0)  # central in contact all along
    cfg = CutoffConfig(**{**cfg.__dict__, "contact_protect_after_ms": None})
    changes = _points(story, T0)
    end = changes[-1][0] + 2 * 24 * HOUR
    first = evaluate(CutoffState(), opening, T0, contact, cfg, "acc")
    whole_state, _, whole = follow(first.state, PolicyPoint(T0, opening), changes, end, contact, cfg, "acc")

    state, point, pieces = first.state, PolicyPoint(T0, opening), []
    stops = sorted({T0 + x for x in ticks if T0 + x < end} | {end})
    pending = list(changes)
    for stop in stops:
        now = [c for c in pending if c[0] <= stop]
        pending = pending[len(now):]
        state, point, ds = follow(state, point, now, stop, contact, cfg, "acc")
        pieces += ds
    assert _summary(pieces) == _summary(whole)
    assert state == whole_state


@settings(max_examples=60, deadline=None)
@given(tz=zones, w=windows.filter(bool), cal=calendars, start=st.integers(0, 14 * 24 * HOUR))
def test_window_edges_match_a_minute_by_minute_scan(
    tz: ZoneInfo, w: tuple[Window, ...], cal: DayCalendar, start: int
) -> None:
    cfg = CutoffConfig(alarm1_micro=2, alarm2_micro=1, windows=w, calendar=cal, tz=tz)
    after = T0 + start + 12_345  # not on a minute
    inside = in_no_disconnect_window(after, cfg)
    found = next_window_change_ms(after, cfg)
    # every edge is on a whole UTC minute in these zones
    t = (after // MIN + 1) * MIN
    for _ in range(4 * 24 * 60):
        if in_no_disconnect_window(t, cfg) != inside:
            assert found == t, (found, t)
            return
        t += MIN
    assert found is None or found > t


def cfg_household(**kw: object) -> CutoffConfig:
    base: dict[str, object] = dict(
        alarm1_micro=10 * Y, alarm2_micro=5 * Y, overdraft_micro=2 * Y, close_permit_micro=Y,
        close_mode=CloseMode.ALLOWED, meters=("m1",), tz=SH, reconnect_delay_ms=60_000,
        relay_min_interval_ms=10_000, windows=(Window(18 * 60, 8 * 60),),
    )
    base.update(kw)
    return CutoffConfig(**base)  # type: ignore[arg-type]


def test_a_cut_deferred_by_a_window_happens_when_the_window_ends() -> None:
    cfg = cfg_household()
    contact = Contact(ms("2026-03-03T07:00"), ms("2026-03-02T00:00"))
    s0 = CutoffState(Level.ALARM2, alarm_on=True)
    state, point, ds = follow(s0, PolicyPoint(ms("2026-03-03T06:00"), 4 * Y),
                              [(ms("2026-03-03T07:00"), -2_400_000)], ms("2026-03-03T09:00"),
                              contact, cfg, "acc")
    assert [(d.time_ms, [a.kind for a in d.actions]) for d in ds] == [
        (ms("2026-03-03T07:00"), []),
        (ms("2026-03-03T08:00"), [RelayOp.TRIP]),
    ]
    pending = ds[0].events[-1]
    assert pending.type == "trip_pending"
    assert pending.reason == ("trip due but not executed: balance -2.40 <= cut level -2.00;"
                              " cut deferred: no-disconnect window until 08:00")
    assert state.level is Level.CUTOFF and point == PolicyPoint(ms("2026-03-03T09:00"), -2_400_000)
    # at 07:00 a clerk reads what is happening, not "grace"
    assert describe(ds[0].state, -2_400_000, ms("2026-03-03T07:00"), contact, cfg) == (
        "cut pending: no-disconnect window until 08:00")
    assert describe(state, -2_400_000, ms("2026-03-03T09:00"), contact, cfg) == (
        "supply cut (balance -2.40, cut level -2.00); restore above 1.00")


def test_a_restore_waits_its_reconnect_delay_to_the_second() -> None:
    cfg = cfg_household()
    contact = Contact(ms("2026-03-03T10:00"), ms("2026-03-02T00:00"))
    cut = CutoffState(Level.CUTOFF, relay_open=True, alarm_on=True, last_relay_op_ms=ms("2026-03-03T08:00"))
    topup = ms("2026-03-03T10:30")
    state, _, ds = follow(cut, PolicyPoint(ms("2026-03-03T09:00"), -2_400_000), [(topup, 47_600_000)],
                          ms("2026-03-03T12:00"), contact, cfg, "acc")
    assert [d.time_ms for d in ds] == [topup, topup + 60_000]
    assert ds[0].events[0].type == "restore_pending"
    assert "reconnect delay until 10:31" in ds[0].events[0].reason
    assert describe(ds[0].state, 47_600_000, topup, contact, cfg) == "restore pending: reconnect delay until 10:31"
    assert [a.kind for a in ds[1].actions] == [RelayOp.CLOSE_ALLOWED, RelayOp.ALARM_OFF]
    assert state.level is Level.NORMAL and not state.relay_open


def test_reason_texts_say_yuan_and_never_minus_zero() -> None:
    cfg = cfg_household(overdraft_micro=0, windows=())
    d = evaluate(CutoffState(), 0, T0, Contact(T0), cfg, "acc")
    trip = next(e for e in d.events if e.type == "state_change")
    assert trip.reason == "balance 0.00 <= cut level 0.00 (no overdraft)"
    assert "-0.00" not in trip.reason
    d = evaluate(CutoffState(), 9_500_000, T0, Contact(T0), cfg, "acc")
    assert d.events[0].reason == "balance 9.50 <= alarm 1 level 10.00"


def test_labels_for_every_waiting_reason() -> None:
    cfg = cfg_household(windows=(), startup_protect_ms=10 * MIN, contact_protect_after_ms=HOUR)
    now = ms("2026-03-02T12:00")
    contact = Contact(now, now - MIN)
    d = evaluate(CutoffState(), -3 * Y, now, contact, cfg, "acc")
    assert d.state.pending is Pending.STARTUP
    assert describe(d.state, -3 * Y, now, contact, cfg) == "cut pending: start-up protection until 12:09"
    # the cut happens when start-up protection ends, to the millisecond
    assert next_change_ms(d.state, -3 * Y, now, contact, cfg) == now - MIN + 10 * MIN
    lost = Contact(now - 2 * HOUR, now - 5 * HOUR)
    d = evaluate(CutoffState(), -3 * Y, now, lost, cfg, "acc")
    assert describe(d.state, -3 * Y, now, lost, cfg) == (
        "cut pending: no contact with central since 10:00 (more than 3600 s)")
    prot = cfg_household(protected=True)
    d = evaluate(CutoffState(), -3 * Y, now, contact, prot, "acc")
    assert describe(d.state, -3 * Y, now, contact, prot) == "cut pending: account protected (保电)"
    assert describe(CutoffState(Level.ALARM1, alarm_on=True), 8 * Y, now, contact, cfg) == (
        "supply on: low balance (alarm 1 at 10.00)")


def test_a_window_on_holidays_only_ends_days_later() -> None:
    cal = DayCalendar(holidays=frozenset({date(2026, 10, 1), date(2026, 10, 2), date(2026, 10, 3)}))
    cfg = cfg_household(windows=(Window(0, 1440, frozenset({DayType.HOLIDAY})),), calendar=cal)
    t = ms("2026-10-01T09:00")
    assert in_no_disconnect_window(t, cfg)
    # 3 October is a Saturday but a holiday; the window ends at midnight into the 4th
    assert next_window_change_ms(t, cfg) == ms("2026-10-04T00:00")
    d = evaluate(CutoffState(), -3 * Y, t, Contact(t), cfg, "acc")
    assert describe(d.state, -3 * Y, t, Contact(t), cfg) == (
        "cut pending: no-disconnect window until 2026-10-04 00:00")

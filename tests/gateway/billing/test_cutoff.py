"""Cutoff policy: levels, deferrals, protection, restore, rate limiting."""

from __future__ import annotations

from datetime import date
from zoneinfo import ZoneInfo

import pytest

from firmware_bridge.relay_ops import RelayOp
from gateway.billing.cutoff import (
    CloseMode,
    Contact,
    CutoffConfig,
    CutoffConfigError,
    CutoffState,
    Level,
    Pending,
    Window,
    band,
    evaluate,
)
from gateway.billing.daytypes import DayCalendar, DayType
from tests.gateway.billing._util import ms

Y = 1_000_000
SH = ZoneInfo("Asia/Shanghai")
OK = Contact(None)


def cfg(**kw: object) -> CutoffConfig:
    base: dict[str, object] = dict(
        alarm1_micro=20 * Y, alarm2_micro=10 * Y, overdraft_micro=5 * Y, close_permit_micro=2 * Y,
        tz=SH, relay_min_interval_ms=10_000, meters=("m1",),
    )
    base.update(kw)
    return CutoffConfig(**base)  # type: ignore[arg-type]


def kinds(d: object) -> list[RelayOp]:
    return [a.kind for a in d.actions]  # type: ignore[attr-defined]


T = ms("2026-03-02T10:00")  # Monday 10:00


@pytest.mark.parametrize(
    ("balance", "level"),
    [
        (20 * Y + 1, Level.NORMAL),
        (20 * Y, Level.ALARM1),
        (10 * Y + 1, Level.ALARM1),
        (10 * Y, Level.ALARM2),
        (1, Level.ALARM2),
        (0, Level.GRACE),
        (-5 * Y + 1, Level.GRACE),
        (-5 * Y, Level.CUTOFF),
    ],
)
def test_bands_at_their_edges(balance: int, level: Level) -> None:
    assert band(balance, cfg()) is level


def test_walk_down_and_restore() -> None:
    c = cfg()
    s = CutoffState()
    d = evaluate(s, 15 * Y, T, OK, c, "acc")
    assert d.state.level is Level.ALARM1 and kinds(d) == [RelayOp.ALARM_ON]
    assert d.events[0].type == "state_change" and d.events[0].from_level is Level.NORMAL
    d = evaluate(d.state, 5 * Y, T + 1000, OK, c, "acc")
    assert d.state.level is Level.ALARM2 and kinds(d) == []
    d = evaluate(d.state, -1 * Y, T + 2000, OK, c, "acc")
    assert d.state.level is Level.GRACE and kinds(d) == []
    d = evaluate(d.state, -5 * Y, T + 3000, OK, c, "acc")
    assert d.state.level is Level.CUTOFF and kinds(d) == [RelayOp.TRIP] and d.state.relay_open
    # topped up a little: still not above the close permit (2.00)
    d = evaluate(d.state, 2 * Y, T + 60_000, OK, c, "acc")
    assert d.state.level is Level.CUTOFF and kinds(d) == []
    d = evaluate(d.state, 50 * Y, T + 120_000, OK, c, "acc")
    assert kinds(d) == [RelayOp.CLOSE, RelayOp.ALARM_OFF]
    assert d.state.level is Level.NORMAL and not d.state.relay_open
    assert d.events[0].from_level is Level.CUTOFF and d.events[0].to_level is Level.NORMAL


def test_close_allowed_per_meter() -> None:
    c = cfg(meters=("m1", "m2"), close_mode=CloseMode.ALLOWED, close_mode_by_meter={"m2": CloseMode.DIRECT})
    s = CutoffState(Level.CUTOFF, True, True, None, None, 0)
    d = evaluate(s, 30 * Y, T, OK, c, "acc")
    acts = [(a.kind, a.meter) for a in d.actions if a.kind in (RelayOp.CLOSE, RelayOp.CLOSE_ALLOWED)]
    assert acts == [(RelayOp.CLOSE_ALLOWED, "m1"), (RelayOp.CLOSE, "m2")]


def test_protected_account_never_trips_and_protection_restores() -> None:
    c = cfg(protected=True)
    d = evaluate(CutoffState(), -100 * Y, T, OK, c, "acc")
    assert RelayOp.TRIP not in kinds(d)
    assert d.state.pending is Pending.PROTECTED and d.state.level is Level.GRACE
    assert any(e.type == "trip_pending" and "protected" in e.reason for e in d.events)
    tripped = CutoffState(Level.CUTOFF, True, True, None, None, 0)
    d = evaluate(tripped, -100 * Y, T, OK, c, "acc")
    assert RelayOp.CLOSE in kinds(d) and not d.state.relay_open


def test_no_disconnect_window_defers_and_trip_happens_when_it_ends() -> None:
    evening = Window(18 * 60, 8 * 60)  # 18:00 - 08:00 next day, every day type
    c = cfg(windows=(evening,))
    t = ms("2026-03-02T23:00")
    d = evaluate(CutoffState(Level.GRACE, alarm_on=True), -10 * Y, t, OK, c, "acc")
    assert kinds(d) == [] and d.state.pending is Pending.NO_DISCONNECT_WINDOW
    d2 = evaluate(d.state, -10 * Y, ms("2026-03-03T07:59"), OK, c, "acc")
    assert kinds(d2) == [] and d2.events == ()  # no repeated event while still pending
    d3 = evaluate(d2.state, -10 * Y, ms("2026-03-03T08:00"), OK, c, "acc")
    assert kinds(d3) == [RelayOp.TRIP]


def test_weekend_and_holiday_windows() -> None:
    cal = DayCalendar(holidays=frozenset({date(2026, 3, 4)}))
    w = Window(0, 24 * 60, frozenset({DayType.WEEKEND, DayType.HOLIDAY}))
    c = cfg(windows=(w,), calendar=cal)
    for when, deferred in [
        ("2026-03-07T12:00", True),  # Saturday
        ("2026-03-04T12:00", True),  # Wednesday holiday
        ("2026-03-05T12:00", False),  # Thursday
    ]:
        d = evaluate(CutoffState(), -10 * Y, ms(when), OK, c, "acc")
        assert (RelayOp.TRIP not in kinds(d)) is deferred, when


def test_contact_loss_protection() -> None:
    c = cfg(contact_protect_after_ms=3_600_000)
    d = evaluate(CutoffState(), -10 * Y, T, Contact(T - 3_600_001), c, "acc")
    assert RelayOp.TRIP not in kinds(d) and d.state.pending is Pending.CONTACT_LOST
    d = evaluate(CutoffState(), -10 * Y, T, Contact(T - 60_000), c, "acc")
    assert RelayOp.TRIP in kinds(d)


def test_reconnect_delay_and_rate_limit() -> None:
    c = cfg(reconnect_delay_ms=60_000, relay_min_interval_ms=300_000)
    s = CutoffState(Level.CUTOFF, True, True, None, None, T)
    d = evaluate(s, 30 * Y, T + 10_000, OK, c, "acc")
    assert kinds(d) == [] and d.state.pending is Pending.RECONNECT_DELAY
    assert d.events[0].type == "restore_pending"
    d = evaluate(d.state, 30 * Y, T + 70_000, OK, c, "acc")  # delay over, but last op was 70 s ago
    assert kinds(d) == [] and d.state.pending is Pending.RATE_LIMIT
    d = evaluate(d.state, 30 * Y, T + 300_000, OK, c, "acc")
    assert RelayOp.CLOSE in kinds(d)
    # the balance dropping back below the permit resets the delay
    s2 = CutoffState(Level.CUTOFF, True, True, Pending.RECONNECT_DELAY, T, T - 10**6)
    d = evaluate(s2, 0, T + 30_000, OK, c, "acc")
    assert d.state.restore_since_ms is None


def test_trip_rate_limited_after_a_recent_close() -> None:
    c = cfg(relay_min_interval_ms=60_000)
    s = CutoffState(Level.NORMAL, False, False, None, None, T)
    d = evaluate(s, -10 * Y, T + 1000, OK, c, "acc")
    assert RelayOp.TRIP not in kinds(d) and d.state.pending is Pending.RATE_LIMIT
    d = evaluate(d.state, -10 * Y, T + 60_000, OK, c, "acc")
    assert RelayOp.TRIP in kinds(d)


def test_deferred_trip_cancelled_by_topup() -> None:
    c = cfg(protected=True)
    d = evaluate(CutoffState(), -10 * Y, T, OK, c, "acc")
    d = evaluate(d.state, 30 * Y, T + 1, OK, c, "acc")
    assert d.state.pending is None and d.state.level is Level.NORMAL


def test_config_validation() -> None:
    with pytest.raises(CutoffConfigError):
        cfg(alarm1_micro=5 * Y)  # below alarm2
    with pytest.raises(CutoffConfigError):
        cfg(overdraft_micro=-1)
    with pytest.raises(CutoffConfigError):
        cfg(close_permit_micro=-1)


def test_state_json_roundtrip() -> None:
    s = CutoffState(Level.GRACE, False, True, Pending.NO_DISCONNECT_WINDOW, 3, 4)
    assert CutoffState.from_json(s.to_json()) == s


def test_reassert_repeats_lost_commands() -> None:
    from gateway.billing.cutoff import reassert

    c = cfg(relay_min_interval_ms=10_000)
    tripped = CutoffState(Level.CUTOFF, True, True, None, None, T)
    st2, acts = reassert(tripped, "m1", False, T + 5_000, OK, c, "acc")
    assert acts == ()  # rate limit
    st2, acts = reassert(tripped, "m1", False, T + 10_000, OK, c, "acc")
    assert [a.kind for a in acts] == [RelayOp.TRIP] and st2.last_relay_op_ms == T + 10_000
    assert reassert(tripped, "m1", True, T + 60_000, OK, c, "acc")[1] == ()  # agrees
    assert reassert(tripped, "m1", False, T + 60_000, OK, cfg(protected=True), "acc")[1] == ()
    closed = CutoffState(Level.NORMAL, False, False, None, None, T)
    assert [a.kind for a in reassert(closed, "m1", True, T + 60_000, OK, c, "acc")[1]] == [RelayOp.CLOSE]
    allowed = cfg(close_mode=CloseMode.ALLOWED)
    assert reassert(closed, "m1", True, T + 60_000, OK, allowed, "acc")[1] == ()  # customer's button
    never_operated = CutoffState()
    assert reassert(never_operated, "m1", True, T, OK, c, "acc")[1] == ()


def test_action_maps_to_relay_controller_argument() -> None:
    from gateway.billing.cutoff import Action

    assert Action(RelayOp.TRIP, "a", "m", "").relay_open is True
    assert Action(RelayOp.CLOSE, "a", "m", "").relay_open is False
    assert Action(RelayOp.CLOSE_ALLOWED, "a", "m", "").relay_open is False
    assert Action(RelayOp.ALARM_ON, "a", "m", "").relay_open is None


def test_startup_protection() -> None:
    c = cfg(startup_protect_ms=600_000)
    d = evaluate(CutoffState(), -10 * Y, T, Contact(T, started_ms=T - 60_000), c, "acc")
    assert RelayOp.TRIP not in kinds(d) and d.state.pending is Pending.STARTUP
    d = evaluate(d.state, -10 * Y, T + 600_000, Contact(T, started_ms=T - 60_000), c, "acc")
    assert RelayOp.TRIP in kinds(d)
    # without a known start time the protection holds (fail safe for the customer)
    d = evaluate(CutoffState(), -10 * Y, T, Contact(T), c, "acc")
    assert RelayOp.TRIP not in kinds(d)

"""Trusted time: floor, estimate, jumps, confirmation, unseen stretches, persistence,
and recognising NTP synchronisation from files readable inside the sandbox."""

from __future__ import annotations

import os
from pathlib import Path

import aiosqlite
from hypothesis import example, given, settings
from hypothesis import strategies as st

from firmware_bridge.reading import TimeSource
from gateway.security.trusted_time import (
    CONFIRM_MS,
    FIRST_SYNC_WINDOW_MS,
    JUMP_TOLERANCE_MS,
    POLICY,
    Anchor,
    ClockEvent,
    ClockEventKind,
    ClockPolicy,
    ClockState,
    SyncProbe,
    TimeQuality,
    Track,
    TrustedClock,
    Unseen,
    UnseenKind,
    _observe,
    _observe_steady,
    apply_central_time,
    apply_time_sync,
    chrony_tracking_synced,
    corroborate,
    create_schema,
    floor_to_persist,
    load_floor,
    load_seen,
    meter_majority,
    observe,
    reset_floor,
    restore,
    save_clock,
    save_floor,
    seen_to_persist,
    timesyncd_synced,
)

T0 = 1_767_225_600_000
MIN = 60_000
HOUR = 60 * MIN
DAY = 24 * HOUR
YEAR = 365 * DAY


class FakeClocks:
    def __init__(self, wall: int, mono: int = 5_000, synced: bool = False) -> None:
        self.wall, self.mono, self.synced = wall, mono, synced
        self.meters: list[int] = []

    def advance(self, ms: int) -> None:
        self.wall += ms
        self.mono += ms

    def clock(self, floor_ms: int, seen_ms: int = 0) -> TrustedClock:
        return TrustedClock.restored(
            floor_ms,
            seen_ms=seen_ms,
            wall=lambda: self.wall,
            mono=lambda: self.mono,
            synced=lambda: self.synced,
            meters=lambda: self.meters,
        )


def kinds(events: list[ClockEvent]) -> list[ClockEventKind]:
    return [e.kind for e in events]


def test_after_reboot_time_is_never_earlier_than_floor() -> None:
    s = restore(T0, mono_ms=1000)
    s, t, events = observe(s, wall_ms=0, mono_ms=1000, synced=False)  # no RTC: 1970
    assert t.time_ms == T0 and t.quality is TimeQuality.FLOOR
    assert kinds(events) == [ClockEventKind.BEHIND_FLOOR]
    # the floor keeps moving with the monotonic clock: elapsed time is a lower bound
    s, t, events = observe(s, wall_ms=60_000, mono_ms=61_000, synced=False)
    assert t.time_ms == T0 + 60_000 and t.floor_ms == T0 + 60_000
    assert events == []  # reported once per episode, not every tick


def test_unsynced_clock_ahead_at_start_is_used_but_never_raises_floor() -> None:
    s = restore(T0, mono_ms=0)
    s, t, _ = observe(s, wall_ms=T0 + 10 * MIN, mono_ms=0, synced=False)
    assert t.time_ms == T0 + 10 * MIN and t.quality is TimeQuality.SYSTEM_UNSYNCED
    assert t.floor_ms == T0
    assert t.time_source is TimeSource.SYSTEM
    s, t, _ = observe(s, wall_ms=T0 + 10 * MIN + CONFIRM_MS, mono_ms=CONFIRM_MS, synced=False)
    assert t.floor_ms == T0 + CONFIRM_MS  # held, but unsynchronised: the floor only carries on


def test_synced_clock_raises_floor_once_it_has_held_and_a_set_back_clock_is_clamped() -> None:
    s = restore(T0, mono_ms=0)
    s, t, _ = observe(s, wall_ms=T0 + 10 * MIN, mono_ms=0, synced=True)
    assert t.quality is TimeQuality.SYSTEM_SYNCED and t.time_ms == T0 + 10 * MIN
    assert t.floor_ms == T0  # not yet: it has not held
    s, t, _ = observe(s, wall_ms=T0 + 10 * MIN + CONFIRM_MS, mono_ms=CONFIRM_MS, synced=True)
    assert t.floor_ms == T0 + 10 * MIN + CONFIRM_MS
    # someone sets the clock back a day
    s, t, events = observe(s, wall_ms=T0 - DAY, mono_ms=CONFIRM_MS + 1000, synced=False)
    assert set(kinds(events)) == {ClockEventKind.JUMP_BACKWARD, ClockEventKind.BEHIND_FLOOR}
    assert t.time_ms == T0 + 10 * MIN + CONFIRM_MS + 1000 and t.quality is TimeQuality.FLOOR


def test_forward_leap_is_recorded_and_not_followed() -> None:
    s = restore(T0, mono_ms=0)
    s, _, _ = observe(s, wall_ms=T0, mono_ms=0, synced=False)
    s, t, events = observe(s, wall_ms=T0 + YEAR, mono_ms=10, synced=False)
    assert kinds(events) == [ClockEventKind.JUMP_FORWARD]
    assert events[0].delta_ms == YEAR - 10 and "until it holds" in events[0].detail
    assert t.time_ms == T0 + 10  # trusted time stays on the monotonic clock
    assert t.floor_ms == T0 + 10
    assert s.unseen == ()


def test_forward_jump_is_followed_once_it_has_held_and_the_stretch_is_unseen() -> None:
    s = restore(T0, mono_ms=0)
    s, _, _ = observe(s, wall_ms=T0, mono_ms=0, synced=False)
    s, t, _ = observe(s, wall_ms=T0 + 1000 + DAY, mono_ms=1000, synced=False)
    assert t.time_ms == T0 + 1000
    m = 1000 + CONFIRM_MS - 1
    s, t, events = observe(s, wall_ms=T0 + m + DAY, mono_ms=m, synced=False)
    assert t.time_ms == T0 + m and events == []  # one millisecond short of holding
    m += 1
    s, t, events = observe(s, wall_ms=T0 + m + DAY, mono_ms=m, synced=False)
    assert t.time_ms == T0 + m + DAY and t.quality is TimeQuality.SYSTEM_UNSYNCED
    assert kinds(events) == [ClockEventKind.STEP_FOLLOWED] and events[0].delta_ms == DAY
    assert [(u.from_ms, u.to_ms, u.kind) for u in s.unseen] == [(T0 + m, T0 + m + DAY, UnseenKind.JUMP)]
    assert t.floor_ms == T0 + m  # unsynchronised: the floor does not follow


def test_synced_blip_a_year_ahead_never_reaches_the_floor_or_trusted_time() -> None:
    s = restore(T0, mono_ms=0)
    s, t, _ = observe(s, wall_ms=T0, mono_ms=0, synced=True)
    m = CONFIRM_MS  # a steady synchronised clock that held
    s, t, _ = observe(s, wall_ms=T0 + m, mono_ms=m, synced=True)
    base = t.time_ms
    assert t.floor_ms == base
    seen = []
    for i in range(1, 7):  # six seconds a year ahead, NTP says synchronised
        s, t, ev = observe(s, wall_ms=T0 + m + i * 1000 + YEAR, mono_ms=m + i * 1000, synced=True)
        seen += ev
        assert t.time_ms == base + i * 1000 and t.floor_ms == base + i * 1000
    s, t, ev = observe(s, wall_ms=T0 + m + 7000, mono_ms=m + 7000, synced=True)
    seen += ev
    assert kinds(seen) == [ClockEventKind.JUMP_FORWARD, ClockEventKind.JUMP_BACKWARD]
    assert t.time_ms == base + 7000 and s.unseen == ()
    _, floor = floor_to_persist(s, m + 7000, granularity_ms=0)
    assert floor == base + 7000


def test_ntp_step_that_holds_is_followed_and_raises_the_floor() -> None:
    s = restore(T0, mono_ms=0)
    s, _, _ = observe(s, wall_ms=T0, mono_ms=0, synced=True)
    s, t, _ = observe(s, wall_ms=T0 + 1000 + HOUR, mono_ms=1000, synced=True)
    assert t.time_ms == T0 + 1000 == t.floor_ms
    m = 1000 + CONFIRM_MS
    s, t, _ = observe(s, wall_ms=T0 + m + HOUR, mono_ms=m, synced=True)
    assert t.time_ms == T0 + m + HOUR == t.floor_ms and t.quality is TimeQuality.SYSTEM_SYNCED


def test_set_back_clock_unsynchronised_is_never_followed_synchronised_only_above_floor() -> None:
    s = restore(T0, mono_ms=0)
    s, _, _ = observe(s, wall_ms=T0 + 3 * DAY, mono_ms=0, synced=False)  # clock ahead at start
    s, _, _ = observe(s, wall_ms=T0, mono_ms=1000, synced=False)  # someone corrects it
    s, t, _ = observe(s, wall_ms=T0 + 2 * CONFIRM_MS, mono_ms=1000 + 2 * CONFIRM_MS, synced=False)
    assert t.time_ms == T0 + 3 * DAY + 1000 + 2 * CONFIRM_MS  # unsynchronised: not followed
    # NTP reports the (steady) earlier time synchronised: it has held, so it is followed
    m = 1000 + 2 * CONFIRM_MS + 1000
    s, t, events = observe(s, wall_ms=T0 + m, mono_ms=m, synced=True)
    assert t.time_ms == T0 + m and kinds(events) == [ClockEventKind.STEP_FOLLOWED]
    assert events[0].delta_ms == -3 * DAY
    # a synchronised clock stepped back is followed only after holding, never below the floor
    m += CONFIRM_MS
    s, t, _ = observe(s, wall_ms=T0 + m, mono_ms=m, synced=True)
    assert t.floor_ms == T0 + m
    s, t, events = observe(s, wall_ms=T0 - DAY, mono_ms=m + 1, synced=True)
    assert t.time_ms == T0 + m + 1 and ClockEventKind.BEHIND_FLOOR in kinds(events)
    s, t, events = observe(s, wall_ms=T0 - DAY + CONFIRM_MS, mono_ms=m + 1 + CONFIRM_MS, synced=True)
    assert t.time_ms == T0 + m + 1 + CONFIRM_MS and t.quality is TimeQuality.FLOOR


def test_time_the_gateway_was_off_is_an_unseen_stretch() -> None:
    s = restore(T0, mono_ms=7, seen_ms=T0 + HOUR)  # last time used: an hour after the floor
    s, t, events = observe(s, wall_ms=T0 + HOUR + 3 * DAY, mono_ms=7, synced=False)
    assert t.time_ms == T0 + HOUR + 3 * DAY
    assert kinds(events) == [ClockEventKind.START_GAP] and events[0].delta_ms == 3 * DAY
    assert [(u.from_ms, u.to_ms, u.kind) for u in s.unseen] == [
        (T0 + HOUR, T0 + HOUR + 3 * DAY, UnseenKind.OFF)
    ]


def test_first_start_ever_has_no_gap() -> None:
    s = restore(0, mono_ms=7)
    s, t, events = observe(s, wall_ms=T0, mono_ms=7, synced=True)
    assert t.time_ms == T0 and events == [] and s.unseen == ()


def test_rtc_less_start_waits_on_the_floor_then_takes_ntp_time_as_off_time() -> None:
    s = restore(T0, mono_ms=0, seen_ms=T0)
    s, t, _ = observe(s, wall_ms=0, mono_ms=0, synced=False)  # 1970 until NTP
    assert t.time_ms == T0 and t.quality is TimeQuality.FLOOR
    s, t, events = observe(s, wall_ms=T0 + 2 * DAY, mono_ms=30_000, synced=True)
    assert t.time_ms == T0 + 2 * DAY and t.quality is TimeQuality.SYSTEM_SYNCED
    assert ClockEventKind.START_GAP in kinds(events)
    assert [u.kind for u in s.unseen] == [UnseenKind.OFF] and s.unseen[0].from_ms == T0 + 30_000
    assert t.floor_ms == T0 + 30_000  # the floor waits until the new time has held


def test_clock_restored_from_a_file_at_boot_then_stepped_by_ntp_is_off_time() -> None:
    """timesyncd (or fake-hwclock) sets the clock to about the shutdown time at boot;
    NTP's first step is the time the gateway was off: followed at once."""
    s = restore(T0, mono_ms=0, seen_ms=T0 + HOUR)
    s, t, _ = observe(s, wall_ms=T0 + HOUR, mono_ms=0, synced=False)  # from the clock file
    assert t.time_ms == T0 + HOUR and s.unseen == ()
    s, t, events = observe(s, wall_ms=T0 + 3 * HOUR, mono_ms=20_000, synced=True)
    assert t.time_ms == T0 + 3 * HOUR and ClockEventKind.START_GAP in kinds(events)
    assert [(u.from_ms, u.kind) for u in s.unseen] == [(T0 + HOUR + 20_000, UnseenKind.OFF)]
    assert t.floor_ms == T0 + 20_000  # still waits for it to hold
    # from now on a synchronised jump has to hold, like any other
    s, t, _ = observe(s, wall_ms=T0 + 3 * HOUR + 21_000 + DAY, mono_ms=21_000, synced=True)
    assert t.time_ms == T0 + 3 * HOUR + 1000
    # and only shortly after the start: later, a first synchronisation has to hold too
    s = restore(T0, mono_ms=0, seen_ms=T0)
    s, _, _ = observe(s, wall_ms=T0, mono_ms=0, synced=False)
    m = FIRST_SYNC_WINDOW_MS + 1
    s, t, _ = observe(s, wall_ms=T0 + m + HOUR, mono_ms=m, synced=True)
    assert t.time_ms == T0 + m


def test_unsynchronised_jump_after_the_start_waits_even_before_any_synchronisation() -> None:
    s = restore(T0, mono_ms=0, seen_ms=T0)
    s, _, _ = observe(s, wall_ms=T0, mono_ms=0, synced=False)
    s, t, _ = observe(s, wall_ms=T0 + 1000 + YEAR, mono_ms=1000, synced=False)
    assert t.time_ms == T0 + 1000 and s.unseen == ()


def test_restart_never_goes_back_behind_the_last_time_used() -> None:
    s = restore(T0, mono_ms=0, seen_ms=T0 + 3 * DAY)
    s, t, events = observe(s, wall_ms=T0 + DAY, mono_ms=0, synced=False)  # clock set back
    assert t.time_ms == T0 + 3 * DAY and events == []


def test_small_drift_is_not_a_jump() -> None:
    s = restore(T0, mono_ms=0)
    s, _, _ = observe(s, wall_ms=T0, mono_ms=0, synced=True)
    s, _, events = observe(s, wall_ms=T0 + 60_000 + 1500, mono_ms=60_000, synced=True)
    assert events == []


def test_central_outranks_synced_system_clock() -> None:
    s = restore(T0, mono_ms=0)
    s, events = apply_central_time(s, T0 + 5 * MIN, mono_ms=0)
    assert kinds(events) == [ClockEventKind.CENTRAL_SYNC]
    s, t, _ = observe(s, wall_ms=T0 + 7 * MIN, mono_ms=MIN, synced=True)
    assert t.time_ms == T0 + 6 * MIN and t.quality is TimeQuality.CENTRAL
    assert t.time_source is TimeSource.CENTRAL


def test_central_time_ahead_of_the_gateway_is_an_unseen_jump() -> None:
    s = restore(T0, mono_ms=0)
    s, _, _ = observe(s, wall_ms=T0, mono_ms=0, synced=False)
    s, events = apply_central_time(s, T0 + 1000 + HOUR, mono_ms=1000)
    assert events[0].delta_ms == HOUR
    assert [(u.from_ms, u.to_ms, u.kind) for u in s.unseen] == [(T0 + 1000, T0 + 1000 + HOUR, UnseenKind.JUMP)]
    # central behind the gateway's estimate (but not the floor): time moves back, nothing unseen
    s = restore(T0, mono_ms=0)
    s, _, _ = observe(s, wall_ms=T0 + HOUR, mono_ms=0, synced=False)  # unsynced, an hour fast
    s, _ = apply_central_time(s, T0 + 2000, mono_ms=2000)
    _, t, _ = observe(s, wall_ms=T0 + HOUR, mono_ms=3000, synced=False)
    assert t.time_ms == T0 + 3000
    # the start's stretch is cut at the corrected time: the rest was never stepped over
    assert [(u.from_ms, u.to_ms, u.kind) for u in s.unseen] == [(T0, T0 + 2000, UnseenKind.OFF)]


def test_central_behind_floor_keeps_floor_unless_signed_reset() -> None:
    s = restore(T0 + 100 * MIN, mono_ms=0)  # floor poisoned into the future
    s2, events = apply_central_time(s, T0, mono_ms=0)
    assert s2 == s and kinds(events) == [ClockEventKind.CENTRAL_BEHIND_FLOOR]
    s3, events = apply_central_time(s, T0, mono_ms=0, reset_floor=True)
    assert kinds(events) == [ClockEventKind.FLOOR_RESET]
    _, t, _ = observe(s3, wall_ms=0, mono_ms=1000, synced=False)
    assert t.time_ms == T0 + 1000 and t.quality is TimeQuality.CENTRAL


def test_meter_majority() -> None:
    assert meter_majority([T0, T0 + 1000, T0 - 2000]) == T0
    assert meter_majority([T0, T0 + 1000, T0 + 10**9]) in (T0, T0 + 1000)
    assert meter_majority([T0, T0 + 10**9, T0 + 2 * 10**9]) is None  # no majority
    assert meter_majority([T0, T0, T0 + 10**9, T0 + 10**9]) is None  # tie is no majority
    assert meter_majority([T0, T0]) is None  # too few meters
    # an RTC-less start with no network: the meters' majority starts the clock
    s = restore(T0, mono_ms=0)
    s, t, _ = observe(s, wall_ms=0, mono_ms=0, synced=False, meter_ms=[T0 + MIN, T0 + MIN + 500, 0])
    assert t.quality is TimeQuality.METER_MAJORITY and t.time_ms in (T0 + MIN, T0 + MIN + 500)
    assert t.floor_ms == T0  # meters never raise the floor
    assert t.time_source is TimeSource.METER
    # afterwards meter clocks cannot move it (a majority of tampered meters a day ahead)
    s, t2, _ = observe(s, wall_ms=0, mono_ms=1000, synced=False, meter_ms=[T0 + DAY] * 3)
    assert t2.time_ms == t.time_ms + 1000


def test_a_signed_command_issued_after_the_estimate_confirms_the_clock_at_once() -> None:
    s = restore(T0, mono_ms=0, seen_ms=T0)
    s, _, _ = observe(s, wall_ms=T0, mono_ms=0, synced=True)  # a stale clock at start
    s, t, _ = observe(s, wall_ms=T0 + 1000 + DAY, mono_ms=1000, synced=True)  # NTP steps it
    assert t.time_ms == T0 + 1000  # waiting for it to hold
    same, events = corroborate(s, T0 + 1000, 1000)  # issued no later than the estimate
    assert same == s and events == []
    same, events = corroborate(s, T0 + 1000 + DAY - 20 * MIN, 1000)  # clock far from the issue time
    assert same == s and events == []
    s, events = corroborate(s, T0 + 1000 + DAY - MIN, 1000)  # issued a minute before the clock
    assert kinds(events) == [ClockEventKind.STEP_FOLLOWED]
    _, t, _ = observe(s, wall_ms=T0 + 2000 + DAY, mono_ms=2000, synced=True)
    assert t.time_ms == T0 + 2000 + DAY and t.floor_ms == T0 + 2000 + DAY
    assert [(u.from_ms, u.kind) for u in s.unseen] == [(T0 + 1000, UnseenKind.JUMP)]


# -- properties -----------------------------------------------------------------

step_st = st.tuples(
    st.integers(0, 10**7),  # monotonic step
    st.integers(0, 2 * T0),  # arbitrary wall clock
    st.booleans(),  # synced
    st.one_of(st.none(), st.integers(0, 2 * T0)),  # central time sync
    st.one_of(st.none(), st.integers(0, 2 * T0)),  # a verified command's issue time
)


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(step_st, max_size=30), floor0=st.integers(0, 2 * T0), seen0=st.integers(0, 2 * T0))
def test_time_never_below_floor_floor_never_back_and_every_step_is_accounted(
    steps: list[tuple[int, int, bool, int | None, int | None]], floor0: int, seen0: int
) -> None:
    """Trusted time never falls below the floor; the floor never moves back; trusted time
    goes back only on central time or a synchronised clock that held; every forward move
    beyond the monotonic clock is an unseen stretch."""
    policy = ClockPolicy(keep_unseen=10**6)
    mono = 0
    s = restore(floor0, mono, seen_ms=seen0)
    last_floor, last_t = floor0, max(floor0, seen0)
    for dm, wall, synced, central, issued in steps:
        mono += dm
        before = s
        trusted_back = False
        if central is not None:
            s, ev = apply_central_time(s, central, mono, policy=policy)
            trusted_back = bool(ev) and ev[0].kind is ClockEventKind.CENTRAL_SYNC
        if issued is not None:
            s, _ = corroborate(s, issued, mono, policy=policy)
        s, t, events = observe(s, wall_ms=wall, mono_ms=mono, synced=synced, policy=policy)
        assert t.time_ms >= t.floor_ms >= last_floor
        assert all(u.to_ms <= t.time_ms for u in s.unseen)  # clipped when time moved back
        if t.time_ms < last_t:
            assert trusted_back or any(
                e.kind is ClockEventKind.STEP_FOLLOWED and e.delta_ms < 0 for e in events
            )
        first_start = before.initial and before.restored_ms == 0  # nothing lived through before
        if t.time_ms > last_t + dm + JUMP_TOLERANCE_MS and not first_start:
            new = [u for u in s.unseen if u not in before.unseen]
            assert any(u.to_ms >= t.time_ms - JUMP_TOLERANCE_MS for u in new), "step not recorded"
        last_floor, last_t = t.floor_ms, t.time_ms


blip_st = st.lists(
    st.tuples(
        st.integers(1, 20),  # observations in this stretch
        st.integers(1, 10_000),  # ms between them
        st.sampled_from([0, 0, YEAR, -3 * DAY, HOUR, 10 * 60_000]),  # wall offset (0: true time)
        st.booleans(),  # synced
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(segments=blip_st, synced0=st.booleans())
def test_billing_time_never_follows_an_unconfirmed_jump(
    segments: list[tuple[int, int, int, bool]], synced0: bool
) -> None:
    """The system clock jumps away and back, each time for less than the confirmation
    period: trusted time advances exactly with the monotonic clock, nothing is unseen, and
    the floor stays at true time. (Starting unsynchronised, the first synchronised step
    shortly after the start is the time the gateway was off: the run starts after that.)"""
    mono = 0
    s = restore(T0, mono)
    s, t, _ = observe(s, wall_ms=T0, mono_ms=mono, synced=synced0)
    mono = 0 if synced0 else FIRST_SYNC_WINDOW_MS + 1
    s, t, _ = observe(s, wall_ms=T0 + mono, mono_ms=mono, synced=synced0)
    for n, gap, offset, synced in segments:
        n = min(n, max(1, (CONFIRM_MS - 1) // gap)) if offset else n
        for _ in range(n):
            mono += gap
            s, t, _ = observe(s, wall_ms=T0 + mono + offset, mono_ms=mono, synced=synced)
            assert t.time_ms == T0 + mono  # true time, whatever the system clock says
            assert t.floor_ms <= T0 + mono
        mono += gap  # back to true time before the jump could hold
        s, t, _ = observe(s, wall_ms=T0 + mono, mono_ms=mono, synced=synced)
        assert t.time_ms == T0 + mono
    assert s.unseen == ()


# Steady-state look at the clocks (observe's quick path) against every case (_observe):
# states and clocks drawn around one instant, so that the tolerances' edges come up.
TOL = JUMP_TOLERANCE_MS
M0 = 10 * HOUR  # the monotonic clock, around


def _near(span: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(-span, span), st.sampled_from([-TOL - 1, -TOL, -TOL + 1, 0, 1, TOL, TOL + 1]))


def _clock_states(span: int) -> st.SearchStrategy[ClockState]:
    near = _near(span)
    # at M0 about T0 + d (anchored up to CONFIRM_MS before, or a little after)
    anchor = st.builds(lambda d, m: Anchor(T0 + d + m, M0 + m), near, st.integers(-CONFIRM_MS - 10, 10))
    unseen = st.builds(
        lambda a, b, k: Unseen(T0 + min(a, b), T0 + max(a, b), k), near, near, st.sampled_from(UnseenKind)
    )
    held = [0, 1, 2, TOL - 1, TOL, TOL + 1, CONFIRM_MS - 1, CONFIRM_MS, CONFIRM_MS + 1]  # (see _policy_st)
    since = st.one_of(st.integers(0, CONFIRM_MS + 10), st.sampled_from(held))
    return st.builds(
        ClockState,
        floor=anchor,
        est=anchor,
        quality=st.sampled_from(TimeQuality),
        initial=st.sampled_from([False, False, False, True]),
        synced_seen=st.booleans(),
        restored_ms=st.one_of(st.just(0), st.integers(T0 - DAY, T0)),
        start_mono_ms=st.integers(0, M0),
        central=st.one_of(st.none(), st.none(), anchor),
        track=st.one_of(st.just(None), *[st.builds(lambda d, h: Track(T0 - M0 + d, M0 - h), near, since)] * 2),
        last_synced=st.booleans(),
        last_time_ms=near.map(lambda d: T0 + d),
        behind_floor=st.booleans(),
        disagree=st.booleans(),
        persisted_floor_ms=st.integers(0, T0),
        persisted_seen_ms=st.integers(0, T0),
        unseen=st.lists(unseen, max_size=3).map(tuple),
    )


# (mostly) within the jump tolerance of each other, or around it: a state and the
# system clock's distance from T0 + the monotonic step
_state_wall_st = st.sampled_from([TOL // 2, 3 * TOL]).flatmap(lambda span: st.tuples(_clock_states(span), _near(span)))
_policy_st = st.sampled_from(
    [
        POLICY,
        ClockPolicy(jump_tolerance_ms=0, confirm_ms=1, disagree_tolerance_ms=0),
        ClockPolicy(confirm_ms=TOL, disagree_tolerance_ms=TOL),
    ]
)


_HELD_JUST_NOW = ClockState(  # a synchronised clock that holds from this instant on
    floor=Anchor(T0 - 5, M0), est=Anchor(T0, M0), initial=False, track=Track(T0 - M0, M0 - CONFIRM_MS),
    last_time_ms=T0,
)  # fmt: skip
_ON_CENTRAL = ClockState(
    floor=Anchor(T0, M0), est=Anchor(T0, M0), initial=False, central=Anchor(T0, M0),
    track=Track(T0 - M0 - TOL, M0), last_time_ms=T0,
)  # fmt: skip


@settings(max_examples=1500, deadline=None)
@example(state_wall=(_HELD_JUST_NOW, 0), dm=0, synced=True, meters=[], policy=POLICY)  # raises the floor
@example(state_wall=(_ON_CENTRAL, -TOL - 1), dm=0, synced=True, meters=[], policy=POLICY)  # just behind the floor
@given(
    state_wall=_state_wall_st,
    dm=st.one_of(st.sampled_from([0, 1]), st.integers(-5, 3 * TOL)),
    synced=st.booleans(),
    meters=st.lists(_near(10 * MIN).map(lambda d: T0 + d), max_size=4),
    policy=_policy_st,
)
def test_the_steady_state_path_returns_what_every_case_returns(
    state_wall: tuple[ClockState, int], dm: int, synced: bool, meters: list[int], policy: ClockPolicy
) -> None:
    state, dw = state_wall
    mono = M0 + dm
    wall = T0 + dm + dw
    expected = _observe(state, wall_ms=wall, mono_ms=mono, synced=synced, meter_ms=meters, policy=policy)
    steady = _observe_steady(state, wall, mono, synced, policy)
    if steady is not None:
        assert steady == expected
        assert steady[2] == []
    assert observe(state, wall_ms=wall, mono_ms=mono, synced=synced, meter_ms=meters, policy=policy) == expected


def test_the_steady_state_path_is_taken_while_nothing_but_time_moves_on() -> None:
    """Synchronised and held (the floor rises with the clock), jitter of a millisecond
    either way (at times just below the floor), and on central time."""
    s = restore(T0, mono_ms=0, seen_ms=T0)
    s, _, _ = observe(s, wall_ms=T0, mono_ms=0, synced=True)
    m = CONFIRM_MS
    for central in (False, True):
        if central:
            s, _ = apply_central_time(s, T0 + m, m)
        for i in range(30):
            m += 1000
            wall, mono = T0 + m + i % 3 - 1, m
            quick = _observe_steady(s, wall, mono, True, POLICY)
            assert quick is not None
            assert quick == _observe(s, wall_ms=wall, mono_ms=mono, synced=True)
            s = quick[0]


def test_floor_to_persist_granularity() -> None:
    s = restore(T0, mono_ms=0)
    s, v = floor_to_persist(s, 30_000)
    assert v is None  # moved less than a minute
    s, v = floor_to_persist(s, 61_000)
    assert v == T0 + 61_000
    s, v = floor_to_persist(s, 62_000)
    assert v is None
    s, v = seen_to_persist(s, 62_000)
    assert v == T0 + 62_000
    s, v = seen_to_persist(s, 63_000)
    assert v is None
    s, v = seen_to_persist(s, 63_000, granularity_ms=0)
    assert v == T0 + 63_000


def test_clock_event_flood_is_bounded() -> None:
    clocks = FakeClocks(wall=T0)
    clock = clocks.clock(T0)
    clock.event_budget = 5
    for i in range(40):
        clocks.advance(10)
        clocks.wall += YEAR if i % 2 == 0 else -YEAR
        clock.now()
    events = clock.drain_events()
    assert len(events) == 5
    clocks.advance(HOUR)
    clocks.wall += YEAR
    clock.now()
    events = clock.drain_events()
    assert kinds(events) == [ClockEventKind.EVENTS_SUPPRESSED, ClockEventKind.JUMP_FORWARD]
    assert events[0].delta_ms == 35
    clock.requeue(events)
    assert clock.drain_events() == events


async def test_floor_and_last_time_persist_across_reboot(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    clocks = FakeClocks(wall=T0, synced=True)
    async with aiosqlite.connect(db) as conn:
        await create_schema(conn)
        assert await load_floor(conn) == 0 and await load_seen(conn) == 0
        clock = clocks.clock(await load_floor(conn))
        assert clock.now().quality is TimeQuality.SYSTEM_SYNCED
        clocks.advance(CONFIRM_MS)
        clock.now()
        await save_clock(conn, clock)
        assert await load_floor(conn) == await load_seen(conn) == T0 + CONFIRM_MS
        await save_floor(conn, T0, clocks.mono)  # an older value never overwrites
        await conn.commit()
    # reboot without RTC: the system clock starts at the epoch, monotonic restarts
    clocks = FakeClocks(wall=0, mono=10, synced=False)
    async with aiosqlite.connect(db) as conn:
        clock = clocks.clock(await load_floor(conn), await load_seen(conn))
        t = clock.now()
        assert t.time_ms == T0 + CONFIRM_MS and t.quality is TimeQuality.FLOOR
        assert kinds(clock.drain_events()) == [ClockEventKind.BEHIND_FLOOR]
        assert clock.drain_events() == []
        await reset_floor(conn, T0, clocks.mono)  # only after a signed reset
        await conn.commit()
        assert await load_floor(conn) == await load_seen(conn) == T0


def test_synced_clock_far_from_central_is_reported_once() -> None:
    s = restore(T0, mono_ms=0)
    s, _ = apply_central_time(s, T0, mono_ms=0)
    s, t, events = observe(s, wall_ms=T0 + 1000, mono_ms=1000, synced=True)
    assert events == [] and t.quality is TimeQuality.CENTRAL
    s, t, events = observe(s, wall_ms=T0 + 10 * MIN, mono_ms=2000, synced=True)
    assert ClockEventKind.SOURCES_DISAGREE in kinds(events)
    assert t.time_ms == T0 + 2000  # central still wins
    s, _, events = observe(s, wall_ms=T0 + 10 * MIN + 1000, mono_ms=3000, synced=True)
    assert events == []


async def test_apply_time_sync_persists_and_resets(tmp_path: Path) -> None:
    clocks = FakeClocks(wall=0, mono=100)
    async with aiosqlite.connect(tmp_path / "gw.db") as conn:
        await create_schema(conn)
        await save_floor(conn, T0 + 100 * MIN, 0)  # poisoned floor
        clock = clocks.clock(await load_floor(conn))
        events = await apply_time_sync(conn, clock, T0, reset_floor_flag=False)
        assert kinds(events) == [ClockEventKind.CENTRAL_BEHIND_FLOOR]
        assert await load_floor(conn) == T0 + 100 * MIN
        events = await apply_time_sync(conn, clock, T0, reset_floor_flag=True)
        assert kinds(events) == [ClockEventKind.FLOOR_RESET]
        assert await load_floor(conn) == T0
        events = await apply_time_sync(conn, clock, T0 + 5 * MIN, reset_floor_flag=False)
        assert kinds(events) == [ClockEventKind.CENTRAL_SYNC]
        assert await load_floor(conn) == await load_seen(conn) == T0 + 5 * MIN
        t = clock.now()
        assert t.quality is TimeQuality.CENTRAL and t.time_ms == T0 + 5 * MIN


# -- recognising NTP synchronisation --------------------------------------------


def test_timesyncd_file_counts_while_fresh() -> None:
    assert timesyncd_synced(T0, T0 + 10 * MIN)
    assert not timesyncd_synced(T0, T0 + 2 * HOUR)  # NTP lost since
    assert not timesyncd_synced(None, T0)  # never synchronised this boot
    assert not timesyncd_synced(T0 + DAY, T0)  # stamped in the future: clock set back


def test_chrony_tracking_log_last_line() -> None:
    banner = (
        "=" * 40 + "\n   Date (UTC) Time     IP Address   St   Freq ppm   Skew ppm     Offset L Co\n"
        + "=" * 40 + "\n"
    )
    good = "2026-01-01 00:00:00 203.0.113.15     2     -3.541      0.075 -8.621e-06 N  2\n"
    lost = "2026-01-01 00:10:00 0.0.0.0          0     -3.541      0.075  0.000e+00 ?  0\n"
    assert chrony_tracking_synced(banner + good, T0 + MIN) is True
    assert chrony_tracking_synced(banner + good, T0 + 3 * HOUR) is False
    assert chrony_tracking_synced(banner + good + lost, T0 + 11 * MIN) is False
    assert chrony_tracking_synced(banner + good + "2026-01-01 00:1", T0 + MIN) is True  # torn line
    assert chrony_tracking_synced(banner, T0) is None
    assert chrony_tracking_synced("", T0) is None


def test_sync_probe_reads_the_files_an_ntp_daemon_leaves(tmp_path: Path) -> None:
    flag = tmp_path / "timesync" / "synchronized"
    log = tmp_path / "tracking.log"
    wall = [T0]
    probe = SyncProbe(
        timesyncd_file=flag, chrony_tracking_log=log, kernel=False, wall_ms=lambda: wall[0], cache_s=0
    )
    assert probe() is False and probe.sources() == {"timesyncd": None, "chrony": None}
    flag.parent.mkdir()
    flag.touch()
    os.utime(flag, ns=(T0 * 1_000_000, T0 * 1_000_000))
    assert probe() is True
    wall[0] = T0 + 2 * HOUR  # no synchronisation for two hours
    assert probe() is False
    log.write_text("2026-01-01 02:00:00 203.0.113.15 2 -3.5 0.07 -8.6e-06 N 2\n")
    assert probe() is True and probe.sources()["chrony"] is True

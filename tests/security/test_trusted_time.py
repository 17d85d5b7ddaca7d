"""Trusted time: floor, source ranking, jump detection, persistence across reboots."""

from __future__ import annotations

from pathlib import Path

import aiosqlite
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge.reading import TimeSource
from gateway.security.trusted_time import (
    ClockEventKind,
    TimeQuality,
    TrustedClock,
    apply_central_time,
    create_schema,
    floor_to_persist,
    load_floor,
    meter_majority,
    observe,
    reset_floor,
    restore,
    save_floor,
)

T0 = 1_767_225_600_000
MIN = 60_000


class FakeClocks:
    def __init__(self, wall: int, mono: int = 5_000, synced: bool = False) -> None:
        self.wall, self.mono, self.synced = wall, mono, synced
        self.meters: list[int] = []

    def advance(self, ms: int) -> None:
        self.wall += ms
        self.mono += ms

    def clock(self, floor_ms: int) -> TrustedClock:
        return TrustedClock.restored(
            floor_ms,
            wall=lambda: self.wall,
            mono=lambda: self.mono,
            synced=lambda: self.synced,
            meters=lambda: self.meters,
        )


def test_after_reboot_time_is_never_earlier_than_floor() -> None:
    s = restore(T0, mono_ms=1000)
    s, t, events = observe(s, wall_ms=0, mono_ms=1000, synced=False)  # no RTC: 1970
    assert t.time_ms == T0 and t.quality is TimeQuality.FLOOR
    assert [e.kind for e in events] == [ClockEventKind.BEHIND_FLOOR]
    # the floor keeps moving with the monotonic clock: elapsed time is a lower bound
    s, t, events = observe(s, wall_ms=60_000, mono_ms=61_000, synced=False)
    assert t.time_ms == T0 + 60_000 and t.floor_ms == T0 + 60_000
    assert events == []  # reported once per episode, not every tick


def test_unsynced_clock_ahead_is_used_but_never_raises_floor() -> None:
    s = restore(T0, mono_ms=0)
    s, t, _ = observe(s, wall_ms=T0 + 10 * MIN, mono_ms=0, synced=False)
    assert t.time_ms == T0 + 10 * MIN and t.quality is TimeQuality.SYSTEM_UNSYNCED
    assert t.floor_ms == T0
    assert t.time_source is TimeSource.SYSTEM


def test_synced_clock_raises_floor_and_clock_set_back_is_clamped() -> None:
    s = restore(T0, mono_ms=0)
    s, t, _ = observe(s, wall_ms=T0 + 10 * MIN, mono_ms=0, synced=True)
    assert t.quality is TimeQuality.SYSTEM_SYNCED and t.floor_ms == T0 + 10 * MIN
    # someone sets the clock back a day
    s, t, events = observe(s, wall_ms=T0 - 24 * 60 * MIN, mono_ms=1000, synced=False)
    kinds = {e.kind for e in events}
    assert kinds == {ClockEventKind.JUMP_BACKWARD, ClockEventKind.BEHIND_FLOOR}
    assert t.time_ms == T0 + 10 * MIN + 1000 and t.quality is TimeQuality.FLOOR


def test_forward_leap_is_recorded() -> None:
    s = restore(T0, mono_ms=0)
    s, _, _ = observe(s, wall_ms=T0, mono_ms=0, synced=False)
    s, t, events = observe(s, wall_ms=T0 + 365 * 24 * 60 * MIN, mono_ms=10, synced=False)
    assert [e.kind for e in events] == [ClockEventKind.JUMP_FORWARD]
    assert t.floor_ms == T0 + 10  # an unsynced leap cannot drag the floor forward


def test_small_drift_is_not_a_jump() -> None:
    s = restore(T0, mono_ms=0)
    s, _, _ = observe(s, wall_ms=T0, mono_ms=0, synced=True)
    s, _, events = observe(s, wall_ms=T0 + 60_000 + 1500, mono_ms=60_000, synced=True)
    assert events == []


def test_central_outranks_synced_system_clock() -> None:
    s = restore(T0, mono_ms=0)
    s, events = apply_central_time(s, T0 + 5 * MIN, mono_ms=0)
    assert [e.kind for e in events] == [ClockEventKind.CENTRAL_SYNC]
    s, t, _ = observe(s, wall_ms=T0 + 7 * MIN, mono_ms=MIN, synced=True)
    assert t.time_ms == T0 + 6 * MIN and t.quality is TimeQuality.CENTRAL
    assert t.time_source is TimeSource.CENTRAL


def test_central_behind_floor_keeps_floor_unless_signed_reset() -> None:
    s = restore(T0 + 100 * MIN, mono_ms=0)  # floor poisoned into the future
    s2, events = apply_central_time(s, T0, mono_ms=0)
    assert s2 == s and [e.kind for e in events] == [ClockEventKind.CENTRAL_BEHIND_FLOOR]
    s3, events = apply_central_time(s, T0, mono_ms=0, reset_floor=True)
    assert [e.kind for e in events] == [ClockEventKind.FLOOR_RESET]
    _, t, _ = observe(s3, wall_ms=0, mono_ms=1000, synced=False)
    assert t.time_ms == T0 + 1000 and t.quality is TimeQuality.CENTRAL


def test_meter_majority() -> None:
    assert meter_majority([T0, T0 + 1000, T0 - 2000]) == T0
    assert meter_majority([T0, T0 + 1000, T0 + 10**9]) in (T0, T0 + 1000)
    assert meter_majority([T0, T0 + 10**9, T0 + 2 * 10**9]) is None  # no majority
    assert meter_majority([T0, T0, T0 + 10**9, T0 + 10**9]) is None  # tie is no majority
    assert meter_majority([T0, T0]) is None  # too few meters
    s = restore(T0, mono_ms=0)
    _, t, _ = observe(s, wall_ms=0, mono_ms=0, synced=False, meter_ms=[T0 + MIN, T0 + MIN + 500, 0])
    assert t.quality is TimeQuality.METER_MAJORITY and t.time_ms in (T0 + MIN, T0 + MIN + 500)
    assert t.floor_ms == T0  # meters never raise the floor
    assert t.time_source is TimeSource.METER


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(0, 10**7),  # monotonic step
            st.integers(0, 2 * T0),  # arbitrary wall clock
            st.booleans(),  # synced
            st.one_of(st.none(), st.integers(0, 2 * T0)),  # central time sync
        ),
        max_size=30,
    ),
    floor0=st.integers(0, 2 * T0),
)
def test_time_never_below_floor_and_floor_never_moves_back(
    steps: list[tuple[int, int, bool, int | None]], floor0: int
) -> None:
    mono = 0
    s = restore(floor0, mono)
    last_floor = floor0
    for dm, wall, synced, central in steps:
        mono += dm
        if central is not None:
            s, _ = apply_central_time(s, central, mono)
        s, t, _ = observe(s, wall_ms=wall, mono_ms=mono, synced=synced)
        assert t.time_ms >= t.floor_ms >= last_floor
        last_floor = t.floor_ms


def test_floor_to_persist_granularity() -> None:
    s = restore(T0, mono_ms=0)
    s, v = floor_to_persist(s, 30_000)
    assert v is None  # moved less than a minute
    s, v = floor_to_persist(s, 61_000)
    assert v == T0 + 61_000
    s, v = floor_to_persist(s, 62_000)
    assert v is None


async def test_floor_persists_across_reboot_and_never_goes_back(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    clocks = FakeClocks(wall=T0, synced=True)
    async with aiosqlite.connect(db) as conn:
        await create_schema(conn)
        assert await load_floor(conn) == 0
        clock = clocks.clock(await load_floor(conn))
        assert clock.now().quality is TimeQuality.SYSTEM_SYNCED
        clocks.advance(2 * MIN)
        clock.now()
        floor = clock.floor_to_persist()
        assert floor == T0 + 2 * MIN
        await save_floor(conn, floor, clocks.mono)
        await save_floor(conn, T0, clocks.mono)  # an older value never overwrites
        await conn.commit()
    # reboot without RTC: the system clock starts at the epoch, monotonic restarts
    clocks = FakeClocks(wall=0, mono=10, synced=False)
    async with aiosqlite.connect(db) as conn:
        clock = clocks.clock(await load_floor(conn))
        t = clock.now()
        assert t.time_ms == T0 + 2 * MIN and t.quality is TimeQuality.FLOOR
        assert [e.kind for e in clock.drain_events()] == [ClockEventKind.BEHIND_FLOOR]
        assert clock.drain_events() == []
        await reset_floor(conn, T0, clocks.mono)  # only after a signed reset
        await conn.commit()
        assert await load_floor(conn) == T0


def test_synced_clock_far_from_central_is_reported_once() -> None:
    s = restore(T0, mono_ms=0)
    s, _ = apply_central_time(s, T0, mono_ms=0)
    s, t, events = observe(s, wall_ms=T0 + 1000, mono_ms=1000, synced=True)
    assert events == [] and t.quality is TimeQuality.CENTRAL
    s, t, events = observe(s, wall_ms=T0 + 10 * MIN, mono_ms=2000, synced=True)
    assert ClockEventKind.SOURCES_DISAGREE in {e.kind for e in events}
    assert t.time_ms == T0 + 2000  # central still wins
    s, _, events = observe(s, wall_ms=T0 + 10 * MIN + 1000, mono_ms=3000, synced=True)
    assert events == []


async def test_apply_time_sync_persists_and_resets(tmp_path: Path) -> None:
    from gateway.security.trusted_time import apply_time_sync

    clocks = FakeClocks(wall=0, mono=100)
    async with aiosqlite.connect(tmp_path / "gw.db") as conn:
        await create_schema(conn)
        await save_floor(conn, T0 + 100 * MIN, 0)  # poisoned floor
        clock = clocks.clock(await load_floor(conn))
        events = await apply_time_sync(conn, clock, T0, reset_floor_flag=False)
        assert [e.kind for e in events] == [ClockEventKind.CENTRAL_BEHIND_FLOOR]
        assert await load_floor(conn) == T0 + 100 * MIN
        events = await apply_time_sync(conn, clock, T0, reset_floor_flag=True)
        assert [e.kind for e in events] == [ClockEventKind.FLOOR_RESET]
        assert await load_floor(conn) == T0
        events = await apply_time_sync(conn, clock, T0 + 5 * MIN, reset_floor_flag=False)
        assert [e.kind for e in events] == [ClockEventKind.CENTRAL_SYNC]
        assert await load_floor(conn) == T0 + 5 * MIN
        t = clock.now()
        assert t.quality is TimeQuality.CENTRAL and t.time_ms == T0 + 5 * MIN

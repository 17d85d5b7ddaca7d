"""Trusted time for a gateway without a real-time clock.

The gateway decides expiry of signed commands, time-of-use prices, fixed
charges and cutoff by the clock, and the clock is the easiest thing on the
board to attack or to get wrong: set it back and an expired top-up is valid
again; set it forward and valid commands expire, and a year of daily charges
falls due at once. This module keeps two times, both carried on the
monotonic clock (``CLOCK_BOOTTIME``: it never steps, and counts suspended
time) between *anchors*:

* the **floor** — a lower bound on true time that never moves backwards
  (persisted; only a signed reset lowers it);
* the **estimate** — trusted time, what commands, readings, billing and cutoff
  use. It is never earlier than the floor.

Sources, best first:

==================  =============================================================
quality             source
==================  =============================================================
``central``         signed ``time.sync`` from central, carried on the monotonic
                    clock
``system_synced``   system clock while NTP reports it synchronised (see
                    :class:`SyncProbe`)
``meter_majority``  a strict majority of meter clocks agreeing within tolerance
                    (only to start an RTC-less gateway that has nothing better)
``system_unsynced`` system clock, not known to be synchronised
``floor``           the estimate is the floor itself
==================  =============================================================

Rules (:func:`observe`, all pure):

* The system clock is tracked against the monotonic clock. A change of their
  difference by more than ``jump_tolerance_ms`` is a *jump*: it is reported
  (:class:`ClockEvent`) and **not followed**: trusted time keeps running on
  the monotonic clock from where it was.
* A forward jump is followed once the new time has *held* (no further jump)
  for ``confirm_ms``, or at once when central confirms it (a ``time.sync``,
  or a verified command issued after the carried estimate whose issue time
  agrees with the system clock, :func:`corroborate`). A backward jump is
  followed only when the clock is synchronised and held; an unsynchronised
  clock set back is never followed. Trusted time otherwise never decreases.
* After a start the estimate begins at the last time used before it (or the
  floor, if later); the first clock reading at or after that is taken as it
  is, and so is the first synchronised one within ``first_sync_window_ms``
  (a clock set from a file at boot shows about the time of the shutdown until
  NTP steps it): the difference is the time the gateway was off.
* The floor advances with the monotonic clock, and is raised only to central
  time and to a synchronised system clock that has held for ``confirm_ms``:
  a synchronised clock that leaps a year ahead for a few seconds never
  reaches the floor, so it cannot expire every later command.
* Whenever trusted time moves forward by more than the monotonic clock
  explains (a followed jump, central time ahead, the time the gateway was
  off), the stretch is recorded as :class:`Unseen`: billing holds the fixed
  charges that fall in such a stretch (``gateway.billing.held``).
* A system clock behind the floor, a central time behind the floor and a
  synchronised system clock more than ``disagree_tolerance_ms`` off central
  time (spoofed NTP?) are reported too, once per episode.

After a (re)boot :func:`restore` starts from the persisted floor and the last
estimate (:func:`floor_to_persist`, :func:`seen_to_persist`: at most one
small write a minute, and always at a clean stop).

Known limit: a ``time.sync`` that sat in a queue is late; its time is a lower
bound, which is what the floor needs, but the ``central`` estimate lags by the
delivery delay (bounded by the command's short validity window whenever the
gateway's own time is good).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import aiosqlite

from firmware_bridge.reading import TimeSource
from firmware_bridge.slots import slot_setters
from store_forward.schema import Schema, Step

JUMP_TOLERANCE_MS = 2_000
CONFIRM_MS = 5 * 60_000
DISAGREE_TOLERANCE_MS = 60_000
CORROBORATION_WINDOW_MS = 10 * 60_000
FIRST_SYNC_WINDOW_MS = 15 * 60_000
METER_TOLERANCE_MS = 5 * 60_000
MIN_METERS = 3
PERSIST_GRANULARITY_MS = 60_000
KEEP_UNSEEN = 32
EVENT_BUDGET_PER_HOUR = 60


@dataclass(frozen=True, slots=True)
class ClockPolicy:
    """The clock's tolerances (milliseconds)."""

    jump_tolerance_ms: int = JUMP_TOLERANCE_MS  # larger changes of wall - monotonic are jumps
    confirm_ms: int = CONFIRM_MS  # a jumped clock is followed after holding this long
    disagree_tolerance_ms: int = DISAGREE_TOLERANCE_MS  # synced clock vs central
    corroboration_window_ms: int = CORROBORATION_WINDOW_MS  # command issue time vs clock
    first_sync_window_ms: int = FIRST_SYNC_WINDOW_MS  # after a start: first NTP step is off-time
    keep_unseen: int = KEEP_UNSEEN  # recent unseen stretches kept for billing


POLICY = ClockPolicy()


def system_wall_ms() -> int:
    return time.time_ns() // 1_000_000


def boot_ms() -> int:
    """The monotonic clock in ms: ``CLOCK_BOOTTIME`` (counts suspend), else ``monotonic``."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is not None:
        return time.clock_gettime_ns(boottime) // 1_000_000
    return time.monotonic_ns() // 1_000_000


class TimeQuality(enum.StrEnum):
    CENTRAL = "central"
    SYSTEM_SYNCED = "system_synced"
    METER_MAJORITY = "meter_majority"
    SYSTEM_UNSYNCED = "system_unsynced"
    FLOOR = "floor"

    @property
    def rank(self) -> int:
        return _RANK[self]

    @property
    def time_source(self) -> TimeSource:
        """The :class:`TimeSource` to stamp on a reading taken at this time."""
        return _SOURCE[self]


_RANK = {
    TimeQuality.CENTRAL: 4,
    TimeQuality.SYSTEM_SYNCED: 3,
    TimeQuality.METER_MAJORITY: 2,
    TimeQuality.SYSTEM_UNSYNCED: 1,
    TimeQuality.FLOOR: 0,
}
_SOURCE = {
    TimeQuality.CENTRAL: TimeSource.CENTRAL,
    TimeQuality.SYSTEM_SYNCED: TimeSource.SYSTEM_SYNCED,
    TimeQuality.METER_MAJORITY: TimeSource.METER,
    TimeQuality.SYSTEM_UNSYNCED: TimeSource.SYSTEM,
    TimeQuality.FLOOR: TimeSource.SYSTEM,
}


class ClockEventKind(enum.StrEnum):
    JUMP_BACKWARD = "clock_jump_backward"  # system clock moved back vs monotonic
    JUMP_FORWARD = "clock_jump_forward"  # system clock leapt ahead vs monotonic
    STEP_FOLLOWED = "clock_step_followed"  # trusted time followed a jump that held/was confirmed
    START_GAP = "time_gap_at_start"  # trusted time after a start is ahead of the last time used
    BEHIND_FLOOR = "clock_behind_floor"  # system clock earlier than the floor
    CENTRAL_BEHIND_FLOOR = "central_time_behind_floor"
    FLOOR_RESET = "time_floor_reset"  # signed reset lowered the floor
    CENTRAL_SYNC = "central_time_sync"
    SOURCES_DISAGREE = "time_sources_disagree"  # synced system clock far from central
    EVENTS_SUPPRESSED = "clock_events_suppressed"  # more events in an hour than the budget


@dataclass(frozen=True, slots=True)
class ClockEvent:
    kind: ClockEventKind
    at_ms: int  # trusted time when it was seen
    delta_ms: int  # size of the jump / distance to the floor (signed)
    detail: str


@dataclass(frozen=True, slots=True)
class TrustedTime:
    time_ms: int
    quality: TimeQuality
    floor_ms: int

    @property
    def time_source(self) -> TimeSource:
        return self.quality.time_source


@dataclass(frozen=True, slots=True)
class Anchor:
    time_ms: int
    mono_ms: int

    def at(self, mono_ms: int) -> int:
        return self.time_ms + max(0, mono_ms - self.mono_ms)


class UnseenKind(enum.StrEnum):
    OFF = "off"  # the gateway was off (seen at the first time source after a start)
    JUMP = "jump"  # trusted time stepped forward while running (a followed jump, central)


@dataclass(frozen=True, slots=True)
class Unseen:
    """A stretch (from, to] of trusted time the monotonic clock did not live through."""

    from_ms: int
    to_ms: int
    kind: UnseenKind

    @property
    def length_ms(self) -> int:
        return self.to_ms - self.from_ms


@dataclass(frozen=True, slots=True)
class Track:
    """The system clock's offset from the monotonic clock, and since when it has held."""

    offset_ms: int
    since_mono_ms: int


@dataclass(frozen=True, slots=True)
class ClockState:
    """Everything the clock remembers in memory during one boot (pure value)."""

    floor: Anchor  # lower bound on true time, carried on the monotonic clock
    est: Anchor  # the trusted estimate, carried on the monotonic clock
    quality: TimeQuality = TimeQuality.FLOOR  # of the estimate
    initial: bool = True  # no time source followed yet since the start
    synced_seen: bool = False  # a synchronised clock (or central) followed since the start
    restored_ms: int = 0  # where the estimate started (0: nothing was ever persisted)
    start_mono_ms: int = 0
    central: Anchor | None = None  # last signed central time, this boot
    track: Track | None = None
    last_synced: bool = False
    last_time_ms: int = 0  # the last trusted time returned
    behind_floor: bool = False
    disagree: bool = False
    persisted_floor_ms: int = 0
    persisted_seen_ms: int = 0
    unseen: tuple[Unseen, ...] = ()

    def floor_at(self, mono_ms: int) -> int:
        return self.floor.at(mono_ms)

    def estimate_at(self, mono_ms: int) -> int:
        """Trusted time carried on the monotonic clock, without looking at any clock."""
        return max(self.est.at(mono_ms), self.floor.at(mono_ms))


def restore(persisted_floor_ms: int, mono_ms: int, *, seen_ms: int = 0) -> ClockState:
    """State after a (re)boot: the persisted floor and the last time used, nothing else.

    The estimate starts at the later of the two: trusted time does not go back
    across a restart any more than while running.
    """
    start = max(persisted_floor_ms, seen_ms)
    return ClockState(
        floor=Anchor(persisted_floor_ms, mono_ms),
        est=Anchor(start, mono_ms),
        restored_ms=start,
        start_mono_ms=mono_ms,
        last_time_ms=start,
        persisted_floor_ms=persisted_floor_ms,
        persisted_seen_ms=seen_ms,
    )


def meter_majority(
    meter_ms: Sequence[int],
    *,
    tolerance_ms: int = METER_TOLERANCE_MS,
    min_meters: int = MIN_METERS,
) -> int | None:
    """Median of the largest group of meter clocks agreeing within ``tolerance_ms``.

    Returns None unless at least ``min_meters`` clocks are given and the group
    is a strict majority of them: one tampered or drifting meter cannot set
    the time.
    """
    if len(meter_ms) < min_meters:
        return None
    xs = sorted(meter_ms)
    best_lo, best_n = 0, 0
    lo = 0
    for hi in range(len(xs)):
        while xs[hi] - xs[lo] > tolerance_ms:
            lo += 1
        if hi - lo + 1 > best_n:
            best_lo, best_n = lo, hi - lo + 1
    if best_n * 2 <= len(xs):
        return None
    group = xs[best_lo : best_lo + best_n]
    return group[len(group) // 2]


def _jump_event(delta: int, at_ms: int, policy: ClockPolicy) -> ClockEvent:
    hold = f"trusted time stays on the monotonic clock until it holds for {policy.confirm_ms // 1000} s"
    if delta < 0:
        return ClockEvent(
            ClockEventKind.JUMP_BACKWARD, at_ms, delta, f"system clock moved back {-delta} ms; {hold}"
        )
    return ClockEvent(
        ClockEventKind.JUMP_FORWARD, at_ms, delta, f"system clock leapt {delta} ms ahead; {hold}"
    )


def _clip_unseen(unseen: tuple[Unseen, ...], t: int) -> tuple[Unseen, ...]:
    """Trusted time moved back to ``t``: what lies after it was not stepped over after all."""
    if all(u.to_ms <= t for u in unseen):
        return unseen
    return tuple(replace(u, to_ms=min(u.to_ms, t)) for u in unseen if u.from_ms < t)


def _add_unseen(state: ClockState, u: Unseen, policy: ClockPolicy) -> tuple[Unseen, ...]:
    if state.restored_ms == 0 and state.initial:
        return state.unseen  # first start ever: nothing was lived through before
    return (*state.unseen, u)[-policy.keep_unseen :]


def observe(
    state: ClockState,
    *,
    wall_ms: int,
    mono_ms: int,
    synced: bool,
    meter_ms: Sequence[int] = (),
    policy: ClockPolicy = POLICY,
) -> tuple[ClockState, TrustedTime, list[ClockEvent]]:
    """Current trusted time from one look at the clocks (pure).

    ``wall_ms`` is the system clock, ``mono_ms`` the monotonic clock (same
    boot as ``state``), ``synced`` whether the system clock is known to be
    NTP-synchronised, ``meter_ms`` current meter clock readings (already
    corrected for the time since they were read).
    """
    steady = _observe_steady(state, wall_ms, mono_ms, synced, policy)
    if steady is not None:
        return steady
    return _observe(state, wall_ms=wall_ms, mono_ms=mono_ms, synced=synced, meter_ms=meter_ms, policy=policy)


# ClockState's slots, set directly (firmware_bridge.slots): a frozen dataclass's
# __init__ goes through object.__setattr__ once per field, which is most of what a
# steady-state observe() costs (it runs a few times per meter reading). (A field
# added to ClockState stops the import here until _observe_steady sets it too.)
_new = object.__new__
(
    _set_floor, _set_est, _set_quality, _set_initial, _set_synced_seen, _set_restored_ms,
    _set_start_mono_ms, _set_central, _set_track, _set_last_synced, _set_last_time_ms,
    _set_behind_floor, _set_disagree, _set_persisted_floor_ms, _set_persisted_seen_ms, _set_unseen,
) = slot_setters(ClockState, (
    "floor", "est", "quality", "initial", "synced_seen", "restored_ms",
    "start_mono_ms", "central", "track", "last_synced", "last_time_ms",
    "behind_floor", "disagree", "persisted_floor_ms", "persisted_seen_ms", "unseen",
))  # fmt: skip
_set_anchor_time, _set_anchor_mono = slot_setters(Anchor, ("time_ms", "mono_ms"))
_set_tt_time, _set_tt_quality, _set_tt_floor = slot_setters(TrustedTime, ("time_ms", "quality", "floor_ms"))


def _observe_steady(
    state: ClockState, wall_ms: int, mono_ms: int, synced: bool, policy: ClockPolicy
) -> tuple[ClockState, TrustedTime, list[ClockEvent]] | None:
    """:func:`_observe` where it is quickest to see that nothing but time moved on,
    or None: not after a start, the system clock without a jump, trusted time
    on central time or on a system clock within the tolerance of the carried
    estimate (and not behind the floor), no event. The tests check that the
    result is :func:`_observe`'s wherever this gives one."""
    track = state.track
    if state.initial or track is None:
        return None
    tol = policy.jump_tolerance_ms
    offset = wall_ms - mono_ms
    if offset - track.offset_ms > tol or track.offset_ms - offset > tol:
        return None
    floor = state.floor
    lower = floor.time_ms + mono_ms - floor.mono_ms if mono_ms > floor.mono_ms else floor.time_ms
    est = state.est
    carried = est.time_ms + mono_ms - est.mono_ms if mono_ms > est.mono_ms else est.time_ms
    if carried < lower:
        carried = lower
    behind = wall_ms < lower - tol
    if behind and not state.behind_floor:
        return None  # the BEHIND_FLOOR event
    central = state.central
    if central is not None:
        t = central.time_ms + mono_ms - central.mono_ms if mono_ms > central.mono_ms else central.time_ms
        if t < lower:
            t = lower
        q = TimeQuality.CENTRAL
        disagree = synced and abs(wall_ms - t) > policy.disagree_tolerance_ms
        if disagree and not state.disagree:
            return None  # the SOURCES_DISAGREE event
        synced_seen = True
    else:
        if wall_ms - carried > tol or carried - wall_ms > tol:
            return None
        t = state.last_time_ms
        if wall_ms > t:
            t = wall_ms
        if t < lower:
            t, q = lower, TimeQuality.FLOOR
        else:
            q = TimeQuality.SYSTEM_SYNCED if synced else TimeQuality.SYSTEM_UNSYNCED
        disagree = False
        synced_seen = state.synced_seen or synced
        if synced and wall_ms > lower and mono_ms - track.since_mono_ms >= policy.confirm_ms:
            floor = Anchor(wall_ms, mono_ms)  # a synchronised clock that has held raises the floor
            lower = wall_ms  # (the floor now)
    if offset != track.offset_ms:
        track = Track(offset, track.since_mono_ms)
    new = _new(ClockState)
    _set_floor(new, floor)
    est = _new(Anchor)
    _set_anchor_time(est, t)
    _set_anchor_mono(est, mono_ms)
    _set_est(new, est)
    _set_quality(new, q)
    _set_initial(new, False)
    _set_synced_seen(new, synced_seen)
    _set_restored_ms(new, state.restored_ms)
    _set_start_mono_ms(new, state.start_mono_ms)
    _set_central(new, central)
    _set_track(new, track)
    _set_last_synced(new, synced)
    _set_last_time_ms(new, t)
    _set_behind_floor(new, behind)
    _set_disagree(new, disagree)
    _set_persisted_floor_ms(new, state.persisted_floor_ms)
    _set_persisted_seen_ms(new, state.persisted_seen_ms)
    _set_unseen(new, state.unseen if t >= carried else _clip_unseen(state.unseen, t))
    now = _new(TrustedTime)
    _set_tt_time(now, t)
    _set_tt_quality(now, q)
    _set_tt_floor(now, lower)
    return new, now, []


def _observe(
    state: ClockState,
    *,
    wall_ms: int,
    mono_ms: int,
    synced: bool,
    meter_ms: Sequence[int] = (),
    policy: ClockPolicy = POLICY,
) -> tuple[ClockState, TrustedTime, list[ClockEvent]]:
    """:func:`observe`, every case."""
    tol = policy.jump_tolerance_ms
    events: list[ClockEvent] = []
    lower = state.floor_at(mono_ms)
    carried = state.estimate_at(mono_ms)

    # The system clock against the monotonic clock: a jump starts a new track.
    offset = wall_ms - mono_ms
    track = state.track
    if track is None:
        track = Track(offset, mono_ms)
    elif abs(offset - track.offset_ms) > tol:
        events.append(_jump_event(offset - track.offset_ms, carried, policy))
        track = Track(offset, mono_ms)
    else:
        track = Track(offset, track.since_mono_ms)
    held = mono_ms - track.since_mono_ms >= policy.confirm_ms
    wall_q = TimeQuality.SYSTEM_SYNCED if synced else TimeQuality.SYSTEM_UNSYNCED

    t, q = carried, state.quality
    followed = False  # the estimate takes a source's value now
    floor_ok = False  # ... and that value may raise the floor
    step: UnseenKind | None = None
    disagree = False
    if state.central is not None:
        t, q, followed = max(state.central.at(mono_ms), lower), TimeQuality.CENTRAL, True
        disagree = synced and abs(wall_ms - t) > policy.disagree_tolerance_ms
        if disagree and not state.disagree:
            events.append(
                ClockEvent(
                    ClockEventKind.SOURCES_DISAGREE,
                    t,
                    wall_ms - t,
                    f"synchronised system clock is {wall_ms - t} ms off central time",
                )
            )
    else:
        majority = meter_majority(meter_ms) if state.initial and not synced and meter_ms else None
        if majority is not None and majority > max(wall_ms, carried) + tol:
            # an RTC-less start with nothing better: the meters' clocks
            t, q, followed, step = majority, TimeQuality.METER_MAJORITY, True, UnseenKind.OFF
        elif abs(wall_ms - carried) <= tol:
            t, q, followed = max(wall_ms, state.last_time_ms), wall_q, True
            floor_ok = synced and held
        elif wall_ms > carried:
            # Shortly after a start, before the first synchronisation, the system clock
            # may have been set from a file at boot (timesyncd's clock file,
            # fake-hwclock: about the time of the shutdown); the step NTP then makes is
            # the time the gateway was off, like a first reading.
            first = state.initial or (
                synced
                and not state.synced_seen
                and mono_ms - state.start_mono_ms <= policy.first_sync_window_ms
            )
            if first or held:
                t, q, followed = wall_ms, wall_q, True
                floor_ok = synced and held
                step = UnseenKind.OFF if first else UnseenKind.JUMP
                if not first:
                    events.append(
                        ClockEvent(
                            ClockEventKind.STEP_FOLLOWED,
                            t,
                            t - carried,
                            f"system clock {t - carried} ms ahead held for "
                            f"{policy.confirm_ms // 1000} s: trusted time follows it",
                        )
                    )
        elif synced and held:
            t, followed, floor_ok = max(wall_ms, lower), True, True
            q = wall_q if wall_ms >= lower else TimeQuality.FLOOR
            events.append(
                ClockEvent(
                    ClockEventKind.STEP_FOLLOWED,
                    t,
                    t - carried,
                    f"synchronised system clock {carried - wall_ms} ms behind held for "
                    f"{policy.confirm_ms // 1000} s: trusted time follows it",
                )
            )

    if t < lower or (not followed and t == lower):
        t, q = lower, TimeQuality.FLOOR

    behind = wall_ms < lower - tol  # (within the tolerance: rounding and rate jitter)
    if behind and not state.behind_floor:
        events.append(
            ClockEvent(
                ClockEventKind.BEHIND_FLOOR,
                lower,
                wall_ms - lower,
                f"system clock is {lower - wall_ms} ms earlier than the time floor",
            )
        )

    unseen = state.unseen if t >= carried else _clip_unseen(state.unseen, t)
    if step is not None and t - carried > tol:
        unseen = _add_unseen(state, Unseen(carried, t, step), policy)
        if step is UnseenKind.OFF and unseen is not state.unseen:
            events.append(
                ClockEvent(
                    ClockEventKind.START_GAP,
                    t,
                    t - carried,
                    f"trusted time is {t - carried} ms after the last time used before the start "
                    "(the gateway was off)",
                )
            )

    floor = state.floor
    if floor_ok and wall_ms > lower:
        floor = Anchor(wall_ms, mono_ms)  # the clock's own reading: never above it
    new_state = replace(
        state,
        floor=floor,
        est=Anchor(t, mono_ms),
        quality=q,
        initial=state.initial and not followed,
        synced_seen=state.synced_seen or (followed and (synced or q is TimeQuality.CENTRAL)),
        track=track,
        last_synced=synced,
        last_time_ms=t,
        behind_floor=behind,
        disagree=disagree,
        unseen=unseen,
    )
    return new_state, TrustedTime(t, q, floor.at(mono_ms)), events


def apply_central_time(
    state: ClockState,
    central_ms: int,
    mono_ms: int,
    *,
    reset_floor: bool = False,
    policy: ClockPolicy = POLICY,
) -> tuple[ClockState, list[ClockEvent]]:
    """Take a signed central time (from an APPLIED ``time.sync`` command) (pure).

    Central time becomes the estimate and the floor. A central time behind the
    floor does not move the floor back unless the command says
    ``reset_floor``; it is reported instead. Central time ahead of the carried
    estimate records the stretch between them as unseen.
    """
    lower = state.floor_at(mono_ms)
    carried = state.estimate_at(mono_ms)
    if central_ms < lower and not reset_floor:
        return state, [
            ClockEvent(
                ClockEventKind.CENTRAL_BEHIND_FLOOR,
                lower,
                central_ms - lower,
                f"central time is {lower - central_ms} ms earlier than the time floor; kept floor",
            )
        ]
    anchor = Anchor(central_ms, mono_ms)
    unseen = _clip_unseen(state.unseen, central_ms)
    if central_ms - carried > policy.jump_tolerance_ms:
        kind = UnseenKind.OFF if state.initial else UnseenKind.JUMP
        unseen = _add_unseen(replace(state, unseen=unseen), Unseen(carried, central_ms, kind), policy)
    moved = replace(
        state,
        floor=anchor,
        est=anchor,
        quality=TimeQuality.CENTRAL,
        central=anchor,
        initial=False,
        synced_seen=True,
        last_time_ms=central_ms,
        unseen=unseen,
    )
    if central_ms < lower:
        event = ClockEvent(
            ClockEventKind.FLOOR_RESET,
            central_ms,
            central_ms - lower,
            f"signed reset moved the time floor back {lower - central_ms} ms",
        )
        # the caller stores it with reset_floor() (save_floor never lowers it)
        return replace(moved, persisted_floor_ms=central_ms), [event]
    event = ClockEvent(
        ClockEventKind.CENTRAL_SYNC,
        central_ms,
        central_ms - carried,
        f"signed central time ({central_ms - carried:+d} ms from the gateway's time)",
    )
    return moved, [event]


def corroborate(
    state: ClockState, issued_ms: int, mono_ms: int, *, policy: ClockPolicy = POLICY
) -> tuple[ClockState, list[ClockEvent]]:
    """A verified signed command was issued at ``issued_ms`` (pure).

    Its issue time is a lower bound on true time. When it is later than the
    carried estimate, the estimate is provably behind; if the system clock
    (waiting to be followed after a jump) agrees with the issue time — not
    earlier, and at most ``corroboration_window_ms`` later — the system
    clock is followed now, as if it had held. The command's time itself is
    never taken (any signing role could choose it); it only confirms the
    system clock.
    """
    tol = policy.jump_tolerance_ms
    track = state.track
    if state.central is not None or track is None:
        return state, []
    carried = state.estimate_at(mono_ms)
    wall = track.offset_ms + mono_ms
    if issued_ms <= carried + tol:
        return state, []
    if not issued_ms - tol <= wall <= issued_ms + policy.corroboration_window_ms:
        return state, []
    kind = UnseenKind.OFF if state.initial else UnseenKind.JUMP
    lower = state.floor_at(mono_ms)
    synced = state.last_synced
    moved = replace(
        state,
        est=Anchor(wall, mono_ms),
        quality=TimeQuality.SYSTEM_SYNCED if synced else TimeQuality.SYSTEM_UNSYNCED,
        initial=False,
        synced_seen=state.synced_seen or synced,
        track=Track(track.offset_ms, mono_ms - policy.confirm_ms),  # counts as held
        last_time_ms=wall,
        floor=Anchor(wall, mono_ms) if synced and wall > lower else state.floor,
        unseen=_add_unseen(state, Unseen(carried, wall, kind), policy),
    )
    return moved, [
        ClockEvent(
            ClockEventKind.STEP_FOLLOWED,
            wall,
            wall - carried,
            f"system clock {wall - carried} ms ahead confirmed by a signed command issued "
            f"at {issued_ms}: trusted time follows it",
        )
    ]


def floor_to_persist(
    state: ClockState, mono_ms: int, *, granularity_ms: int = PERSIST_GRANULARITY_MS
) -> tuple[ClockState, int | None]:
    """The floor value to write now, or None if the stored one is recent enough."""
    f = state.floor_at(mono_ms)
    if f - state.persisted_floor_ms < granularity_ms and state.persisted_floor_ms != 0:
        return state, None
    if f <= state.persisted_floor_ms:
        return state, None
    return replace(state, persisted_floor_ms=f), f


def seen_to_persist(
    state: ClockState, mono_ms: int, *, granularity_ms: int = PERSIST_GRANULARITY_MS
) -> tuple[ClockState, int | None]:
    """The trusted time to write now as "last time used", or None if the stored one will do.

    Unlike the floor it may go down (after central or a held synchronised
    clock moved trusted time back).
    """
    s = state.estimate_at(mono_ms)
    if s == state.persisted_seen_ms:
        return state, None
    if abs(s - state.persisted_seen_ms) < granularity_ms and state.persisted_seen_ms != 0:
        return state, None
    return replace(state, persisted_seen_ms=s), s


# ---------------------------------------------------------------------------
# Is the system clock synchronised? (readable inside the service's sandbox)

# systemd-timesyncd touches this file on every successful synchronisation (systemd >= 239).
TIMESYNCD_SYNCHRONIZED = Path("/run/systemd/timesync/synchronized")
# chronyd writes a line here at every clock update when chrony.conf has ``log tracking``.
CHRONY_TRACKING_LOG = Path("/var/log/chrony/tracking.log")
# timesyncd polls at most every 2048 s and chronyd (default maxpoll 10) every 1024 s:
# a source that said "synchronised" within two of the longest intervals is current.
SYNC_MAX_AGE_MS = 75 * 60_000
# A status file stamped this far in the future of the system clock (clock set back): stale.
SYNC_FUTURE_SLACK_MS = 60_000


def timesyncd_synced(mtime_ms: int | None, wall_ms: int, max_age_ms: int = SYNC_MAX_AGE_MS) -> bool:
    """timesyncd's ``synchronized`` file was touched recently (by the system clock's measure)."""
    if mtime_ms is None:
        return False
    return -SYNC_FUTURE_SLACK_MS <= wall_ms - mtime_ms <= max_age_ms


def chrony_tracking_synced(
    tail: str, wall_ms: int, max_age_ms: int = SYNC_MAX_AGE_MS
) -> bool | None:
    """The last line of chrony's ``tracking.log``: synchronised (True), not (False), or
    nothing usable (None).

    Columns: UTC date, time, reference address, stratum, frequency, skew,
    offset, leap status (``N``, ``+``, ``-``; ``?`` = not synchronised), ...
    """
    for line in reversed(tail.splitlines()):
        fields = line.split()
        if len(fields) < 8 or line.startswith("=") or not fields[0][:1].isdigit():
            continue  # the banner chronyd repeats, a torn last line
        try:
            at = datetime.strptime(f"{fields[0]} {fields[1]}", "%Y-%m-%d %H:%M:%S")
        except ValueError:
            continue
        at_ms = int(at.replace(tzinfo=UTC).timestamp() * 1000)
        if fields[7] == "?":
            return False
        if fields[7] not in ("N", "+", "-"):
            continue
        return -SYNC_FUTURE_SLACK_MS <= wall_ms - at_ms <= max_age_ms
    return None


class _Timex(ctypes.Structure):
    # struct timex is larger on every ABI than the fields we need; pad generously
    _fields_ = [("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 512)]


@functools.cache
def _adjtimex() -> Callable[..., int] | None:
    """libc's ``adjtimex``, looked up once. The C library is already in the
    process: its symbols are found without ``ctypes.util.find_library``, which
    runs ``ldconfig -p`` in a child process on every call."""
    try:
        return ctypes.CDLL(None, use_errno=True).adjtimex
    except (OSError, AttributeError):
        pass
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None


def kernel_sync_state() -> bool | None:
    """The kernel's view (``adjtimex`` != TIME_ERROR), or None where it cannot be asked.

    ``adjtimex`` with ``modes = 0`` only reads, but seccomp filters the system
    call as a whole: under ``ProtectClock=yes`` or ``SystemCallFilter=~@clock``
    it fails with EPERM, which is "unknown", not "unsynchronised".
    """
    adjtimex = _adjtimex()
    if adjtimex is None:
        return None
    tx = _Timex()
    tx.modes = 0
    try:
        state = int(adjtimex(ctypes.byref(tx)))
    except OSError:
        return None
    if state == -1:
        return None
    time_error = 5
    return state != time_error


def kernel_clock_synced() -> bool:
    """True if the kernel says the system clock is synchronised (False where unknown)."""
    return kernel_sync_state() is True


class SyncProbe:
    """Is the system clock NTP-synchronised? Asked of every source that can answer.

    Inside the service's sandbox ``adjtimex`` is refused, so the probe reads
    what the NTP daemons leave in plain files: systemd-timesyncd's
    ``/run/systemd/timesync/synchronized`` (its modification time is the last
    synchronisation) and chronyd's ``tracking.log`` (last line: leap status and
    time). Each counts while it is younger than ``max_age_ms``. Where
    ``adjtimex`` is allowed (outside the sandbox) the kernel is asked too. Any
    source that says "synchronised" is enough; none means unsynchronised.
    Answers are kept ``cache_s`` (a stat and a small read per look).
    """

    def __init__(
        self,
        *,
        timesyncd_file: Path | None = TIMESYNCD_SYNCHRONIZED,
        chrony_tracking_log: Path | None = CHRONY_TRACKING_LOG,
        kernel: bool = True,
        max_age_ms: int = SYNC_MAX_AGE_MS,
        wall_ms: Callable[[], int] = system_wall_ms,
        cache_s: float = 5.0,
    ) -> None:
        self.timesyncd_file = timesyncd_file
        self.chrony_tracking_log = chrony_tracking_log
        self.kernel = kernel
        self.max_age_ms = max_age_ms
        self.wall_ms = wall_ms
        self.cache_s = cache_s
        self._cached: tuple[float, bool] | None = None

    def sources(self) -> dict[str, bool | None]:
        """Each source's answer (None: not there / cannot be asked)."""
        wall = self.wall_ms()
        out: dict[str, bool | None] = {}
        if self.timesyncd_file is not None:
            try:
                mtime: int | None = os.stat(self.timesyncd_file).st_mtime_ns // 1_000_000
            except OSError:
                mtime = None
            out["timesyncd"] = None if mtime is None else timesyncd_synced(mtime, wall, self.max_age_ms)
        if self.chrony_tracking_log is not None:
            out["chrony"] = self._chrony(wall)
        if self.kernel:
            out["kernel"] = kernel_sync_state()
        return out

    def _chrony(self, wall: int) -> bool | None:
        assert self.chrony_tracking_log is not None
        try:
            with open(self.chrony_tracking_log, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - 4096))
                tail = f.read().decode("ascii", "replace")
        except OSError:
            return None
        return chrony_tracking_synced(tail, wall, self.max_age_ms)

    def __call__(self) -> bool:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < self.cache_s:
            return self._cached[1]
        synced = any(v is True for v in self.sources().values())
        self._cached = (now, synced)
        return synced


class TrustedClock:
    """Imperative wrapper around the pure functions for the daemon.

    Clocks are injectable (``wall``/``mono`` return milliseconds; ``synced``
    says whether the system clock is NTP-synchronised, default a
    :class:`SyncProbe`); events pile up until :meth:`drain_events` hands them
    to the audit log, at most ``event_budget_per_hour`` an hour (the rest are
    counted and reported as one ``clock_events_suppressed``).
    """

    def __init__(
        self,
        state: ClockState,
        *,
        wall: Callable[[], int] = system_wall_ms,
        mono: Callable[[], int] = boot_ms,
        synced: Callable[[], bool] | None = None,
        meters: Callable[[], Sequence[int]] = tuple,
        policy: ClockPolicy = POLICY,
        event_budget_per_hour: int = EVENT_BUDGET_PER_HOUR,
    ) -> None:
        self._state = state
        self._wall, self._mono, self._meters = wall, mono, meters
        self._synced = synced if synced is not None else SyncProbe(wall_ms=wall)
        self.policy = policy
        self.event_budget = event_budget_per_hour
        self._events: list[ClockEvent] = []
        self._hour = -1
        self._in_hour = 0
        self._suppressed = 0

    @classmethod
    def restored(
        cls,
        persisted_floor_ms: int,
        *,
        seen_ms: int = 0,
        wall: Callable[[], int] = system_wall_ms,
        mono: Callable[[], int] = boot_ms,
        synced: Callable[[], bool] | None = None,
        meters: Callable[[], Sequence[int]] = tuple,
        policy: ClockPolicy = POLICY,
    ) -> TrustedClock:
        return cls(
            restore(persisted_floor_ms, mono(), seen_ms=seen_ms),
            wall=wall,
            mono=mono,
            synced=synced,
            meters=meters,
            policy=policy,
        )

    @property
    def state(self) -> ClockState:
        return self._state

    @property
    def unseen(self) -> tuple[Unseen, ...]:
        """Recent stretches trusted time stepped over (for holding fixed charges)."""
        return self._state.unseen

    def mono_ms(self) -> int:
        return self._mono()

    def now(self) -> TrustedTime:
        self._state, t, events = observe(
            self._state,
            wall_ms=self._wall(),
            mono_ms=self._mono(),
            synced=self._synced(),
            meter_ms=self._meters(),
            policy=self.policy,
        )
        self._add(events)
        return t

    def central_time(self, central_ms: int, *, reset_floor: bool = False) -> list[ClockEvent]:
        self._state, events = apply_central_time(
            self._state, central_ms, self._mono(), reset_floor=reset_floor, policy=self.policy
        )
        self._add(events)
        return events

    def corroborate(self, issued_ms: int) -> list[ClockEvent]:
        """A verified signed command was issued at ``issued_ms`` (see :func:`corroborate`)."""
        self._state, events = corroborate(self._state, issued_ms, self._mono(), policy=self.policy)
        self._add(events)
        return events

    def floor_to_persist(self, granularity_ms: int = PERSIST_GRANULARITY_MS) -> int | None:
        self._state, value = floor_to_persist(self._state, self._mono(), granularity_ms=granularity_ms)
        return value

    def seen_to_persist(self, granularity_ms: int = PERSIST_GRANULARITY_MS) -> int | None:
        self._state, value = seen_to_persist(self._state, self._mono(), granularity_ms=granularity_ms)
        return value

    def _add(self, events: list[ClockEvent]) -> None:
        if not events:
            return
        hour = self._mono() // 3_600_000
        if hour != self._hour:
            if self._suppressed:
                at = self._state.last_time_ms
                self._events.append(
                    ClockEvent(
                        ClockEventKind.EVENTS_SUPPRESSED,
                        at,
                        self._suppressed,
                        f"{self._suppressed} more clock events in an hour were not recorded one by one",
                    )
                )
            self._hour, self._in_hour, self._suppressed = hour, 0, 0
        for e in events:
            if self._in_hour < self.event_budget:
                self._events.append(e)
                self._in_hour += 1
            else:
                self._suppressed += 1

    def drain_events(self) -> list[ClockEvent]:
        out, self._events = self._events, []
        return out

    def requeue(self, events: list[ClockEvent]) -> None:
        """Give back drained events whose transaction rolled back (they go first)."""
        self._events[:0] = events


# ---------------------------------------------------------------------------
# Persistence (caller-owned transaction on the daemon's writer connection)

TABLES: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS sec_time_floor (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        floor_ms INTEGER NOT NULL,
        updated_mono_ms INTEGER NOT NULL
    ) STRICT""",
    # the last trusted time used (where the estimate resumes after a restart); from
    # version 6 on it is kept in sec_time_floor.seen_ms instead, and this table is
    # no longer written
    """CREATE TABLE IF NOT EXISTS sec_time_seen (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seen_ms INTEGER NOT NULL
    ) STRICT""",
)


async def _seen_into_the_floor_row(conn: aiosqlite.Connection) -> None:
    """The last trusted time used moves into the time floor's row (``seen_ms``), so
    that a cycle that stores both writes one page, not two. ``sec_time_seen`` keeps
    the value it had (a database of an earlier release holds it) and is not written
    again."""
    async with conn.execute("PRAGMA table_info(sec_time_floor)") as cur:
        columns = {str(row[1]) async for row in cur}
    if "seen_ms" in columns:
        return
    await conn.execute("ALTER TABLE sec_time_floor ADD COLUMN seen_ms INTEGER NOT NULL DEFAULT 0")
    await conn.execute(
        "INSERT INTO sec_time_floor (id, floor_ms, updated_mono_ms, seen_ms)"
        " SELECT 1, 0, 0, seen_ms FROM sec_time_seen WHERE id = 1"
        " ON CONFLICT(id) DO UPDATE SET seen_ms = excluded.seen_ms"
    )


# Declared to the gateway database's schema registry (gateway.database).
SCHEMA = Schema(
    "trusted_time",
    Step(4, "the time floor and the last trusted time used", TABLES),
    Step(6, "the last trusted time used in the time floor's row (sec_time_floor.seen_ms)", apply=_seen_into_the_floor_row),
)


async def create_schema(conn: aiosqlite.Connection) -> None:
    """The tables on a connection of their own (tests, tools); the gateway's database
    gets them from its schema registry (:mod:`gateway.database`)."""
    await SCHEMA.create(conn)


async def load_floor(conn: aiosqlite.Connection) -> int:
    async with conn.execute("SELECT floor_ms FROM sec_time_floor WHERE id = 1") as cur:
        row = await cur.fetchone()
    return 0 if row is None else int(row[0])


async def save_floor(conn: aiosqlite.Connection, floor_ms: int, mono_ms: int) -> None:
    """Store ``floor_ms`` unless the stored floor is already higher (never backwards)."""
    await conn.execute(
        "INSERT INTO sec_time_floor (id, floor_ms, updated_mono_ms) VALUES (1, ?, ?) "
        "ON CONFLICT(id) DO UPDATE SET floor_ms = excluded.floor_ms, "
        "updated_mono_ms = excluded.updated_mono_ms WHERE excluded.floor_ms > floor_ms",
        (floor_ms, mono_ms),
    )


async def reset_floor(conn: aiosqlite.Connection, floor_ms: int, mono_ms: int) -> None:
    """Lower the stored floor: only after a signed ``time.sync`` with ``reset_floor``."""
    await conn.execute(
        "INSERT INTO sec_time_floor (id, floor_ms, updated_mono_ms) VALUES (1, ?, ?) "
        "ON CONFLICT(id) DO UPDATE SET floor_ms = excluded.floor_ms, "
        "updated_mono_ms = excluded.updated_mono_ms",
        (floor_ms, mono_ms),
    )
    await save_seen(conn, floor_ms)  # the estimate resumes from the reset, not above it


async def load_seen(conn: aiosqlite.Connection) -> int:
    async with conn.execute("SELECT seen_ms FROM sec_time_floor WHERE id = 1") as cur:
        row = await cur.fetchone()
    return 0 if row is None else int(row[0])


async def save_seen(conn: aiosqlite.Connection, seen_ms: int) -> None:
    """Store the last trusted time used (in the floor's row; a floor of 0 where none
    was stored yet, which is what no row means)."""
    await conn.execute(
        "INSERT INTO sec_time_floor (id, floor_ms, updated_mono_ms, seen_ms) VALUES (1, 0, 0, ?) "
        "ON CONFLICT(id) DO UPDATE SET seen_ms = excluded.seen_ms",
        (seen_ms,),
    )


async def save_floor_and_seen(conn: aiosqlite.Connection, floor_ms: int, mono_ms: int, seen_ms: int) -> None:
    """:func:`save_floor` and :func:`save_seen` in one statement (one row, one page)."""
    await conn.execute(
        "INSERT INTO sec_time_floor (id, floor_ms, updated_mono_ms, seen_ms) VALUES (1, ?, ?, ?) "
        "ON CONFLICT(id) DO UPDATE SET seen_ms = excluded.seen_ms, "
        "floor_ms = max(floor_ms, excluded.floor_ms), "
        "updated_mono_ms = CASE WHEN excluded.floor_ms > floor_ms"
        " THEN excluded.updated_mono_ms ELSE updated_mono_ms END",
        (floor_ms, mono_ms, seen_ms),
    )


async def save_clock(
    conn: aiosqlite.Connection,
    clock: TrustedClock,
    *,
    force: bool = False,
    granularity_ms: int = PERSIST_GRANULARITY_MS,
) -> None:
    """Persist the floor and the last time used if they moved (every minute, or
    ``granularity_ms``; ``force``: now)."""
    g = 0 if force else granularity_ms
    floor = clock.floor_to_persist(g)
    seen = clock.seen_to_persist(g)
    if floor is not None and seen is not None:
        await save_floor_and_seen(conn, floor, clock.mono_ms(), seen)
    elif floor is not None:
        await save_floor(conn, floor, clock.mono_ms())
    elif seen is not None:
        await save_seen(conn, seen)


async def apply_time_sync(
    conn: aiosqlite.Connection, clock: TrustedClock, time_ms: int, *, reset_floor_flag: bool
) -> list[ClockEvent]:
    """Apply the body of an APPLIED ``time.sync`` command; caller's transaction.

    Feeds the signed time to ``clock`` and stores the floor: a signed reset
    is written with :func:`reset_floor` (the only way the stored floor goes
    down), anything else with :func:`save_floor`.
    """
    events = clock.central_time(time_ms, reset_floor=reset_floor_flag)
    mono = clock.state.floor.mono_ms
    if any(e.kind is ClockEventKind.FLOOR_RESET for e in events):
        await reset_floor(conn, clock.state.floor.time_ms, mono)
    elif any(e.kind is ClockEventKind.CENTRAL_SYNC for e in events):
        await save_floor(conn, clock.state.floor.time_ms, mono)
        await save_seen(conn, clock.state.est.time_ms)
    return events

"""Trusted time for a gateway without a real-time clock.

The gateway decides expiry of signed commands and time-of-use prices by the
clock, and the clock is the easiest thing on the board to attack: set it back
and an expired top-up or relay command is valid again; set it forward and
valid commands expire. This module keeps a *time floor* — a lower bound on
true time that never moves backwards — and ranks the sources of the current
time:

==================  =============================================================
quality             source
==================  =============================================================
``central``         signed ``time.sync`` from central, carried forward on the
                    monotonic clock
``system_synced``   system clock while the kernel reports it synchronised (NTP)
``meter_majority``  a strict majority of meter clocks that agree within tolerance
``system_unsynced`` system clock, not known to be synchronised
``floor``           none of the above is at or above the floor: the floor itself
==================  =============================================================

Rules:

* :func:`observe` never returns a time earlier than the floor.
* The floor advances with the monotonic clock (elapsed monotonic time is a
  lower bound on elapsed real time), and jumps up only on ``central`` or
  ``system_synced`` time. Meter clocks and an unsynchronised system clock are
  used for the current estimate but never raise the floor, so they cannot
  poison it permanently.
* Only a signed ``time.sync`` with ``reset_floor`` may lower the floor (to
  recover from a floor pushed into the future by a spoofed NTP server).
* Jumps of the system clock relative to the monotonic clock, a system clock
  behind the floor, a central time behind the floor, and a synchronised
  system clock more than a minute off central time (spoofed NTP?) are reported as
  :class:`ClockEvent` for the audit log.

After a reboot (no RTC) :func:`restore` starts from the persisted floor; the
daemon persists the floor when :func:`floor_to_persist` says it has moved by
at least ``granularity_ms`` (so a minute-level floor costs one small write per
minute at most, and a power cut loses at most that much).

Known limit: a ``time.sync`` that sat in a queue is late; its time is a lower
bound, which is what the floor needs, but the ``central`` estimate lags by the
delivery delay (bounded by the command's short validity window whenever the
gateway's own time is good).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import aiosqlite

from firmware_bridge.reading import TimeSource

JUMP_TOLERANCE_MS = 2_000
DISAGREE_TOLERANCE_MS = 60_000
METER_TOLERANCE_MS = 5 * 60_000
MIN_METERS = 3
PERSIST_GRANULARITY_MS = 60_000


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
_FLOOR_RAISING = frozenset({TimeQuality.CENTRAL, TimeQuality.SYSTEM_SYNCED})


class ClockEventKind(enum.StrEnum):
    JUMP_BACKWARD = "clock_jump_backward"  # system clock moved back vs monotonic
    JUMP_FORWARD = "clock_jump_forward"  # system clock leapt ahead vs monotonic
    BEHIND_FLOOR = "clock_behind_floor"  # system clock earlier than the floor
    CENTRAL_BEHIND_FLOOR = "central_time_behind_floor"
    FLOOR_RESET = "time_floor_reset"  # signed reset lowered the floor
    CENTRAL_SYNC = "central_time_sync"
    SOURCES_DISAGREE = "time_sources_disagree"  # synced system clock far from central


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


@dataclass(frozen=True, slots=True)
class ClockState:
    """Everything the clock remembers in memory during one boot (pure value)."""

    floor: Anchor  # lower bound on true time, carried on the monotonic clock
    central: Anchor | None = None  # last signed central time, this boot
    last_wall_ms: int | None = None
    last_mono_ms: int | None = None
    behind_floor: bool = False
    disagree: bool = False
    persisted_floor_ms: int = 0

    def floor_at(self, mono_ms: int) -> int:
        return self.floor.at(mono_ms)


def restore(persisted_floor_ms: int, mono_ms: int) -> ClockState:
    """State after a (re)boot: the persisted floor, nothing else known yet."""
    return ClockState(
        floor=Anchor(persisted_floor_ms, mono_ms), persisted_floor_ms=persisted_floor_ms
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


def observe(
    state: ClockState,
    *,
    wall_ms: int,
    mono_ms: int,
    synced: bool,
    meter_ms: Sequence[int] = (),
    jump_tolerance_ms: int = JUMP_TOLERANCE_MS,
) -> tuple[ClockState, TrustedTime, list[ClockEvent]]:
    """Current trusted time from one look at the clocks (pure).

    ``wall_ms`` is the system clock, ``mono_ms`` the monotonic clock (same
    boot as ``state``), ``synced`` whether the kernel reports the system clock
    synchronised, ``meter_ms`` current meter clock readings (already corrected
    for the time since they were read).
    """
    events: list[ClockEvent] = []
    lower = state.floor_at(mono_ms)

    if state.last_wall_ms is not None and state.last_mono_ms is not None:
        expected = state.last_wall_ms + (mono_ms - state.last_mono_ms)
        delta = wall_ms - expected
        if delta < -jump_tolerance_ms:
            kind = ClockEventKind.JUMP_BACKWARD
            events.append(ClockEvent(kind, lower, delta, f"system clock moved back {-delta} ms"))
        elif delta > jump_tolerance_ms:
            kind = ClockEventKind.JUMP_FORWARD
            events.append(ClockEvent(kind, lower, delta, f"system clock leapt {delta} ms ahead"))

    majority = meter_majority(meter_ms) if meter_ms else None
    disagree = False
    if state.central is not None:
        t, q = state.central.at(mono_ms), TimeQuality.CENTRAL
        disagree = synced and abs(wall_ms - t) > DISAGREE_TOLERANCE_MS
        if disagree and not state.disagree:
            events.append(
                ClockEvent(
                    ClockEventKind.SOURCES_DISAGREE,
                    t,
                    wall_ms - t,
                    f"synchronised system clock is {wall_ms - t} ms off central time",
                )
            )
    elif synced:
        t, q = wall_ms, TimeQuality.SYSTEM_SYNCED
    elif majority is not None:
        t, q = majority, TimeQuality.METER_MAJORITY
    else:
        t, q = wall_ms, TimeQuality.SYSTEM_UNSYNCED

    behind = wall_ms < lower
    if behind and not state.behind_floor:
        events.append(
            ClockEvent(
                ClockEventKind.BEHIND_FLOOR,
                lower,
                wall_ms - lower,
                f"system clock is {lower - wall_ms} ms earlier than the time floor",
            )
        )
    if t < lower:
        t, q = lower, TimeQuality.FLOOR

    floor = state.floor
    if q in _FLOOR_RAISING and t > lower:
        floor = Anchor(t, mono_ms)
    new_state = replace(
        state,
        floor=floor,
        last_wall_ms=wall_ms,
        last_mono_ms=mono_ms,
        behind_floor=behind,
        disagree=disagree,
    )
    return new_state, TrustedTime(t, q, floor.at(mono_ms)), events


def apply_central_time(
    state: ClockState, central_ms: int, mono_ms: int, *, reset_floor: bool = False
) -> tuple[ClockState, list[ClockEvent]]:
    """Take a signed central time (from an APPLIED ``time.sync`` command) (pure).

    A central time behind the floor does not move the floor back unless the
    command says ``reset_floor``; it is reported instead.
    """
    lower = state.floor_at(mono_ms)
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
    if central_ms < lower:
        event = ClockEvent(
            ClockEventKind.FLOOR_RESET,
            central_ms,
            central_ms - lower,
            f"signed reset moved the time floor back {lower - central_ms} ms",
        )
        # the caller stores it with reset_floor() (save_floor never lowers it)
        return replace(state, floor=anchor, central=anchor, persisted_floor_ms=central_ms), [event]
    event = ClockEvent(
        ClockEventKind.CENTRAL_SYNC, central_ms, central_ms - lower, "signed central time"
    )
    return replace(state, floor=anchor, central=anchor), [event]


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


# ---------------------------------------------------------------------------
# Kernel clock status


class _Timex(ctypes.Structure):
    # struct timex is larger on every ABI than the fields we need; pad generously
    _fields_ = [("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 512)]


def kernel_clock_synced() -> bool:
    """True if the kernel says the system clock is synchronised (adjtimex != TIME_ERROR).

    ``adjtimex`` with ``modes = 0`` only reads. Returns False where it is not
    available: an unknown clock is treated as unsynchronised.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        tx = _Timex()
        tx.modes = 0
        state = int(libc.adjtimex(ctypes.byref(tx)))
    except (OSError, AttributeError):
        return False
    time_error = 5
    return state not in (-1, time_error)


class TrustedClock:
    """Imperative wrapper around the pure functions for the daemon.

    Clocks are injectable (``wall``/``mono`` return milliseconds); events pile
    up until :meth:`drain_events` hands them to the audit log.
    """

    def __init__(
        self,
        state: ClockState,
        *,
        wall: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        mono: Callable[[], int] = lambda: time.monotonic_ns() // 1_000_000,
        synced: Callable[[], bool] = kernel_clock_synced,
        meters: Callable[[], Sequence[int]] = tuple,
    ) -> None:
        self._state = state
        self._wall, self._mono, self._synced, self._meters = wall, mono, synced, meters
        self._events: list[ClockEvent] = []

    @classmethod
    def restored(
        cls,
        persisted_floor_ms: int,
        *,
        wall: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        mono: Callable[[], int] = lambda: time.monotonic_ns() // 1_000_000,
        synced: Callable[[], bool] = kernel_clock_synced,
        meters: Callable[[], Sequence[int]] = tuple,
    ) -> TrustedClock:
        return cls(
            restore(persisted_floor_ms, mono()), wall=wall, mono=mono, synced=synced, meters=meters
        )

    @property
    def state(self) -> ClockState:
        return self._state

    def now(self) -> TrustedTime:
        self._state, t, events = observe(
            self._state,
            wall_ms=self._wall(),
            mono_ms=self._mono(),
            synced=self._synced(),
            meter_ms=self._meters(),
        )
        self._events.extend(events)
        return t

    def central_time(self, central_ms: int, *, reset_floor: bool = False) -> list[ClockEvent]:
        self._state, events = apply_central_time(
            self._state, central_ms, self._mono(), reset_floor=reset_floor
        )
        self._events.extend(events)
        return events

    def floor_to_persist(self) -> int | None:
        self._state, value = floor_to_persist(self._state, self._mono())
        return value

    def drain_events(self) -> list[ClockEvent]:
        out, self._events = self._events, []
        return out


# ---------------------------------------------------------------------------
# Persistence (caller-owned transaction on the daemon's writer connection)

SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS sec_time_floor (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        floor_ms INTEGER NOT NULL,
        updated_mono_ms INTEGER NOT NULL
    ) STRICT""",
)


async def create_schema(conn: aiosqlite.Connection) -> None:
    for stmt in SCHEMA:
        await conn.execute(stmt)


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
    return events

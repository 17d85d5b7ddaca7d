"""Cutoff policy: balance -> relay decisions, as a pure state machine.

``evaluate(state, balance, now, contact, config)`` returns the next state,
the relay/alarm actions to hand to the relay controller, and events (each
with a reason). Levels, by balance ``B`` (docs/billing.md, "Cutoff policy"):

    NORMAL   B > alarm1
    ALARM1   alarm2 < B <= alarm1        alarm on
    ALARM2   0 < B <= alarm2             alarm on (pre-trip warning)
    GRACE    -overdraft < B <= 0         alarm on, supply stays on
    CUTOFF   B <= -overdraft             trip; stays off until B > close_permit

A due trip is not executed while the account is protected (保电), while the
gateway has been out of contact with central longer than
``contact_protect_after_ms`` (if configured) or started less than
``startup_protect_ms`` ago, inside a no-disconnect window,
or before ``relay_min_interval_ms`` has passed since the last relay operation;
the state stays GRACE with ``pending`` naming the reason, and the trip
happens at the instant the reason is gone. Protection also
restores a tripped supply. A restore by balance waits ``reconnect_delay_ms``
of continuously sufficient balance, then closes directly or sends
close-allowed (the customer presses the meter's button), per meter.

Time: the decision depends on the balance, the contact and the clock. With
balance and contact unchanged, :func:`next_change_ms` says the next instant
at which the decision may change (a no-disconnect window starts or ends, a
reconnect delay or relay rate limit runs out, start-up protection ends,
contact is lost); between two such instants evaluating again changes
nothing. :func:`follow` evaluates at every balance change and at every one of
those instants, in time order: the daemon's one-second tick and ``tariff
simulate`` both use it, so they take the same decisions at the same instants.
:func:`describe` says in words what the state means ("cut pending:
no-disconnect window until 08:00").
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.relay_ops import RelayOp
from gateway.billing.daytypes import DayCalendar, DayType
from gateway.billing.money import report_yuan, yuan_text
from gateway.billing.tariff import to_local


class Level(enum.StrEnum):
    NORMAL = "normal"
    ALARM1 = "alarm1"
    ALARM2 = "alarm2"
    GRACE = "grace"
    CUTOFF = "cutoff"


class CloseMode(enum.StrEnum):
    DIRECT = "direct"  # close the relay
    ALLOWED = "allowed"  # allow closing; the customer presses the button


class Pending(enum.StrEnum):
    """Why a due relay operation is not executed yet."""

    PROTECTED = "protected"
    CONTACT_LOST = "contact_lost"
    STARTUP = "startup"
    NO_DISCONNECT_WINDOW = "no_disconnect_window"
    RATE_LIMIT = "rate_limit"
    RECONNECT_DELAY = "reconnect_delay"


class CutoffConfigError(EdgeGwError, ValueError):
    """Cutoff limits that contradict each other."""

    kind = ErrorKind.INVALID


@dataclass(frozen=True)
class Window:
    """A no-disconnect window: from ``start_min`` to ``end_min`` (minutes, end may be 1440)
    on days of the given types; ``end_min <= start_min`` runs overnight into the next day
    (the window belongs to the day it starts on)."""

    start_min: int
    end_min: int
    days: frozenset[DayType] = frozenset(DayType)

    def contains(self, tz: ZoneInfo, calendar: DayCalendar, t_ms: int) -> bool:
        lt = to_local(tz, t_ms)
        minute = lt.hour * 60 + lt.minute
        today = calendar.day_type(lt.date()) in self.days
        if self.start_min < self.end_min:
            return today and self.start_min <= minute < self.end_min
        yesterday = calendar.day_type(lt.date() - timedelta(days=1)) in self.days
        return (today and minute >= self.start_min) or (yesterday and minute < self.end_min)


@dataclass(frozen=True)
class CutoffConfig:
    alarm1_micro: int
    alarm2_micro: int
    overdraft_micro: int = 0  # emergency credit below zero before a trip
    close_permit_micro: int = 0  # restore when balance > this
    close_mode: CloseMode = CloseMode.DIRECT
    meters: tuple[str, ...] = ()  # relays this account drives ("" = account level)
    close_mode_by_meter: Mapping[str, CloseMode] = field(default_factory=dict)
    windows: tuple[Window, ...] = ()
    calendar: DayCalendar = field(default_factory=DayCalendar)
    tz: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    protected: bool = False
    contact_protect_after_ms: int | None = None
    startup_protect_ms: int = 0  # no money trip for this long after the gateway started
    reconnect_delay_ms: int = 0
    relay_min_interval_ms: int = 10_000

    def __post_init__(self) -> None:
        if not self.alarm1_micro > self.alarm2_micro > 0:
            raise CutoffConfigError(
                f"limits must satisfy alarm1 > alarm2 > 0, got {self.alarm1_micro}, {self.alarm2_micro}"
            )
        if self.overdraft_micro < 0:
            raise CutoffConfigError(f"overdraft must be >= 0, got {self.overdraft_micro}")
        if self.close_permit_micro < 0:
            raise CutoffConfigError(f"close permit must be >= 0, got {self.close_permit_micro}")
        if self.reconnect_delay_ms < 0 or self.relay_min_interval_ms < 0 or self.startup_protect_ms < 0:
            raise CutoffConfigError("delays must be >= 0")
        if self.contact_protect_after_ms is not None and self.contact_protect_after_ms <= 0:
            raise CutoffConfigError("contact_protect_after_ms must be > 0")


@dataclass(frozen=True)
class CutoffState:
    level: Level = Level.NORMAL
    relay_open: bool = False  # the policy holds the supply off
    alarm_on: bool = False
    pending: Pending | None = None
    restore_since_ms: int | None = None
    last_relay_op_ms: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "level": self.level.value,
            "relay_open": self.relay_open,
            "alarm_on": self.alarm_on,
            "pending": None if self.pending is None else self.pending.value,
            "restore_since_ms": self.restore_since_ms,
            "last_relay_op_ms": self.last_relay_op_ms,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CutoffState:
        return cls(
            Level(d["level"]),
            bool(d["relay_open"]),
            bool(d["alarm_on"]),
            None if d.get("pending") is None else Pending(d["pending"]),
            d.get("restore_since_ms"),
            d.get("last_relay_op_ms"),
        )


@dataclass(frozen=True)
class Contact:
    """What the gateway knows of its link and uptime: when it last heard from central
    (None: never since start) and when it started (for power-up protection)."""

    last_contact_ms: int | None
    started_ms: int | None = None


@dataclass(frozen=True)
class Action:
    kind: RelayOp
    account: str
    meter: str  # "" when the account has no meter list (account-level relay)
    reason: str

    @property
    def relay_open(self) -> bool | None:
        """The argument for ``RelayController.set_open(meter, open)``; None for alarm actions.

        Close-allowed is ``False`` too: the actuator decides whether a close is
        direct or left to the customer's button (DL/T 645 1C vs 1B)."""
        return None if self.kind.is_signal else self.kind.opens


@dataclass(frozen=True)
class CutoffEvent:
    type: str  # "state_change", "trip_pending", "restore_pending"
    account: str
    time_ms: int
    from_level: Level
    to_level: Level
    balance_micro: int
    reason: str


@dataclass(frozen=True)
class CutoffDecision:
    state: CutoffState
    actions: tuple[Action, ...]
    events: tuple[CutoffEvent, ...]
    time_ms: int = 0  # the instant it was taken
    balance_micro: int = 0  # the balance it was taken on


def band(balance: int, cfg: CutoffConfig) -> Level:
    """The level the balance alone asks for (CUTOFF = trip due)."""
    if balance > cfg.alarm1_micro:
        return Level.NORMAL
    if balance > cfg.alarm2_micro:
        return Level.ALARM1
    if balance > 0:
        return Level.ALARM2
    if balance > -cfg.overdraft_micro:
        return Level.GRACE
    return Level.CUTOFF


def _yuan(micro: int) -> str:
    """A balance as it is reported (truncated toward zero to the fen)."""
    return f"{report_yuan(micro)}"


def cut_level_text(cfg: CutoffConfig) -> str:
    """Where supply is cut, in words: "0.00 (no overdraft)" or "-2.00"."""
    if cfg.overdraft_micro == 0:
        return "0.00 (no overdraft)"
    return yuan_text(-cfg.overdraft_micro)


def _band_reason(balance: int, lvl: Level, cfg: CutoffConfig) -> str:
    b = _yuan(balance)
    if lvl is Level.NORMAL:
        return f"balance {b} > alarm 1 level {yuan_text(cfg.alarm1_micro)}"
    if lvl is Level.ALARM1:
        return f"balance {b} <= alarm 1 level {yuan_text(cfg.alarm1_micro)}"
    if lvl is Level.ALARM2:
        return f"balance {b} <= alarm 2 level {yuan_text(cfg.alarm2_micro)}"
    if lvl is Level.GRACE:
        return f"balance {b} <= 0, in overdraft above the cut level {cut_level_text(cfg)}"
    return f"balance {b} <= cut level {cut_level_text(cfg)}"


def protection(now_ms: int, contact: Contact, cfg: CutoffConfig) -> Pending | None:
    if cfg.protected:
        return Pending.PROTECTED
    lim = cfg.contact_protect_after_ms
    if lim is not None and (contact.last_contact_ms is None or now_ms - contact.last_contact_ms > lim):
        return Pending.CONTACT_LOST
    if cfg.startup_protect_ms and (contact.started_ms is None or now_ms - contact.started_ms < cfg.startup_protect_ms):
        return Pending.STARTUP
    return None


def in_no_disconnect_window(now_ms: int, cfg: CutoffConfig) -> bool:
    return any(w.contains(cfg.tz, cfg.calendar, now_ms) for w in cfg.windows)


def _rate_limited(state: CutoffState, now_ms: int, cfg: CutoffConfig) -> bool:
    return state.last_relay_op_ms is not None and now_ms - state.last_relay_op_ms < cfg.relay_min_interval_ms


def evaluate(
    state: CutoffState,
    balance_micro: int,
    now_ms: int,
    contact: Contact,
    cfg: CutoffConfig,
    account: str,
) -> CutoffDecision:
    """One policy step. Call it after every balance change and periodically (windows end)."""
    meters = cfg.meters or ("",)
    actions: list[Action] = []
    events: list[CutoffEvent] = []
    want = band(balance_micro, cfg)
    prot = protection(now_ms, contact, cfg)
    new = state
    # The reason's text is made only when an action or event carries it (most
    # evaluations change nothing).
    reason: str | None = None

    def reason_text() -> str:
        nonlocal reason
        if reason is None:
            reason = _band_reason(balance_micro, want, cfg)
        return reason

    def relay(kind: RelayOp, why: str) -> None:
        for m in meters:
            k = kind
            if kind is RelayOp.CLOSE:
                mode = cfg.close_mode_by_meter.get(m, cfg.close_mode)
                k = RelayOp.CLOSE if mode is CloseMode.DIRECT else RelayOp.CLOSE_ALLOWED
            actions.append(Action(k, account, m, why))

    if state.relay_open:
        if prot is not None:
            restore_why: str | None = f"{_PROTECTION_TEXT[prot]}: supply restored"
            # protection restores without the reconnect delay
            since = state.restore_since_ms if state.restore_since_ms is not None else now_ms
            delay = 0
        elif balance_micro > cfg.close_permit_micro:
            restore_why = (
                f"balance {_yuan(balance_micro)} > restore level {yuan_text(cfg.close_permit_micro)}"
            )
            since = state.restore_since_ms if state.restore_since_ms is not None else now_ms
            delay = cfg.reconnect_delay_ms
        else:
            restore_why = None
            since = 0
            delay = 0
        if restore_why is None:
            new = replace(state, level=Level.CUTOFF, pending=None, restore_since_ms=None)
        elif now_ms - since < delay:
            new = replace(state, level=Level.CUTOFF, pending=Pending.RECONNECT_DELAY, restore_since_ms=since)
        elif _rate_limited(state, now_ms, cfg):
            new = replace(state, level=Level.CUTOFF, pending=Pending.RATE_LIMIT, restore_since_ms=since)
        else:
            relay(RelayOp.CLOSE, restore_why)
            lvl = Level.GRACE if want is Level.CUTOFF else want
            new = CutoffState(lvl, False, state.alarm_on, prot if want is Level.CUTOFF else None, None, now_ms)
            reason = restore_why
        if new.pending is not None and new.pending != state.pending:
            events.append(
                CutoffEvent("restore_pending", account, now_ms, state.level, new.level, balance_micro,
                            f"restore due ({restore_why}) but waiting: "
                            f"{_waiting(new, now_ms, contact, cfg)}")
            )
    elif want is Level.CUTOFF:
        blocker = prot
        if blocker is None and in_no_disconnect_window(now_ms, cfg):
            blocker = Pending.NO_DISCONNECT_WINDOW
        if blocker is None and _rate_limited(state, now_ms, cfg):
            blocker = Pending.RATE_LIMIT
        if blocker is None:
            relay(RelayOp.TRIP, reason_text())
            new = CutoffState(Level.CUTOFF, True, state.alarm_on, None, None, now_ms)
        else:
            new = replace(state, level=Level.GRACE, pending=blocker, restore_since_ms=None)
            if blocker != state.pending or new.level != state.level or not new.alarm_on:
                # only when something is emitted: the window's end is looked up here
                reason = f"{reason_text()}; cut deferred: {_waiting(new, now_ms, contact, cfg)}"
            if blocker != state.pending:
                events.append(
                    CutoffEvent("trip_pending", account, now_ms, state.level, Level.GRACE, balance_micro,
                                f"trip due but not executed: {reason_text()}")
                )
    else:
        new = replace(state, level=want, pending=None, restore_since_ms=None)

    alarm = new.level is not Level.NORMAL
    if alarm != new.alarm_on:
        for m in meters:
            actions.append(Action(RelayOp.ALARM_ON if alarm else RelayOp.ALARM_OFF, account, m, reason_text()))
        new = replace(new, alarm_on=alarm)
    if new.level != state.level:
        events.insert(
            0, CutoffEvent("state_change", account, now_ms, state.level, new.level, balance_micro, reason_text())
        )
    return CutoffDecision(new, tuple(actions), tuple(events), now_ms, balance_micro)


def reassert(
    state: CutoffState,
    meter: str,
    reported_open: bool,
    now_ms: int,
    contact: Contact,
    cfg: CutoffConfig,
    account: str,
) -> tuple[CutoffState, tuple[Action, ...]]:
    """Re-drive a relay whose reported state differs from what the policy decided.

    Covers a command lost between the commit of a decision and the relay (crash,
    bus error). Only relays the policy operated are re-driven: a trip is repeated
    while the policy holds the supply off and no protection or window applies; a
    close is repeated only for meters closed directly (with close-allowed the
    relay stays open until the customer presses the button). Rate-limited like
    every relay operation.
    """
    if _rate_limited(state, now_ms, cfg):
        return state, ()
    if state.relay_open and not reported_open:
        if protection(now_ms, contact, cfg) is not None or in_no_disconnect_window(now_ms, cfg):
            return state, ()
        why = f"relay of {meter} reported closed while the policy holds it open: trip repeated"
        return replace(state, last_relay_op_ms=now_ms), (Action(RelayOp.TRIP, account, meter, why),)
    if not state.relay_open and reported_open and state.last_relay_op_ms is not None:
        if cfg.close_mode_by_meter.get(meter, cfg.close_mode) is not CloseMode.DIRECT:
            return state, ()
        why = f"relay of {meter} reported open while the policy closed it: close repeated"
        return replace(state, last_relay_op_ms=now_ms), (Action(RelayOp.CLOSE, account, meter, why),)
    return state, ()


# ---------------------------------------------------------------------------
# Time: when the decision can change, following it, and saying what it means

# Evaluations one call of catch_up()/follow() makes at most between two inputs: far
# more than any real span needs (a change instant per window edge, delay or limit).
MAX_CATCH_UP = 10_000
# How far ahead a no-disconnect window's next edge is looked for (a window on
# holidays only may end days later); beyond it, "no edge".
WINDOW_HORIZON_DAYS = 400

_PROTECTION_TEXT: Mapping[Pending, str] = {
    Pending.PROTECTED: "account protected (保电)",
    Pending.CONTACT_LOST: "no contact with central",
    Pending.STARTUP: "start-up protection",
}


def local_text(tz: ZoneInfo, t_ms: int, ref_ms: int | None = None) -> str:
    """A local time for texts: ``08:00`` (``08:00:30`` with seconds, ``08:00:30.250``
    with milliseconds), prefixed by the date ``2026-03-07 08:00`` unless it is on the
    same local day as ``ref_ms``."""
    lt = to_local(tz, t_ms)
    hm = f"{lt.hour:02d}:{lt.minute:02d}"
    if lt.second or lt.microsecond:
        hm += f":{lt.second:02d}"
    if lt.microsecond:
        hm += f".{lt.microsecond // 1000:03d}"
    if ref_ms is not None and to_local(tz, ref_ms).date() == lt.date():
        return hm
    return f"{lt.date().isoformat()} {hm}"


def _day_instants(tz: ZoneInfo, d: date, minute: int) -> set[int]:
    """The instants at which local wall time on ``d`` reads ``minute`` (0..1440): both
    folds, so a repeated hour gives both and a skipped one gives instants around it."""
    if minute >= 1440:
        d, minute = d + timedelta(days=1), minute - 1440
    out = set()
    for fold in (0, 1):
        lt = datetime.combine(d, time(minute // 60, minute % 60), tzinfo=tz).replace(fold=fold)
        out.add(int(lt.timestamp() * 1000))
    return out


def _offset_changes(tz: ZoneInfo, lo_ms: int, hi_ms: int) -> list[int]:
    """Instants in (lo, hi] where the zone's UTC offset changes (at most one expected
    between two local midnights), found by bisection to the millisecond."""
    def off(t: int) -> timedelta | None:
        return to_local(tz, t).utcoffset()

    if hi_ms <= lo_ms or off(lo_ms) == off(hi_ms):
        return []
    a, b = lo_ms, hi_ms  # off(a) != off(b): the change is in (a, b]
    while b - a > 1:
        m = (a + b) // 2
        if off(m) == off(a):
            a = m
        else:
            b = m
    return [b]


def next_window_change_ms(after_ms: int, cfg: CutoffConfig) -> int | None:
    """The first instant after ``after_ms`` at which being inside a no-disconnect window
    changes (a window starts or ends); None without windows or edges in sight.

    Inside-or-not depends on the local date and minute only, so it can change only
    where local time reads a window's start or end, at local midnight (the day type
    changes) or where the UTC offset changes (a skipped hour jumps over an edge).
    Those candidates are generated day by day and checked in time order.
    """
    if not cfg.windows:
        return None
    tz = cfg.tz
    inside = in_no_disconnect_window(after_ms, cfg)
    minutes = sorted({0, *(w.start_min for w in cfg.windows), *(w.end_min for w in cfg.windows)})
    day = to_local(tz, after_ms).date() - timedelta(days=1)
    pool: list[int] = []
    mid = min(_day_instants(tz, day, 0))
    for _ in range(WINDOW_HORIZON_DAYS + 2):
        for m in minutes:
            pool.extend(_day_instants(tz, day, m))
        day += timedelta(days=1)
        next_mid = min(_day_instants(tz, day, 0))
        pool.extend(_offset_changes(tz, mid, next_mid))
        mid = next_mid
        # nothing generated for later days lies before this (offsets move by < 2 h)
        safe = next_mid - 2 * 3_600_000
        pool.sort()
        while pool and pool[0] <= safe:
            c = pool.pop(0)
            if c > after_ms and in_no_disconnect_window(c, cfg) != inside:
                return c
    return None


def _protection_ends(after_ms: int, contact: Contact, cfg: CutoffConfig) -> list[int]:
    """Instants after ``after_ms`` where :func:`protection` may change."""
    out = []
    lim = cfg.contact_protect_after_ms
    if lim is not None and contact.last_contact_ms is not None:
        out.append(contact.last_contact_ms + lim + 1)  # lost once now - last > lim
    if cfg.startup_protect_ms and contact.started_ms is not None:
        out.append(contact.started_ms + cfg.startup_protect_ms)
    return [t for t in out if t > after_ms]


def next_change_ms(
    state: CutoffState, balance_micro: int, after_ms: int, contact: Contact, cfg: CutoffConfig
) -> int | None:
    """The first instant after ``after_ms`` at which :func:`evaluate` may decide
    otherwise than at ``after_ms``, the balance and the contact staying as they are.

    ``state`` is the state after evaluating at ``after_ms``. None: nothing changes
    until an input does (a balance change, contact with central). Only a due trip
    or a held-off supply depends on time: window edges, start-up and contact
    protection, the relay rate limit, the reconnect delay. Alarm levels depend on
    the balance alone, so they change only when the balance does.
    """
    cands: list[int] = []
    if state.relay_open:
        cands += _protection_ends(after_ms, contact, cfg)
        if state.restore_since_ms is not None:
            cands.append(state.restore_since_ms + cfg.reconnect_delay_ms)
        if state.last_relay_op_ms is not None:
            cands.append(state.last_relay_op_ms + cfg.relay_min_interval_ms)
    elif band(balance_micro, cfg) is Level.CUTOFF:
        cands += _protection_ends(after_ms, contact, cfg)
        if state.last_relay_op_ms is not None:
            cands.append(state.last_relay_op_ms + cfg.relay_min_interval_ms)
        w = next_window_change_ms(after_ms, cfg)
        if w is not None:
            cands.append(w)
    later = [t for t in cands if t > after_ms]
    return min(later) if later else None


def catch_up(
    state: CutoffState,
    balance_micro: int,
    since_ms: int,
    until_ms: int,
    contact: Contact,
    cfg: CutoffConfig,
    account: str,
    *,
    inclusive: bool,
) -> tuple[CutoffState, list[CutoffDecision]]:
    """Evaluate at every instant in (since, until) — or (since, until] — at which the
    decision may change, with the balance and contact unchanged."""
    out: list[CutoffDecision] = []
    t = since_ms
    for _ in range(MAX_CATCH_UP):
        n = next_change_ms(state, balance_micro, t, contact, cfg)
        if n is None or n > until_ms or (n == until_ms and not inclusive):
            break
        d = evaluate(state, balance_micro, n, contact, cfg, account)
        out.append(d)
        state, t = d.state, n
    return state, out


@dataclass(frozen=True)
class PolicyPoint:
    """Where the policy of an account was last evaluated: the instant and the balance."""

    time_ms: int
    balance_micro: int


def follow(
    state: CutoffState,
    point: PolicyPoint | None,
    changes: Sequence[tuple[int, int]],
    until_ms: int,
    contact: Contact,
    cfg: CutoffConfig,
    account: str,
    *,
    balance_micro: int | None = None,
) -> tuple[CutoffState, PolicyPoint, list[CutoffDecision]]:
    """Evaluate the policy of one account from ``point`` up to ``until_ms``.

    ``changes`` are the balance changes since ``point`` in the order they happened:
    (instant, balance after). Each is evaluated at its instant (or at the last
    evaluated instant, if it lies before it: time is never evaluated backwards),
    after evaluating every instant in between at which the decision may change
    (:func:`next_change_ms`); finally up to ``until_ms`` inclusive, where the policy
    is evaluated once more (contact may have changed). Returns the state, the new
    point and the decisions that did something (actions or events), in order.

    Without a ``point`` (nothing evaluated yet, e.g. after a restart) the changes
    are not replayed: the policy is evaluated at ``until_ms`` with ``balance_micro``
    (the current balance; by default the last change's).
    """
    out: list[CutoffDecision] = []

    def keep(d: CutoffDecision) -> None:
        if d.actions or d.events:
            out.append(d)

    if point is None:
        bal = balance_micro if balance_micro is not None else (changes[-1][1] if changes else 0)
        d = evaluate(state, bal, until_ms, contact, cfg, account)
        keep(d)
        return d.state, PolicyPoint(until_ms, bal), out
    t, bal = point.time_ms, point.balance_micro
    for tc, bc in changes:
        te = max(tc, t)
        state, ds = catch_up(state, bal, t, te, contact, cfg, account, inclusive=False)
        for d in ds:
            keep(d)
        bal = bc
        d = evaluate(state, bal, te, contact, cfg, account)
        keep(d)
        state, t = d.state, te
    end = max(until_ms, t)
    state, ds = catch_up(state, bal, t, end, contact, cfg, account, inclusive=True)
    for d in ds:
        keep(d)
    if not ds or ds[-1].time_ms != end:
        d = evaluate(state, bal, end, contact, cfg, account)
        keep(d)
        state = d.state
    return state, PolicyPoint(end, bal), out


def _waiting(state: CutoffState, now_ms: int, contact: Contact, cfg: CutoffConfig) -> str:
    """Why a due relay operation waits, and until when (in words)."""
    p = state.pending
    tz = cfg.tz
    if p is Pending.NO_DISCONNECT_WINDOW:
        end = next_window_change_ms(now_ms, cfg)
        return "no-disconnect window" + ("" if end is None else f" until {local_text(tz, end, now_ms)}")
    if p is Pending.RATE_LIMIT and state.last_relay_op_ms is not None:
        end = state.last_relay_op_ms + cfg.relay_min_interval_ms
        return f"relay rate limit until {local_text(tz, end, now_ms)}"
    if p is Pending.RECONNECT_DELAY and state.restore_since_ms is not None:
        end = state.restore_since_ms + cfg.reconnect_delay_ms
        return f"reconnect delay until {local_text(tz, end, now_ms)}"
    if p is Pending.STARTUP and contact.started_ms is not None:
        end = contact.started_ms + cfg.startup_protect_ms
        return f"start-up protection until {local_text(tz, end, now_ms)}"
    if p is Pending.CONTACT_LOST:
        lim = cfg.contact_protect_after_ms or 0
        if contact.last_contact_ms is None:
            return "no contact with central since the gateway started"
        return (f"no contact with central since {local_text(tz, contact.last_contact_ms, now_ms)}"
                f" (more than {lim // 1000} s)")
    if p is not None and p in _PROTECTION_TEXT:
        return _PROTECTION_TEXT[p]
    return "" if p is None else p.value.replace("_", " ")


def describe(
    state: CutoffState, balance_micro: int, now_ms: int, contact: Contact, cfg: CutoffConfig
) -> str:
    """What the state means for the customer, in words, e.g. ``supply on: low balance
    (alarm 1 at 10.00)``, ``cut pending: no-disconnect window until 08:00``,
    ``supply cut (balance -2.40, cut level -2.00); restore above 1.00``,
    ``restore pending: reconnect delay until 10:31``."""
    lvl = state.level
    if state.relay_open:
        if state.pending is not None:
            return f"restore pending: {_waiting(state, now_ms, contact, cfg)}"
        return (f"supply cut (balance {_yuan(balance_micro)}, cut level {cut_level_text(cfg)});"
                f" restore above {yuan_text(cfg.close_permit_micro)}")
    if state.pending is not None:
        return f"cut pending: {_waiting(state, now_ms, contact, cfg)}"
    if lvl is Level.NORMAL:
        return "supply on"
    if lvl is Level.ALARM1:
        return f"supply on: low balance (alarm 1 at {yuan_text(cfg.alarm1_micro)})"
    if lvl is Level.ALARM2:
        return (f"supply on: balance nearly used up (alarm 2 at {yuan_text(cfg.alarm2_micro)},"
                f" cut at {cut_level_text(cfg)})")
    if lvl is Level.GRACE:
        return f"supply on: in overdraft, cut at {cut_level_text(cfg)}"
    return f"cut due (balance {_yuan(balance_micro)})"

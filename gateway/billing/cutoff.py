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
happens at the first evaluation after the reason is gone. Protection also
restores a tripped supply. A restore by balance waits ``reconnect_delay_ms``
of continuously sufficient balance, then closes directly or sends
close-allowed (the customer presses the meter's button), per meter.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

from gateway.billing.daytypes import DayCalendar, DayType
from gateway.billing.money import report_yuan
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


class ActionKind(enum.StrEnum):
    TRIP = "trip"
    CLOSE = "close"
    CLOSE_ALLOWED = "close_allowed"
    ALARM_ON = "alarm_on"
    ALARM_OFF = "alarm_off"


class Pending(enum.StrEnum):
    """Why a due relay operation is not executed yet."""

    PROTECTED = "protected"
    CONTACT_LOST = "contact_lost"
    STARTUP = "startup"
    NO_DISCONNECT_WINDOW = "no_disconnect_window"
    RATE_LIMIT = "rate_limit"
    RECONNECT_DELAY = "reconnect_delay"


class CutoffConfigError(ValueError):
    """Cutoff limits that contradict each other."""


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
    kind: ActionKind
    account: str
    meter: str  # "" when the account has no meter list (account-level relay)
    reason: str

    @property
    def relay_open(self) -> bool | None:
        """The argument for ``RelayController.set_open(meter, open)``; None for alarm actions.

        Close-allowed is ``False`` too: the actuator decides whether a close is
        direct or left to the customer's button (DL/T 645 1C vs 1B)."""
        if self.kind is ActionKind.TRIP:
            return True
        if self.kind in (ActionKind.CLOSE, ActionKind.CLOSE_ALLOWED):
            return False
        return None


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
    return f"{report_yuan(micro)}"


def _band_reason(balance: int, lvl: Level, cfg: CutoffConfig) -> str:
    b = _yuan(balance)
    if lvl is Level.NORMAL:
        return f"balance {b} > alarm1 {_yuan(cfg.alarm1_micro)}"
    if lvl is Level.ALARM1:
        return f"balance {b} <= alarm1 {_yuan(cfg.alarm1_micro)}"
    if lvl is Level.ALARM2:
        return f"balance {b} <= alarm2 {_yuan(cfg.alarm2_micro)}"
    if lvl is Level.GRACE:
        return f"balance {b} <= 0, above the overdraft limit -{_yuan(cfg.overdraft_micro)}"
    return f"balance {b} <= overdraft limit -{_yuan(cfg.overdraft_micro)}"


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
    reason = _band_reason(balance_micro, want, cfg)

    def relay(kind: ActionKind, why: str) -> None:
        for m in meters:
            k = kind
            if kind is ActionKind.CLOSE:
                mode = cfg.close_mode_by_meter.get(m, cfg.close_mode)
                k = ActionKind.CLOSE if mode is CloseMode.DIRECT else ActionKind.CLOSE_ALLOWED
            actions.append(Action(k, account, m, why))

    if state.relay_open:
        if prot is not None:
            restore_why: str | None = f"{prot.value}: supply restored"
            since = now_ms  # protection restores without the reconnect delay
            delay = 0
        elif balance_micro > cfg.close_permit_micro:
            restore_why = f"balance {_yuan(balance_micro)} > close permit {_yuan(cfg.close_permit_micro)}"
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
            relay(ActionKind.CLOSE, restore_why)
            lvl = Level.GRACE if want is Level.CUTOFF else want
            new = CutoffState(lvl, False, state.alarm_on, prot if want is Level.CUTOFF else None, None, now_ms)
            reason = restore_why
        if new.pending is not None and new.pending != state.pending:
            events.append(
                CutoffEvent("restore_pending", account, now_ms, state.level, new.level, balance_micro,
                            f"restore due ({restore_why}) but waiting: {new.pending.value}")
            )
    elif want is Level.CUTOFF:
        blocker = prot
        if blocker is None and in_no_disconnect_window(now_ms, cfg):
            blocker = Pending.NO_DISCONNECT_WINDOW
        if blocker is None and _rate_limited(state, now_ms, cfg):
            blocker = Pending.RATE_LIMIT
        if blocker is None:
            relay(ActionKind.TRIP, reason)
            new = CutoffState(Level.CUTOFF, True, state.alarm_on, None, None, now_ms)
        else:
            new = replace(state, level=Level.GRACE, pending=blocker, restore_since_ms=None)
            reason = f"{reason}; trip deferred: {blocker.value}"
            if blocker != state.pending:
                events.append(
                    CutoffEvent("trip_pending", account, now_ms, state.level, Level.GRACE, balance_micro,
                                f"trip due but not executed: {reason}")
                )
    else:
        new = replace(state, level=want, pending=None, restore_since_ms=None)

    alarm = new.level is not Level.NORMAL
    if alarm != new.alarm_on:
        for m in meters:
            actions.append(Action(ActionKind.ALARM_ON if alarm else ActionKind.ALARM_OFF, account, m, reason))
        new = replace(new, alarm_on=alarm)
    if new.level != state.level:
        events.insert(
            0, CutoffEvent("state_change", account, now_ms, state.level, new.level, balance_micro, reason)
        )
    return CutoffDecision(new, tuple(actions), tuple(events))


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
        return replace(state, last_relay_op_ms=now_ms), (Action(ActionKind.TRIP, account, meter, why),)
    if not state.relay_open and reported_open and state.last_relay_op_ms is not None:
        if cfg.close_mode_by_meter.get(meter, cfg.close_mode) is not CloseMode.DIRECT:
            return state, ()
        why = f"relay of {meter} reported open while the policy closed it: close repeated"
        return replace(state, last_relay_op_ms=now_ms), (Action(ActionKind.CLOSE, account, meter, why),)
    return state, ()

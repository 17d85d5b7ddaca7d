"""Caring reminders, the pure part: which gateway events become notices, and when
each notice may go out.

The gateway reports its cutoff policy's decisions as events (docs/billing.md,
"Cutoff policy"): ``cutoff.state_change`` (``from`` / ``to`` among normal,
alarm1, alarm2, grace, cutoff; ``balance``, ``state``, ``reason``) and
``cutoff.trip_pending`` (a due cut held back, e.g. by a no-disconnect window).
:func:`notices_of` turns the events of a stored batch into notices, which the
stores queue (``notify_queue``) in the batch's own transaction — so a notice
is queued exactly once, like the event, and survives any restart:

=====================  ===========================================  =========
notice                 event                                        class
=====================  ===========================================  =========
``low_balance``        state_change down to ``alarm1``              reminder
``nearly_used_up``     state_change down to ``alarm2``              reminder
``overdraft``          state_change down to ``grace``               reminder
``cut_pending``        trip_pending                                 reminder
``cutoff``             state_change to ``cutoff``                   urgent
``restored``           state_change from ``cutoff`` to another      urgent
``clear``              state_change up (towards ``normal``)         — (never
                                                                    sent)
=====================  ===========================================  =========

:func:`plan` decides, for one account's pending notices, what to do now:

* **Only the newest matters.** A later notice supersedes every earlier
  reminder not yet sent (alarm 2 makes alarm 1 old news; a cut makes both
  pointless; a top-up back above the alarm level — ``clear`` — withdraws
  them), and a later urgent notice supersedes an earlier unsent urgent one
  (a cut already restored is not announced). So at most one reminder and one
  urgent notice per account are ever waiting.
* **Quiet hours** (the customer's, in the customer's time zone) hold
  reminders until they end. Urgent notices go at once: a cut that has
  happened is what the customer must know now (the supply is already off,
  and the message says how to restore it), and a restore answers a payment
  the customer has just made — as utilities send disconnection and payment
  notices. Cuts themselves happen only outside the no-disconnect windows the
  gateway keeps, which are usually the nights.
* **Rate limits**, per customer: a reminder waits until ``reminder_interval``
  after the last message of any kind sent to that customer; urgent notices,
  at most ``urgent_max`` per ``urgent_window`` (a relay that flaps does not
  flood a phone), beyond that they wait.
* **Age**: a reminder older than ``reminder_max_age`` (a gateway's backlog
  after days offline) or an urgent notice older than ``urgent_max_age``
  expires unsent.
* An account with no customer on file is ``unaddressed`` (final, logged).

Everything here is a function of its arguments (time included).
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import orjson

from firmware_bridge.errors import EdgeGwError, ErrorKind

LEVELS = ("normal", "alarm1", "alarm2", "grace", "cutoff")  # by severity
_SEVERITY = {name: i for i, name in enumerate(LEVELS)}


class NoticeKind(enum.StrEnum):
    LOW_BALANCE = "low_balance"
    NEARLY_USED_UP = "nearly_used_up"
    OVERDRAFT = "overdraft"
    CUT_PENDING = "cut_pending"
    CUTOFF = "cutoff"
    RESTORED = "restored"
    CLEAR = "clear"  # balance back up: withdraws pending reminders, never sent

    @property
    def urgent(self) -> bool:
        return self in (NoticeKind.CUTOFF, NoticeKind.RESTORED)

    @property
    def sendable(self) -> bool:
        return self is not NoticeKind.CLEAR


REMINDERS = (NoticeKind.LOW_BALANCE, NoticeKind.NEARLY_USED_UP, NoticeKind.OVERDRAFT, NoticeKind.CUT_PENDING)
SENDABLE = tuple(k for k in NoticeKind if k.sendable)
_DOWN_TO = {"alarm1": NoticeKind.LOW_BALANCE, "alarm2": NoticeKind.NEARLY_USED_UP, "grace": NoticeKind.OVERDRAFT}
# Facts a notice keeps from its event (all that the templates may use).
FACT_KEYS = ("balance", "balance_micro", "from", "to", "state", "reason")


class RecordLike(Protocol):
    @property
    def id(self) -> int: ...

    @property
    def kind(self) -> str: ...

    @property
    def created_ms(self) -> int: ...

    @property
    def body(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Notice:
    """A notice to queue: named by the event it comes from."""

    notice_id: str
    gateway: str
    account: str
    kind: NoticeKind
    event_type: str
    event_ms: int
    facts: dict[str, Any] = field(default_factory=dict)


def notice_id(gateway: str, epoch: str, record_id: int) -> str:
    """``gateway/epoch/record id``: the event's identity at central, so one event is one notice."""
    return f"{gateway}/{epoch}/{record_id}"


def kind_of(body: dict[str, Any]) -> NoticeKind | None:
    """The notice an event body makes (None: not one for the customer)."""
    etype = body.get("type")
    if etype == "cutoff.trip_pending":
        return NoticeKind.CUT_PENDING
    if etype != "cutoff.state_change":
        return None
    before, after = body.get("from"), body.get("to")
    if before not in _SEVERITY or after not in _SEVERITY or before == after:
        return None
    if after == "cutoff":
        return NoticeKind.CUTOFF
    if before == "cutoff":
        return NoticeKind.RESTORED
    if _SEVERITY[after] < _SEVERITY[before]:
        return NoticeKind.CLEAR
    return _DOWN_TO[after]


def notices_of(gateway: str, epoch: str, new_records: Iterable[RecordLike]) -> list[Notice]:
    """The notices of a stored batch's new records (events of other kinds, and events
    without an account, make none)."""
    out = []
    for r in new_records:
        if r.kind != "event":
            continue
        body = r.body
        kind = kind_of(body)
        account = body.get("account")
        if kind is None or not isinstance(account, str) or not account:
            continue
        t = body.get("time_ms")
        event_ms = t if isinstance(t, int) and not isinstance(t, bool) else int(r.created_ms)
        facts = {k: body[k] for k in FACT_KEYS if k in body}
        out.append(
            Notice(notice_id(gateway, epoch, r.id), gateway, account, kind, str(body["type"]), event_ms, facts)
        )
    return out


# -- the queue's rows (both stores; ``?`` placeholders, store_pg swaps them) ---------

QUEUE_COLUMNS = """
    notice_id       TEXT    NOT NULL UNIQUE,
    gateway_id      TEXT    NOT NULL,
    account         TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    event_type      TEXT    NOT NULL,
    event_ms        {INT}   NOT NULL,
    facts           TEXT    NOT NULL,
    enqueued_ms     {INT}   NOT NULL,
    state           TEXT    NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms {INT}   NOT NULL DEFAULT 0,
    decided_ms      {INT},
    sent_ms         {INT},
    recipient       TEXT,
    language        TEXT,
    text            TEXT,
    http_status     INTEGER,
    detail          TEXT"""


def queue_schema(*, serial: str, int_type: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS notify_queue (\n    id {serial},"
        + QUEUE_COLUMNS.format(INT=int_type)
        + "\n);\n"
        "CREATE INDEX IF NOT EXISTS notify_queue_due ON notify_queue (state, next_attempt_ms);\n"
        "CREATE INDEX IF NOT EXISTS notify_queue_account ON notify_queue (account, state);\n"
    )


SQLITE_SCHEMA = queue_schema(serial="INTEGER PRIMARY KEY AUTOINCREMENT", int_type="INTEGER")
PG_SCHEMA = queue_schema(serial="BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", int_type="BIGINT")

INSERT = (
    "INSERT INTO notify_queue (notice_id, gateway_id, account, kind, event_type, event_ms, facts,"
    " enqueued_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (notice_id) DO NOTHING"
)


def statements(notices: Iterable[Notice], now_ms: int) -> list[tuple[str, tuple[Any, ...]]]:
    return [
        (INSERT, (n.notice_id, n.gateway, n.account, n.kind.value, n.event_type, n.event_ms,
                  orjson.dumps(n.facts, option=orjson.OPT_SORT_KEYS).decode(), now_ms))
        for n in notices
    ]  # fmt: skip


# -- when to send ---------------------------------------------------------------------


class QuietHoursError(EdgeGwError, ValueError):
    """A quiet-hours text that is not ``HH:MM-HH:MM``."""

    kind = ErrorKind.INVALID


@dataclass(frozen=True)
class QuietHours:
    """Local minutes of the day [start, end); ``end <= start`` runs over midnight;
    ``start == end`` means none."""

    start_min: int
    end_min: int

    @classmethod
    def parse(cls, text: str) -> QuietHours | None:
        """``"21:00-08:00"``; ``""`` or ``"none"``: no quiet hours (None)."""
        if text.strip().lower() in ("", "none"):
            return None
        try:
            a, b = text.split("-")
            return cls(_minutes(a), _minutes(b))
        except ValueError:
            raise QuietHoursError(f"quiet hours must be HH:MM-HH:MM (e.g. 21:00-08:00), got {text!r}") from None

    def contains(self, minute: int) -> bool:
        if self.start_min == self.end_min:
            return False
        if self.start_min < self.end_min:
            return self.start_min <= minute < self.end_min
        return minute >= self.start_min or minute < self.end_min

    def text(self) -> str:
        return f"{self.start_min // 60:02d}:{self.start_min % 60:02d}-{self.end_min // 60:02d}:{self.end_min % 60:02d}"


def _minutes(hhmm: str) -> int:
    h, m = hhmm.strip().split(":")
    if not (h.isdigit() and m.isdigit() and len(m) == 2 and int(h) < 24 and int(m) < 60):
        raise ValueError(hhmm)
    return int(h) * 60 + int(m)


def quiet_until(now_ms: int, tz: ZoneInfo, quiet: QuietHours | None) -> int | None:
    """When the quiet hours around ``now_ms`` end (epoch ms), None outside them.

    Walks local wall-clock minutes, so a UTC offset change inside the quiet
    hours (summer time) is followed; a local end time that does not exist on
    that day (skipped by a change) is the first instant after it."""
    if quiet is None:
        return None
    local = dt.datetime.fromtimestamp(now_ms / 1000, tz)
    minute = local.hour * 60 + local.minute
    if not quiet.contains(minute):
        return None
    day = local.date()
    if quiet.start_min > quiet.end_min and minute >= quiet.start_min:
        day += dt.timedelta(days=1)  # the quiet hours end tomorrow morning
    end_local = dt.datetime.combine(day, dt.time(quiet.end_min // 60, quiet.end_min % 60), tz)
    end_ms = int(end_local.timestamp() * 1000)
    # fold/gap: never earlier than now, at most a day away
    return max(end_ms, now_ms + 1)


@dataclass(frozen=True)
class Policy:
    reminder_interval_ms: int = 6 * 3600_000
    urgent_max: int = 4
    urgent_window_ms: int = 3600_000
    reminder_max_age_ms: int = 24 * 3600_000
    urgent_max_age_ms: int = 72 * 3600_000

    @property
    def history_ms(self) -> int:
        """How far back :func:`plan` needs the messages sent."""
        return max(self.reminder_interval_ms, self.urgent_window_ms)


@dataclass(frozen=True)
class Recipient:
    account: str
    phone: str
    language: str
    tz: ZoneInfo
    quiet: QuietHours | None
    name: str = ""


@dataclass(frozen=True)
class Queued:
    """A pending row of the queue, as :func:`plan` sees it."""

    id: int  # queue order
    notice_id: str
    kind: NoticeKind
    event_ms: int
    attempts: int = 0
    next_attempt_ms: int = 0


@dataclass(frozen=True)
class SentBefore:
    sent_ms: int
    urgent: bool


class Act(enum.StrEnum):
    SEND = "send"
    WAIT = "wait"  # stays pending until ``until_ms``
    SUPERSEDED = "superseded"
    CLEARED = "cleared"  # a clear notice, done
    EXPIRED = "expired"
    UNADDRESSED = "unaddressed"


FINAL = (Act.SUPERSEDED, Act.CLEARED, Act.EXPIRED, Act.UNADDRESSED)


@dataclass(frozen=True)
class Decision:
    notice_id: str
    act: Act
    until_ms: int | None = None  # WAIT: when to look again
    why: str = ""


def plan(
    pending: Sequence[Queued],
    sent: Sequence[SentBefore],
    recipient: Recipient | None,
    now_ms: int,
    policy: Policy,
) -> list[Decision]:
    """One decision for every pending notice of one account (see the module doc)."""
    rows = sorted(pending, key=lambda q: (q.event_ms, q.id))
    out: list[Decision] = []
    live: list[Queued] = []
    for i, q in enumerate(rows):
        later = rows[i + 1 :]
        if not q.kind.urgent and later:
            out.append(Decision(q.notice_id, Act.SUPERSEDED, why=f"superseded by {later[-1].kind.value}"))
        elif q.kind.urgent and any(x.kind.urgent for x in later):
            out.append(Decision(q.notice_id, Act.SUPERSEDED, why="superseded by a later supply change"))
        elif q.kind is NoticeKind.CLEAR:
            out.append(Decision(q.notice_id, Act.CLEARED, why="balance back up"))
        else:
            live.append(q)
    reminders_after = max((s.sent_ms for s in sent), default=None)
    urgent_sent = sorted(s.sent_ms for s in sent if s.urgent and s.sent_ms > now_ms - policy.urgent_window_ms)
    for q in live:  # at most one urgent, then at most one reminder after it, in time order
        age = now_ms - q.event_ms
        limit = policy.urgent_max_age_ms if q.kind.urgent else policy.reminder_max_age_ms
        if age > limit:
            out.append(Decision(q.notice_id, Act.EXPIRED, why=f"event {age // 1000} s old"))
            continue
        if recipient is None:
            out.append(Decision(q.notice_id, Act.UNADDRESSED, why="no customer on file for the account"))
            continue
        if q.attempts and q.next_attempt_ms > now_ms:
            out.append(Decision(q.notice_id, Act.WAIT, q.next_attempt_ms, "retry back-off"))
            continue
        if q.kind.urgent:
            if len(urgent_sent) >= policy.urgent_max:
                until = urgent_sent[-policy.urgent_max] + policy.urgent_window_ms
                out.append(Decision(q.notice_id, Act.WAIT, until, "urgent rate limit"))
                continue
            urgent_sent.append(now_ms)
        else:
            quiet_end = quiet_until(now_ms, recipient.tz, recipient.quiet)
            if quiet_end is not None:
                out.append(Decision(q.notice_id, Act.WAIT, quiet_end, "quiet hours"))
                continue
            if reminders_after is not None and now_ms < reminders_after + policy.reminder_interval_ms:
                until = reminders_after + policy.reminder_interval_ms
                out.append(Decision(q.notice_id, Act.WAIT, until, "reminder rate limit"))
                continue
        out.append(Decision(q.notice_id, Act.SEND))
        reminders_after = now_ms
    return out

"""Central's command queue, the pure part: delivery states and what moves them.

Every command central sends a gateway goes through these states:

=============  ===============================================================
``queued``     central holds it and will (re)send it: new, or waiting to be
               re-signed (``resign``) or retried (a top-up whose purchase
               counter the gateway cannot take yet, ``counter_gap``)
``sent``       published at QoS 1, no result from the gateway yet; published
               again while no result comes (:func:`resend_delay_ms`)
``applied``    the gateway reported it applied (``applied`` or ``duplicate``,
               or a ``replay`` refusal: the very same envelope was accepted
               before)
``refused``    the gateway refused it for good (reason, code and message
               kept); never sent again
``expired``    its expiry passed before the gateway applied it (central's
               clock, or the gateway's ``expired`` refusal); never sent again
``superseded`` a relay operation the gateway could not take in order, while
               a later operation of the same meter was applied: re-signing it
               would undo the later one, so it is dropped
=============  ===============================================================

``applied`` is the gateway's word that the effect happened: it wins over
everything (a result can arrive after central expired the command, or
after a duplicate delivery was refused), and nothing moves a command out of
it. The other final states change only to ``applied``.

Results come from the gateway's ``command_result`` events (docs/security.md
§8), which reach central inside the gateway's batches: :func:`parse_result`
reads one, :func:`on_result` says what it does to a command. The gateway
answers every delivery, so a command resent a few times gets several
results; they are idempotent here. A result is matched to a command by the
command id *and* the gateway whose batch carried it, so a gateway can only
ever report on its own commands.

Everything here is a function of its arguments (time included); the store
(:mod:`headend.central_db`) applies the transitions in its transactions.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class State(enum.StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    APPLIED = "applied"
    REFUSED = "refused"
    EXPIRED = "expired"
    SUPERSEDED = "superseded"


OPEN = frozenset({State.QUEUED, State.SENT})  # central still sends these
FINAL = frozenset(State) - OPEN

# Resending a command that has no result yet: 30 s after the first send,
# doubling, at most every 15 min while the gateway is reachable.
FIRST_RESEND_MS = 30_000
MAX_RESEND_MS = 15 * 60_000
# A top-up whose purchase counter the gateway cannot take yet (an earlier one
# of the account has not arrived) is tried again after this long, or at once
# when an earlier top-up of the account is applied.
GAP_RETRY_MS = 10 * 60_000
# After a gateway comes back online, the broker delivers what it queued for
# the gateway's session; central waits this long for the results before it
# resends anything.
ONLINE_GRACE_MS = 30_000
# Commands sent and not answered, per gateway (the gateway's inbox holds 64).
WINDOW = 8

# Refusals that do not end a command: central re-signs it with a fresh counter
# under the same id (docs/security.md §3).
RESIGN_REASONS = frozenset({"counter_stale", "issued_before_recovery"})
# Ledger codes of a refused top-up that clear once an earlier top-up arrives.
RETRY_CODES = frozenset({"counter_gap"})


def resend_delay_ms(attempts: int) -> int:
    """How long after its ``attempts``-th send an unanswered command is sent again."""
    if attempts < 1:
        return 0
    return min(MAX_RESEND_MS, FIRST_RESEND_MS << min(attempts - 1, 20))


@dataclass(frozen=True)
class Result:
    """A gateway's ``command_result`` event, as central reads it."""

    command_id: str
    outcome: str  # applied | duplicate | rejected
    reason: str | None = None
    code: str | None = None
    message: str = ""
    effect: Mapping[str, Any] | None = None
    command_type: str | None = None
    channel: str | None = None
    at_ms: int | None = None

    @property
    def is_applied(self) -> bool:
        """The gateway holds the effect: applied now, before (duplicate), or this very
        envelope was accepted before (its re-delivery refused as a replay)."""
        return self.outcome in ("applied", "duplicate") or (
            self.outcome == "rejected" and self.reason == "replay"
        )


def _text(v: Any, limit: int) -> str | None:
    return v[:limit] if isinstance(v, str) and v else None


def parse_result(body: Any) -> Result | None:
    """The result a ``command_result`` event body carries; None for any other event,
    and for results that name no command (a failure, or an envelope that did not
    parse: central learns nothing it could match, and resends)."""
    if not isinstance(body, Mapping) or body.get("type") != "command_result":
        return None
    cid = body.get("id")
    outcome = body.get("outcome")
    if not isinstance(cid, str) or not cid or len(cid) > 64:
        return None
    if outcome not in ("applied", "duplicate", "rejected"):
        return None
    effect = body.get("effect")
    at = body.get("at_ms")
    return Result(
        command_id=cid,
        outcome=str(outcome),
        reason=_text(body.get("reason"), 64),
        code=_text(body.get("code"), 64),
        message=_text(body.get("message"), 500) or "",
        effect=dict(effect) if isinstance(effect, Mapping) else None,
        command_type=_text(body.get("command_type"), 64),
        channel=_text(body.get("channel"), 32),
        at_ms=at if isinstance(at, int) and not isinstance(at, bool) else None,
    )


class Action(enum.StrEnum):
    APPLY = "apply"  # -> applied
    REFUSE = "refuse"  # -> refused (final)
    EXPIRE = "expire"  # -> expired (final)
    RESIGN = "resign"  # -> queued, re-signed with a fresh counter before the next send
    RETRY = "retry"  # -> queued, sent again after a while (or when unblocked)
    SUPERSEDE = "supersede"  # -> superseded (final)
    IGNORE = "ignore"  # nothing changes


@dataclass(frozen=True)
class Transition:
    action: Action
    state: State | None = None  # the new state (None: unchanged)
    reason: str | None = None
    code: str | None = None
    message: str = ""
    next_attempt_ms: int | None = None


def on_result(
    state: State,
    result: Result,
    *,
    command_type: str,
    now_ms: int,
    expires_ms: int,
    later_relay_applied: bool = False,
) -> Transition:
    """What ``result`` does to a command in ``state``.

    ``later_relay_applied``: for a relay operation, whether a later operation of
    the same meter was applied (then a stale one is dropped, not re-signed).
    """
    if state is State.APPLIED:
        return Transition(Action.IGNORE)
    if result.is_applied:
        return Transition(Action.APPLY, State.APPLIED)
    if state in FINAL:
        return Transition(Action.IGNORE)  # a late refusal of a copy changes nothing
    reason = result.reason or "rejected"
    if reason == "expired":
        return Transition(Action.EXPIRE, State.EXPIRED, reason, result.code, result.message)
    if reason in RESIGN_REASONS:
        if command_type == "relay.operate" and later_relay_applied:
            return Transition(
                Action.SUPERSEDE,
                State.SUPERSEDED,
                "superseded",
                reason,
                "a later relay operation of this meter was applied first",
            )
        if now_ms >= expires_ms:
            return Transition(Action.EXPIRE, State.EXPIRED, "expired", reason, result.message)
        return Transition(
            Action.RESIGN, State.QUEUED, reason, result.code, result.message, now_ms
        )
    if reason == "bad_body" and result.code in RETRY_CODES:
        return Transition(
            Action.RETRY,
            State.QUEUED,
            reason,
            result.code,
            result.message,
            now_ms + GAP_RETRY_MS,
        )
    return Transition(Action.REFUSE, State.REFUSED, reason, result.code, result.message)


def expired_at_central(state: State, expires_ms: int, now_ms: int) -> bool:
    """An open command whose expiry passed: central marks it expired and never sends it."""
    return state in OPEN and now_ms >= expires_ms


@dataclass(frozen=True)
class Presence:
    """A gateway's presence as its retained ``state`` topic last said."""

    online: bool
    since_ms: int


def may_resend(presence: Presence | None, now_ms: int) -> bool:
    """Whether to publish again a command already sent (its resend time is due).

    Not while the gateway is offline: its persistent session holds what was
    published, and the broker delivers it on the gateway's return. Not in the
    first :data:`ONLINE_GRACE_MS` after it came back either, while those
    deliveries are answered. Unknown presence resends (a broker without the
    retained state, a gateway that never connected)."""
    if presence is None:
        return True
    if not presence.online:
        return False
    return now_ms >= presence.since_ms + ONLINE_GRACE_MS


@dataclass(frozen=True)
class Pending:
    """An open command, as the dispatcher picks what to publish."""

    seq: int
    gateway_id: str
    state: State
    next_attempt_ms: int
    expires_ms: int


@dataclass(frozen=True)
class Pick:
    to_expire: tuple[int, ...]  # seqs
    to_send: tuple[int, ...]  # seqs, in order


def pick(
    pending: list[Pending],
    in_flight: Mapping[str, int],
    presence: Mapping[str, Presence],
    now_ms: int,
    *,
    window: int = WINDOW,
) -> Pick:
    """Which open commands to expire and which to publish now (in queue order).

    ``pending``: open commands whose next attempt is due, in queue order;
    ``in_flight``: per gateway, the commands in state ``sent``. A command that
    was never sent goes out while its gateway has fewer than ``window`` in
    flight; a resend only when :func:`may_resend` allows it.
    """
    expire: list[int] = []
    send: list[int] = []
    flight = dict(in_flight)
    due = [p for p in sorted(pending, key=lambda p: p.seq) if p.next_attempt_ms <= now_ms]
    live: list[Pending] = []
    for p in due:  # expiries first: an expired command frees its place in the window
        if expired_at_central(p.state, p.expires_ms, now_ms):
            if p.state is State.SENT:
                flight[p.gateway_id] = flight.get(p.gateway_id, 0) - 1
            expire.append(p.seq)
        else:
            live.append(p)
    for p in live:
        if p.state is State.SENT:
            if may_resend(presence.get(p.gateway_id), now_ms):
                send.append(p.seq)
            continue
        if flight.get(p.gateway_id, 0) < window:
            flight[p.gateway_id] = flight.get(p.gateway_id, 0) + 1
            send.append(p.seq)
    return Pick(tuple(expire), tuple(send))

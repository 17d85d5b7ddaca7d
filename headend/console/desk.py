"""Where the console hands the commands an operator asks for: the command desk.

The console checks who may ask (role), that the form is genuine (CSRF) and
that the input is well formed; signing the command with the key of its role,
assigning the account's purchase counter, queueing it durably and resending it
until the gateway answers is the command queue's work. The console talks to
it through :class:`CommandDesk`. A headend without one shows the forms to
those allowed to use them and answers a submission with "no command queue
configured" (503) — nothing is half-done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from firmware_bridge.errors import EdgeGwError, ErrorKind


class DeskError(EdgeGwError):
    """The command queue refused the command (the message says why, for the operator)."""

    kind = ErrorKind.REFUSED


@dataclass(frozen=True)
class QueuedCommand:
    """A command in the queue and where its delivery stands.

    ``state`` is the queue's (queued: not sent yet; sent: published, no answer
    from the gateway yet — an offline gateway's broker holds it; applied: the
    gateway applied it; refused, expired, superseded). Times are central's
    (milliseconds): ``first_sent_ms``/``last_sent_ms`` when it was published,
    ``answered_ms`` when the gateway's answer that settled it arrived,
    ``credited_ms`` when the gateway's ledger credit of a top-up arrived
    (``credited_micro``: the amount the ledger credited)."""

    command_id: str
    type: str  # topup, relay.operate, ...
    created_ms: int
    state: str  # e.g. queued, sent, applied, refused, expired
    detail: str = ""
    operator: str = ""
    account: str | None = None
    meter: str | None = None
    amount_micro: int | None = None
    purchase_counter: int | None = None
    payment_channel: str | None = None
    attempts: int = 0
    first_sent_ms: int | None = None
    last_sent_ms: int | None = None
    answered_ms: int | None = None
    credited_micro: int | None = None
    credited_ms: int | None = None


class CommandDesk(Protocol):
    async def sell_topup(
        self, *, gateway: str, account: str, amount_micro: int, operator: str, request_id: str
    ) -> str:
        """Queue a top-up; its command id. ``request_id`` makes a resubmitted form one top-up."""
        ...

    async def operate_relay(
        self, *, gateway: str, meter: str, action: str, operator: str, request_id: str
    ) -> str:
        """Queue a relay operation (``trip`` or ``close``); its command id."""
        ...

    async def commands(self, gateway: str, limit: int = 50) -> Sequence[QueuedCommand]:
        """The gateway's commands, newest first, with their delivery state."""
        ...

    async def topups(self, gateway: str, account: str, limit: int = 50) -> Sequence[QueuedCommand]:
        """The top-ups sold for the account on the gateway, newest first, with their delivery state."""
        ...

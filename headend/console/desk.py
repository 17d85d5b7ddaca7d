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
    command_id: str
    type: str  # topup, relay.operate, ...
    created_ms: int
    state: str  # e.g. queued, sent, applied, rejected, expired
    detail: str = ""
    operator: str = ""


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

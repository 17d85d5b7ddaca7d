"""The console's command desk on central's queue (:class:`headend.console.desk.CommandDesk`).

The console decides who may ask (its roles: a billing clerk sells top-ups, a
field supervisor operates relays) and checks its forms; the desk hands the
request to :class:`headend.central.Central` in the central role that signs it
— ``billing`` for a top-up, ``operations`` for a relay — so the same
permissions, signing keys, purchase counters and delivery apply as for the
API and the command line. The form's request id makes a resubmitted form the
same command. A request central refuses is a :class:`DeskError` with its
reason, for the operator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from headend.central import Actor, ApiRole, Central, CentralError
from headend.console.desk import DeskError, QueuedCommand

# What a top-up sold at the console's desk is recorded as (the office counter).
CONSOLE_CHANNEL = "counter"


# States a gateway's answer settles (expired is central's own decision, or a late refusal).
ANSWER_SETTLES = frozenset({"applied", "refused", "superseded"})


def _detail(v: dict[str, Any]) -> str:
    """What a command is and why it is where it is, beyond the fields the console
    shows in their own columns (a top-up's amount, counter and credit)."""
    parts: list[str] = []
    if v["type"] == "relay.operate":
        body = v["body"]
        assert isinstance(body, dict)
        parts.append(f"{v['meter']} {body.get('op')}")
    if v.get("reason"):
        parts.append(f"{v['reason']}{': ' + str(v['code']) if v.get('code') else ''}")
    if v.get("message"):
        parts.append(str(v["message"]))
    return " · ".join(parts)


def _opt(v: Any) -> int | None:
    return None if v is None else int(v)


def queued_command(v: dict[str, Any]) -> QueuedCommand:
    """The console's view of one of central's commands (:func:`headend.central.command_view`)."""
    state = str(v["state"])
    return QueuedCommand(
        command_id=str(v["id"]),
        type=str(v["type"]),
        created_ms=int(v["created_ms"]),
        state=state,
        detail=_detail(v),
        operator=str(v["requested_by"]),
        account=v.get("account"),
        meter=v.get("meter"),
        amount_micro=_opt(v.get("amount_micro")),
        purchase_counter=_opt(v.get("purchase_counter")),
        payment_channel=v.get("payment_channel"),
        attempts=int(v["attempts"]),
        first_sent_ms=_opt(v.get("first_sent_ms")),
        last_sent_ms=_opt(v.get("last_sent_ms")),
        answered_ms=_opt(v["final_ms"] if state in ANSWER_SETTLES else v.get("last_result_ms")),
        credited_micro=_opt(v.get("credited_micro")),
        credited_ms=_opt(v.get("credited_ms")),
    )


class CentralDesk:
    def __init__(self, central: Central, *, payment_channel: str = CONSOLE_CHANNEL) -> None:
        self.central = central
        self.payment_channel = payment_channel

    async def sell_topup(
        self, *, gateway: str, account: str, amount_micro: int, operator: str, request_id: str
    ) -> str:
        try:
            v = await self.central.sell_topup(
                Actor(f"console:{operator}", ApiRole.BILLING),
                account=account,
                amount_micro=amount_micro,
                payment_channel=self.payment_channel,
                gateway=gateway,
                request_key=f"console:{request_id}",
            )
        except CentralError as exc:
            raise DeskError(exc.message) from None
        return str(v["id"])

    async def operate_relay(
        self, *, gateway: str, meter: str, action: str, operator: str, request_id: str
    ) -> str:
        try:
            v = await self.central.operate_relay(
                Actor(f"console:{operator}", ApiRole.OPERATIONS),
                gateway=gateway,
                meter=meter,
                op=action,
                reason=f"console, {operator}",
                request_key=f"console:{request_id}",
            )
        except CentralError as exc:
            raise DeskError(exc.message) from None
        return str(v["id"])

    async def commands(self, gateway: str, limit: int = 50) -> Sequence[QueuedCommand]:
        views = await self.central.commands(
            Actor("console", ApiRole.VIEWER), gateway=gateway, limit=limit
        )
        return [queued_command(v) for v in views]

    async def topups(self, gateway: str, account: str, limit: int = 50) -> Sequence[QueuedCommand]:
        views = await self.central.commands(
            Actor("console", ApiRole.VIEWER),
            gateway=gateway,
            account=account,
            type="topup",
            limit=limit,
        )
        return [queued_command(v) for v in views]

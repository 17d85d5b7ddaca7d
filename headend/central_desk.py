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

from headend.central import Actor, ApiRole, Central, CentralError
from headend.console.desk import DeskError, QueuedCommand

# What a top-up sold at the console's desk is recorded as (the office counter).
CONSOLE_CHANNEL = "counter"


def _detail(v: dict[str, object]) -> str:
    """One line of what a command is and why it is where it is."""
    parts: list[str] = []
    if v["type"] == "topup":
        parts.append(f"{v['account']} {v['amount']} #{v['purchase_counter']}")
        if v.get("credited"):
            parts.append(f"credited {v['credited']}")
    elif v["type"] == "relay.operate":
        body = v["body"]
        assert isinstance(body, dict)
        parts.append(f"{v['meter']} {body.get('op')}")
    if v.get("reason"):
        parts.append(f"{v['reason']}{': ' + str(v['code']) if v.get('code') else ''}")
    if v.get("message"):
        parts.append(str(v["message"]))
    return " · ".join(parts)


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
        return [
            QueuedCommand(
                command_id=str(v["id"]),
                type=str(v["type"]),
                created_ms=int(v["created_ms"]),
                state=str(v["state"]),
                detail=_detail(v),
                operator=str(v["requested_by"]),
            )
            for v in views
        ]

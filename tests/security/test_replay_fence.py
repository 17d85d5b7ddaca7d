"""The replay fence after a storage recovery: what was issued before it needs a known id.

After a damaged database the record of applied command ids may be incomplete
(the transaction that recorded one may be what was lost). A command issued
before the recovery is then refused unless its id is among those recovered;
a command issued after it is judged as always.
"""

from __future__ import annotations

from gateway.security.envelope import (
    Outcome,
    RejectReason,
    get_replay_fence,
    set_replay_fence,
)
from gateway.security.roles import CommandType
from tests.security.conftest import HOUR, T0, Central, GatewayDB, topup_body

FENCE = T0 + 10 * 60_000


async def test_fence_refuses_unknown_commands_issued_before_it(
    central: Central, gw: GatewayDB
) -> None:
    applied = central.cmd(CommandType.TOPUP, topup_body(pc=1), command_id="sale-1", issued_at=T0)
    assert (await gw.process(applied)).outcome is Outcome.APPLIED
    # the recovery: the floor is lost, one id is known again, the fence is set
    assert gw.conn is not None
    await gw.conn.execute("DELETE FROM sec_counter_floor")
    await set_replay_fence(gw.conn, FENCE, FENCE, "storage recovery")
    await set_replay_fence(gw.conn, FENCE - 1, FENCE, "an older fence never lowers it")
    await gw.conn.commit()
    assert await get_replay_fence(gw.conn) == FENCE
    now = FENCE + 1000
    # a known id before the fence: a duplicate, no effect
    assert (await gw.process(applied, now_ms=now)).outcome is Outcome.DUPLICATE
    # an unknown one (its acceptance may be what was lost): refused, nothing recorded
    lost = central.cmd(
        CommandType.TOPUP,
        topup_body(pc=2),
        command_id="sale-2",
        issued_at=T0 + 60_000,
        expires_at=T0 + HOUR,
    )
    before = await gw.snapshot()
    res = await gw.process(lost, now_ms=now)
    assert res.outcome is Outcome.REJECTED and res.reason is RejectReason.ISSUED_BEFORE_RECOVERY
    assert "re-sign" in res.message
    assert await gw.snapshot() == before
    # re-signed after the recovery, the same id is applied once
    again = central.cmd(
        CommandType.TOPUP,
        topup_body(pc=2),
        command_id="sale-2",
        issued_at=FENCE + 1,
        expires_at=FENCE + HOUR,
    )
    assert (await gw.process(again, now_ms=now)).outcome is Outcome.APPLIED
    assert (await gw.process(again, now_ms=now)).outcome is Outcome.REJECTED  # replay
    assert await gw.balance() == 2 * 50_000_000

"""Meter replacement in the daemon's billing shell, through signed commands.

Real parts: the daemon's Prepaid shell and command handler on one real outbox
database, envelopes signed with real Ed25519 keys. An undeclared register reset
reaches central as an event with the evidence; a signed ``meter.replace`` then
bills the held energy exactly; a replacement that contradicts the bill, or
signed with the wrong role, changes nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from firmware_bridge.reading import Measurement, Quantity, Reading
from firmware_bridge.relay_ops import RelayOp
from gateway.billing import ledger_store as ls
from gateway.billing.cutoff import Contact
from gateway.commands.handler import CommandHandler, NoRemoteConfig, NoResend
from gateway.config import load_config
from gateway.database import open_database
from gateway.prepaid import Prepaid
from gateway.security.envelope import Outcome, RejectReason
from gateway.security.roles import CommandType, Role
from gateway.security.trusted_time import TrustedClock, restore
from store_forward.outbox import Outbox
from tests.gateway.test_prepaid_daemon import config
from tests.security.conftest import Central

T0 = 1_790_000_000_000  # 2026-09-21, after the flat tariff's effective_from
H = 3_600_000
GW = "gw-prepaid"


class NoRelay:
    async def request(self, meter_id: str, op: RelayOp, *, reason: str, command_id: str) -> None:
        raise AssertionError("no relay command expected")


@dataclass
class Rig:
    prepaid: Prepaid
    outbox: Outbox
    handler: CommandHandler
    central: Central
    now: list[int]

    async def read(self, kwh: str, t: int) -> None:
        r = Reading("m001", t, {Quantity.ENERGY_IMPORT: Measurement(Decimal(kwh))})
        async with self.outbox.transaction() as db:
            ids = await self.outbox.commit_cycle_in(db, t, [r])
            await self.prepaid.on_readings_in(db, self.outbox, [(ids[0], r)], t, Contact(t, T0))

    async def replace(self, body: dict[str, Any], *, role: Role | None = None) -> Any:
        raw = self.central.cmd(CommandType.METER_REPLACE, body, target=GW, role=role,
                               issued_at=self.now[0] - 1000)
        return await self.handler.handle(raw, channel="usb")

    async def balance(self) -> int:
        async with self.outbox.transaction() as db:
            return (await ls.verify(db, "acct-001")).balance_micro

    async def events(self, kind: str = "event") -> list[dict[str, Any]]:
        out = []
        seen: list[int] = []
        while (b := await self.outbox.next_batch(0, exclude=seen, max_records=10_000)) is not None:
            seen.append(b.seq)
            out += [r.body for r in b.records if r.kind == kind]
        return out


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    cfg = load_config(config(tmp_path, 1))
    prepaid = Prepaid.from_config(cfg)
    assert prepaid is not None
    outbox = await open_database(tmp_path / "gw.db")
    prepaid.attach(outbox)
    async with outbox.transaction() as db:
        await prepaid.start_in(db, T0)
    central = Central()
    now = [T0 + 10 * H]
    clock = TrustedClock(restore(0, 1), wall=lambda: now[0], mono=lambda: now[0], synced=lambda: True)
    handler = CommandHandler(outbox, trust=central.trust(), gateway_id=GW, clock=clock, billing=prepaid,
                             relay=NoRelay(), config=NoRemoteConfig(), resend=NoResend())
    await handler.start()
    try:
        yield Rig(prepaid, outbox, handler, central, now)
    finally:
        await outbox.close()


def body(t: int, old: str, new: str, **extra: Any) -> dict[str, Any]:
    return {"meter": "m001", "time_ms": t, "old_final": {"import_kwh": old},
            "new_initial": {"import_kwh": new}, **extra}


async def test_undeclared_reset_reaches_central_and_a_late_declaration_bills_the_held_energy(rig: Rig) -> None:
    opening = 300_000  # 0.30 yuan, flat 0.56/kWh
    await rig.read("100.00", T0 + H)  # baseline
    await rig.read("101.00", T0 + 2 * H)  # 1.00 kWh
    await rig.read("0.50", T0 + 4 * H)  # the meter was exchanged; nobody said so
    await rig.read("1.50", T0 + 5 * H)  # confirms the reset: 1.00 kWh on the new register
    assert await rig.balance() == opening - 2 * 560_000
    ev = [e for e in await rig.events() if e["type"] == "meter.register_reset"]
    assert len(ev) == 1
    e = ev[0]
    assert (e["meter"], e["account"]) == ("m001", "acct-001")
    assert (e["last_good"]["import_kwh"], e["last_good"]["time_ms"]) == ("101.00", T0 + 2 * H)
    assert (e["first_after"]["import_kwh"], e["confirmed_by"]["import_kwh"]) == ("0.50", "1.50")
    assert "held until the exchange is declared with meter.replace" in e["billing"]

    # central declares it: old meter read 101.40 at 03:00, new meter started at 0.10
    res = await rig.replace(body(T0 + 3 * H, "101.40", "0.10", note="serial 4409 -> 5120"))
    assert res.outcome is Outcome.APPLIED, res
    # held: 0.40 kWh old + 0.40 kWh new, billed exactly now; then normal rating goes on
    assert await rig.balance() == opening - (100 + 100 + 40 + 40) * 5600
    await rig.read("2.00", T0 + 6 * H)
    assert await rig.balance() == opening - (100 + 100 + 40 + 40 + 50) * 5600
    charges = await rig.events("charge")
    debits = [c for c in charges if c["kind"] == "debit"]
    assert sorted(c["body"]["ckwh"] for c in debits) == [40, 40, 50, 100, 100]
    result = next(e for e in await rig.events() if e["type"] == "command_result"
                  and e.get("command_type") == "meter.replace")
    assert result["effect"]["kwh"] == "0.80" and result["effect"]["amount"] == "0.448"

    # the same exchange declared again under another command id bills nothing twice
    again = await rig.replace(body(T0 + 3 * H, "101.40", "0.10"))
    assert again.outcome is Outcome.REJECTED and again.code == "replacement_before_billed"
    assert await rig.balance() == opening - (100 + 100 + 40 + 40 + 50) * 5600


async def test_a_planned_replacement_declared_in_time(rig: Rig) -> None:
    await rig.read("100.00", T0 + H)
    res = await rig.replace(body(T0 + 2 * H, "100.30", "5.00"))
    assert res.outcome is Outcome.APPLIED
    # declared twice (another command id): refused, nothing billed twice
    twice = await rig.replace(body(T0 + 2 * H, "100.30", "5.00"))
    assert twice.outcome is Outcome.REJECTED and twice.code == "already_replaced"
    await rig.read("5.20", T0 + 3 * H)  # the new meter, from its initial register
    assert await rig.balance() == 300_000 - (30 + 20) * 5600
    assert not [e for e in await rig.events() if e["type"] == "meter.register_reset"]


@pytest.mark.parametrize(
    ("b", "role", "expect"),
    [
        (body(T0 + 2 * H, "99.00", "0"), None, "old_final_below_billed"),
        (body(T0 + H - 1, "100.50", "0"), None, "replacement_before_billed"),
        (body(T0 + 2 * H, "100.50", "0") | {"meter": "m999"}, None, "unknown_meter"),
        (body(T0 + 2 * H, "100.50", "0") | {"extra": 1}, None, "malformed"),
        ({**body(T0 + 2 * H, "100.50", "0"), "old_final": {"import_kwh": 100}}, None, "malformed"),
        (body(T0 + 20 * H, "100.50", "0"), None, "replacement_in_future"),
        (body(T0 + 2 * H, "100.50", "0"), Role.OPERATIONS, "wrong_role"),
    ],
)
async def test_replacements_that_do_not_fit_change_nothing(
    rig: Rig, b: dict[str, Any], role: Role | None, expect: str
) -> None:
    await rig.read("100.00", T0 + H)
    async with rig.outbox.transaction() as db:
        before = await ls.get_track(db, "m001")
    res = await rig.replace(b, role=role)
    assert res.outcome is Outcome.REJECTED
    if expect == "wrong_role":
        assert res.reason is RejectReason.WRONG_ROLE
    else:
        assert res.reason is RejectReason.BAD_BODY and res.code == expect, res
    async with rig.outbox.transaction() as db:
        assert await ls.get_track(db, "m001") == before
    assert await rig.balance() == 300_000

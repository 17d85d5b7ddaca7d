"""The command path: real SQLite (a real Outbox), real signed envelopes, small real ports.

The ports below are collaborators that do real (but minimal) work in the
gateway database and remember what they were asked; the handler is what is
under test. The crash test SIGKILLs a child process (this module run as a
script) in the middle of a stream of commands.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import aiosqlite
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge.relay_ops import RelayOp
from gateway.billing import ledger_store as ls
from gateway.billing.account import load_account
from gateway.billing.tariff_file import load_book
from gateway.commands.bodies import CommandRefused, ConfigChange, parse_relay, parse_resend
from gateway.commands.handler import SEEN_GRACE_MS, CommandHandler, NoRemoteConfig, NoResend
from gateway.commands.inbox import CommandInbox
from gateway.commands.tally import Bucket, due_summaries, tally_rejection
from gateway.daemon import NoBilling
from gateway.database import open_database
from gateway.prepaid import Prepaid, PrepaidAccount
from gateway.security import audit
from gateway.security.envelope import (
    Outcome,
    RejectReason,
    canonical_payload,
    encode_wire,
    sign_payload,
)
from gateway.security.envelope import create_schema as envelope_schema
from gateway.security.roles import CommandType, Role, TrustStore
from gateway.security.trusted_time import TrustedClock, load_floor, restore, save_floor
from gateway.security.trusted_time import create_schema as time_schema
from provisioning.keys import Keystore
from store_forward.outbox import Outbox
from store_forward.topics import Topics
from tests.harness.mosquitto import Mosquitto
from tests.security.conftest import GATEWAY, HOUR, T0, Central, raw_public, topup_body

ROOT = Path(__file__).resolve().parents[2]
HOARD_LIMIT = 1_000_000_000  # micro: the account's hoarding limit (1000.00 yuan)

# ---------------------------------------------------------------------------
# Collaborators: the real billing port (the daemon's Prepaid on the same SQLite
# database) and small real ports for the rest

ACCOUNT = """
account = "acct-17"
timezone = "Asia/Shanghai"
opening_balance = "0.00"
meters = []
protected = false

[limits]
alarm1 = "2.00"
alarm2 = "1.00"
overdraft = "0.00"
close_permit = "0.50"
close_mode = "direct"

[topup_policy]
hoarding_limit = "1000.00"
"""

PORT_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS t_config (command_id TEXT NOT NULL, change TEXT NOT NULL,"
    " body TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS t_resend (command_id TEXT NOT NULL, a INTEGER, b INTEGER)",
)


class Billing(Prepaid):
    """The daemon's billing port, with a fault that can be switched on after it wrote."""

    explode = False

    async def apply_topup_in(
        self,
        db: aiosqlite.Connection,
        body: Mapping[str, Any],
        *,
        command_id: str,
        channel: str,
        now_ms: int,
        outbox: Outbox | None = None,
    ) -> dict[str, Any]:
        res = await super().apply_topup_in(
            db, body, command_id=command_id, channel=channel, now_ms=now_ms, outbox=outbox
        )
        if self.explode:
            raise RuntimeError("disk on fire")  # after the ledger took the credit
        return res


def make_billing(site: Path) -> Billing:
    """One prepaid account ``acct-17`` (balance 0, hoarding limit 1000.00) on the flat tariff."""
    shutil.copy(ROOT / "examples" / "tariffs" / "flat.toml", site / "flat.toml")
    (site / "acct-17.toml").write_text(ACCOUNT)
    acct = PrepaidAccount(
        load_account(site / "acct-17.toml", "Asia/Shanghai"),
        load_book([site / "flat.toml"], "Asia/Shanghai"),
    )
    return Billing({"acct-17": acct}, {})


async def start_billing(billing: Prepaid, outbox: Outbox, now_ms: int) -> None:
    billing.attach(outbox)
    async with outbox.transaction() as db:
        await billing.start_in(db, now_ms)


TARIFF_V2 = {
    "id": "flat-basic",
    "version": 2,
    "effective_from": "2026-09-21T00:00:00+08:00",
    "timezone": "Asia/Shanghai",
    "price": "1.0000",
}


def snapshot_body(*, central_seq: int, as_of_seq: int, balance_micro: int = 7) -> dict[str, Any]:
    return {
        "id": f"snap-{central_seq}",
        "account": "acct-17",
        "central_seq": central_seq,
        "as_of_seq": as_of_seq,
        "balance_micro": balance_micro,
        "time_ms": T0,
    }


CREDITS = "SELECT entry_id, body, amount_micro FROM billing_entry WHERE kind = 'credit' ORDER BY seq"


def topups(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """(top-up id, amount) of the rows of :data:`CREDITS`, bodies read as the ledger reads them."""
    return [(ls.body_from_column(body, e)["topup_id"], a) for e, body, a in rows]


@dataclass
class RecordingRelay:
    """Remembers requests; checks through a second connection that the intent is committed."""

    db_path: Path | None = None
    calls: list[tuple[str, RelayOp, str, str]] = field(default_factory=list)
    fail: bool = False
    committed_when_called: list[bool] = field(default_factory=list)

    async def request(self, meter_id: str, op: RelayOp, *, reason: str, command_id: str) -> None:
        if self.fail:
            raise ConnectionError("relay controller not ready")
        if self.db_path is not None:
            async with (
                aiosqlite.connect(self.db_path) as other,
                other.execute(
                    "SELECT count(*) FROM cmd_relay_intent i JOIN sec_seen_command s"
                    " USING (command_id) WHERE command_id = ?",
                    (command_id,),
                ) as cur,
            ):
                row = await cur.fetchone()
            self.committed_when_called.append(bool(row and row[0] == 1))
        self.calls.append((meter_id, op, reason, command_id))


class StagingConfig:
    async def stage_in(
        self,
        db: aiosqlite.Connection,
        change: ConfigChange,
        body: Mapping[str, Any],
        *,
        command_id: str,
        now_ms: int,
    ) -> dict[str, Any]:
        if "bad" in body:
            raise CommandRefused("not_a_setting", f"{change}: key 'bad' is not a setting")
        await db.execute(
            "INSERT INTO t_config (command_id, change, body) VALUES (?, ?, ?)",
            (command_id, change.value, orjson.dumps(dict(body))),
        )
        return {"staged": change.value}


class RecordingResend:
    async def resend_in(
        self, db: aiosqlite.Connection, *, from_id: int, to_id: int, command_id: str, now_ms: int
    ) -> dict[str, Any]:
        await db.execute(
            "INSERT INTO t_resend (command_id, a, b) VALUES (?, ?, ?)", (command_id, from_id, to_id)
        )
        return {"queued": to_id - from_id + 1, "missing": 0}


class FakeTime:
    """Wall and monotonic clock that tests move by hand (both move together)."""

    def __init__(self, wall_ms: int) -> None:
        self.wall = wall_ms
        self.mono = 1_000_000

    def advance(self, ms: int) -> None:
        self.wall += ms
        self.mono += ms


class EventLog:
    """What central receives: drains the outbox the way the uplink does (batch, then ack)."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.bodies: list[dict[str, Any]] = []

    async def drain(self) -> list[dict[str, Any]]:
        for _ in range(10_000):
            batch = await self.outbox.next_batch(T0)
            if batch is None:
                break
            self.bodies.extend(r.body for r in batch.records)
            await self.outbox.ack(batch.seq)
        return self.bodies


@dataclass
class Rig:
    outbox: Outbox
    handler: CommandHandler
    billing: Billing
    relay: RecordingRelay
    keys: Keystore
    time: FakeTime
    path: Path
    log: EventLog

    async def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        async with self.outbox.transaction() as db, db.execute(sql, args) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    async def events(self) -> list[dict[str, Any]]:
        return await self.log.drain()

    async def audit_actions(self) -> list[str]:
        return [a for (a,) in await self.rows("SELECT action FROM audit_log ORDER BY seq")]

    async def effects(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row that a command can change, outside the audit log and the outbox."""
        out = {}
        for t in (
            "billing_entry",
            "billing_account",
            "billing_tariff",
            "t_config",
            "t_resend",
            "cmd_relay_intent",
            "cmd_purpose_rotation",
            "sec_seen_command",
            "sec_counter_floor",
            "sec_central_key",
            "sec_revoked_key",
            "sec_time_floor",
        ):
            out[t] = await self.rows(f"SELECT * FROM {t} ORDER BY 1")
        return out

    async def credits(self) -> list[tuple[Any, ...]]:
        return topups(await self.rows(CREDITS))

    async def balance(self) -> int:
        async with self.outbox.transaction() as db:
            return (await ls.verify(db, "acct-17")).balance_micro


async def make_handler(
    outbox: Outbox,
    trust: TrustStore,
    keys: Keystore | None,
    ft: FakeTime,
    *,
    billing: Prepaid | None = None,
    relay: RecordingRelay | None = None,
    known_meter: Any = None,
) -> CommandHandler:
    clock = TrustedClock(
        restore(0, ft.mono), wall=lambda: ft.wall, mono=lambda: ft.mono, synced=lambda: True
    )
    if billing is None:
        billing = make_billing(outbox.path.parent)
        await start_billing(billing, outbox, ft.wall)
    h = CommandHandler(
        outbox,
        trust=trust,
        gateway_id=GATEWAY,
        clock=clock,
        billing=billing,
        relay=relay or RecordingRelay(),
        config=StagingConfig(),
        resend=RecordingResend(),
        keys=keys,
        known_meter=known_meter,
        event_budget_per_hour=5,
    )
    async with outbox.transaction() as db:
        for stmt in PORT_SCHEMA:
            await db.execute(stmt)
    await h.start()
    return h


@pytest.fixture
async def rig(tmp_path: Path, central: Central) -> AsyncIterator[Rig]:
    path = tmp_path / "gateway.db"
    outbox = await open_database(path)
    keys = Keystore.init(tmp_path / "keys", GATEWAY)
    ft = FakeTime(T0 + 1000)
    billing = make_billing(tmp_path)
    await start_billing(billing, outbox, ft.wall)
    relay = RecordingRelay(db_path=path)
    h = await make_handler(
        outbox,
        central.trust(),
        keys,
        ft,
        billing=billing,
        relay=relay,
        known_meter=lambda m: m.startswith("m-"),
    )
    yield Rig(outbox, h, billing, relay, keys, ft, path, EventLog(outbox))
    await outbox.close()


def results(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("type") == "command_result"]


# ---------------------------------------------------------------------------
# Applied, duplicate, replay


async def test_topup_applied_once_with_audit_and_result_event(rig: Rig, central: Central) -> None:
    res = await rig.handler.handle(central.cmd(CommandType.TOPUP, command_id="t-1"), channel="mqtt")
    assert res.outcome is Outcome.APPLIED
    assert await rig.balance() == 50_000_000
    assert await rig.credits() == [("t-1", 50_000_000)]
    assert await rig.rows("SELECT command_id FROM sec_seen_command") == [("t-1",)]
    ev = results(await rig.events())
    assert ev == [
        {
            "type": "command_result",
            "outcome": "applied",
            "id": "t-1",
            "channel": "mqtt",
            "command_type": "topup",
            "issuer": "billing-k1",
            "effect": {
                "status": "applied",
                "message": "top-up t-1 applied",
                "account": "acct-17",
                "balance_after_micro": 50_000_000,
                "overdraft_repaid_micro": 0,
            },
            "at_ms": T0 + 1000,
        }
    ]
    assert await rig.audit_actions() == ["command.applied"]
    (details,) = await rig.rows("SELECT details FROM audit_log")
    d = orjson.loads(details[0])
    assert d["id"] == "t-1" and d["effect"]["balance_after_micro"] == 50_000_000
    assert audit.verify(rig.path).ok


async def test_retry_under_same_id_is_duplicate_and_exact_replay_is_refused(
    rig: Rig, central: Central
) -> None:
    first = central.cmd(CommandType.TOPUP, command_id="t-1")
    assert (await rig.handler.handle(first, channel="mqtt")).outcome is Outcome.APPLIED
    # central re-signs the same command id with a fresh counter (lost result)
    retry = central.cmd(CommandType.TOPUP, command_id="t-1")
    res = await rig.handler.handle(retry, channel="usb")
    assert res.outcome is Outcome.DUPLICATE
    assert await rig.credits() == [("t-1", 50_000_000)]
    before = await rig.effects()
    res = await rig.handler.handle(first, channel="mqtt")
    assert res.outcome is Outcome.REJECTED and res.reason is RejectReason.REPLAY
    assert await rig.effects() == before
    outcomes = [(e["outcome"], e.get("reason")) for e in results(await rig.events())]
    assert outcomes == [("applied", None), ("duplicate", None), ("rejected", "replay")]
    assert await rig.audit_actions() == ["command.applied", "command.duplicate", "command.rejected"]


# ---------------------------------------------------------------------------
# Every rejection path leaves nothing applied


def _rejections(central: Central) -> dict[str, tuple[bytes, RejectReason]]:
    rogue = Ed25519PrivateKey.generate()
    good = central.cmd(CommandType.TOPUP, command_id="x-1")
    outer = orjson.loads(good)
    flipped = bytearray(base64.b64decode(outer["signature"]))
    flipped[0] ^= 1
    tampered = orjson.dumps(
        {"payload": outer["payload"], "signature": base64.b64encode(bytes(flipped)).decode()}
    )
    return {
        "garbage": (b"\x00not json", RejectReason.MALFORMED),
        "oversized": (b"{" + b" " * 70_000 + b"}", RejectReason.OVERSIZED),
        "bad_signature": (tampered, RejectReason.BAD_SIGNATURE),
        "unknown_issuer": (
            central.cmd(CommandType.TOPUP, key=rogue, issuer="billing-rogue"),
            RejectReason.UNKNOWN_ISSUER,
        ),
        "forged_under_real_name": (
            central.cmd(CommandType.TOPUP, key=rogue, issuer="billing-k1"),
            RejectReason.BAD_SIGNATURE,
        ),
        "wrong_role": (
            central.cmd(CommandType.TOPUP, role=Role.OPERATIONS),
            RejectReason.WRONG_ROLE,
        ),
        "wrong_target": (
            central.cmd(CommandType.TOPUP, target="gw-0002"),
            RejectReason.WRONG_TARGET,
        ),
        "expired": (
            central.cmd(CommandType.TOPUP, issued_at=T0 - 2 * HOUR, expires_at=T0 - HOUR),
            RejectReason.EXPIRED,
        ),
        "stale_counter": (
            central.cmd(CommandType.TOPUP, counter=1, command_id="x-stale"),
            RejectReason.COUNTER_STALE,
        ),
        "relay_bad_op": (
            central.cmd(CommandType.RELAY_OPERATE, {"meter": "m-1", "op": "explode"}),
            RejectReason.BAD_BODY,
        ),
        "relay_unknown_meter": (
            central.cmd(CommandType.RELAY_OPERATE, {"meter": "other-1", "op": "trip"}),
            RejectReason.BAD_BODY,
        ),
        "hoarding": (
            central.cmd(CommandType.TOPUP, topup_body(amount_micro=HOARD_LIMIT, pc=2)),
            RejectReason.BAD_BODY,
        ),
        "purchase_counter_reused": (
            central.cmd(CommandType.TOPUP, topup_body(pc=1)),
            RejectReason.BAD_BODY,
        ),
        "purchase_counter_skipped": (
            central.cmd(CommandType.TOPUP, topup_body(pc=3)),
            RejectReason.BAD_BODY,
        ),
        "unknown_account": (
            central.cmd(CommandType.TOPUP, {**topup_body(pc=2), "account": "acct-99"}),
            RejectReason.BAD_BODY,
        ),
        "snapshot_refused": (
            central.cmd(
                CommandType.BALANCE_SNAPSHOT, snapshot_body(central_seq=1, as_of_seq=99)
            ),
            RejectReason.BAD_BODY,
        ),
        "tariff_refused": (
            central.cmd(CommandType.TARIFF_PUBLISH, {"no_name": 1}),
            RejectReason.BAD_BODY,
        ),
        "config_refused": (
            central.cmd(CommandType.CONFIG_PATCH, {"bad": True}),
            RejectReason.BAD_BODY,
        ),
        "resend_range": (
            central.cmd(CommandType.UPLINK_RESEND, {"from_id": 9, "to_id": 3}),
            RejectReason.BAD_BODY,
        ),
        "bundle_not_on_this_path": (
            central.cmd(CommandType.PROVISIONING_BUNDLE, {}),
            RejectReason.BAD_BODY,
        ),
        "key_rebind": (
            central.cmd(
                CommandType.KEYS_ROTATE,
                {
                    "op": "add_key",
                    "key_id": "billing-k1",
                    "role": "billing",
                    "public_key": base64.b64encode(raw_public(rogue)).decode(),
                },
            ),
            RejectReason.BAD_BODY,
        ),
    }


CASES = list(_rejections(Central()))


@pytest.mark.parametrize("case", CASES)
async def test_rejection_leaves_nothing_applied(rig: Rig, central: Central, case: str) -> None:
    # one applied command first, so the stale-counter case has a floor to be under
    await rig.handler.handle(central.cmd(CommandType.TOPUP, command_id="t-0"), channel="mqtt")
    raw, reason = _rejections(central)[case]
    before = await rig.effects()
    res = await rig.handler.handle(raw, channel="mqtt")
    assert res.outcome is Outcome.REJECTED
    assert res.reason is reason, res.message
    assert await rig.effects() == before
    assert rig.relay.calls == []
    ev = results(await rig.events())[-1]
    assert ev["outcome"] == "rejected" and ev["reason"] == reason.value
    assert (await rig.audit_actions())[-1] == "command.rejected"
    assert audit.verify(rig.path).ok


async def test_refused_body_leaves_id_unseen_so_a_corrected_command_applies(
    rig: Rig, central: Central
) -> None:
    bad = central.cmd(CommandType.TOPUP, topup_body(amount_micro=HOARD_LIMIT + 1), command_id="t-9")
    res = await rig.handler.handle(bad, channel="mqtt")
    assert res.reason is RejectReason.BAD_BODY and "hoarding" in res.message
    assert await rig.rows("SELECT * FROM sec_counter_floor") == []
    fixed = central.cmd(CommandType.TOPUP, topup_body(amount_micro=5), command_id="t-9")
    assert (await rig.handler.handle(fixed, channel="mqtt")).outcome is Outcome.APPLIED
    assert await rig.credits() == [("t-9", 5)]


@pytest.mark.parametrize(
    ("pc", "amount", "code", "words"),
    [
        (1, 20_000_000, "counter_replay", "purchase counter 1 already used"),
        (3, 20_000_000, "counter_gap", "purchase counter 3 skips ahead (expected 2)"),
        (2, HOARD_LIMIT, "hoarding_limit", "would exceed hoarding limit"),
    ],
)
async def test_a_top_up_the_ledger_refuses_is_rejected_with_its_reason_and_its_id_kept_free(
    rig: Rig, central: Central, pc: int, amount: int, code: str, words: str
) -> None:
    """20.00 paid with a reused or skipped purchase counter: refused with the ledger's
    reason, nothing credited, the id not burned — the corrected top-up applies."""
    assert (
        await rig.handler.handle(central.cmd(CommandType.TOPUP, command_id="t-1"), channel="mqtt")
    ).outcome is Outcome.APPLIED
    before = await rig.effects()
    bad = central.cmd(CommandType.TOPUP, topup_body(amount_micro=amount, pc=pc), command_id="t-2")
    res = await rig.handler.handle(bad, channel="mqtt")
    assert (res.outcome, res.reason, res.code) == (Outcome.REJECTED, RejectReason.BAD_BODY, code)
    assert words in res.message
    assert await rig.effects() == before  # no credit, no seen id, no counter floor moved
    assert await rig.balance() == 50_000_000
    ev = results(await rig.events())[-1]
    assert (ev["outcome"], ev["reason"], ev["code"], ev["id"]) == ("rejected", "bad_body", code, "t-2")
    (details,) = await rig.rows("SELECT details FROM audit_log ORDER BY seq DESC LIMIT 1")
    assert orjson.loads(details[0])["code"] == code
    # central corrects the purchase counter and re-signs under the same id
    fixed = central.cmd(CommandType.TOPUP, topup_body(amount_micro=20_000_000, pc=2), command_id="t-2")
    assert (await rig.handler.handle(fixed, channel="mqtt")).outcome is Outcome.APPLIED
    assert await rig.credits() == [("t-1", 50_000_000), ("t-2", 20_000_000)]
    assert await rig.balance() == 70_000_000
    again = central.cmd(CommandType.TOPUP, topup_body(amount_micro=20_000_000, pc=2), command_id="t-2")
    assert (await rig.handler.handle(again, channel="mqtt")).outcome is Outcome.DUPLICATE
    assert await rig.balance() == 70_000_000


async def test_the_billing_port_raises_and_never_returns_a_refusal(rig: Rig) -> None:
    """Called directly (technician CLI, USB), the port says no the same way."""
    billing = rig.billing
    cases: list[tuple[str, Any]] = [
        ("counter_gap", billing.apply_topup_in),
        ("unknown_account", billing.apply_topup_in),
        ("malformed", billing.apply_topup_in),
        ("stale_snapshot", billing.apply_snapshot_in),
        ("snapshot_rejected", billing.apply_snapshot_in),
        ("invalid_tariff", billing.install_tariff_in),
        ("unknown_tariff", billing.install_tariff_in),
    ]
    bodies: dict[str, dict[str, Any]] = {
        "counter_gap": topup_body(pc=5),
        "unknown_account": {**topup_body(), "account": "acct-99"},
        "malformed": {**topup_body(), "amount_micro": "50"},
        "stale_snapshot": snapshot_body(central_seq=1, as_of_seq=0),
        "snapshot_rejected": snapshot_body(central_seq=3, as_of_seq=42),
        "invalid_tariff": {**TARIFF_V2, "price": "cheap"},
        "unknown_tariff": {**TARIFF_V2, "id": "other-tariff"},
    }
    async with rig.outbox.transaction() as db:  # a newer snapshot in force first
        await billing.apply_snapshot_in(db, snapshot_body(central_seq=2, as_of_seq=0), now_ms=T0)
    before = await rig.effects()
    for code, method in cases:
        with pytest.raises(CommandRefused) as info:
            async with rig.outbox.transaction() as db:
                if method == billing.apply_topup_in:
                    await method(db, bodies[code], command_id="cli-1", channel="cli", now_ms=T0)
                else:
                    await method(db, bodies[code], now_ms=T0)
        assert info.value.reason == code, (code, info.value.message)
        assert info.value.message
    assert await rig.effects() == before


async def test_refusals_keep_their_events_through_a_flood_of_garbage(
    rig: Rig, central: Central
) -> None:
    """Unauthenticated junk with bad bodies cannot use up the events that tell central
    about a refused top-up: refusals are counted per code."""
    rogue = Ed25519PrivateKey.generate()
    payload = canonical_payload(
        target=GATEWAY,
        command_id="junk",
        issuer="billing-k1",
        counter=1,
        issued_at_ms=T0,
        expires_at_ms=T0 + HOUR,
        type=CommandType.TOPUP,
        body=topup_body(amount_micro=-1),
    )
    junk = encode_wire(payload, sign_payload(rogue, payload))
    for _ in range(20):
        res = await rig.handler.handle(junk, channel="mqtt")
        assert (res.reason, res.code) == (RejectReason.BAD_BODY, None)
    refused = central.cmd(CommandType.TOPUP, topup_body(pc=7), command_id="t-7")
    res = await rig.handler.handle(refused, channel="mqtt")
    assert res.code == "counter_gap"
    ev = results(await rig.events())
    assert ev[-1]["id"] == "t-7" and ev[-1]["code"] == "counter_gap"


async def test_port_crash_rolls_back_everything_and_is_reported(rig: Rig, central: Central) -> None:
    rig.billing.explode = True  # fails after its first write
    before = await rig.effects()
    res = await rig.handler.handle(central.cmd(CommandType.TOPUP, command_id="t-1"), channel="mqtt")
    assert res.outcome is Outcome.REJECTED and "nothing was kept" in res.message
    assert await rig.effects() == before
    assert results(await rig.events())[-1]["outcome"] == "failed"
    assert await rig.audit_actions() == ["command.failed"]
    rig.billing.explode = False
    again = central.cmd(CommandType.TOPUP, command_id="t-1")
    assert (await rig.handler.handle(again, channel="mqtt")).outcome is Outcome.APPLIED
    assert await rig.credits() == [("t-1", 50_000_000)]
    assert await rig.balance() == 50_000_000


# ---------------------------------------------------------------------------
# Each command type reaches its port


async def test_relay_intent_is_committed_before_the_port_hears_of_it(
    rig: Rig, central: Central
) -> None:
    raw = central.cmd(
        CommandType.RELAY_OPERATE,
        {"meter": "m-7", "op": "trip", "reason": "arrears"},
        command_id="r-1",
    )
    res = await rig.handler.handle(raw, channel="mqtt")
    assert res.outcome is Outcome.APPLIED
    assert rig.relay.calls == [("m-7", RelayOp.TRIP, "arrears", "r-1")]
    assert rig.relay.committed_when_called == [True]
    assert await rig.rows("SELECT command_id, state FROM cmd_relay_intent") == [("r-1", "handed")]
    await rig.handler.recover()  # nothing pending: not handed again
    assert len(rig.relay.calls) == 1


async def test_every_relay_op_is_accepted() -> None:
    for op in RelayOp:
        assert parse_relay({"meter": "m-1", "op": op.value}).op is op
    with pytest.raises(CommandRefused):
        parse_relay({"meter": "m-1", "op": "trip", "extra": 1})
    with pytest.raises(CommandRefused):
        parse_relay({"meter": "m 1", "op": "trip"})
    with pytest.raises(CommandRefused):
        parse_relay({"meter": "m-1", "op": "trip", "reason": "x" * 201})


async def test_relay_port_down_keeps_intent_pending_until_recovery(
    rig: Rig, central: Central
) -> None:
    rig.relay.fail = True
    raw = central.cmd(CommandType.RELAY_OPERATE, {"meter": "m-1", "op": "close"}, command_id="r-1")
    assert (await rig.handler.handle(raw, channel="mqtt")).outcome is Outcome.APPLIED
    assert await rig.rows("SELECT state FROM cmd_relay_intent") == [("pending",)]
    rig.relay.fail = False
    await rig.handler.recover()
    assert [c[3] for c in rig.relay.calls] == ["r-1"]
    assert await rig.rows("SELECT state FROM cmd_relay_intent") == [("handed",)]


async def test_pending_relay_intent_whose_command_expired_is_not_driven(
    rig: Rig, central: Central
) -> None:
    rig.relay.fail = True
    raw = central.cmd(CommandType.RELAY_OPERATE, {"meter": "m-1", "op": "trip"}, command_id="r-1")
    await rig.handler.handle(raw, channel="mqtt")
    rig.relay.fail = False
    rig.time.advance(2 * HOUR)  # the command expired at T0 + 1 h
    await rig.handler.recover()
    assert rig.relay.calls == []
    assert await rig.rows("SELECT state FROM cmd_relay_intent") == [("expired",)]
    assert (await rig.events())[-1]["type"] == "relay_intent_expired"
    assert (await rig.audit_actions())[-1] == "relay.intent_expired"


async def test_billing_config_and_resend_commands_reach_their_ports(
    rig: Rig, central: Central
) -> None:
    h = rig.handler
    cmds = [
        central.cmd(CommandType.TARIFF_PUBLISH, TARIFF_V2),
        central.cmd(CommandType.BALANCE_SNAPSHOT, snapshot_body(central_seq=1, as_of_seq=0)),
        central.cmd(CommandType.CONFIG_PATCH, {"poll_interval_s": 60}, command_id="c-1"),
        central.cmd(CommandType.METER_ROSTER, {"add": [{"id": "m-9"}]}, command_id="c-2"),
        central.cmd(CommandType.UPLINK_RESEND, {"from_id": 3, "to_id": 9}, command_id="s-1"),
    ]
    for raw in cmds:
        res = await h.handle(raw, channel="mqtt")
        assert res.outcome is Outcome.APPLIED, res.message
    assert await rig.rows("SELECT tariff_id, version FROM billing_tariff") == [("flat-basic", 2)]
    assert [v.version for v in rig.billing.accounts["acct-17"].book.versions] == [1, 2]
    assert await rig.rows(
        "SELECT entry_id, kind FROM billing_entry WHERE kind = 'snapshot'"
    ) == [("snapshot:acct-17:1", "snapshot")]
    assert await rig.balance() == 7
    assert await rig.rows("SELECT command_id, change FROM t_config ORDER BY 1") == [
        ("c-1", "config.patch"),
        ("c-2", "meter.roster"),
    ]
    assert await rig.rows("SELECT * FROM t_resend") == [("s-1", 3, 9)]
    effects = [e.get("effect") for e in results(await rig.events())]
    assert effects[-1] == {"queued": 7, "missing": 0}


async def test_fallback_ports_answer_honestly(tmp_path: Path, central: Central) -> None:
    outbox = await open_database(tmp_path / "gw.db")
    ft = FakeTime(T0 + 1000)
    clock = TrustedClock(
        restore(0, ft.mono), wall=lambda: ft.wall, mono=lambda: ft.mono, synced=lambda: True
    )
    h = CommandHandler(
        outbox,
        trust=central.trust(),
        gateway_id=GATEWAY,
        clock=clock,
        billing=make_billing(tmp_path),
        relay=RecordingRelay(),
        config=NoRemoteConfig(),
        resend=NoResend(),
    )
    await h.start()
    res = await h.handle(
        central.cmd(CommandType.UPLINK_RESEND, {"from_id": 5, "to_id": 6}), channel="mqtt"
    )
    assert res.outcome is Outcome.APPLIED
    (ev,) = [e for e in await EventLog(outbox).drain() if e["type"] == "command_result"]
    assert ev["effect"]["missing"] == 2 and ev["effect"]["queued"] == 0
    res = await h.handle(central.cmd(CommandType.CONFIG_PATCH, {"x": 1}), channel="mqtt")
    assert res.reason is RejectReason.BAD_BODY and "not accepted remotely" in res.message
    await outbox.close()


async def test_resend_range_rules() -> None:
    assert parse_resend({"from_id": 1, "to_id": 1}) == (1, 1)
    for bad in (
        {"from_id": 0, "to_id": 1},
        {"from_id": 1, "to_id": 1_000_001},
        {"from_id": True, "to_id": 2},
        {"from_id": 1},
        {"from_id": 1, "to_id": 2, "x": 0},
    ):
        with pytest.raises(CommandRefused):
            parse_resend(bad)


async def test_time_sync_stores_the_floor(rig: Rig, central: Central) -> None:
    t = T0 + 30 * 60_000
    raw = central.cmd(
        CommandType.TIME_SYNC, {"time_ms": t}, issued_at=t - 1000, expires_at=t + 60_000
    )
    res = await rig.handler.handle(raw, channel="mqtt")
    assert res.outcome is Outcome.APPLIED, res.message
    async with rig.outbox.transaction() as db:
        assert await load_floor(db) == t
    assert rig.handler.clock.now().quality.value == "central"
    ev = results(await rig.events())[-1]
    assert ev["effect"]["clock_events"] == ["central_time_sync"]


async def test_key_rotation_adds_a_key_that_signs_at_once_and_revokes_the_old(
    rig: Rig, central: Central
) -> None:
    new = Ed25519PrivateKey.generate()
    add = central.cmd(
        CommandType.KEYS_ROTATE,
        {
            "op": "add_key",
            "key_id": "billing-k2",
            "role": "billing",
            "public_key": base64.b64encode(raw_public(new)).decode(),
        },
    )
    assert (await rig.handler.handle(add, channel="usb")).outcome is Outcome.APPLIED
    topup = central.cmd(CommandType.TOPUP, key=new, issuer="billing-k2", command_id="t-new")
    assert (await rig.handler.handle(topup, channel="mqtt")).outcome is Outcome.APPLIED
    revoke = central.cmd(CommandType.KEYS_ROTATE, {"op": "revoke_key", "key_id": "billing-k1"})
    assert (await rig.handler.handle(revoke, channel="usb")).outcome is Outcome.APPLIED
    old = central.cmd(CommandType.TOPUP, command_id="t-old")
    res = await rig.handler.handle(old, channel="mqtt")
    assert res.reason is RejectReason.KEY_REVOKED
    assert [c[0] for c in await rig.credits()] == ["t-new"]


async def test_purpose_rotation_happens_exactly_once_even_if_the_keystore_lagged(
    rig: Rig, central: Central, tmp_path: Path
) -> None:
    v0 = rig.keys.versions()["storage"]
    raw = central.cmd(CommandType.KEYS_ROTATE, {"op": "rotate_purpose", "purpose": "storage"})
    assert (await rig.handler.handle(raw, channel="usb")).outcome is Outcome.APPLIED
    assert rig.keys.versions()["storage"] == v0 + 1
    await rig.handler.recover()
    assert Keystore.open(rig.keys.path).versions()["storage"] == v0 + 1
    # a crash after the commit but before the keystore write: the target is on disk,
    # the keystore still at the old version; start-up finishes the job, once
    async with rig.outbox.transaction() as db:
        await db.execute("UPDATE cmd_purpose_rotation SET target_version = target_version + 1")
    fresh = await make_handler(rig.outbox, central.trust(), Keystore.open(rig.keys.path), rig.time)
    assert fresh.keys is not None and fresh.keys.versions()["storage"] == v0 + 2
    await fresh.recover()
    assert Keystore.open(rig.keys.path).versions()["storage"] == v0 + 2


# ---------------------------------------------------------------------------
# The replay table is pruned by expiry, on the trusted-time floor


async def test_prune_forgets_only_ids_no_command_can_be_accepted_under(
    rig: Rig, central: Central
) -> None:
    h = rig.handler
    relay = central.cmd(CommandType.RELAY_OPERATE, {"meter": "m-1", "op": "trip"}, command_id="r-1")
    topup = central.cmd(CommandType.TOPUP, command_id="t-1", expires_at=T0 + 10 * 24 * HOUR)
    for raw in (relay, topup):
        assert (await h.handle(raw, channel="mqtt")).outcome is Outcome.APPLIED

    async def floor(ms: int) -> None:
        async with rig.outbox.transaction() as db:
            await save_floor(db, ms, rig.time.mono)

    async def seen() -> list[str]:
        return [r[0] for r in await rig.rows("SELECT command_id FROM sec_seen_command ORDER BY 1")]

    # the system clock a year ahead moves nothing: pruning goes by the trusted-time floor
    rig.time.wall += 365 * 24 * HOUR
    assert await h.prune_replay_table() == 0
    rig.time.wall -= 365 * 24 * HOUR
    # r-1 expired at T0 + 1 h; it is kept for SEEN_GRACE_MS after that
    await floor(T0 + HOUR + SEEN_GRACE_MS)
    assert await h.prune_replay_table() == 0
    await floor(T0 + HOUR + SEEN_GRACE_MS + 1)
    assert await h.prune_replay_table() == 1
    assert await seen() == ["t-1"]
    assert await rig.rows("SELECT command_id FROM cmd_relay_intent") == []  # handed, expired
    before = await rig.effects()
    # the pruned envelope replayed: still refused (counter floor), nothing happens
    res = await h.handle(relay, channel="mqtt")
    assert res.reason is RejectReason.COUNTER_STALE
    assert await rig.effects() == before and len(rig.relay.calls) == 1
    # an id still kept answers duplicate to a re-signed copy
    again = central.cmd(CommandType.TOPUP, command_id="t-1", expires_at=T0 + 10 * 24 * HOUR)
    assert (await h.handle(again, channel="mqtt")).outcome is Outcome.DUPLICATE
    assert await rig.credits() == [("t-1", 50_000_000)]


@settings(max_examples=15, deadline=None)
@given(
    expiries=st.lists(st.integers(1, 100 * 24 * HOUR), min_size=1, max_size=12),
    floor=st.integers(0, 120 * 24 * HOUR),
)
def test_a_pruned_id_would_be_refused_as_expired_at_any_trusted_time(
    expiries: list[int], floor: int
) -> None:
    """Whatever the expiries and the floor: an id goes only if its envelope's expiry
    lies before the floor (trusted time never runs below it), and every such id
    older than the grace goes."""

    async def run() -> tuple[set[str], set[str]]:
        with tempfile.TemporaryDirectory() as d:
            outbox = await open_database(Path(d) / "gw.db")
            try:
                async with outbox.transaction() as db:
                    await envelope_schema(db)
                    await time_schema(db)
                    for i, e in enumerate(expiries):
                        await db.execute(
                            "INSERT INTO sec_seen_command VALUES (?, 'k', ?, 'topup', x'00',"
                            " 'mqtt', 0, ?)",
                            (f"c-{i}", i + 1, e),
                        )
                    await save_floor(db, floor, 0)
                h = CommandHandler(
                    outbox,
                    trust=TrustStore(),
                    gateway_id=GATEWAY,
                    clock=TrustedClock(restore(0, 0), wall=lambda: 0, mono=lambda: 0),
                    billing=NoBilling(),
                    relay=RecordingRelay(),
                    config=NoRemoteConfig(),
                    resend=NoResend(),
                )
                await h.start()
                await h.prune_replay_table(grace_ms=HOUR)
                async with outbox.transaction() as db, db.execute(
                    "SELECT command_id FROM sec_seen_command"
                ) as cur:
                    kept = {str(r[0]) for r in await cur.fetchall()}
            finally:
                await outbox.close()
        return kept, {f"c-{i}" for i in range(len(expiries))}

    kept, every = asyncio.run(run())
    for i, e in enumerate(expiries):
        cid = f"c-{i}"
        if cid not in kept:
            assert e < floor  # a command carrying it is expired at any time >= the floor
        else:
            assert e >= floor - HOUR
    assert kept <= every


# ---------------------------------------------------------------------------
# Rejection floods are aggregated


def test_tally_first_per_reason_and_hour_is_audited_and_summaries_follow() -> None:
    tally: dict[tuple[str, int], Bucket] = {}
    notes = []
    for i in range(10):
        tally, note = tally_rejection(tally, "malformed", T0 + i, "mqtt", event_budget=3)
        notes.append(note)
    assert [n.audit for n in notes] == [True] + [False] * 9
    assert [n.event for n in notes] == [True] * 3 + [False] * 7
    tally, note = tally_rejection(tally, "expired", T0 + 20, "usb", event_budget=3)
    assert note.audit
    keep, done = due_summaries(tally, T0 + HOUR - 1)
    assert done == [] and keep == tally
    keep, done = due_summaries(tally, T0 + HOUR)
    assert keep == {}
    # "expired" was seen once: its full row says everything; no summary needed
    assert [(b.reason, b.count, b.first_ms, b.last_ms) for b in done] == [
        ("malformed", 10, T0, T0 + 9)
    ]


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.sampled_from(["malformed", "expired", "replay"]), st.integers(0, 3 * HOUR)),
        max_size=60,
    )
)
def test_tally_accounts_for_every_rejection_with_bounded_rows(
    events: list[tuple[str, int]],
) -> None:
    """Whatever the order: at most one full row per (reason, hour), and no count lost."""
    tally: dict[tuple[str, int], Bucket] = {}
    full_rows: list[tuple[str, int]] = []
    summarised: list[Bucket] = []
    now = T0
    for reason, dt_ms in sorted(events, key=lambda e: e[1]):
        now = T0 + dt_ms  # trusted time never goes back
        tally, done = due_summaries(tally, now)
        summarised += done
        tally, note = tally_rejection(tally, reason, now, "mqtt", event_budget=3)
        if note.audit:
            full_rows.append((reason, note.bucket.hour_ms))
    tally, done = due_summaries(tally, now + 4 * HOUR)
    summarised += done
    assert tally == {}
    assert len(full_rows) == len(set(full_rows))
    per_bucket = {(b.reason, b.hour_ms): b.count for b in summarised}
    assert all(k in set(full_rows) for k in per_bucket)
    total = sum(per_bucket.get(k, 1) for k in set(full_rows))
    assert total == len(events)


async def test_flood_of_garbage_writes_bounded_rows(rig: Rig, central: Central) -> None:
    rogue = Ed25519PrivateKey.generate()
    for i in range(300):
        raw = (
            central.cmd(CommandType.TOPUP, key=rogue, issuer="billing-k1")
            if i % 2
            else os.urandom(40)
        )
        res = await rig.handler.handle(raw, channel="mqtt")
        assert res.outcome is Outcome.REJECTED
    actions = await rig.audit_actions()
    assert actions == ["command.rejected", "command.rejected"]  # malformed, bad_signature
    assert len(results(await rig.events())) == 2 * 5  # event budget per reason and hour
    rig.time.advance(HOUR)
    assert await rig.handler.flush_rejections() == 2
    summaries = {
        e["reason"]: e["count"] for e in await rig.events() if e["type"] == "command_rejections"
    }
    assert summaries == {"malformed": 150, "bad_signature": 150}
    assert (await rig.audit_actions())[2:] == ["command.rejected_summary"] * 2
    assert audit.verify(rig.path).ok
    assert rig.handler.stats.by_reason == {"malformed": 150, "bad_signature": 150}


async def test_summary_is_written_by_the_next_rejection_of_a_later_hour(
    rig: Rig, central: Central
) -> None:
    for _ in range(3):
        await rig.handler.handle(b"junk", channel="mqtt")
    rig.time.advance(HOUR)
    await rig.handler.handle(b"junk", channel="mqtt")
    assert await rig.audit_actions() == [
        "command.rejected",
        "command.rejected_summary",
        "command.rejected",
    ]
    await rig.handler.handle(b"junk", channel="mqtt")
    assert await rig.handler.flush_all_rejections() == 1


# ---------------------------------------------------------------------------
# Crash consistency: SIGKILL mid-stream


def _stream(central: Central, n: int) -> list[bytes]:
    out = []
    purchases = 0  # the account's purchase counter runs 1, 2, 3, ... over the top-ups
    for i in range(n):
        if i % 5 == 4:
            out.append(
                central.cmd(
                    CommandType.RELAY_OPERATE,
                    {"meter": f"m-{i}", "op": "trip"},
                    command_id=f"r-{i}",
                    expires_at=T0 + 2 * HOUR,
                )
            )
        else:
            purchases += 1
            out.append(
                central.cmd(
                    CommandType.TOPUP,
                    topup_body(amount_micro=1_000 + i, pc=purchases),
                    command_id=f"t-{i}",
                    expires_at=T0 + 2 * HOUR,
                )
            )
    return out


async def _child(db_path: Path, stream: list[bytes], trust: TrustStore) -> None:
    outbox = await open_database(db_path)
    ft = FakeTime(T0 + 1000)
    h = await make_handler(outbox, trust, None, ft)
    print("ready", flush=True)
    for i, raw in enumerate(stream):
        res = await h.handle(raw, channel="mqtt")
        print(i, res.outcome.value, flush=True)
    print("done", flush=True)
    await outbox.close()


def _run_child(db: Path, stream: Path, trust: Path, kill_after: int | None) -> bool:
    """Run the child; SIGKILL it after ``kill_after`` applied commands. True if it finished."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.security.test_commands", str(db), str(stream), str(trust)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    seen = 0
    finished = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if not ready:
                continue
            line = proc.stdout.readline().decode()
            if not line:
                break
            if line.startswith("done"):
                finished = True
                break
            if line.rstrip().endswith(" applied"):  # count new applications, not replays
                seen += 1
                if kill_after is not None and seen >= kill_after:
                    # land the kill at an arbitrary point of the next command
                    time.sleep(random.uniform(0, 0.004))
                    proc.send_signal(signal.SIGKILL)
                    break
        else:
            pytest.fail("child did not make progress in 60 s")
    finally:
        with contextlib.suppress(ProcessLookupError):
            if not finished:
                proc.kill()
        proc.wait(timeout=10)
    return finished


async def _check_consistent(db_path: Path, received: list[dict[str, Any]]) -> set[str]:
    """Invariants after a kill; ``received`` accumulates the events central got so far."""
    outbox = await open_database(db_path)
    try:
        received.extend(await EventLog(outbox).drain())
    finally:
        await outbox.close()
    async with aiosqlite.connect(db_path) as db:

        async def q(sql: str) -> list[tuple[Any, ...]]:
            async with db.execute(sql) as cur:
                return [tuple(r) for r in await cur.fetchall()]

        seen = {r[0]: r[1] for r in await q("SELECT command_id, type FROM sec_seen_command")}
        credits = [r[0] for r in topups(await q(CREDITS))]
        intents = [r[0] for r in await q("SELECT command_id FROM cmd_relay_intent")]
        applied_events = [e["id"] for e in received if e.get("outcome") == "applied"]
        balance = await q("SELECT coalesce(sum(balance_micro), 0) FROM billing_account")
        amounts = await q(
            "SELECT coalesce(sum(amount_micro), 0) FROM billing_entry WHERE kind = 'credit'"
        )
        # re-sent commands already applied are refused as replays; the ledger refuses none
        refused = [e for e in received if e.get("reason") == "bad_body"]
    assert len(credits) == len(set(credits)), "a top-up was applied twice"
    assert len(intents) == len(set(intents))
    assert set(credits) == {c for c, t in seen.items() if t == "topup"}, "seen vs applied differ"
    assert set(intents) == {c for c, t in seen.items() if t == "relay.operate"}
    assert sorted(applied_events) == sorted(seen), "result events differ from applied commands"
    assert balance == amounts
    assert refused == [], "the ledger refused a top-up of the stream"
    assert audit.verify(db_path).ok
    return set(seen)


async def test_sigkill_mid_stream_never_separates_seen_from_applied(
    tmp_path: Path, central: Central, long_run: bool
) -> None:
    n = 120 if long_run else 40
    stream = _stream(central, n)
    stream_path = tmp_path / "stream.json"
    stream_path.write_bytes(orjson.dumps([base64.b64encode(s).decode() for s in stream]))
    trust_path = tmp_path / "trust.json"
    trust_path.write_bytes(orjson.dumps(central.trust().to_dict()))
    db = tmp_path / "gateway.db"
    rng = random.Random(7)
    rounds = 12 if long_run else 4
    applied: set[str] = set()
    received: list[dict[str, Any]] = []
    for _ in range(rounds):
        # central re-sends the whole stream each time (it has seen no results)
        _run_child(db, stream_path, trust_path, kill_after=rng.randint(1, n // rounds + 3))
        applied = await _check_consistent(db, received)
    assert _run_child(db, stream_path, trust_path, kill_after=None)
    applied = await _check_consistent(db, received)
    assert len(applied) == n  # everything applied, each exactly once
    # the relay intents a crash left pending are handed on the next start
    outbox = await open_database(db)
    relay = RecordingRelay()
    await make_handler(outbox, central.trust(), None, FakeTime(T0 + 1000), relay=relay)
    await outbox.close()
    async with (
        aiosqlite.connect(db) as conn,
        conn.execute("SELECT count(*) FROM cmd_relay_intent WHERE state != 'handed'") as cur,
    ):
        assert await cur.fetchone() == (0,)


# ---------------------------------------------------------------------------
# MQTT glue against a real broker


async def _wait(cond: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_inbox_on_a_shared_connection(
    rig: Rig, central: Central, mosquitto: Mosquitto
) -> None:
    topics = Topics("edgegw/v1", GATEWAY)
    woken: list[str] = []
    inbox = CommandInbox(rig.handler, topics, on_result=lambda r: woken.append(r.outcome.value))
    other: list[str] = []

    async def reader(client: aiomqtt.Client) -> None:  # the uplink's receive loop, in miniature
        async for msg in client.messages:
            if inbox.wants(msg.topic):
                inbox.offer(msg.payload)
            else:
                other.append(msg.topic.value)

    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="gw") as gw_client:
        await gw_client.subscribe(topics.ack, qos=1)
        await inbox.subscribe(gw_client)
        async with asyncio.TaskGroup() as tg:
            t1 = tg.create_task(reader(gw_client))
            t2 = tg.create_task(inbox.run())
            async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="central") as c:
                for i in range(3):
                    await c.publish(
                        topics.cmd,
                        central.cmd(CommandType.TOPUP, topup_body(pc=i + 1), command_id=f"t-{i}"),
                        qos=1,
                    )
                await c.publish(topics.cmd, b"garbage", qos=1)
                await c.publish(topics.ack, b"{}", qos=1)
                await _wait(lambda: len(woken) == 4 and other)
            t1.cancel()
            t2.cancel()
    assert woken == ["applied"] * 3 + ["rejected"]
    assert other == [topics.ack]
    assert [c[0] for c in await rig.credits()] == ["t-0", "t-1", "t-2"]


async def test_inbox_applies_a_broker_level_duplicate_once(
    rig: Rig, central: Central, mosquitto: Mosquitto
) -> None:
    """The same command delivered twice by the broker (QoS 1 may repeat one): applied,
    then refused as a replay; the relay operates once."""
    topics = Topics("edgegw/v1", GATEWAY)
    done: list[Outcome] = []
    inbox = CommandInbox(rig.handler, topics, on_result=lambda r: done.append(r.outcome))

    async def reader(client: aiomqtt.Client) -> None:  # the uplink's receive loop, in miniature
        async for msg in client.messages:
            if inbox.wants(msg.topic):
                inbox.offer(msg.payload)

    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="gw") as gw_client:
        await inbox.subscribe(gw_client)
        async with asyncio.TaskGroup() as tg:
            t1 = tg.create_task(reader(gw_client))
            t2 = tg.create_task(inbox.run())
            async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="central") as c:
                raw = central.cmd(CommandType.RELAY_OPERATE, {"meter": "m-1", "op": "protect"})
                await c.publish(topics.cmd, raw, qos=1)
                await c.publish(topics.cmd, raw, qos=1)  # broker-level duplicate
                await _wait(lambda: len(done) == 2)
            t1.cancel()
            t2.cancel()
    assert done == [Outcome.APPLIED, Outcome.REJECTED]
    assert [(c[0], c[1]) for c in rig.relay.calls] == [("m-1", RelayOp.PROTECT)]


if __name__ == "__main__":  # the crash-test child
    _stream_in = [base64.b64decode(s) for s in orjson.loads(Path(sys.argv[2]).read_bytes())]
    asyncio.run(_child(Path(sys.argv[1]), _stream_in, TrustStore.load(sys.argv[3])))

"""Central's queue in the headend's stores (SQLite and PostgreSQL): results, counters, payments.

The gateways' answers reach the queue the way they do in production: as
``command_result`` events and ledger ``charge`` records inside batches the
headend's own store takes (:meth:`headend.store.HeadendDB.store`,
:meth:`headend.store_pg.PostgresHeadendDB.store`), in the batch's
transaction. Re-signed envelopes are checked with the gateway's own
verification code.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.security.envelope import authenticate
from headend.central import Actor, ApiRole, Central, Conflict
from headend.central_db import CentralDB
from headend.dispatch import Dispatcher
from headend.signing import Signer, init_keys
from headend.store import HeadendDB, HeadendStore
from store_forward.codec import JsonCodec, decode
from store_forward.command_envelope import Envelope
from store_forward.command_roles import TrustStore
from store_forward.records import Record, RecordClass
from tests.headend.test_headend_scaleout import pg_dsn  # noqa: F401 (fixture)

GW = "gw-s1"
OTHER = "gw-s2"
T0 = 1_767_225_600_000
BILLING = Actor("clerk", ApiRole.BILLING)
OPS = Actor("field", ApiRole.OPERATIONS)


class Clock:
    def __init__(self) -> None:
        self.ms = T0

    def __call__(self) -> int:
        return self.ms


@dataclass
class Site:
    central: Central
    store: HeadendStore
    db: CentralDB
    clock: Clock
    signer: Signer
    trust: TrustStore
    seq: itertools.count[int]
    rid: itertools.count[int]
    dsn: str | None

    async def answer(self, gateway: str, *bodies: tuple[str, dict[str, Any]]) -> str:
        """A batch from ``gateway`` with these (kind, body) records, through the store."""
        records = [
            Record(next(self.rid), RecordClass.EVENT if k == "event" else RecordClass.BILLING, k, self.clock(), b)
            for k, b in bodies
        ]
        payload, _ = JsonCodec().pack(gateway, next(self.seq), records, 1 << 20, epoch="00000000000000aa")
        batch = decode(payload, None, allow_plain=True)
        return (await self.store.store(batch, self.clock())).status

    async def view(self, cid: str) -> dict[str, Any]:
        return await self.central.command(BILLING, cid)


def result(cid: str, outcome: str, reason: str | None = None, code: str | None = None, **extra: Any) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"type": "command_result", "outcome": outcome, "id": cid, "channel": "mqtt", **extra}
    if reason:
        body["reason"] = reason
    if code:
        body["code"] = code
    return ("event", body)


def credit(cid: str, micro: int) -> tuple[str, dict[str, Any]]:
    return ("charge", {"id": f"topup:{cid}", "account": "acct-1", "seq": 9, "kind": "credit",
                       "amount_micro": micro, "time_ms": T0, "body": {}})  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
async def site(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Site]:
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgresql" else None
    init_keys(tmp_path / "keys")
    signer = Signer.load(tmp_path / "keys")
    store: HeadendStore
    if dsn:
        from headend.store_pg import PostgresHeadendDB

        store = await PostgresHeadendDB.open(dsn)
    else:
        store = await HeadendDB.open(tmp_path / "central.db")
    db = await CentralDB.open(db=tmp_path / "central.db", dsn=dsn)
    clock = Clock()
    central = Central(db, signer, clock_ms=clock)
    await central.add_account(BILLING, account="acct-1", gateway=GW)
    await central.add_account(BILLING, account="acct-2", gateway=OTHER)
    try:
        yield Site(central, store, db, clock, signer, TrustStore.load(tmp_path / "keys" / "trust.json"),
                   itertools.count(1), itertools.count(1), dsn)  # fmt: skip
    finally:
        await db.close()
        await store.close()


async def topup(s: Site, micro: int, account: str = "acct-1", **kw: Any) -> dict[str, Any]:
    return await s.central.sell_topup(BILLING, account=account, amount_micro=micro, payment_channel="counter", **kw)


def verify(s: Site, envelope: bytes) -> Envelope:
    env = authenticate(envelope, s.trust)
    assert isinstance(env, Envelope), env
    return env


async def test_a_snapshot_past_a_counter_gap_releases_the_top_up_waiting_behind_it(site: Site) -> None:
    s = site
    a, b = await topup(s, 5_000_000), await topup(s, 7_000_000)
    # A is refused for good: its counter is a gap B waits behind (retried in 10 minutes)
    await s.answer(GW, result(a["id"], "rejected", "bad_body", "hoarding_limit", message="too much"),
                   result(b["id"], "rejected", "bad_body", "counter_gap", message="expected 1"))  # fmt: skip
    vb = await s.view(b["id"])
    assert (vb["state"], vb["code"]) == ("queued", "counter_gap") and vb["next_attempt_ms"] > s.clock()
    # central's snapshot moves the account's counter past the gap: B goes out at once
    snap = await s.central.snapshot_balance(BILLING, account="acct-1", balance_micro=0, as_of_seq=1,
                                            purchase_counter=1)  # fmt: skip
    await s.answer(GW, result(snap["id"], "applied", effect={"status": "applied"}))
    assert (await s.view(snap["id"]))["state"] == "applied"
    assert (await s.view(b["id"]))["next_attempt_ms"] <= s.clock()


async def test_results_in_stored_batches_move_the_commands(site: Site) -> None:
    s = site
    a, b = await topup(s, 5_000_000), await topup(s, 7_000_000)
    assert (a["purchase_counter"], b["purchase_counter"]) == (1, 2)
    trip = await s.central.operate_relay(OPS, gateway=GW, meter="m1", op="trip")
    close = await s.central.operate_relay(OPS, gateway=GW, meter="m1", op="close")
    cfg = await s.central.change_config(OPS, gateway=GW, settings={"gateway.poll_interval_s": 5})
    hoard = await topup(s, 9_000_000)
    # B arrived first and waits for A; A is applied (and unblocks B); the credit follows
    assert await s.answer(GW, result(b["id"], "rejected", "bad_body", "counter_gap", message="expected 1"),
                          result(a["id"], "applied", effect={"status": "applied"}),
                          credit(a["id"], 5_000_000)) == "stored"  # fmt: skip
    va, vb = await s.view(a["id"]), await s.view(b["id"])
    assert (va["state"], va["credited"], va["effect"]) == ("applied", "5.00", {"status": "applied"})
    assert (vb["state"], vb["code"]) == ("queued", "counter_gap")
    assert vb["next_attempt_ms"] <= s.clock()
    # the close was applied; the trip, refused as out of order after it, is not re-signed
    await s.answer(GW, result(close["id"], "applied"), result(trip["id"], "rejected", "counter_stale"))
    assert (await s.view(trip["id"]))["state"] == "superseded"
    assert (await s.view(close["id"]))["state"] == "applied"
    # the configuration change refused as stale is re-signed under the same id
    await s.answer(GW, result(cfg["id"], "rejected", "counter_stale"))
    assert (await s.view(cfg["id"]))["state"] == "queued"
    # a refusal for good
    await s.answer(GW, result(hoard["id"], "rejected", "bad_body", "hoarding_limit", message="too much"))
    v = await s.view(hoard["id"])
    assert (v["state"], v["reason"], v["code"], v["message"]) == ("refused", "bad_body", "hoarding_limit", "too much")

    # another gateway cannot answer for this one's commands
    await s.answer(OTHER, result(b["id"], "applied"), credit(b["id"], 7_000_000))
    vb = await s.view(b["id"])
    assert (vb["state"], vb["credited"]) == ("queued", None)

    d = Dispatcher(s.db, s.signer, "127.0.0.1", 1, clock_ms=s.clock)
    out = {o.command_id: o for o in await d.take(s.clock())}
    assert set(out) == {b["id"], cfg["id"]}  # the re-signed, the retried; nothing final
    env = verify(s, out[cfg["id"]].envelope)
    assert env.command_id == cfg["id"] and env.counter > (await s.view(cfg["id"]))["log"][0]["counter"]
    assert [x["event"] for x in (await s.view(cfg["id"]))["log"]] == ["created", "result", "resigned", "sent"]
    assert verify(s, out[b["id"]].envelope).body["purchase_counter"] == 2

    # a duplicate batch changes nothing
    n = (await s.view(a["id"]))["results"]
    seq = next(s.seq)
    records = [Record(900, RecordClass.EVENT, "event", T0, result(a["id"], "applied")[1])]
    payload, _ = JsonCodec().pack(GW, seq, records, 1 << 20, epoch="00000000000000aa")
    assert (await s.store.store(decode(payload, None, allow_plain=True), T0)).status == "stored"
    assert (await s.store.store(decode(payload, None, allow_plain=True), T0)).status == "duplicate"
    assert (await s.view(a["id"]))["results"] == n + 1


async def test_expiry_stops_sending_but_a_late_applied_result_is_the_truth(site: Site) -> None:
    s = site
    t = await topup(s, 1_000_000, valid_for_s=120)
    d = Dispatcher(s.db, s.signer, "127.0.0.1", 1, clock_ms=s.clock)
    assert [o.command_id for o in await d.take(s.clock())] == [t["id"]]
    s.clock.ms += 121_000
    assert await d.take(s.clock()) == []
    assert (await s.view(t["id"]))["state"] == "expired"
    s.clock.ms += 3_600_000
    assert await d.take(s.clock()) == []  # never sent again
    # the gateway applied it before it expired; its answer comes late
    await s.answer(GW, result(t["id"], "applied"), credit(t["id"], 1_000_000))
    v = await s.view(t["id"])
    assert (v["state"], v["credited"]) == ("applied", "1.00")


async def test_the_window_holds_commands_back_and_resends_wait_for_the_gateway(site: Site) -> None:
    s = site
    ids = [(await topup(s, 1_000_000 + i))["id"] for i in range(12)]
    d = Dispatcher(s.db, s.signer, "127.0.0.1", 1, clock_ms=s.clock, window=8)
    assert [o.command_id for o in await d.take(s.clock())] == ids[:8]
    assert await d.take(s.clock()) == []  # window full, nothing due again yet
    await s.answer(GW, *(result(c, "applied") for c in ids[:3]))
    assert [o.command_id for o in await d.take(s.clock())] == ids[8:11]
    d.note_presence(GW, b"offline", s.clock())
    s.clock.ms += 3_600_000
    assert await d.take(s.clock()) == []  # offline: the broker holds them, no resend
    d.note_presence(GW, b"online", s.clock())
    assert await d.take(s.clock()) == []  # back: what the broker held is answered first
    s.clock.ms += 31_000
    again = [o.command_id for o in await d.take(s.clock())]
    assert again == ids[3:11]
    views = [await s.view(c) for c in ids[3:11]]
    assert {v["attempts"] for v in views} == {2}


async def test_two_dispatchers_keep_one_window_and_the_queue_order_per_gateway(site: Site) -> None:
    """Several dispatchers may share a PostgreSQL database. While one is in the middle
    of its pass for a gateway (its transaction holds the gateway, has claimed and
    marked commands sent, not yet committed), another's pass leaves that gateway
    alone: it neither sends commands queued behind them (order) nor fills a window
    of its own beside the first one's (8 in flight, not 16)."""
    s = site
    if s.dsn is None:
        pytest.skip("one SQLite writer: a single dispatcher")
    ids = [(await topup(s, 1_000_000 + i))["id"] for i in range(12)]
    other_ids = [(await topup(s, 2_000_000, account="acct-2"))["id"]]
    second_db = await CentralDB.open(dsn=s.dsn)
    try:
        second = Dispatcher(second_db, s.signer, "127.0.0.1", 1, clock_ms=s.clock, window=8)
        first = Dispatcher(s.db, s.signer, "127.0.0.1", 1, clock_ms=s.clock, window=8)
        # the second dispatcher's pass, stopped before its commit: the queue's
        # first eight commands of GW claimed and marked sent
        async with second_db.transaction() as tx:
            due = await second_db.due(tx, s.clock(), 8)
            assert [r.command_id for r in due] == ids[:8]
            assert await second_db.claim_gateways(tx, {GW}) == {GW}
            for r in due:
                await second_db.mark_sent(tx, r, s.clock(), s.clock() + 30_000)
            # meanwhile the first dispatcher: nothing for GW, the other gateway's command goes
            assert [o.command_id for o in await first.take(s.clock())] == other_ids
        # the second committed: eight in flight for GW, the window is full for both
        assert await first.take(s.clock()) == []
        assert await second.take(s.clock()) == []
        await s.answer(GW, *(result(c, "applied") for c in ids[:2]))
        assert [o.command_id for o in await first.take(s.clock())] == ids[8:10]
        views = [await s.view(c) for c in ids]
        assert [v["attempts"] for v in views] == [1] * 10 + [0] * 2
    finally:
        await second_db.close()


async def test_purchase_and_signing_counters_are_never_reused_by_concurrent_sellers(
    site: Site, tmp_path: Path
) -> None:
    s = site
    # a second connection (a second central process on PostgreSQL; SQLite serialises)
    db2 = await CentralDB.open(db=tmp_path / "central.db", dsn=s.dsn)
    try:
        other = Central(db2, s.signer, clock_ms=s.clock)
        sales = await asyncio.gather(
            *(
                c.sell_topup(BILLING, account="acct-1", amount_micro=1_000_000, payment_channel="bank")
                for c in [s.central, other] * 10
            )
        )
    finally:
        await db2.close()
    assert sorted(v["purchase_counter"] for v in sales) == list(range(1, 21))
    async with s.db.transaction() as tx:
        rows = [await s.db.command(tx, v["id"]) for v in sales]
    counters = [r.counter for r in rows if r is not None]
    assert len(set(counters)) == 20
    for r in rows:
        assert r is not None and verify(s, r.envelope).counter == r.counter


async def test_a_payment_posted_concurrently_twice_makes_one_topup(site: Site, tmp_path: Path) -> None:
    s = site
    _, token = await s.central.create_token("bank-1", ApiRole.CHANNEL, "bank")
    actor = await s.central.authenticate(token)
    assert actor is not None
    db2 = await CentralDB.open(db=tmp_path / "central.db", dsn=s.dsn)
    try:
        other = Central(db2, s.signer, clock_ms=s.clock)
        pay = {"idempotency_key": "tx-1", "account": "acct-1", "amount": "8.00"}
        answers = await asyncio.gather(*(c.post_payment(actor, pay) for c in [s.central, other] * 3))
        assert len({json.dumps(a.body, sort_keys=True) for a in answers}) == 1
        assert sorted(a.replayed for a in answers) == [False] + [True] * 5
        with pytest.raises(Conflict, match="tx-1"):
            await other.post_payment(actor, {**pay, "amount": "8.01"})
    finally:
        await db2.close()
    listing = await s.central.commands(BILLING, type="topup")
    assert len(listing) == 1 and listing[0]["amount"] == "8.00" and listing[0]["payment_channel"] == "bank"



async def test_a_task_cancelled_at_any_point_of_a_transaction_leaves_the_connection_usable(
    tmp_path: Path,
) -> None:
    """The dispatcher and the ingest are cancelled when their broker connection drops
    (and at stop), possibly while they begin a transaction: the statement still runs
    on aiosqlite's thread, and must not leave a transaction nobody ends."""
    db = await CentralDB.open(db=tmp_path / "c.db")
    store = await HeadendDB.open(tmp_path / "c.db")
    payload, _ = JsonCodec().pack(GW, 1, [Record(1, RecordClass.EVENT, "event", T0, {"type": "x"})],
                                  1 << 20, epoch="00000000000000cc")  # fmt: skip
    batch = decode(payload, None, allow_plain=True)
    try:
        for spins in range(16):  # cancel after 0, 1, ... event loop turns

            async def work() -> None:
                async with db.transaction() as tx:
                    await db.next_counter(tx, "k", T0)
                    await asyncio.sleep(0)

            task = asyncio.create_task(work())
            for _ in range(spins):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            stored = asyncio.create_task(store.store(batch, T0))
            for _ in range(spins):
                await asyncio.sleep(0)
            stored.cancel()
            await asyncio.gather(stored, return_exceptions=True)
            async with db.transaction() as tx:  # usable: no "transaction within a transaction"
                assert await db.next_counter(tx, "k", T0) >= T0 * 1000
        assert (await store.store(batch, T0)).status in ("stored", "duplicate")
    finally:
        await store.close()
        await db.close()


async def test_every_command_central_signs_is_one_the_gateway_verifies_and_reads(site: Site) -> None:
    """Each kind of command central can ask for — top-up, tariff, balance snapshot,
    relay operation, configuration change — leaves the dispatcher as an envelope the
    gateway's own verifier accepts, signed by the role's key, with a body the
    gateway's own parser for that type reads (gateway.commands.bodies)."""
    from gateway.commands.bodies import BODIES
    from store_forward.command_roles import COMMAND_ROLE, CommandType

    s = site
    asked = {
        "topup": await topup(s, 5_000_000),
        "tariff.publish": (await s.central.publish_tariff(
            BILLING, gateways=[GW], tariff={"id": "flat-basic", "version": 2, "price": "0.6000",
                                            "effective_from": "2026-09-21T00:00:00+08:00",
                                            "timezone": "Asia/Shanghai"}))[0],
        "balance.snapshot": await s.central.snapshot_balance(
            BILLING, account="acct-1", balance_micro=12_340_000, as_of_seq=7, purchase_counter=1,
            included_ids=["topup:x"]),
        "relay.operate": await s.central.operate_relay(OPS, gateway=GW, meter="m1", op="close_allowed",
                                                       reason="paid at the counter"),
        "config.patch": await s.central.change_config(OPS, gateway=GW, settings={"gateway.poll_interval_s": 5},
                                                      confirm_within_s=600),
    }  # fmt: skip
    d = Dispatcher(s.db, s.signer, "127.0.0.1", 1, clock_ms=s.clock)
    out = {o.command_id: o for o in await d.take(s.clock())}
    assert set(out) == {v["id"] for v in asked.values()}
    for ctype, view in asked.items():
        env = verify(s, out[view["id"]].envelope)
        assert (env.type, env.command_id, env.body) == (ctype, view["id"], view["body"])
        t = CommandType(ctype)
        key = s.trust.lookup(env.issuer)
        assert key is not None and key.role is COMMAND_ROLE[t]
        BODIES[t].parse(env.body, env.command_id)  # raises CommandRefused if the gateway would refuse it

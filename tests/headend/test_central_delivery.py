"""Commands that arrive: central's queue, a real mosquitto, a real gateway daemon.

The gateway (the daemon, a Modbus meter with a supply relay, one prepaid
account) reaches a real mosquitto, on the shipped configuration (mutual TLS,
the ACL, persistence), through a link emulator; central runs the
headend's ingest, the dispatcher and the HTTP API in this process. Top-ups
are sold through the API (billing, and payment channels) and the command
line while the gateway is online, while its results cannot reach central,
and while it is offline for hours of simulated time — across a clean
broker restart (its persistence keeps the gateway's session and the queued
commands) and a SIGKILL (which loses what the broker held since). Every
top-up must be credited exactly once by the gateway's ledger, and show
``applied`` with its credit at central; a relay operation that expired while
the gateway was away must never reach the relay; the payment a channel
posted twice must be one top-up.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import main as edgegw
from gateway.config import load_config
from gateway.daemon import Daemon
from headend.commands import ONLINE_GRACE_MS
from headend.tls import BrokerTLS
from testbed.linkemu import LinkEmulator
from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import until
from tests.harness.mosquitto import Mosquitto, TlsFiles
from tests.headend.central_site import (
    ACCOUNT_ID,
    CentralStack,
    ClientTls,
    SimClock,
    gateway_applied,
    gateway_audit,
    gateway_credits,
    prepaid_site,
)
from tests.headend.test_headend_scaleout import pg_dsn  # noqa: F401 (fixture)
from tests.security.tls import HEADEND_CN, Pki, make_pki

HOUR_MS = 3_600_000


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), clients=("gw-central", HEADEND_CN))


@pytest.fixture
def shipped_broker(tmp_path: Path, pki: Pki) -> Iterator[Mosquitto]:
    """mosquitto on the shipped configuration (examples/mosquitto: mutual TLS, the
    ACL, persistence that keeps sessions and their queues across a clean restart)."""
    broker = Mosquitto.shipped(
        tmp_path / "broker", TlsFiles(ca=pki.ca, crl=pki.crl, cert=pki.server.cert, key=pki.server.key)
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


async def _exactly_once_while_offline(
    tmp_path: Path, broker: Mosquitto, pki: Pki, dsn: str | None
) -> None:
    clock = SimClock()
    headend = pki.clients[HEADEND_CN]
    central_tls = BrokerTLS(pki.ca, headend.cert, headend.key).context()
    gw = pki.clients["gw-central"]
    async with (
        ModbusSimulator(units=[1], load_kw="0.5") as sim,
        LinkEmulator("127.0.0.1", broker.port) as link,
        CentralStack(tmp_path, broker_port=broker.port, clock=clock, dsn=dsn, tls=central_tls) as c,
    ):
        site = prepaid_site(
            tmp_path, broker_port=link.port, modbus_port=sim.port, trust=c.trust,
            tls=ClientTls(pki.ca, gw.cert, gw.key),
        )  # fmt: skip
        cfg = load_config(site)
        daemon = Daemon(cfg, clock_ms=clock.now)
        stop = asyncio.Event()
        run = asyncio.create_task(daemon.run(stop))
        api = c.api
        try:
            await asyncio.wait_for(daemon.ready.wait(), 15)
            status, acct, _ = await api.call(
                "PUT", f"/api/v1/accounts/{ACCOUNT_ID}", "billing", {"gateway": "gw-central"}
            )
            assert status == 200, acct
            await until(lambda: c.dispatcher.presence.get("gw-central") is not None, 15, "presence")

            # 1. online: a top-up sold at the counter is applied and credited
            status, t1, _ = await api.call(
                "POST", "/api/v1/topups", "billing",
                {"account": ACCOUNT_ID, "amount": "10.00", "payment_channel": "counter"},
            )  # fmt: skip
            assert status == 201 and t1["state"] == "queued" and t1["purchase_counter"] == 1, t1
            v = await c.until_state(t1["id"], {"applied"}, 30)
            assert v["effect"]["status"] == "applied"

            # 2. the result cannot reach central (the ingest is down): central resends, and
            #    the gateway refuses the second copy as a replay; one credit
            await c.stop_ingest()
            status, t2, _ = await api.call(
                "POST", "/api/v1/topups", "billing",
                {"account": ACCOUNT_ID, "amount_micro": 2_500_000, "payment_channel": "agent"},
            )  # fmt: skip
            assert status == 201
            await until(lambda: t2["id"] in gateway_applied(daemon.config.storage.path), 20, "t2 applied")
            await until(lambda: c.dispatcher.stats.sent >= 2, 10, "t2 sent")
            clock.advance(ONLINE_GRACE_MS + 31_000)  # past the resend time (and any grace)
            await until(lambda: c.dispatcher.stats.resent >= 1, 10, "t2 resent")
            await until(
                lambda: any(
                    a.get("id") == t2["id"] and a.get("reason") == "replay"
                    for a in gateway_audit(daemon.config.storage.path, "command.rejected")
                ),
                20,
                "the resent copy refused as a replay",
            )
            assert (await c.state(t2["id"]))["state"] == "sent"
            c.start_ingest()
            await c.until_state(t2["id"], {"applied"}, 30)
            for _ in range(100):  # the replay's result comes too, and changes nothing
                v = await c.state(t2["id"])
                if v["results"] >= 2:
                    break
                await asyncio.sleep(0.2)
            assert v["results"] >= 2 and v["state"] == "applied", v
            assert [s["event"] for s in v["log"]].count("result") == v["results"]

            # 3. the gateway goes offline (its link dies; the broker publishes its will)
            link.set_up(False)
            await until(
                lambda: (p := c.dispatcher.presence.get("gw-central")) is not None and not p.online,
                20,
                "the gateway seen offline",
            )
            # a bank posts a payment twice (a lost answer), then once more with other content
            pay = {"idempotency_key": "bank-tx-0001", "account": ACCOUNT_ID, "amount": "20.00",
                   "reference": "slip 0001"}  # fmt: skip
            s1, p1, h1 = await api.call("POST", "/api/v1/payments", "bank", pay)
            s2, p2, h2 = await api.call("POST", "/api/v1/payments", "bank", {**pay, "amount": "20"})
            assert (s1, s2) == (201, 201) and p1 == p2, (p1, p2)
            assert "Idempotent-Replayed" not in h1 and h2["Idempotent-Replayed"] == "true"
            s3, p3, _ = await api.call("POST", "/api/v1/payments", "bank", {**pay, "amount": "21.00"})
            assert s3 == 409 and p3["error"]["code"] == "idempotency_key_reused", p3
            s4, p4, _ = await api.call(
                "POST", "/api/v1/payments", "mobile_app",
                {"idempotency_key": "app-77", "account": ACCOUNT_ID, "amount": "5.00"},
                {"Idempotency-Key": "app-77"},
            )  # fmt: skip
            assert s4 == 201, p4
            # the command line sells one more; operations trips the relay, valid for an hour
            cli = ["central", "topup", *(["--dsn", dsn] if dsn else ["--db", str(c.db_path)]),
                   "--keys", str(c.keys), "--account", ACCOUNT_ID, "--amount", "3.00", "--channel", "counter"]  # fmt: skip
            assert await asyncio.to_thread(edgegw, cli) == 0
            c.dispatcher.wake()
            s5, relay, _ = await api.call(
                "POST", "/api/v1/relays", "operations",
                {"gateway": "gw-central", "meter": "m001", "op": "trip", "valid_for_s": 3600},
            )  # fmt: skip
            assert s5 == 201, relay
            offline = [p1["topup"]["command_id"], p4["topup"]["command_id"], relay["id"]]
            status, listing, _ = await api.call("GET", "/api/v1/commands?type=topup", "viewer")
            offline += [v["id"] for v in listing["commands"] if v["requested_by"].startswith("billing:cli:")]
            assert len(offline) == 4
            for cid in offline:  # published once: the broker holds them for the gateway
                await c.until_state(cid, {"sent"}, 15)

            # 4. a clean broker restart keeps the session and what it holds
            broker.stop()
            broker.start()
            # 5. three hours pass; the relay operation expires at central, and nothing is
            #    resent to a gateway known to be offline
            resent = c.dispatcher.stats.resent
            clock.advance(3 * HOUR_MS)
            v = await c.until_state(relay["id"], {"expired"}, 15)
            await asyncio.sleep(1.0)
            assert c.dispatcher.stats.resent == resent
            # 6. one more sale, then the broker dies without saving: that copy is lost
            s6, p6, _ = await api.call(
                "POST", "/api/v1/payments", "bank",
                {"idempotency_key": "bank-tx-0002", "account": ACCOUNT_ID, "amount": "1.00"},
            )  # fmt: skip
            assert s6 == 201
            late = p6["topup"]["command_id"]
            await c.until_state(late, {"sent"}, 15)
            broker.kill()
            broker.start()

            # 7. the gateway comes back: the broker delivers what it kept; central resends
            #    the lost one once the gateway has been back for a while
            link.set_up(True)
            await until(
                lambda: (p := c.dispatcher.presence.get("gw-central")) is not None and p.online,
                20,
                "the gateway back online",
            )
            held = [x for x in offline if x != relay["id"]]
            for cid in held:  # what the broker kept for the session, without a resend
                v = await c.until_state(cid, {"applied"}, 30)
                assert v["attempts"] == 1, v
            assert (await c.state(late))["state"] == "sent"
            clock.advance(ONLINE_GRACE_MS + 1_000)
            topups = [t1["id"], t2["id"], *held, late]
            for cid in topups:
                v = await c.until_state(cid, {"applied"}, 45, credited=True)
                assert v["credited"] == v["amount"], v
            assert (await c.state(relay["id"]))["state"] == "expired"

            # every top-up credited exactly once; the expired relay operation never ran
            credits = gateway_credits(daemon.config.storage.path)
            assert sorted(cid for cid, _ in credits) == sorted(topups)
            assert sum(a for _, a in credits) == 10_000_000 + 2_500_000 + 20_000_000 + 5_000_000 + 3_000_000 + 1_000_000
            applied = gateway_applied(daemon.config.storage.path)
            assert sorted(applied) == sorted(topups)
            assert relay["id"] not in applied and not sim.meter(1).relay_open
            # the copy of the relay command the broker kept reached the gateway: refused as
            # expired by the gateway's own (trusted) clock; central's state stays expired
            v = await c.until_state(relay["id"], {"expired"}, 5)
            for _ in range(100):
                if (v := await c.state(relay["id"]))["results"]:
                    break
                await asyncio.sleep(0.2)
            assert [(s["outcome"], s["reason"]) for s in v["log"] if s["event"] == "result"] == [
                ("rejected", "expired")
            ], v["log"]
            # the sale the killed broker lost was sent again once the gateway was back
            assert (await c.state(late))["attempts"] >= 2

            # 8. the day's reconciliation, per channel, against what the gateways confirmed
            day = dt.datetime.fromtimestamp(t1["created_ms"] / 1000, dt.UTC).date()
            days = {day, dt.datetime.fromtimestamp(clock.now() / 1000, dt.UTC).date()}
            totals: dict[str, list[int]] = {}
            for d in sorted(days):
                status, rep, _ = await api.call("GET", f"/api/v1/reports/reconciliation?day={d}", "viewer")
                assert status == 200, rep
                for row in rep["channels"]:
                    t = totals.setdefault(row["channel"], [0, 0, 0, 0])
                    t[0] += row["topups"]["count"]
                    t[1] += row["topups"]["amount_micro"]
                    t[2] += row["applied"]["amount_micro"]
                    t[3] += row["credited"]["amount_micro"]
            assert totals == {
                "agent": [1, 2_500_000, 2_500_000, 2_500_000],
                "bank": [2, 21_000_000, 21_000_000, 21_000_000],
                "counter": [2, 13_000_000, 13_000_000, 13_000_000],
                "mobile_app": [1, 5_000_000, 5_000_000, 5_000_000],
            }
        finally:
            stop.set()
            await asyncio.wait_for(run, 30)


async def test_every_command_is_applied_once_across_an_offline_gateway_and_broker_restarts(
    tmp_path: Path, shipped_broker: Mosquitto, pki: Pki
) -> None:
    await _exactly_once_while_offline(tmp_path, shipped_broker, pki, None)


async def test_the_same_on_postgresql(
    tmp_path: Path, shipped_broker: Mosquitto, pki: Pki, pg_dsn: str  # noqa: F811
) -> None:
    await _exactly_once_while_offline(tmp_path, shipped_broker, pki, pg_dsn)

"""Commands that arrive: central's queue, a real mosquitto, a real gateway daemon.

The gateway (the daemon, a Modbus meter with a supply relay, one prepaid
account) reaches a real mosquitto, on the shipped configuration (mutual TLS,
the ACL, persistence), through a link emulator; central runs the
headend's ingest, the dispatcher and the HTTP API in this process. Top-ups
are sold through the API (billing, and payment channels) and the command
line while the gateway is online, while its results cannot reach central,
and — through the operator console's own form, by a billing clerk in a real
browser — while it is offline for hours of simulated time, across a clean
broker restart (its persistence keeps the gateway's session and the queued
commands) and a SIGKILL (which loses what the broker held since). Every
top-up must be credited exactly once by the gateway's ledger, and show
``applied`` with its credit at central; a relay operation that expired while
the gateway was away must never reach the relay; the payment a channel
posted twice must be one top-up. The console (served beside the API on the
same application, its pages read over HTTP as a viewer and parsed, and — on
SQLite — in chromium; on PostgreSQL the clerk's form is posted over HTTP)
shows the top-up sold while the gateway was offline as sent and awaiting
the gateway, never delivered, until the gateway is back; then as delivered
and applied, with when it was sent and answered, its amount and the gateway
ledger's one credit of it, in English and in Chinese.
Screenshots: ``offline-topup-*.png`` beside the console's others
(``$EDGEGW_ARTIFACTS/console``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway.cli import main as edgegw
from gateway.config import load_config
from headend.central_db import CentralDB
from headend.commands import ONLINE_GRACE_MS
from headend.dispatch import Dispatcher
from headend.tls import BrokerTLS
from testbed.linkemu import LinkEmulator
from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import until
from tests.harness.mosquitto import Mosquitto, TlsFiles
from tests.harness.site import FLAT_TARIFF
from tests.headend.central_site import (
    ACCOUNT_ID,
    GATEWAY,
    CentralStack,
    ClientTls,
    GatewayRun,
    SimClock,
    gateway_applied,
    gateway_audit,
    gateway_credits,
    gateway_rows,
    gateway_view,
    prepaid_site,
)
from tests.headend.console.pagetree import Node, body_rows, parse, rows
from tests.headend.console.test_console_browser import (
    by_id,
    chromium,
    click_and_wait,
    log_in,
    screenshots_dir,
    shoot_to,
)
from tests.headend.console.test_console_http import client, login, page
from tests.headend.test_headend_scaleout import pg_dsn  # noqa: F401 (fixture)
from tests.security.tls import CENTRAL_2_CN, CENTRAL_CN, HEADEND_CN, Pki, make_pki

HOUR_MS = 3_600_000
CONSOLE_SALE = "7.00"  # sold at the console while the gateway is offline
TIME = re.compile(r"(\d{4}-\d\d-\d\d)\s+(\d\d:\d\d:\d\d)")  # a line may break between
CONSOLE_TZ = ZoneInfo("Asia/Shanghai")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The gateway's certificate, the headend ingest's and one per dispatcher: the
    shipped broker names every session by its certificate's CN."""
    return make_pki(tmp_path_factory.mktemp("pki"), clients=(GATEWAY, HEADEND_CN, CENTRAL_CN, CENTRAL_2_CN))


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


@contextlib.asynccontextmanager
async def _browser(wanted: bool) -> AsyncIterator[asyncio.Future[Any] | None]:
    """chromium, started while the rest starts (await what this yields) and stopped,
    off the event loop, on which the gateway and central run; None if not ``wanted``."""
    if not wanted:
        yield None
        return
    cm = chromium()
    starting = asyncio.ensure_future(asyncio.to_thread(cm.__enter__))
    try:
        yield starting
    finally:
        try:
            await starting
        except Exception:
            pass  # it did not start: the test awaiting it failed with the reason
        else:
            await asyncio.to_thread(cm.__exit__, None, None, None)


def _sell_in_browser(d: Any, base: str, amount: str) -> str:
    """A billing clerk sells a top-up on the account page's form; the command id."""
    log_in(d, base, "bill")
    d.get(f"{base}/gw/{GATEWAY}/account/{ACCOUNT_ID}")
    by_id(d, "amount").send_keys(amount)
    click_and_wait(d, by_id(d, "sell"))
    m = re.search(r"[?&]sold=([A-Za-z0-9_.:-]+)", d.current_url)
    assert m, d.current_url
    assert by_id(d, "sold").text == f"Top-up queued as command {m.group(1)}."
    return m.group(1)


def _browser_row(d: Any, base: str, path: str, row_id: str, *, login: bool = False) -> dict[str, str]:
    """The cells of one row of a console page as chromium shows them, by class."""
    from selenium.webdriver.common.by import By

    if login:
        log_in(d, base, "bill")
    d.get(f"{base}{path}")
    row = by_id(d, row_id)
    cells = {td.get_attribute("class").split()[0]: td.text for td in row.find_elements(By.TAG_NAME, "td")}
    return {"state": row.get_attribute("data-state"), **cells}


def _shoot(d: Any, base: str, path: str, shots: Path, name: str, *, lang: str | None = None) -> Path:
    if lang is not None:
        d.get(f"{base}/lang/{lang}")  # the language cookie, then the page
    d.get(f"{base}{path}")
    return shoot_to(d, shots, name)


async def _sell_over_http(c: CentralStack, amount: str) -> str:
    """A billing clerk sells a top-up with the account page's form, over HTTP; the command id."""
    url = f"{c.console_url}/gw/{GATEWAY}/account/{ACCOUNT_ID}"
    async with client() as s:
        assert (await login(s, c.console_url, "bill")).status == 303
        status, html = await page(s, url)
        assert status == 200
        form = parse(html).by_id("topup-form")
        fields = {i.attrs["name"]: i.attrs.get("value", "") for i in form.all("input")}
        assert set(fields) == {"csrf", "request_id", "amount"}, fields
        async with s.post(f"{url}/topup", data={**fields, "amount": amount}, allow_redirects=False) as r:
            assert r.status == 303, await r.text()
            location = r.headers["Location"]
        m = re.search(r"[?&]sold=([A-Za-z0-9_.:-]+)", location)
        assert m, location
        status, html = await page(s, c.console_url.removesuffix("/console") + location)
        assert status == 200 and parse(html).by_id("sold").text() == f"Top-up queued as command {m.group(1)}."
        return m.group(1)


async def _console_pages(c: CentralStack) -> dict[str, tuple[Node, Node]]:
    """The gateway's page and the account's page as a viewer reads them, parsed, in
    English and in Chinese."""
    out: dict[str, tuple[Node, Node]] = {}
    async with client() as s:
        assert (await login(s, c.console_url, "vera")).status == 303
        for lang in ("en", "zh-CN"):
            async with s.get(f"{c.console_url}/lang/{lang}", allow_redirects=False) as r:
                assert r.status == 303
            pages = []
            for path in (f"/gw/{GATEWAY}", f"/gw/{GATEWAY}/account/{ACCOUNT_ID}"):
                status, html = await page(s, c.console_url + path)
                assert status == 200, (path, html[:500])
                pages.append(parse(html))
            out[lang] = (pages[0], pages[1])
    return out


def _console_ms(text: str) -> int:
    """A time the console shows (its time zone, to the second) in ms."""
    m = TIME.search(text)
    assert m, text
    at = dt.datetime.strptime(f"{m.group(1)} {m.group(2)}", "%Y-%m-%d %H:%M:%S").replace(tzinfo=CONSOLE_TZ)
    return int(at.timestamp() * 1000)


async def _console_shows_pending(c: CentralStack, sale: str, counter: int) -> None:
    """Offline: the gateway's page shows it offline and the sale sent, unanswered and
    uncredited; the account's page the same, and no ledger credit of it."""
    pages = await _console_pages(c)
    for lang, delivery, no_answer, not_credited in (
        ("en", "sent, awaiting the gateway", "no answer yet", "not credited yet"),
        ("zh-CN", "已发送，等待网关", "尚无应答", "尚未入账"),
    ):
        gw, acct = pages[lang]
        presence = gw.by_id("gateway-facts").all("dd")[0].text()
        assert presence.split()[0] == ("offline" if lang == "en" else "离线"), presence
        row = rows(gw, "queued")[f"cmd-{sale}"]
        assert row.attrs["data-state"] == "sent"
        assert row.cell("delivery").text() == delivery
        assert TIME.fullmatch(row.cell("sent").text()), row.cell("sent").text()  # sent once: no count
        assert row.cell("answered").text() == no_answer
        assert row.cell("topup").text() == f"{ACCOUNT_ID} · {CONSOLE_SALE} · #{counter}"
        assert row.cell("credited").text() == "—"
        assert row.cell("operator").text() == "billing:console:bill"
        (badge,) = acct.by_id("gateway-presence").all("span", "badge")
        assert badge.text() == ("offline" if lang == "en" else "离线"), badge.text()
        srow = rows(acct, "sales")[f"sale-{sale}"]
        assert srow.attrs["data-state"] == "sent"
        assert (srow.cell("amount").text(), srow.cell("counter").text()) == (CONSOLE_SALE, str(counter))
        assert srow.cell("delivery").text() == delivery
        assert srow.cell("answered").text() == no_answer
        assert srow.cell("ledger").text() == not_credited
        assert sale not in [tr.all("td")[1].text() for tr in body_rows(acct, "credits")]


async def _console_shows_delivered(c: CentralStack, sale: str, view: dict[str, Any], back_ms: int) -> None:
    """Back online: the sale delivered and applied on both pages, with when it was sent
    (once, while the gateway was offline) and answered (after it came back), its
    amount, central's record of the credit, and exactly one credit in the ledger."""
    assert view["state"] == "applied" and view["attempts"] == 1 and view["credited"] == CONSOLE_SALE, view
    pages = await _console_pages(c)
    for lang, delivery in (("en", "delivered and applied"), ("zh-CN", "已送达并执行")):
        gw, acct = pages[lang]
        presence = gw.by_id("gateway-facts").all("dd")[0].text()
        assert presence.split()[0] == ("online" if lang == "en" else "在线"), presence
        row = rows(gw, "queued")[f"cmd-{sale}"]
        assert row.attrs["data-state"] == "applied"
        assert row.cell("delivery").text() == delivery
        sent_ms = _console_ms(row.cell("sent").text())
        answered_ms = _console_ms(row.cell("answered").text())
        assert TIME.fullmatch(row.cell("sent").text()), row.cell("sent").text()  # sent once
        assert sent_ms < back_ms <= answered_ms + 999, (sent_ms, back_ms, answered_ms)
        assert sent_ms // 1000 == view["first_sent_ms"] // 1000 and answered_ms // 1000 == view["final_ms"] // 1000
        assert row.cell("topup").text().split(" · ")[1] == CONSOLE_SALE
        credited = row.cell("credited").text()
        assert credited.split()[0] == CONSOLE_SALE and _console_ms(credited) // 1000 == view["credited_ms"] // 1000
        (badge,) = acct.by_id("gateway-presence").all("span", "badge")
        assert badge.text() == ("online" if lang == "en" else "在线"), badge.text()
        srow = rows(acct, "sales")[f"sale-{sale}"]
        assert srow.attrs["data-state"] == "applied"
        assert srow.cell("amount").text() == CONSOLE_SALE and srow.cell("delivery").text() == delivery
        assert _console_ms(srow.cell("answered").text()) == answered_ms
        ledger = srow.cell("ledger").text()
        assert ledger.split()[0] == CONSOLE_SALE and _console_ms(ledger) + 999 >= back_ms, ledger
        # the gateway's ledger credited it once: one row of the account's credits
        credits = [tr for tr in body_rows(acct, "credits") if tr.all("td")[1].text() == sale]
        assert len(credits) == 1, [tr.text() for tr in credits]
        assert credits[0].all("td")[2].text() == CONSOLE_SALE
        assert _console_ms(credits[0].all("td")[0].text()) == _console_ms(ledger)


@dataclass(frozen=True)
class Site:
    """The gateway (its daemon, its meter, its link to the broker) and central."""

    c: CentralStack
    sim: ModbusSimulator
    link: LinkEmulator
    gw: GatewayRun


@contextlib.asynccontextmanager
async def _site(
    tmp_path: Path, broker: Mosquitto, pki: Pki, dsn: str | None, clock: SimClock, *,
    console: bool = False, **daemon_settings: Any,
) -> AsyncIterator[Site]:  # fmt: skip
    """A running gateway with the test account, reaching the shipped broker through a
    link emulator; central (ingest, dispatcher, API, and with ``console`` the operator
    console) on ``dsn`` or a SQLite file; the account registered at central and the
    gateway's presence seen by the dispatcher."""
    headend, dispatcher = pki.clients[HEADEND_CN], pki.clients[CENTRAL_CN]
    headend_tls = BrokerTLS(pki.ca, headend.cert, headend.key).context()
    dispatcher_tls = BrokerTLS(pki.ca, dispatcher.cert, dispatcher.key).context()
    gw_tls = pki.clients[GATEWAY]
    async with (
        ModbusSimulator(units=[1], load_kw="0.5") as sim,
        LinkEmulator("127.0.0.1", broker.port) as link,
        CentralStack(
            tmp_path, broker_port=broker.port, clock=clock, dsn=dsn, tls=headend_tls, dispatcher_tls=dispatcher_tls,
            console=console,
        ) as c,
    ):
        site = prepaid_site(
            tmp_path, broker_port=link.port, modbus_port=sim.port, trust=c.trust,
            tls=ClientTls(pki.ca, gw_tls.cert, gw_tls.key),
        )  # fmt: skip
        gw = GatewayRun(site, clock, **daemon_settings)
        try:
            await gw.start()
            status, acct, _ = await c.api.call("PUT", f"/api/v1/accounts/{ACCOUNT_ID}", "billing", {"gateway": GATEWAY})
            assert status == 200, acct
            await until(lambda: c.dispatcher.presence.get(GATEWAY) is not None, 15, "presence")
            # one session per certificate, named by its CN whatever id each asked for
            sessions = broker.sessions()
            assert {cn: sessions.get(cn) for cn in (GATEWAY, HEADEND_CN, CENTRAL_CN)} == {
                cn: cn for cn in (GATEWAY, HEADEND_CN, CENTRAL_CN)
            }, sessions
            yield Site(c, sim, link, gw)
        finally:
            await gw.stop()


def _seen(c: CentralStack | Dispatcher, online: bool, since_ms: int = 0) -> bool:
    """The dispatcher saw the gateway's presence say ``online`` (at or after ``since_ms``)."""
    p = (c.dispatcher if isinstance(c, CentralStack) else c).presence.get(GATEWAY)
    return p is not None and p.online is online and p.since_ms >= since_ms


async def _exactly_once_while_offline(
    tmp_path: Path, broker: Mosquitto, pki: Pki, dsn: str | None
) -> None:
    shots = screenshots_dir(tmp_path / "screenshots")
    clock = SimClock()
    async with (
        _browser(dsn is None) as browser_starting,  # on PostgreSQL: the console's pages over HTTP only
        _site(tmp_path, broker, pki, dsn, clock, console=True) as s,
    ):
        c, sim, link, daemon, api = s.c, s.sim, s.link, s.gw.daemon, s.c.api
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
        await until(lambda: _seen(c, online=False), 20, "the gateway seen offline")
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
        # the office's billing clerk sells one with the console's form (in the browser)
        browser = None
        if browser_starting is not None:
            browser = await asyncio.wait_for(asyncio.shield(browser_starting), 60)
            sale = await asyncio.to_thread(_sell_in_browser, browser, c.console_url, CONSOLE_SALE)
        else:
            sale = await _sell_over_http(c, CONSOLE_SALE)
        sale_view = await c.until_state(sale, {"sent"}, 15)
        assert (sale_view["amount"], sale_view["payment_channel"], sale_view["requested_by"]) == (
            CONSOLE_SALE, "counter", "billing:console:bill"
        )
        await _console_shows_pending(c, sale, sale_view["purchase_counter"])
        if browser is not None:
            pending = await asyncio.to_thread(
                _browser_row, browser, c.console_url, f"/gw/{GATEWAY}/account/{ACCOUNT_ID}", f"sale-{sale}"
            )
            assert (pending["state"], pending["delivery"], pending["ledger"]) == (
                "sent", "sent, awaiting the gateway", "not credited yet"
            ), pending
            await asyncio.to_thread(
                _shoot, browser, c.console_url, f"/gw/{GATEWAY}/account/{ACCOUNT_ID}", shots,
                "offline-topup-pending",
            )  # fmt: skip
        s5, relay, _ = await api.call(
            "POST", "/api/v1/relays", "operations",
            {"gateway": "gw-central", "meter": "m001", "op": "trip", "valid_for_s": 3600},
        )  # fmt: skip
        assert s5 == 201, relay
        offline = [p1["topup"]["command_id"], p4["topup"]["command_id"], relay["id"], sale]
        status, listing, _ = await api.call("GET", "/api/v1/commands?type=topup", "viewer")
        offline += [v["id"] for v in listing["commands"] if v["requested_by"].startswith("billing:cli:")]
        assert len(offline) == 5
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
        await c.until_published(late, 15)
        broker.kill()
        broker.start()

        # hours later, still offline: the console still says so
        await _console_shows_pending(c, sale, sale_view["purchase_counter"])

        # 7. the gateway comes back: the broker delivers what it kept; central resends
        #    the lost one once the gateway has been back for a while
        back_ms = clock.now()
        link.set_up(True)
        await until(lambda: _seen(c, online=True), 20, "the gateway back online")
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
        assert sum(a for _, a in credits) == 10_000_000 + 2_500_000 + 20_000_000 + 5_000_000 + 3_000_000 + 1_000_000 + 7_000_000
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

        # the console shows the top-up sold while the gateway was offline delivered
        await _console_shows_delivered(c, sale, await c.state(sale), back_ms)
        if browser is not None:
            delivered = await asyncio.to_thread(
                _browser_row, browser, c.console_url, f"/gw/{GATEWAY}/account/{ACCOUNT_ID}", f"sale-{sale}",
                login=True,  # the clerk's session ended while the hours passed
            )  # fmt: skip
            assert (delivered["state"], delivered["delivery"], delivered["amount"]) == (
                "applied", "delivered and applied", CONSOLE_SALE
            ), delivered
            assert delivered["ledger"].split()[0] == CONSOLE_SALE and TIME.search(delivered["ledger"]), delivered
            on_gateway_page = await asyncio.to_thread(
                _browser_row, browser, c.console_url, f"/gw/{GATEWAY}", f"cmd-{sale}"
            )
            assert (on_gateway_page["state"], on_gateway_page["delivery"]) == ("applied", "delivered and applied")
            for path, name, lang in (
                (f"/gw/{GATEWAY}/account/{ACCOUNT_ID}", "offline-topup-delivered", None),
                (f"/gw/{GATEWAY}", "offline-topup-delivered-gateway", None),
                (f"/gw/{GATEWAY}/account/{ACCOUNT_ID}", "offline-topup-delivered-zh-CN", "zh-CN"),
            ):
                await asyncio.to_thread(_shoot, browser, c.console_url, path, shots, name, lang=lang)

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
            "counter": [3, 20_000_000, 20_000_000, 20_000_000],
            "mobile_app": [1, 5_000_000, 5_000_000, 5_000_000],
        }


async def test_every_command_is_applied_once_across_an_offline_gateway_and_broker_restarts(
    tmp_path: Path, shipped_broker: Mosquitto, pki: Pki
) -> None:
    await _exactly_once_while_offline(tmp_path, shipped_broker, pki, None)


async def test_the_same_on_postgresql(
    tmp_path: Path, shipped_broker: Mosquitto, pki: Pki, pg_dsn: str  # noqa: F811
) -> None:
    await _exactly_once_while_offline(tmp_path, shipped_broker, pki, pg_dsn)


# -- tariffs, balance snapshots and configuration changes ---------------------------

NEW_PRICE_E4 = 6200  # version 2 of the account's tariff: 0.6200 yuan/kWh (version 1: 0.5600)
CORRECTION_MICRO = 1_500_000  # what central's balance adds to the gateway's own count


def _tariff_v2(tmp: Path, effective_ms: int) -> Path:
    """Version 2 of the site's tariff (examples/tariffs/flat.toml), from ``effective_ms``."""
    at = dt.datetime.fromtimestamp(effective_ms / 1000, CONSOLE_TZ).isoformat(timespec="seconds")
    text = FLAT_TARIFF.read_text(encoding="utf-8")
    text = text.replace("version = 1", "version = 2").replace('price = "0.5600"', 'price = "0.6200"')
    text = re.sub(r'effective_from = "[^"]*"', f'effective_from = "{at}"', text)
    assert "version = 2" in text and "0.6200" in text and at in text, text
    out = tmp / "flat-v2.toml"
    out.write_text(text, encoding="utf-8")
    return out


async def _central_ledger(c: CentralStack) -> tuple[int, int]:
    """The account's ledger as central holds it from the gateway's batches: the last
    seq such that central has every entry up to it, and the balance as of it."""
    entries = {
        e["seq"]: e for e in await c.records("charge") if e.get("account") == ACCOUNT_ID and e["kind"] != "snapshot"
    }
    seq = 0
    while seq + 1 in entries:
        seq += 1
    return seq, sum(entries[q]["amount_micro"] for q in range(1, seq + 1))


def _applied_at_gateway(db: Path) -> dict[str, int]:
    """How many times the gateway's command handler applied each command id."""
    counts: dict[str, int] = {}
    for (details,) in gateway_rows(db, "SELECT details FROM audit_log WHERE action = 'command.applied'"):
        cid = json.loads(details)["id"]
        counts[cid] = counts.get(cid, 0) + 1
    return counts


async def _offline_tariff_snapshot_and_configuration(
    tmp_path: Path, broker: Mosquitto, pki: Pki, dsn: str | None
) -> None:
    clock = SimClock()
    async with _site(tmp_path, broker, pki, dsn, clock, maintenance_interval_s=0.5) as s:
        c, api, gw = s.c, s.c.api, s.gw
        site = gw.site
        s.sim.meter(1).load_kw = Decimal(36)  # 0.01 kWh a second: every poll or two bills energy
        # central has the gateway's ledger so far (its opening balance, its debits)
        for _ in range(150):
            as_of, central_balance = await _central_ledger(c)
            if as_of >= 3:
                break
            await asyncio.sleep(0.2)
        assert as_of >= 3, "central never received the gateway's ledger"

        # 1. the gateway goes offline
        s.link.set_up(False)
        await until(lambda: _seen(c, online=False), 20, "the gateway seen offline")

        # 2. while it is away: a top-up; one more valid for an hour only; version 2 of
        #    the account's tariff from an instant after it will be back (central's
        #    command line, from the tariff file); a configuration change
        status, topup, _ = await api.call(
            "POST", "/api/v1/topups", "billing", {"account": ACCOUNT_ID, "amount": "10.00", "payment_channel": "counter"}
        )
        assert status == 201 and topup["purchase_counter"] == 1, topup
        status, short, _ = await api.call(
            "POST", "/api/v1/topups", "billing",
            {"account": ACCOUNT_ID, "amount": "4.00", "payment_channel": "counter", "valid_for_s": 3600},
        )  # fmt: skip
        assert status == 201 and short["purchase_counter"] == 2, short
        effective_ms = (clock.now() + 3 * HOUR_MS + 20 * 60_000) // 1000 * 1000
        store = ["--dsn", dsn] if dsn else ["--db", str(c.db_path)]
        cli = ["central", "tariff", *store, "--keys", str(c.keys), "--gateway", GATEWAY,
               "--file", str(_tariff_v2(tmp_path, effective_ms))]  # fmt: skip
        assert await asyncio.to_thread(edgegw, cli) == 0
        c.dispatcher.wake()
        status, listing, _ = await api.call("GET", f"/api/v1/commands?gateway={GATEWAY}&type=tariff.publish", "viewer")
        assert status == 200 and len(listing["commands"]) == 1, listing
        tariff = listing["commands"][0]
        assert tariff["requested_by"].startswith("billing:cli:") and tariff["body"]["version"] == 2, tariff
        status, config, _ = await api.call(
            "POST", "/api/v1/config", "operations",
            {"gateway": GATEWAY, "set": {"broker.keepalive_s": 7}, "confirm_within_s": 600},
        )  # fmt: skip
        assert status == 201, config

        # 3. three hours later the short top-up has expired: central's balance snapshot
        #    counts the top-up sold meanwhile (the gateway may not have it yet) and a
        #    correction, and moves the account's purchase counter past the expired one
        clock.advance(3 * HOUR_MS)
        await c.until_state(short["id"], {"expired"}, 15)
        status, snap, _ = await api.call(
            "POST", "/api/v1/snapshots", "billing",
            {"account": ACCOUNT_ID, "balance_micro": central_balance + topup["amount_micro"] + CORRECTION_MICRO,
             "as_of_seq": as_of, "included_ids": [f"topup:{topup['id']}"], "purchase_counter": 2},
        )  # fmt: skip
        assert status == 201, snap
        held = [topup["id"], tariff["id"], config["id"], snap["id"]]
        for cid in [*held, short["id"]]:
            if cid != short["id"]:
                await c.until_state(cid, {"sent"}, 15)  # the broker holds them for the gateway
        # 4. a clean broker restart keeps them; a top-up sold after it is lost with a
        #    broker killed without saving
        broker.stop()
        broker.start()
        status, late, _ = await api.call(
            "POST", "/api/v1/topups", "billing", {"account": ACCOUNT_ID, "amount": "3.00", "payment_channel": "counter"}
        )
        assert status == 201 and late["purchase_counter"] == 3, late
        await c.until_published(late["id"], 15)
        broker.kill()
        broker.start()

        # 5. the gateway comes back: what the broker kept arrives; the configuration
        #    change stops the daemon for a restart, and it starts on the new file
        s.link.set_up(True)
        reason = await gw.restarted(30)
        assert config["id"] in reason, reason
        assert gw.daemon.config.broker.keepalive_s == 7 and load_config(site).broker.keepalive_s == 7
        restarted_ms = clock.now()
        await until(lambda: _seen(c, online=True, since_ms=restarted_ms), 20, "the restarted gateway online")
        # what the first run had not handled yet, and the copy the broker lost, are sent
        # again once the gateway has been back for a while
        clock.advance(ONLINE_GRACE_MS + 1_000)
        applied = [*held, late["id"]]
        views = {cid: await c.until_state(cid, {"applied"}, 45) for cid in applied}
        assert (await c.state(short["id"]))["state"] == "expired"

        # each applied exactly once at the gateway (later copies: replays or duplicates)
        counts = _applied_at_gateway(gw.db)
        assert {cid: counts.get(cid, 0) for cid in applied} == dict.fromkeys(applied, 1), counts
        assert short["id"] not in counts

        # the configuration change: in force, and confirmed by reaching central on it
        assert views[config["id"]]["effect"]["set"] == ["broker.keepalive_s"], views[config["id"]]
        await until(
            lambda: gateway_rows(gw.db, "SELECT state FROM cmd_config_confirm WHERE command_id = ?", (config["id"],))
            == [("confirmed",)],
            20,
            "the configuration change confirmed",
        )
        for _ in range(100):  # the gateway reports it
            if any(e.get("type") == "config_confirmed" and e.get("id") == config["id"] for e in await c.records("event")):
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("central never heard the configuration change confirmed")
        assert gw.starts == 2 and site.with_name(site.name + ".previous").exists()

        # the snapshot: the account rebased on central's balance, the top-up it counted
        # counted once, the purchase counter past the expired top-up (so the late one,
        # counter 3, was taken)
        assert views[snap["id"]]["effect"]["status"] == "applied", views[snap["id"]]
        entries, balance, counter = gateway_view(gw.db)
        kinds = [e["kind"] for e in entries]
        assert kinds.count("snapshot") == 1, kinds
        credits = sorted(e["id"] for e in entries if e["kind"] == "credit")
        assert credits == sorted(f"topup:{t['id']}" for t in (topup, late)), credits
        assert counter == 3
        own_count = sum(e["amount_micro"] for e in entries if e["kind"] != "snapshot")
        assert balance == own_count + CORRECTION_MICRO, (balance, own_count)

        # the tariff: stored once; the restarted daemon rates at the new price from its
        # effective_from on
        effect = views[tariff["id"]]["effect"]
        assert (effect["status"], effect["tariff"], effect["version"]) == ("applied", "flat-basic", 2), effect
        versions = gateway_rows(gw.db, "SELECT tariff_id, version FROM billing_tariff ORDER BY version")
        assert ("flat-basic", 2) in versions and versions.count(("flat-basic", 2)) == 1, versions
        clock.advance(max(0, effective_ms - clock.now()) + 60_000)
        await until(
            lambda: any(
                e["kind"] == "debit" and e["body"]["start_ms"] >= effective_ms and e["body"]["ckwh"] > 0
                for e in gateway_view(gw.db)[0]
            ),
            20,
            "a debit of energy after the new version's effective_from",
        )
        after = 0
        for e in gateway_view(gw.db)[0]:
            if e["kind"] != "debit":
                continue
            lines, body = e["body"]["lines"], e["body"]
            assert e["amount_micro"] == -sum(ln["ckwh"] * ln["price_e4"] for ln in lines), e
            if body["end_ms"] <= effective_ms:
                assert {(ln["tariff"], ln["price_e4"]) for ln in lines} == {("flat-basic@1", 5600)}, e
            elif body["start_ms"] >= effective_ms:
                assert {(ln["tariff"], ln["price_e4"]) for ln in lines} == {("flat-basic@2", NEW_PRICE_E4)}, e
                after += body["ckwh"]
            else:  # the interval that contains the instant is split there (a line of no
                # whole centi-kWh is left out)
                assert [(ln["tariff"], ln["price_e4"]) for ln in lines] in (
                    [("flat-basic@1", 5600), ("flat-basic@2", NEW_PRICE_E4)],
                    [("flat-basic@1", 5600)],
                    [("flat-basic@2", NEW_PRICE_E4)],
                ), e
        assert after > 0


async def test_a_tariff_a_snapshot_and_a_configuration_change_queued_offline_are_applied_once(
    tmp_path: Path, shipped_broker: Mosquitto, pki: Pki
) -> None:
    await _offline_tariff_snapshot_and_configuration(tmp_path, shipped_broker, pki, None)


async def test_the_tariff_snapshot_and_configuration_change_on_postgresql(
    tmp_path: Path, shipped_broker: Mosquitto, pki: Pki, pg_dsn: str  # noqa: F811
) -> None:
    await _offline_tariff_snapshot_and_configuration(tmp_path, shipped_broker, pki, pg_dsn)


# -- several central processes on one database -------------------------------------


async def test_two_dispatchers_on_one_postgresql_database_send_each_command_once(
    tmp_path: Path, shipped_broker: Mosquitto, pki: Pki, pg_dsn: str  # noqa: F811
) -> None:
    """docs/central.md: several dispatchers may share one PostgreSQL database (they
    claim commands with FOR UPDATE SKIP LOCKED). Two of them, taking one command a
    pass and woken together by each sale: every top-up is published once (a second
    copy would reach the gateway as a replay), applied and credited once."""
    clock = SimClock()
    async with _site(tmp_path, shipped_broker, pki, pg_dsn, clock) as s:
        c, gw = s.c, s.gw
        second = pki.clients[CENTRAL_2_CN]  # a process of its own: a certificate of its own
        other_db = await CentralDB.open(dsn=pg_dsn)
        first = c.dispatcher
        first.batch = 1
        other = Dispatcher(
            other_db, c.signer, "127.0.0.1", shipped_broker.port, identifier=CENTRAL_2_CN,
            tls_context=BrokerTLS(pki.ca, second.cert, second.key).context(), clock_ms=clock.now,
            interval_s=0.2, batch=1,
        )  # fmt: skip
        c.central.on_queued.append(other.wake)
        task = asyncio.create_task(other.run())
        try:
            await asyncio.wait_for(other.connected.wait(), 10)
            await until(lambda: _seen(other, online=True), 15, "presence at the second dispatcher")
            sessions = shipped_broker.sessions()
            assert (sessions.get(CENTRAL_CN), sessions.get(CENTRAL_2_CN)) == (CENTRAL_CN, CENTRAL_2_CN), sessions
            amounts = [1_000_000 + 10_000 * i for i in range(16)]
            sale = {"account": ACCOUNT_ID, "payment_channel": "counter"}
            sold = await asyncio.gather(
                *(c.api.call("POST", "/api/v1/topups", "billing", {**sale, "amount_micro": a}) for a in amounts)
            )
            assert all(status == 201 for status, _, _ in sold), sold
            ids = [t["id"] for _, t, _ in sold]
            assert sorted(t["purchase_counter"] for _, t, _ in sold) == list(range(1, len(amounts) + 1))
            for cid in ids:
                v = await c.until_state(cid, {"applied"}, 60, credited=True)
                assert v["credited_micro"] == v["amount_micro"], v
            credits = gateway_credits(gw.db)
            assert sorted(cid for cid, _ in credits) == sorted(ids)
            assert sum(a for _, a in credits) == sum(amounts)
            # each published first by one dispatcher; none published twice
            assert first.stats.sent + other.stats.sent == len(ids), (first.stats, other.stats)
            assert first.stats.sent > 0 and other.stats.sent > 0, (first.stats, other.stats)
            replays = [a for a in gateway_audit(gw.db, "command.rejected") if a.get("reason") == "replay"]
            assert replays == [], replays
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await other_db.close()

"""The operator console's forms on central's queue: the console and the API on one application.

``build_app(central, console=...)`` serves both; the console's command desk is
:class:`headend.central_desk.CentralDesk`. Over real HTTP on a loopback port,
on a real SQLite headend store with a village's data: a billing clerk sells a
top-up (a resubmitted form is the same command, with the account's next
purchase counter, signed with the billing key), a field supervisor trips a
relay (signed with the operations key), each role only its own form, and the
gateway's page lists the commands with their delivery state, as the API does.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from headend.central import Actor, ApiRole, Central
from headend.central_db import CentralDB
from headend.central_desk import CentralDesk
from headend.console.app import ConsoleSettings
from headend.console.auth import Role, Users
from headend.console.db import open_console_db
from headend.signing import Signer, init_keys
from headend.store import HeadendDB
from headend.web import build_app, serve
from store_forward.command_envelope import Envelope, authenticate
from store_forward.command_roles import TrustStore
from tests.headend.central_site import Api
from tests.headend.console.fleetdata import add_villages
from tests.headend.console.pagetree import parse
from tests.headend.console.pagetree import rows as table_rows
from tests.headend.console.test_console_http import PASSWORDS, client, csrf_of, login, page

NOW = 1_796_420_000_000
GW, ACCOUNT = "village-02", "hh-0201"


@dataclass
class Site:
    base: str
    central: Central
    api: Api
    trust: TrustStore


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    path = tmp_path / "central.db"
    store = await HeadendDB.open(path)
    await add_villages(store, NOW)
    await store.close()
    init_keys(tmp_path / "keys")
    db = await CentralDB.open(db=path)
    clock = [NOW]
    central = Central(db, Signer.load(tmp_path / "keys"), clock_ms=lambda: clock[0])
    await central.add_account(Actor("setup", ApiRole.BILLING), account=ACCOUNT, gateway=GW, purchase_counter=1)
    cdb = await open_console_db(path)
    users = Users(cdb)
    for name, (role, pw) in PASSWORDS.items():
        await users.add(name, Role(role), pw, NOW - 86_400_000)
    settings = ConsoleSettings(db=cdb, tz=ZoneInfo("Asia/Shanghai"), clock_ms=lambda: clock[0],
                               desk=CentralDesk(central))  # fmt: skip
    runner, port = await serve(build_app(central, console=settings), "127.0.0.1", 0)
    _, viewer = await central.create_token("viewer", ApiRole.VIEWER)
    api = Api(f"http://127.0.0.1:{port}", {"viewer": viewer})
    try:
        yield Site(f"http://127.0.0.1:{port}/console", central, api, TrustStore.load(tmp_path / "keys" / "trust.json"))
    finally:
        await api.close()
        await runner.cleanup()
        await cdb.close()
        await db.close()


async def test_the_console_sells_and_trips_through_central_once_per_form(site: Site) -> None:
    account_url = f"{site.base}/gw/{GW}/account/{ACCOUNT}"
    async with client() as s:
        assert (await login(s, site.base, "bill")).status == 303
        status, html = await page(s, account_url)
        assert status == 200 and 'id="topup-form"' in html and "topup.no_desk" not in html
        form = {"csrf": csrf_of(html), "amount": "30.00", "request_id": re.search(r'name="request_id" value="([^"]+)"', html).group(1)}  # type: ignore[union-attr]
        ids = []
        for _ in range(2):  # the clerk's browser sends the form twice
            async with s.post(f"{account_url}/topup", data=form, allow_redirects=False) as r:
                assert r.status == 303, await r.text()
                ids.append(r.headers["Location"].split("sold=")[1])
        assert ids[0] == ids[1]
        # the account's page lists the sale once, queued (no dispatcher runs here), not credited
        status, html = await page(s, account_url)
        sales = table_rows(parse(html), "sales")
        assert list(sales) == [f"sale-{ids[0]}"]
        sale = sales[f"sale-{ids[0]}"]
        assert sale.attrs["data-state"] == "queued" and sale.cell("delivery").text() == "queued, not sent yet"
        assert (sale.cell("amount").text(), sale.cell("counter").text(), sale.cell("channel").text()) == ("30.00", "2", "counter")
        assert (sale.cell("sent").text(), sale.cell("ledger").text()) == ("not sent", "not credited yet")
        assert sale.cell("operator").text() == "billing:console:bill"
        # the clerk has no relay form, and a forged post is refused by the console
        status, gw_html = await page(s, f"{site.base}/gw/{GW}")
        assert "relay-form" not in gw_html
        async with s.post(f"{site.base}/gw/{GW}/meter/m-01/relay",
                          data={"csrf": csrf_of(gw_html), "action": "trip", "request_id": "r" * 20}) as r:  # fmt: skip
            assert r.status == 403
    async with client() as s:
        assert (await login(s, site.base, "fred")).status == 303
        status, gw_html = await page(s, f"{site.base}/gw/{GW}")
        assert "relay-form" in gw_html and "topup-form" not in gw_html
        rid = re.search(r'name="request_id" value="([^"]+)"', gw_html).group(1)  # type: ignore[union-attr]
        for _ in range(2):
            async with s.post(f"{site.base}/gw/{GW}/meter/m-01/relay",
                              data={"csrf": csrf_of(gw_html), "action": "trip", "request_id": rid},
                              allow_redirects=False) as r:  # fmt: skip
                assert r.status == 303, await r.text()
        status, gw_html = await page(s, f"{site.base}/gw/{GW}")
        listed = gw_html.split('id="queued"')[1].split("</table>")[0]
        assert ids[0] in listed and "relay.operate" in listed and "topup" in listed
        assert "console:bill" in listed and "console:fred" in listed

    # the API sees the same two commands, each signed with the key of its role
    status, body, _ = await site.api.call("GET", f"/api/v1/commands?gateway={GW}", "viewer")
    assert status == 200
    by_type = {v["type"]: v for v in body["commands"]}
    assert sorted(by_type) == ["relay.operate", "topup"] and len(body["commands"]) == 2
    sale, trip = by_type["topup"], by_type["relay.operate"]
    assert (sale["id"], sale["amount"], sale["purchase_counter"], sale["payment_channel"]) == (ids[0], "30.00", 2, "counter")
    assert (sale["role"], trip["role"], trip["meter"], trip["body"]["op"]) == ("billing", "operations", "m-01", "trip")
    async with site.central.db.transaction() as tx:
        rows = [await site.central.db.command(tx, v["id"]) for v in (sale, trip)]
    for row in rows:
        assert row is not None
        env = authenticate(row.envelope, site.trust)
        assert isinstance(env, Envelope) and env.command_id == row.command_id and env.target == GW


async def test_a_top_up_central_refuses_is_shown_to_the_clerk(site: Site) -> None:
    url = f"{site.base}/gw/{GW}/account/{ACCOUNT}"
    async with site.central.db.transaction() as tx:  # an account central does not know
        await tx.execute("DELETE FROM central_accounts WHERE account_id = ?", (ACCOUNT,))
    async with client() as s:
        assert (await login(s, site.base, "bill")).status == 303
        status, html = await page(s, url)
        assert status == 200
        async with s.post(f"{url}/topup", data={"csrf": csrf_of(html), "amount": "5.00", "request_id": "q" * 22}) as r:
            assert r.status == 422
            assert "is registered at central" in await r.text()
    assert await site.central.commands(Actor("t", ApiRole.VIEWER)) == []

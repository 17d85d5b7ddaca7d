"""The console over HTTP against a real SQLite headend store: login, roles,
sessions, CSRF, cookies, languages, and the ``edgegw headend user`` commands."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from headend.console import auth
from headend.console.app import ConsoleSettings, console_app, declared_permission
from headend.console.auth import Role, Users
from headend.console.db import open_console_db
from headend.store import HeadendDB
from headend.web import build_app, serve
from tests.headend.console.fleetdata import add_villages

NOW = 1_796_420_000_000
PASSWORDS = {
    "vera": ("viewer", "viewer-password-1"),
    "bill": ("billing_clerk", "clerk-password-22"),
    "fred": ("field_supervisor", "field-password-333"),
    "ada": ("administrator", "admin-password-4444"),
}
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Console:
    base: str
    settings: ConsoleSettings
    clock: list[int]
    users: Users
    db_path: Path


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[Console]:
    path = tmp_path / "central.db"
    store = await HeadendDB.open(path)
    await add_villages(store, NOW)
    await store.close()
    db = await open_console_db(path)
    users = Users(db)
    for name, (role, pw) in PASSWORDS.items():
        await users.add(name, Role(role), pw, NOW - 86_400_000)
    clock = [NOW]
    settings = ConsoleSettings(db=db, tz=ZoneInfo("Asia/Shanghai"), clock_ms=lambda: clock[0])
    runner, port = await serve(build_app(console=settings), "127.0.0.1", 0)
    try:
        yield Console(f"http://127.0.0.1:{port}/console", settings, clock, users, path)
    finally:
        await runner.cleanup()
        await db.close()


def client(**kw: object) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), **kw)  # type: ignore[arg-type]


async def login(s: aiohttp.ClientSession, base: str, user: str, password: str | None = None) -> aiohttp.ClientResponse:
    async with s.get(f"{base}/login") as r:
        token = CSRF.search((await r.text()).split('id="login-form"')[1])
    assert token
    pw = password if password is not None else PASSWORDS[user][1]
    async with s.post(
        f"{base}/login", data={"csrf": token.group(1), "username": user, "password": pw, "next": f"{base}/"},
        allow_redirects=False,
    ) as r:  # fmt: skip
        await r.read()
        return r


async def page(s: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with s.get(url, allow_redirects=False) as r:
        return r.status, await r.text()


def csrf_of(html: str) -> str:
    m = CSRF.search(html)
    assert m, "no CSRF token in the page"
    return m.group(1)


async def test_every_route_declares_what_it_needs() -> None:
    app = console_app(ConsoleSettings(db=None, tz=dt.UTC))  # type: ignore[arg-type]
    undeclared = []
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        declared, _ = declared_permission(route.handler)
        if not declared:
            undeclared.append(route.resource.canonical if route.resource else "?")
    assert not undeclared
    public = {
        route.resource.canonical
        for route in app.router.routes()
        if route.resource and declared_permission(route.handler) == (True, None)
    }
    assert public == {"/login", "/lang/{lang}", "/static/console.css"}


async def test_a_wrong_password_is_refused_and_logins_are_rate_limited(console: Console) -> None:
    async with client() as s:
        r = await login(s, console.base, "bill", "not-the-password")
        assert r.status == 401
        status, _html = await page(s, f"{console.base}/")
        assert status == 303  # still not logged in: to the login page
        for _ in range(auth.MAX_FAILURES_PER_USER - 1):
            assert (await login(s, console.base, "bill", "guess-again-123")).status == 401
        # now even the right password is refused, before it is checked
        r = await login(s, console.base, "bill")
        assert r.status == 429
        async with s.get(f"{console.base}/login") as r0:
            assert "edgegw_session" not in {c.key for c in s.cookie_jar}
        # another user from the same address is not locked out by bill's failures
        assert (await login(s, console.base, "vera")).status == 303
        # the window passes
        console.clock[0] += auth.FAILURE_WINDOW_MS + 1
        assert (await login(s, console.base, "bill")).status == 303
        assert r0.status == 200


async def test_unknown_users_and_disabled_users_cannot_log_in(console: Console) -> None:
    await console.users.set_disabled("fred", True, NOW)
    async with client() as s:
        assert (await login(s, console.base, "nobody", "whatever-password")).status == 401
        assert (await login(s, console.base, "fred")).status == 401


async def test_each_role_sees_the_pages_and_only_its_own_forms(console: Console) -> None:
    b = console.base
    pages = ["/", "/gw/village-02", "/gw/village-03", "/gw/village-02/account/hh-0201", "/alarms"]
    for user, (role, _) in PASSWORDS.items():
        async with client() as s:
            assert (await login(s, b, user)).status == 303
            for p in pages:
                status, html = await page(s, b + p)
                assert status == 200, (user, p, html[:400])
                assert f"{user} · {role.replace('_', ' ')}" in html
            _, account = await page(s, f"{b}/gw/village-02/account/hh-0201")
            assert ('id="topup-form"' in account) == (role in ("billing_clerk", "administrator"))
            _, gateway = await page(s, f"{b}/gw/village-02")
            assert ("relay-form" in gateway) == (role in ("field_supervisor", "administrator"))
            status, _ = await page(s, f"{b}/users")
            assert status == (200 if role == "administrator" else 403)


async def test_the_pages_show_the_fleet(console: Console) -> None:
    async with client() as s:
        await login(s, console.base, "vera")
        _, fleet = await page(s, f"{console.base}/")
        assert "village-02" in fleet and "village-03" in fleet and 'id="no-presence"' in fleet
        assert re.search(r'class="bad">1 / 3<', fleet), "village-02 has one meter offline of three"
        _, gw = await page(s, f"{console.base}/gw/village-02")
        assert gw.count('class="series"') == 3 and "hh-0201" in gw and 'id="no-queue"' in gw
        _, acc = await page(s, f"{console.base}/gw/village-02/account/hh-0201")
        debits = sum(117_600 + 5_600 * (i % 3) for i in range(24))
        assert f'id="balance">{(23_000_000 - debits) // 10_000 / 100:.2f}<' in acc  # 3.00 + 20.00 - debits
        assert "counter-20261204-0042" in acc
        _, alarms = await page(s, f"{console.base}/alarms")
        assert "m-03" in alarms and "register_backwards" in alarms and "clock_drift" in alarms
        status, _ = await page(s, f"{console.base}/gw/no-such-gateway")
        assert status == 404


async def test_a_viewer_cannot_sell_a_top_up(console: Console) -> None:
    url = f"{console.base}/gw/village-02/account/hh-0201/topup"
    async with client() as s:
        await login(s, console.base, "vera")
        _, html = await page(s, f"{console.base}/gw/village-02/account/hh-0201")
        assert "topup" not in re.sub(r"\s", "", html.split('id="credits"')[0]).split("<h2>")[-1] or 'id="topup-form"' not in html
        async with s.post(url, data={"csrf": csrf_of(html), "amount": "10", "request_id": "a" * 22}) as r:
            assert r.status == 403
            assert "Your role does not allow this." in await r.text()


async def test_posts_without_the_csrf_token_are_refused(console: Console) -> None:
    url = f"{console.base}/gw/village-02/account/hh-0201/topup"
    async with client() as s:
        await login(s, console.base, "bill")
        _, html = await page(s, f"{console.base}/gw/village-02/account/hh-0201")
        good = csrf_of(html)
        for data in ({"amount": "10", "request_id": "a" * 22},
                     {"csrf": "", "amount": "10", "request_id": "a" * 22},
                     {"csrf": good[:-2] + "xx", "amount": "10", "request_id": "a" * 22}):  # fmt: skip
            async with s.post(url, data=data) as r:
                assert r.status == 403, data
                assert "security token" in await r.text()
        # the right token, but the browser says the form came from elsewhere
        async with s.post(url, data={"csrf": good, "amount": "10", "request_id": "a" * 22},
                          headers={"Origin": "http://evil.example"}) as r:  # fmt: skip
            assert r.status == 403
        # the login form needs its own token too
        async with s.post(f"{console.base}/login", data={"username": "bill", "password": PASSWORDS["bill"][1]}) as r:
            assert r.status == 403
        # logging out is a POST too
        async with s.post(f"{console.base}/logout", data={}) as r:
            assert r.status == 403


async def test_a_top_up_needs_a_valid_amount_and_a_command_queue(console: Console) -> None:
    url = f"{console.base}/gw/village-02/account/hh-0201/topup"
    async with client() as s:
        await login(s, console.base, "bill")
        _, html = await page(s, f"{console.base}/gw/village-02/account/hh-0201")
        for amount, shown in (("-5", "greater than 0"), ("1.234", "at most two decimals"), ("999999", "larger than")):
            async with s.post(url, data={"csrf": csrf_of(html), "amount": amount, "request_id": "b" * 22}) as r:
                assert r.status == 422 and shown in await r.text()
        async with s.post(url, data={"csrf": csrf_of(html), "amount": "50.00", "request_id": "b" * 22}) as r:
            assert r.status == 503
            assert "no command queue" in await r.text()
        async with s.post(f"{console.base}/gw/village-02/account/nobody/topup",
                          data={"csrf": csrf_of(html), "amount": "5", "request_id": "b" * 22}) as r:  # fmt: skip
            assert r.status == 404


async def test_sessions_end_when_idle_too_long_at_logout_and_at_a_password_change(console: Console) -> None:
    b = console.base
    async with client() as s:
        await login(s, b, "vera")
        console.clock[0] += auth.IDLE_MS - 1000
        assert (await page(s, f"{b}/"))[0] == 200  # seen again: the idle time starts over
        console.clock[0] += auth.IDLE_MS - 1000
        assert (await page(s, f"{b}/"))[0] == 200
        console.clock[0] += auth.IDLE_MS + 1
        status, _ = await page(s, f"{b}/")
        assert status == 303
    async with client() as s:
        await login(s, b, "vera")
        for _ in range(auth.ABSOLUTE_MS // (auth.IDLE_MS // 2) + 1):
            console.clock[0] += auth.IDLE_MS // 2
            status, html = await page(s, f"{b}/")
        assert status == 303  # however busy, a session ends ABSOLUTE_MS after login
    async with client() as s:
        await login(s, b, "vera")
        _, html = await page(s, f"{b}/")
        async with s.post(f"{b}/logout", data={"csrf": csrf_of(html)}, allow_redirects=False) as r:
            assert r.status == 303
        assert (await page(s, f"{b}/"))[0] == 303
    async with client() as s:
        await login(s, b, "vera")
        await console.users.set_password("vera", "another-password-5", console.clock[0])
        assert (await page(s, f"{b}/"))[0] == 303


async def test_cookies_are_httponly_and_strict_and_the_headers_forbid_scripts(console: Console) -> None:
    async with client() as s:
        r = await login(s, console.base, "vera")
        cookie = r.headers.getone("Set-Cookie")
        assert "edgegw_session=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert "Path=/console/" in cookie and "Secure" not in cookie  # plain HTTP
        async with s.get(f"{console.base}/") as page_r:
            csp = page_r.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "script" not in csp
            assert page_r.headers["X-Frame-Options"] == "DENY"
            assert page_r.headers["Cache-Control"] == "no-store"
            assert "<script" not in await page_r.text()


def _self_signed(tmp: Path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (tmp / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "k.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(tmp / "c.pem"), str(tmp / "k.pem")


async def test_over_tls_the_cookies_are_secure(console: Console, tmp_path: Path) -> None:
    from headend.web import server_tls

    cert, key = _self_signed(tmp_path)
    runner, port = await serve(build_app(console=console.settings), "127.0.0.1", 0, server_tls(cert, key))
    try:
        trust = ssl.create_default_context(cafile=cert)
        async with client(connector=aiohttp.TCPConnector(ssl=trust)) as s:
            r = await login(s, f"https://127.0.0.1:{port}/console", "vera")
            assert r.status == 303
            cookie = r.headers.getone("Set-Cookie")
            assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
            async with s.get(f"https://127.0.0.1:{port}/console/") as p:
                assert p.status == 200 and "Strict-Transport-Security" in p.headers
    finally:
        await runner.cleanup()


async def test_the_language_follows_the_browser_and_the_switch(console: Console) -> None:
    b = console.base
    async with client(headers={"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.5"}) as s:
        _, html = await page(s, f"{b}/login")
        assert "<h1>登录</h1>" in html and 'lang="zh-CN"' in html
        async with s.get(f"{b}/lang/en", params={"next": "/console/login"}, allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/console/login"
        _, html = await page(s, f"{b}/login")
        assert "<h1>Log in</h1>" in html
        for evil in ("//evil.example/x", "https://evil.example/", "/elsewhere", "/console/\\\\evil"):
            async with s.get(f"{b}/lang/zh-CN", params={"next": evil}, allow_redirects=False) as r:
                assert r.headers["Location"] == "/console/", evil
        assert (await page(s, f"{b}/lang/fr"))[0] == 404


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "headend", "user", *args],
        input=stdin, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_user_commands(tmp_path: Path) -> None:
    db = str(tmp_path / "central.db")
    r = _cli("add", "root", "--role", "administrator", "--db", db, "--password-stdin", stdin="s3cret-enough!\n")
    assert r.returncode == 0, r.stderr
    assert "user root added (administrator)" in r.stdout
    r = _cli("add", "root", "--role", "viewer", "--db", db, "--password-stdin", stdin="s3cret-enough!\n")
    assert r.returncode == 1 and "exists already" in r.stderr
    r = _cli("add", "shorty", "--role", "viewer", "--db", db, "--password-stdin", stdin="short\n")
    assert r.returncode == 1 and "at least 10 characters" in r.stderr
    r = _cli("add", "x", "--role", "boss", "--db", db, "--password-stdin", stdin="s3cret-enough!\n")
    assert r.returncode == 1 and "role 'boss'" in r.stderr
    r = _cli("add", "Bad Name", "--role", "viewer", "--db", db, "--password-stdin", stdin="s3cret-enough!\n")
    assert r.returncode == 1 and "user name" in r.stderr
    r = _cli("passwd", "nobody", "--db", db, "--password-stdin", stdin="s3cret-enough!\n")
    assert r.returncode == 1 and "no user 'nobody'" in r.stderr
    assert _cli("passwd", "root", "--db", db, "--password-stdin", stdin="an0ther-secret\n").returncode == 0
    assert _cli("role", "root", "viewer", "--db", db).returncode == 0
    assert _cli("disable", "root", "--db", db).returncode == 0
    r = _cli("list", "--db", db, "--json")
    assert r.returncode == 0
    import orjson

    (u,) = orjson.loads(r.stdout)
    assert u["user"] == "root" and u["role"] == "viewer" and u["disabled"] is True
    import sqlite3

    (stored,) = sqlite3.connect(db).execute("SELECT password_hash FROM console_users").fetchone()
    assert stored.startswith("scrypt$15$8$1$") and "an0ther-secret" not in stored
    assert auth.verify_password("an0ther-secret", stored) and not auth.verify_password("s3cret-enough!", stored)


async def test_headend_run_serves_the_console_with_the_presence_it_hears(tmp_path: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    """``edgegw headend run --metrics ... --console ...``: the console in the ingest's
    process shows each gateway's retained presence as the headend heard it."""
    import argparse
    import asyncio

    import aiomqtt

    from headend.cli import _start_console
    from headend.ingest import Headend
    from headend.metrics import HeadendMetrics

    path = tmp_path / "central.db"
    store = await HeadendDB.open(path)
    await add_villages(store, NOW)
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as c:
        await c.publish("edgegw/v1/village-02/state", b"online", qos=1, retain=True)
        await c.publish("edgegw/v1/village-03/state", b"offline", qos=1, retain=True)
    metrics = HeadendMetrics()
    headend = Headend(store, host=mosquitto.host, port=mosquitto.port, observer=metrics)
    task = asyncio.create_task(headend.run())
    args = argparse.Namespace(db=str(path), dsn=None, console=("127.0.0.1", 0))
    started = await _start_console(args, metrics)
    assert started is not None
    runner, cdb = started
    try:
        for _ in range(100):
            if len(metrics.presence) == 2:
                break
            await asyncio.sleep(0.05)
        await Users(cdb).add("vera", Role.VIEWER, PASSWORDS["vera"][1], time.time_ns() // 1_000_000)
        port = runner.addresses[0][1]
        async with client() as s:
            r = await login(s, f"http://127.0.0.1:{port}/console", "vera")
            assert r.status == 303
            status, html = await page(s, f"http://127.0.0.1:{port}/console/")
            assert status == 200, (status, html[:500])
        rows = {m.group(1): m.group(2) for m in re.finditer(r'>(village-0\d)</a></td>\s*<td>(.*?)</td>', html, re.S)}
        assert "online" in rows["village-02"] and "offline" in rows["village-03"]
        assert 'id="no-presence"' not in html
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()
        await cdb.close()
        await store.close()


async def test_the_fleet_shows_stored_presence_and_health(tmp_path: Path) -> None:
    """Presence as every headend stores it (fleet_presence) and the newest
    gateway.health record, without a presence source handed in."""
    from store_forward.presence import Identity, OfflineReason, birth, death, parse
    from tests.headend.console.fleetdata import _Gateway

    path = tmp_path / "central.db"
    store = await HeadendDB.open(path)
    await add_villages(store, NOW)
    gw = _Gateway(store, "village-09")
    gw.event({"type": "gateway.health", "time_ms": NOW - 60_000, "version": "9.8.7", "uptime_s": 3600}, NOW - 60_000)
    await gw.send(NOW - 50_000)
    on = parse(birth(Identity("village-09", "9.8.7", "boot-1", NOW - 3_600_000), NOW - 3_000_000))
    off = parse(death(Identity("village-03", "9.8.6", "boot-2", NOW - 7_200_000), OfflineReason.LOST))
    assert on is not None and off is not None
    await store.save_presence("village-09", on, NOW - 3_000_000)
    await store.save_presence("village-03", off, NOW - 600_000)
    await store.close()
    db = await open_console_db(path)
    await Users(db).add("vera", Role.VIEWER, PASSWORDS["vera"][1], NOW - 86_400_000)
    settings = ConsoleSettings(db=db, tz=ZoneInfo("Asia/Shanghai"), clock_ms=lambda: NOW)
    runner, port = await serve(build_app(console=settings), "127.0.0.1", 0)
    try:
        async with client() as s:
            base = f"http://127.0.0.1:{port}/console"
            await login(s, base, "vera")
            _, fleet = await page(s, f"{base}/")
            assert 'id="no-presence"' not in fleet
            assert "9.8.7" in fleet, "the newest health record's version"
            row09 = fleet[fleet.index("village-09") :][:1500]
            row03 = fleet[fleet.index("village-03") :][:1500]
            assert "online" in row09 and "offline" in row03
            # village-02 sent batches but no presence message was stored for it: the
            # console says exactly that (not that the gateway was never seen)
            cells = re.search(r'>village-02</a></td>\s*<td>(.*?)</td>', fleet, re.S)
            assert cells is not None and re.sub(r"<[^>]+>", "", cells.group(1)).strip() == "no presence message"
    finally:
        await runner.cleanup()
        await db.close()

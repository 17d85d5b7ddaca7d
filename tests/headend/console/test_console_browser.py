"""The console in a real browser: Debian's chromium, headless, driven by selenium.

One module-wide set-up: ``edgegw demo`` fills a headend database (plus two
more gateways, see fleetdata.py), the console is started as ``edgegw headend
console`` on it and on a PostgreSQL copy of it, and one browser session
visits the pages as each role. Screenshots of every page go to
``$EDGEGW_ARTIFACTS/console`` (else the test's temporary directory); with
``EDGEGW_UPDATE_SCREENSHOTS=1`` they are also copied to docs/screenshots/.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from headend.console.auth import MAX_FAILURES_PER_USER, Role, Users
from headend.console.db import open_console_db
from headend.store import HeadendDB
from tests.headend.console.fleetdata import (
    REPO,
    add_villages,
    copy_to_postgres,
    pg_database,
    run_demo,
)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
USERS = {
    "vera": (Role.VIEWER, "viewer-password-1"),
    "bill": (Role.BILLING_CLERK, "clerk-password-22"),
    "fred": (Role.FIELD_SUPERVISOR, "field-password-333"),
    "ada": (Role.ADMINISTRATOR, "admin-password-4444"),
    "rita": (Role.VIEWER, "rita-password-55555"),
}
DEMO_GW, DEMO_ACCOUNT = "demo-gw-01", "household-01"
# The screenshots docs/console.md shows (one of each page).
DOCS_SHOTS = {"login-failed", "fleet", "gateway", "account", "account-zh-CN", "alarms", "users", "viewer-topup-403",
              # tests/headend/test_central_delivery.py: a top-up sold while its gateway was offline
              "offline-topup-pending", "offline-topup-delivered"}  # fmt: skip


@dataclass
class Site:
    sqlite: str  # base URL of the console on SQLite
    postgres: str  # and on PostgreSQL
    shots: Path


def _start_console(args: list[str], log: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "headend", "console", "--listen", "127.0.0.1:0",
         "--timezone", "Asia/Shanghai", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "console at http://127.0.0.1:PORT/console/"
    m = re.search(r"(http://127\.0\.0\.1:\d+/console)/", line)
    if m is None:
        proc.kill()
        pytest.fail(f"the console did not start: {line!r} {log.read_text()[-2000:]}")
    return proc, m.group(1)


async def _prepare(db: str | None, dsn: str | None) -> None:
    cdb = await open_console_db(db, dsn)
    try:
        users = Users(cdb)
        for name, (role, pw) in USERS.items():
            await users.add(name, role, pw, time.time_ns() // 1_000_000)
    finally:
        await cdb.close()


async def _villages(db: Path) -> None:
    store = await HeadendDB.open(db)
    try:
        await add_villages(store, time.time_ns() // 1_000_000)
    finally:
        await store.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("the browser tests need Debian's chromium and chromium-driver (./dev test installs them)")
    work = tmp_path_factory.mktemp("console")
    db = run_demo(work / "demo")
    asyncio.run(_villages(db))
    asyncio.run(_prepare(str(db), None))
    shots = screenshots_dir(work / "screenshots")
    with pg_database() as dsn:
        from headend.store_pg import PostgresHeadendDB

        async def pg_schema() -> None:
            await (await PostgresHeadendDB.open(dsn)).close()

        asyncio.run(pg_schema())
        copy_to_postgres(db, dsn)
        asyncio.run(_prepare(None, dsn))
        p1, sqlite_url = _start_console(["--db", str(db)], work / "console-sqlite.log")
        p2, pg_url = _start_console(["--dsn", dsn], work / "console-pg.log")
        try:
            yield Site(sqlite_url, pg_url, shots)
        finally:
            for p in (p1, p2):
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    print(f"console screenshots: {shots}")


def screenshots_dir(fallback: Path) -> Path:
    """Where the console's screenshots go: ``$EDGEGW_ARTIFACTS/console``, else ``fallback``."""
    artifacts = os.environ.get("EDGEGW_ARTIFACTS")
    shots = Path(artifacts) / "console" if artifacts else fallback
    shots.mkdir(parents=True, exist_ok=True)
    return shots


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's chromium, headless, 1280 px wide, asking for English pages."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("the browser tests need Debian's chromium and chromium-driver (./dev test installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        opts.add_argument(a)
    opts.add_experimental_option("prefs", {"intl.accept_languages": "en-US,en"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def browser(site: Site) -> Iterator[object]:
    with chromium() as driver:
        yield driver


def by_id(driver, ident: str):  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, ident)


def all_css(driver, css: str) -> list:  # type: ignore[no-untyped-def,type-arg]
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def click_and_wait(driver, element) -> None:  # type: ignore[no-untyped-def]
    """Click, then wait until the next page has loaded.

    The old page is marked with a property of its ``window``; a new document has
    a fresh window without it. (Waiting for the old ``<html>`` element to go stale
    is not dependable: while the old document is being torn down, chromedriver
    can answer "Node with given id does not belong to the document" instead of a
    stale-element error.) While the browser is between documents a script can
    fail; such failures are retried until the 15 s bound.
    """
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("window.__edgegwOldPage = true;")
    element.click()

    def next_page_loaded(d) -> bool:  # type: ignore[no-untyped-def]
        return bool(d.execute_script("return !window.__edgegwOldPage && document.readyState === 'complete';"))

    WebDriverWait(driver, 15, ignored_exceptions=(WebDriverException,)).until(next_page_loaded)


def fresh(driver, base: str) -> None:  # type: ignore[no-untyped-def]
    """No session, English: a browser as a new visitor has it."""
    driver.get(f"{base}/login")
    driver.delete_all_cookies()


def log_in(driver, base: str, user: str, password: str | None = None) -> None:  # type: ignore[no-untyped-def]
    fresh(driver, base)
    driver.get(f"{base}/login")
    by_id(driver, "username").send_keys(user)
    by_id(driver, "password").send_keys(password if password is not None else USERS[user][1])
    click_and_wait(driver, by_id(driver, "login"))


def shoot(driver, site: Site, name: str) -> Path:  # type: ignore[no-untyped-def]
    """A screenshot of the whole page, however long (Chrome's own full-page capture)."""
    return shoot_to(driver, site.shots, name)


def shoot_to(driver, shots: Path, name: str) -> Path:  # type: ignore[no-untyped-def]
    """The same into ``shots`` (``NAME.png``)."""
    import base64

    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    height = min(int(size["height"]) + 1, 6000)
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False}
    )
    try:
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    path = shots / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    if os.environ.get("EDGEGW_UPDATE_SCREENSHOTS") == "1" and name in DOCS_SHOTS:
        docs = REPO / "docs" / "screenshots"
        docs.mkdir(exist_ok=True)
        shutil.copy2(path, docs / path.name)
    return path


def body_text(driver) -> str:  # type: ignore[no-untyped-def]
    return str(by_id_or_tag(driver, "body").text)


def by_id_or_tag(driver, tag: str):  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, tag)


def test_a_wrong_password_is_refused_and_then_the_login_rate_limited(browser, site: Site) -> None:  # type: ignore[no-untyped-def]
    d = browser
    log_in(d, site.sqlite, "rita", "not-her-password")
    assert by_id(d, "login-error").text == "Wrong user name or password."
    assert d.current_url.endswith("/login")
    shoot(d, site, "login-failed")
    for _ in range(MAX_FAILURES_PER_USER - 1):
        log_in(d, site.sqlite, "rita", "still-not-it-1")
    log_in(d, site.sqlite, "rita")  # the right password, too late
    assert "Too many failed logins" in by_id(d, "login-error").text
    assert not all_css(d, "#logout")


def test_each_role_sees_every_page_with_real_data(browser, site: Site) -> None:  # type: ignore[no-untyped-def]
    d = browser
    b = site.sqlite
    for user, (role, _) in USERS.items():
        if user == "rita":
            continue
        log_in(d, b, user)
        assert d.current_url == f"{b}/", d.current_url
        header = by_id_or_tag(d, "header").text
        assert user in header and role.value.replace("_", " ") in header
        rows = {r.text.split()[0]: r.text for r in all_css(d, "#fleet tbody tr")}
        assert set(rows) == {DEMO_GW, "village-02", "village-03"}
        assert "1 / 3" in rows["village-02"] and "0 / 10" in rows[DEMO_GW]
        if user == "bill":
            shoot(d, site, "fleet")

        d.get(f"{b}/gw/{DEMO_GW}")
        meters = all_css(d, "#meters tbody tr")
        assert len(meters) == 10 and all("online" in m.text for m in meters)
        results = by_id(d, "results").text
        assert "demo-sale-0001" in results and "applied" in results and "rejected" in results
        assert "supply cut" in by_id(d, "events").text
        assert bool(all_css(d, ".relay-form")) == (role in (Role.FIELD_SUPERVISOR, Role.ADMINISTRATOR))
        if user == "fred":
            shoot(d, site, "gateway")

        d.get(f"{b}/gw/{DEMO_GW}/account/{DEMO_ACCOUNT}")
        assert "normal" in by_id(d, "cutoff-state").text
        assert "restore level" in by_id(d, "cutoff-reason").text
        credits = by_id(d, "credits").text
        assert "demo-sale-0001" in credits and "10.00" in credits
        history = by_id(d, "history").text
        assert "supply cut" in history and "supply restored" in history
        assert bool(all_css(d, "#topup-form")) == (role in (Role.BILLING_CLERK, Role.ADMINISTRATOR))
        if user == "bill":
            shoot(d, site, "account")

        d.get(f"{b}/alarms")
        alarms = by_id(d, "alarms").text
        assert "supply cut" in alarms and "meter offline" in alarms and "m-03" in alarms
        risks = by_id(d, "risks").text
        assert "register ran backwards" in risks and "meter clock drift" in risks
        if user == "vera":
            shoot(d, site, "alarms")

        d.get(f"{b}/users")
        if role is Role.ADMINISTRATOR:
            assert {r.text.split()[0] for r in all_css(d, "#users tbody tr")} == set(USERS)
            shoot(d, site, "users")
        else:
            assert "Your role does not allow this." in body_text(d)


def test_a_viewer_has_no_top_up_form_and_cannot_post_one(browser, site: Site) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    log_in(d, site.sqlite, "vera")
    d.get(f"{site.sqlite}/gw/{DEMO_GW}/account/{DEMO_ACCOUNT}")
    assert not all_css(d, "#topup-form") and not all_css(d, "#amount")
    # a hand-made form with the viewer's own session and CSRF token
    d.execute_script(
        """const t = document.querySelector('input[name=csrf]').value;
        const f = document.createElement('form'); f.method = 'post'; f.action = arguments[0];
        for (const [k, v] of [['csrf', t], ['amount', '100'], ['request_id', 'x'.repeat(22)]]) {
          const i = document.createElement('input'); i.name = k; i.value = v; f.appendChild(i); }
        document.body.appendChild(f); f.submit();""",
        f"{site.sqlite}/gw/{DEMO_GW}/account/{DEMO_ACCOUNT}/topup",
    )
    WebDriverWait(d, 15).until(lambda d: d.current_url.endswith("/topup") and all_css(d, "#error-detail"))
    assert "403" in by_id_or_tag(d, "h1").text
    assert "Your role does not allow this." in by_id(d, "error-detail").text
    shoot(d, site, "viewer-topup-403")


def test_a_form_without_its_csrf_token_is_refused(browser, site: Site) -> None:  # type: ignore[no-untyped-def]
    d = browser
    log_in(d, site.sqlite, "bill")
    d.get(f"{site.sqlite}/gw/{DEMO_GW}/account/{DEMO_ACCOUNT}")
    d.execute_script("document.querySelector('#topup-form input[name=csrf]').remove()")
    by_id(d, "amount").send_keys("25.00")
    click_and_wait(d, by_id(d, "sell"))
    assert "403" in by_id_or_tag(d, "h1").text
    assert "security token" in by_id(d, "error-detail").text
    # with its token the same form reaches the command step (none is configured here)
    d.get(f"{site.sqlite}/gw/{DEMO_GW}/account/{DEMO_ACCOUNT}")
    by_id(d, "amount").send_keys("25.00")
    click_and_wait(d, by_id(d, "sell"))
    assert "503" in by_id_or_tag(d, "h1").text and "no command queue" in by_id(d, "error-detail").text


def test_the_language_switch_shows_chinese(browser, site: Site) -> None:  # type: ignore[no-untyped-def]
    d = browser
    log_in(d, site.sqlite, "bill")
    click_and_wait(d, by_id(d, "lang-zh-CN"))
    assert d.current_url == f"{site.sqlite}/"
    assert by_id_or_tag(d, "h1").text == "网关总览"
    nav = by_id_or_tag(d, "nav").text
    assert "告警与风险" in nav and "营业收费员" in by_id_or_tag(d, "header").text
    assert "最近批次" in by_id(d, "fleet").text
    shoot(d, site, "fleet-zh-CN")
    d.get(f"{site.sqlite}/gw/{DEMO_GW}/account/{DEMO_ACCOUNT}")
    text = body_text(d)
    assert "余额走势" in text and "售电充值" in text and "已断电" in text
    shoot(d, site, "account-zh-CN")
    d.get(f"{site.sqlite}/gw/{DEMO_GW}")
    assert "电表上线" in by_id(d, "events").text
    shoot(d, site, "gateway-zh-CN")
    click_and_wait(d, by_id(d, "lang-en"))
    assert by_id_or_tag(d, "h1").text == f"Gateway {DEMO_GW}"


def test_the_charts_are_drawn(browser, site: Site) -> None:  # type: ignore[no-untyped-def]
    d = browser
    log_in(d, site.sqlite, "vera")
    d.get(f"{site.sqlite}/gw/{DEMO_GW}")
    lines = all_css(d, "#readings-chart svg polyline.series")
    assert len(lines) == 8  # the first eight of ten meters; the caption says two more
    for line in lines:
        assert len(line.get_attribute("points").split()) >= 10
        assert line.size["width"] > 100  # really laid out on the page
    d.get(f"{site.sqlite}/gw/{DEMO_GW}/account/{DEMO_ACCOUNT}")
    (balance,) = all_css(d, "#balance-chart svg polyline.series")
    m = re.search(r"from (\d+) ledger entries", body_text(d))
    assert m and int(m.group(1)) >= 10
    assert len(balance.get_attribute("points").split()) == 2 * int(m.group(1)) - 1  # a step per entry
    assert len(all_css(d, "#balance-chart svg circle.marker")) == 1  # the top-up
    assert all_css(d, "#balance-chart svg line.zero")


def test_the_console_on_postgresql(browser, site: Site) -> None:  # type: ignore[no-untyped-def]
    d = browser
    log_in(d, site.sqlite, "ada")
    d.get(f"{site.sqlite}/gw/{DEMO_GW}/account/{DEMO_ACCOUNT}")
    on_sqlite = by_id(d, "balance").text
    log_in(d, site.postgres, "ada")
    assert {r.text.split()[0] for r in all_css(d, "#fleet tbody tr")} == {DEMO_GW, "village-02", "village-03"}
    d.get(f"{site.postgres}/gw/village-02")
    assert len(all_css(d, "#readings-chart svg polyline.series")) == 3
    assert "offline" in by_id(d, "meters").text
    d.get(f"{site.postgres}/gw/{DEMO_GW}/account/{DEMO_ACCOUNT}")
    assert by_id(d, "balance").text == on_sqlite
    assert "demo-sale-0001" in by_id(d, "credits").text
    d.get(f"{site.postgres}/alarms")
    assert "register ran backwards" in by_id(d, "risks").text
    shoot(d, site, "alarms-postgresql")

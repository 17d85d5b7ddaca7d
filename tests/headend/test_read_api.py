"""The read API on a loopback port over a store the headend filled (SQLite and
PostgreSQL): every answer validates against docs/openapi.yaml, every route in the
document is exercised and every route served is in the document; filters, paging,
errors and tokens; on PostgreSQL the documented views agree with the API."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse

from headend.console.db import ConsoleDb, open_console_db
from headend.read_api import ROUTES, ReadApiSettings, TokenFile, new_token
from headend.store import HeadendDB, HeadendStore
from headend.web import build_app, serve
from store_forward import wire_json
from store_forward.presence import OfflineReason, Presence, PresenceState
from store_forward.records import Record, RecordClass
from tests.headend.test_headend_scaleout import pg_dsn

__all__ = ["pg_dsn"]

ROOT = Path(__file__).resolve().parents[2]
SPEC = OpenAPI.from_file_path(str(ROOT / "docs" / "openapi.yaml"))
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
EPOCH = "0000000000000bbb"
CENTRAL_PATHS = {"/commands", "/commands/{id}"}  # served by central's API (headend/api.py)


def reading(rid: int, meter: str, t: int, kwh: str, **q: str) -> Record:
    body: dict[str, Any] = {"m": meter, "t": t, "ts": "system_synced", "v": {"energy_import_kwh": kwh, "relay_open": "0"}}
    if q:
        body["q"] = q
    return Record(rid, RecordClass.BILLING, "reading", t + 50, body)


def telemetry(rid: int, meter: str, t: int) -> Record:
    return Record(rid, RecordClass.TELEMETRY, "reading", t + 50,
                  {"m": meter, "t": t, "ts": "system", "v": {"voltage_v": "229.8", "power_kw": "-0.0125"}})  # fmt: skip


def event(rid: int, t: int, body: dict[str, Any]) -> Record:
    return Record(rid, RecordClass.EVENT, "event", t, {"time_ms": t, **body})


def charge(rid: int, t: int, account: str, seq: int, amount: int, kind: str = "debit") -> Record:
    return Record(rid, RecordClass.BILLING, "charge", t, {
        "id": f"{kind}-{seq}", "account": account, "seq": seq, "kind": kind, "amount_micro": amount,
        "time_ms": t, "body": {},
    })  # fmt: skip


def cut(t: int, account: str, frm: str, to: str, micro: int) -> dict[str, Any]:
    return {"type": "cutoff.state_change", "account": account, "from": frm, "to": to, "balance_micro": micro,
            "balance": f"{micro / 1e6:.2f}", "state": f"state {to}", "reason": f"reason {to}"}  # fmt: skip


def batches() -> list[tuple[str, list[Record]]]:
    m = 60_000
    a = [
        *(reading(1 + i, "m001", T0 + i * m, f"{100 + i}.{i:02d}") for i in range(5)),
        reading(6, "m002", T0, "7.50", energy_import_kwh="suspect"),
        telemetry(7, "m001", T0),
        event(8, T0 + 1 * m, cut(0, "acct-001", "normal", "alarm1", 9_800_000)),
        charge(9, T0 + 2 * m, "acct-001", 10, -300_000),
        event(10, T0 + 3 * m, cut(0, "acct-001", "alarm1", "alarm2", 4_900_000)),
        charge(11, T0 + 4 * m, "acct-001", 11, -200_000),
        charge(12, T0 + 5 * m, "acct-001", 12, -150_000),
        event(13, T0 + 6 * m, {"type": "meter.offline", "meter": "m002", "error": "timeout"}),
        event(14, T0 + 7 * m, {"type": "gateway.health", "version": "0.1.0", "outbox": {"depth": 3}}),
    ]
    b = [
        event(1, T0 + 8 * m, {"type": "command_result", "command_id": "topup-1", "outcome": "applied",
                              "command_type": "topup", "at_ms": T0 + 8 * m,
                              "effect": {"status": "applied", "account": "acct-101", "balance_after_micro": 50_000_000}}),
        charge(2, T0 + 9 * m, "acct-101", 3, -1_000_000),
    ]
    return [("gw-a", a[:8]), ("gw-a", a[8:]), ("gw-b", b)]


class Api:
    def __init__(self, base: str, token: str, session: aiohttp.ClientSession, db: ConsoleDb, dsn: str | None) -> None:
        self.base, self.token, self.session, self.db, self.dsn = base, token, session, db, dsn
        self.seen: set[str] = set()

    async def get(self, path: str, status: int = 200, token: str | None = "", **params: Any) -> dict[str, Any]:
        headers = {} if token is None else {"Authorization": f"Bearer {token or self.token}"}
        query = {k: str(v) for k, v in params.items()}
        async with self.session.get(self.base + path, params=query, headers=headers) as r:
            body = await r.read()
            assert r.status == status, body
            ctype = r.headers["Content-Type"].split(";")[0]
            resp_headers = dict(r.headers)
        req = MockRequest("http://127.0.0.1", "get", "/api/v1" + path, args=query, headers=headers)
        if status == 200:
            SPEC.validate_request(req)
        SPEC.validate_response(req, MockResponse(body, status_code=status, content_type=ctype, headers=resp_headers))
        self.seen.add(path)
        doc: dict[str, Any] = json.loads(body)
        return doc


@pytest.fixture(params=["sqlite", "postgres"])
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Api]:
    dsn = None
    if request.param == "sqlite":
        store: HeadendStore = await HeadendDB.open(tmp_path / "central.db")
    else:
        from headend.store_pg import PostgresHeadendDB

        dsn = request.getfixturevalue("pg_dsn")
        store = await PostgresHeadendDB.open(dsn)
    seqs: dict[str, int] = {}
    for gw, recs in batches():
        seqs[gw] = seqs.get(gw, 0) + 1
        batch = wire_json.decode(wire_json.encode(gw, seqs[gw], recs, epoch=EPOCH))
        assert (await store.store(batch, T0 + 10 * 60_000)).status == "stored"
    await store.save_presence("gw-a", Presence(PresenceState.ONLINE, "gw-a", "0.1.0", "boot-1", T0, T0), T0)
    await store.save_presence(
        "gw-b", Presence(PresenceState.OFFLINE, "gw-b", reason=OfflineReason.LOST), T0 + 60_000
    )
    await store.close()
    db = await open_console_db(tmp_path / "central.db", dsn)
    token = new_token(tmp_path / "tokens", "billing-system")
    runner, port = await serve(build_app(read_api=ReadApiSettings(db, TokenFile(tmp_path / "tokens"))), "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            yield Api(f"http://127.0.0.1:{port}/api/v1", token, session, db, dsn)
    finally:
        await runner.cleanup()
        await db.close()


async def test_every_route_answers_as_documented(api: Api) -> None:
    # readings: a meter's registers in a time range, paged
    r = await api.get("/readings", gateway="gw-a", meter="m001", limit=2)
    assert [x["values"]["energy_import_kwh"] for x in r["readings"]] == ["100.00", "101.01"]
    assert r["readings"][0]["time"] == "2026-01-01T00:00:00.000Z" and r["next"]
    r2 = await api.get("/readings", gateway="gw-a", meter="m001", limit=2, after=r["next"])
    r3 = await api.get("/readings", gateway="gw-a", meter="m001", limit=2, after=r2["next"])
    assert [x["record_id"] for x in r2["readings"] + r3["readings"]] == [3, 4, 5] and r3["next"] is None
    r = await api.get("/readings", **{"from": T0 + 60_000, "to": "2026-01-01T08:03:00+08:00"})
    assert [x["record_id"] for x in r["readings"]] == [2, 3]
    r = await api.get("/readings", meter="m002")
    assert r["readings"][0]["quality"] == {"energy_import_kwh": "suspect"}
    r = await api.get("/readings", **{"class": "telemetry"})
    assert r["readings"] == [{**r["readings"][0], "values": {"power_kw": "-0.0125", "voltage_v": "229.8"}}]

    # events by type and account; charges by kind
    e = await api.get("/events", type="cutoff.state_change", account="acct-001")
    assert [x["body"]["to"] for x in e["events"]] == ["alarm1", "alarm2"]
    assert e["events"][0]["time_ms"] == T0 + 60_000 and e["events"][0]["type"] == "cutoff.state_change"
    e = await api.get("/events", kind="charge", gateway="gw-a")
    assert [x["body"]["amount_micro"] for x in e["events"]] == [-300_000, -200_000, -150_000]
    e = await api.get("/events", limit=3)
    e2 = await api.get("/events", limit=3, after=e["next"])
    assert len(e["events"]) == 3 and not ({x["record_id"] for x in e["events"]} & {x["record_id"] for x in e2["events"]} and
            {x["gateway"] for x in e["events"]} == {x["gateway"] for x in e2["events"]})  # fmt: skip

    # balances: the newest report plus the charges after it; the supply level
    b = {x["account"]: x for x in (await api.get("/balances"))["balances"]}
    a1 = b["acct-001"]
    assert (a1["balance_micro"], a1["source"], a1["level"], a1["supply"]) == (4_900_000, "cutoff.state_change", "alarm2", "state alarm2")
    assert a1["charges_since_micro"] == -350_000 and a1["estimated_balance"] == "4.55"
    a2 = b["acct-101"]
    assert (a2["balance"], a2["source"], a2["level"], a2["estimated_balance_micro"]) == ("50.00", "command_result", None, 49_000_000)
    assert [x["account"] for x in (await api.get("/balances", account="acct-101"))["balances"]] == ["acct-101"]

    # gateways: presence, ingest, health, meters by state
    g = {x["gateway"]: x for x in (await api.get("/gateways"))["gateways"]}
    assert g["gw-a"]["presence"]["state"] == "online" and g["gw-a"]["presence"]["version"] == "0.1.0"
    assert g["gw-b"]["presence"]["reason"] == "lost"
    assert g["gw-a"]["health"]["body"]["outbox"] == {"depth": 3}
    assert g["gw-a"]["meters_by_state"] == {"online": 0, "offline": 1, "quarantined": 0}
    assert g["gw-a"]["ingest"]["batches"] == 2 and g["gw-a"]["ingest"]["records"] == 14
    one = await api.get("/gateways/gw-a")
    assert one["meters"] == [{"meter": "m002", "state": "offline", "since_ms": T0 + 6 * 60_000}]
    await api.get("/gateways/gw-nope", status=404)

    # the notices the cutoff events queued
    n = await api.get("/notifications", account="acct-001")
    assert [(x["kind"], x["state"], x["urgent"]) for x in n["notifications"]] == [
        ("low_balance", "pending", False), ("nearly_used_up", "pending", False)]
    await api.get("/notifications", state="sent")

    # errors: parameters, tokens
    for params in ({"bogus": 1}, {"limit": 0}, {"from": "yesterday"}, {"from": "2026-01-01T00:00:00"},
                   {"after": "not-a-cursor"}, {"class": "x"}):  # fmt: skip
        err = await api.get("/readings", 400, **params)
        assert err["error"]["code"] == "bad_parameter"
    await api.get("/events", 401, token=None)
    await api.get("/balances", 401, token="edgegw-read-wrong")

    documented = set(yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())["paths"])
    # central's command states are documented there too (tests/headend/test_central_api.py)
    assert documented - CENTRAL_PATHS == {path for path, _ in ROUTES}
    assert {"/readings", "/events", "/balances", "/gateways", "/notifications"} <= api.seen

    if api.dsn is not None:
        await views_agree(api, a1, a2)


async def views_agree(api: Api, a1: dict[str, Any], a2: dict[str, Any]) -> None:
    """The PostgreSQL views give the same answers as the API."""
    import psycopg

    with psycopg.connect(api.dsn or "") as conn:
        rows = conn.execute(
            "SELECT quantity, value, value_text, quality FROM edgegw_readings"
            " WHERE gateway_id = 'gw-a' AND meter_id = 'm002'"
        ).fetchall()
        assert sorted(rows) == [("energy_import_kwh", Decimal("7.50"), "7.50", "suspect"),
                                ("relay_open", 0, "0", "good")]  # fmt: skip
        n = conn.execute("SELECT count(*) FROM edgegw_readings WHERE record_class = 'telemetry'").fetchone()
        assert n == (2,)
        bal = conn.execute(
            "SELECT account, balance_micro, as_of_ms, source, charges_since_micro, estimated_balance_micro"
            " FROM edgegw_balances ORDER BY account"
        ).fetchall()
        assert bal == [
            ("acct-001", a1["balance_micro"], a1["as_of_ms"], a1["source"], a1["charges_since_micro"],
             a1["estimated_balance_micro"]),
            ("acct-101", a2["balance_micro"], a2["as_of_ms"], a2["source"], a2["charges_since_micro"],
             a2["estimated_balance_micro"]),
        ]  # fmt: skip
        st = conn.execute("SELECT account, level, supply, reason, since_ms FROM edgegw_cutoff_state").fetchall()
        assert st == [("acct-001", a1["level"], a1["supply"], a1["reason"], a1["level_since_ms"])]
        gws = conn.execute(
            "SELECT gateway_id, presence, version, meters_offline, batches, health->'outbox'->>'depth'"
            " FROM edgegw_gateways ORDER BY gateway_id"
        ).fetchall()
        assert gws == [("gw-a", "online", "0.1.0", 1, 2, "3"), ("gw-b", "offline", None, 0, 1, None)]
        ev = conn.execute("SELECT type, account FROM edgegw_events WHERE gateway_id = 'gw-b'").fetchall()
        assert ev == [("command_result", "acct-101")]
        ch = conn.execute("SELECT sum(amount_micro) FROM edgegw_charges WHERE account = 'acct-001'").fetchone()
        assert ch == (-650_000,)
        notes = conn.execute("SELECT kind, urgent, state FROM edgegw_notifications ORDER BY kind").fetchall()
        assert notes == [("low_balance", False, "pending"), ("nearly_used_up", False, "pending")]

"""Central's HTTP API: real requests to the aiohttp application on a loopback port.

Tokens per role, what each role may do, the errors a caller gets, payments by
idempotency key, delivery states and the daily reconciliation — on SQLite and
on PostgreSQL — and the same service through ``edgegw central``.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main as edgegw
from headend.central import ApiRole, Central
from headend.central_db import CentralDB
from headend.dispatch import Dispatcher
from headend.signing import Signer, init_keys
from headend.store import HeadendDB, HeadendStore
from headend.web import build_app, serve
from store_forward.codec import JsonCodec, decode
from store_forward.records import Record, RecordClass
from tests.headend.central_site import Api
from tests.headend.test_headend_scaleout import pg_dsn  # noqa: F401 (fixture)

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
GW = "gw-api"


class World:
    def __init__(self, central: Central, store: HeadendStore, api: Api, tmp: Path, dsn: str | None) -> None:
        self.central = central
        self.store = store
        self.api = api
        self.tmp = tmp
        self.dsn = dsn
        self.seq = 0

    async def answer(self, *records: tuple[str, dict[str, Any]]) -> None:
        self.seq += 1
        recs = [
            Record(self.seq * 100 + i, RecordClass.EVENT if k == "event" else RecordClass.BILLING, k, T0, b)
            for i, (k, b) in enumerate(records)
        ]
        payload, _ = JsonCodec().pack(GW, self.seq, recs, 1 << 20, epoch="00000000000000bb")
        assert (await self.store.store(decode(payload, None, allow_plain=True), T0)).status == "stored"


@pytest.fixture(params=["sqlite", "postgresql"])
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[World]:
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgresql" else None
    init_keys(tmp_path / "keys")
    store: HeadendStore
    if dsn:
        from headend.store_pg import PostgresHeadendDB

        store = await PostgresHeadendDB.open(dsn)
    else:
        store = await HeadendDB.open(tmp_path / "central.db")
    db = await CentralDB.open(db=tmp_path / "central.db", dsn=dsn)
    clock = [T0]
    central = Central(db, Signer.load(tmp_path / "keys"), clock_ms=lambda: clock[0])
    runner, port = await serve(build_app(central), "127.0.0.1", 0)
    tokens = {}
    for who, role, channel in (
        ("billing", ApiRole.BILLING, None),
        ("operations", ApiRole.OPERATIONS, None),
        ("viewer", ApiRole.VIEWER, None),
        ("bank", ApiRole.CHANNEL, "bank"),
        ("counter", ApiRole.CHANNEL, "counter"),
    ):
        _, tokens[who] = await central.create_token(f"t-{who}", role, channel)
    api = Api(f"http://127.0.0.1:{port}", tokens)
    try:
        yield World(central, store, api, tmp_path, dsn)
    finally:
        await api.close()
        await runner.cleanup()
        await db.close()
        await store.close()


TOPUP = {"account": "acct-1", "amount": "50.00", "payment_channel": "counter"}
RELAY = {"gateway": GW, "meter": "m1", "op": "trip", "reason": "meter tampering"}
CONFIG = {"gateway": GW, "set": {"gateway.poll_interval_s": 10}}
TARIFF = {"gateways": [GW], "tariff": {"id": "flat-basic", "version": 2, "price": "0.6000",
          "effective_from": "2026-09-21T00:00:00+08:00", "timezone": "Asia/Shanghai"}}  # fmt: skip
SNAPSHOT = {"account": "acct-1", "balance": "12.34", "as_of_seq": 7}
PAYMENT = {"idempotency_key": "k-1", "account": "acct-1", "amount": "20.00"}


async def test_each_role_may_do_its_own_work_only(world: World) -> None:
    api = world.api
    status, _, _ = await api.call("PUT", "/api/v1/accounts/acct-1", "billing", {"gateway": GW})
    assert status == 200
    routes = {
        "topup": ("POST", "/api/v1/topups", TOPUP),
        "tariff": ("POST", "/api/v1/tariffs", TARIFF),
        "snapshot": ("POST", "/api/v1/snapshots", SNAPSHOT),
        "relay": ("POST", "/api/v1/relays", RELAY),
        "config": ("POST", "/api/v1/config", CONFIG),
        "account": ("PUT", "/api/v1/accounts/acct-2", {"gateway": GW}),
        "commands": ("GET", "/api/v1/commands", None),
        "report": ("GET", "/api/v1/reports/reconciliation?day=2026-01-01", None),
        "payment": ("POST", "/api/v1/payments", PAYMENT),
    }
    allowed = {
        "billing": {"topup", "tariff", "snapshot", "account", "commands", "report"},
        "operations": {"relay", "config", "commands"},
        "viewer": {"commands", "report"},
        "bank": {"payment"},
    }
    for who, may in allowed.items():
        for name, (method, path, body) in routes.items():
            status, answer, _ = await api.call(method, path, who, body)
            if name in may:
                assert status in (200, 201), (who, name, answer)
            else:
                assert status == 403, (who, name, answer)
                assert answer["error"]["code"] == "forbidden"
    # the signatures follow the roles: billing's key signed money, operations' the relay
    listing = (await api.call("GET", "/api/v1/commands", "viewer"))[1]["commands"]
    signed = {v["type"]: (v["role"], v["signed_by"].split("-")[0]) for v in listing}
    assert signed == {
        "topup": ("billing", "billing"),
        "tariff.publish": ("billing", "billing"),
        "balance.snapshot": ("billing", "billing"),
        "relay.operate": ("operations", "operations"),
        "config.patch": ("operations", "operations"),
    }
    snap = next(v for v in listing if v["type"] == "balance.snapshot")
    assert snap["body"] == {"id": "snap-acct-1-1", "account": "acct-1", "central_seq": 1, "as_of_seq": 7,
                            "balance_micro": 12_340_000, "time_ms": T0}  # fmt: skip


async def test_no_valid_token_no_answer(world: World) -> None:
    api = world.api
    assert (await api.call("GET", "/api/v1/health", "nobody"))[:2] == (200, {"ok": True})
    for headers in ({}, {"Authorization": "Bearer nonsense"}, {"Authorization": "Basic dXNlcjpwYXNz"},
                    {"Authorization": "Bearer egw1.0000000000000000.AAAA"}):  # fmt: skip
        status, body, h = await api.call("GET", "/api/v1/commands", "nobody", headers=headers)
        assert status == 401 and body["error"]["code"] == "unauthenticated"
        assert h["WWW-Authenticate"].startswith("Bearer")
    # a token with its secret altered, and a revoked one
    good = api.tokens["viewer"]
    bad = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
    assert (await api.call("GET", "/api/v1/commands", "x", headers={"Authorization": f"Bearer {bad}"}))[0] == 401
    assert (await api.call("GET", "/api/v1/whoami", "viewer"))[1] == {"name": "t-viewer", "role": "viewer", "channel": None}
    token_id = good.split(".")[1]
    async with world.central.db.transaction() as tx:
        assert await world.central.db.revoke_token(tx, token_id, T0)
    assert (await api.call("GET", "/api/v1/whoami", "viewer"))[0] == 401
    # only the hash of a token is kept
    async with world.central.db.transaction() as tx:
        rows = await world.central.db.tokens(tx)
    assert all(good.split(".")[2].encode() not in r.secret_sha256 for r in rows)


async def test_bad_requests_get_a_clear_error_and_change_nothing(world: World) -> None:
    api = world.api
    await api.call("PUT", "/api/v1/accounts/acct-1", "billing", {"gateway": GW})
    cases = [
        ("billing", "/api/v1/topups", {**TOPUP, "amount": 50.0}, "decimal string"),
        ("billing", "/api/v1/topups", {**TOPUP, "amount": "50.1234567"}, "at most 6 decimals"),
        ("billing", "/api/v1/topups", {**TOPUP, "amount": "0"}, "above 0"),
        ("billing", "/api/v1/topups", {**TOPUP, "amount_micro": 5}, "once"),
        ("billing", "/api/v1/topups", {**TOPUP, "payment_channel": "cash"}, "payment_channel"),
        ("billing", "/api/v1/topups", {**TOPUP, "account": "nobody"}, "no account 'nobody'"),
        ("billing", "/api/v1/topups", {**TOPUP, "account": "bad id!"}, "identifier"),
        ("billing", "/api/v1/topups", {**TOPUP, "colour": "red"}, "unknown field(s) colour"),
        ("billing", "/api/v1/topups", {**TOPUP, "valid_for_s": 90 * 86400}, "at most"),
        ("billing", "/api/v1/topups", b"{not json", "not valid JSON"),
        ("billing", "/api/v1/topups", b"[1, 2]", "JSON object"),
        ("billing", "/api/v1/tariffs", {**TARIFF, "tariff": {"id": "x", "version": 1, "price": 0.5}}, "not floats"),
        ("operations", "/api/v1/relays", {**RELAY, "op": "explode"}, "op must be one of"),
        ("operations", "/api/v1/config", {**CONFIG, "set": {"nodot": 1}}, "table.key"),
        ("bank", "/api/v1/payments", {**PAYMENT, "idempotency_key": ""}, "idempotency_key"),
        ("bank", "/api/v1/payments", {**PAYMENT, "amount": 20}, "decimal string"),
        ("bank", "/api/v1/payments", {k: v for k, v in PAYMENT.items() if k != "amount"}, "amount"),
    ]
    for who, path, body, words in cases:
        status, answer, _ = await api.call("POST", path, who, body)
        assert status in (400, 404), (path, body, answer)
        assert words in answer["error"]["message"], (words, answer)
    status, answer, _ = await api.call(
        "POST", "/api/v1/payments", "bank", PAYMENT, {"Idempotency-Key": "another"}
    )
    assert status == 400 and "differ" in answer["error"]["message"]
    status, answer, _ = await api.call("PUT", "/api/v1/accounts/acct-1", "billing", {"gateway": "gw-other"})
    assert status == 409 and "served by gateway 'gw-api'" in answer["error"]["message"]
    assert (await api.call("GET", "/api/v1/commands", "viewer"))[1]["commands"] == []
    assert (await api.call("GET", "/api/v1/commands/none", "viewer"))[0] == 404


async def test_payments_are_idempotent_per_channel_and_reconciled_per_day(world: World) -> None:
    api = world.api
    await api.call("PUT", "/api/v1/accounts/acct-1", "billing", {"gateway": GW, "purchase_counter": 4})
    s1, first, h1 = await api.call("POST", "/api/v1/payments", "bank", PAYMENT)
    s2, again, h2 = await api.call("POST", "/api/v1/payments", "bank", {**PAYMENT, "amount": "20"})
    assert (s1, s2) == (201, 201) and first == again
    assert "Idempotent-Replayed" not in h1 and h2["Idempotent-Replayed"] == "true"
    assert first["topup"]["purchase_counter"] == 5 and first["payment"]["amount_micro"] == 20_000_000
    s3, clash, _ = await api.call("POST", "/api/v1/payments", "bank", {**PAYMENT, "account": "acct-1", "amount": "25.00"})
    assert s3 == 409 and clash["error"]["code"] == "idempotency_key_reused"
    assert "a new payment needs a new key" in clash["error"]["message"]
    # the same key from another channel is another payment
    s4, other, _ = await api.call("POST", "/api/v1/payments", "counter", PAYMENT)
    assert s4 == 201 and other["topup"]["command_id"] != first["topup"]["command_id"]
    # a channel reads its own payment back, with its top-up's state now
    s5, mine, _ = await api.call("GET", "/api/v1/payments/k-1", "bank")
    assert s5 == 200 and mine["topup"]["state"] == "queued"
    # a billing sale too, then the gateway answers: one applied with its credit, one refused
    status, _, _ = await api.call("POST", "/api/v1/topups", "billing", {**TOPUP, "payment_channel": "bank", "amount": "3.50"})
    assert status == 201
    await world.answer(
        ("event", {"type": "command_result", "outcome": "applied", "id": first["topup"]["command_id"]}),
        ("charge", {"id": f"topup:{first['topup']['command_id']}", "kind": "credit", "amount_micro": 20_000_000}),
        ("event", {"type": "command_result", "outcome": "rejected", "id": other["topup"]["command_id"],
                   "reason": "bad_body", "code": "hoarding_limit", "message": "over the limit"}),
    )  # fmt: skip
    v = (await api.call("GET", f"/api/v1/commands/{other['topup']['command_id']}", "viewer"))[1]
    assert (v["state"], v["reason"], v["code"], v["message"]) == ("refused", "bad_body", "hoarding_limit", "over the limit")
    assert [step["event"] for step in v["log"]] == ["created", "result"]
    status, report, _ = await api.call("GET", "/api/v1/reports/reconciliation?day=2026-01-01&tz=UTC", "billing")
    assert status == 200
    rows = {r["channel"]: r for r in report["channels"]}
    assert set(rows) == {"bank", "counter"}
    bank = rows["bank"]
    assert (bank["topups"]["count"], bank["topups"]["amount"]) == (2, "23.50")
    assert (bank["via_payments"]["count"], bank["via_payments"]["amount"]) == (1, "20.00")
    assert (bank["applied"]["count"], bank["applied"]["amount"]) == (1, "20.00")
    assert (bank["credited"]["count"], bank["credited"]["amount"]) == (1, "20.00")
    assert (bank["pending"]["count"], bank["unconfirmed"]["amount"]) == (1, "3.50")
    assert (rows["counter"]["refused"]["count"], rows["counter"]["applied"]["count"]) == (1, 0)
    assert report["totals"]["topups"] == {"count": 3, "amount": "43.50", "amount_micro": 43_500_000}
    # the day is the time zone's day: 2026-01-01T00:00Z is still 2025-12-31 in Los Angeles
    status, west, _ = await api.call(
        "GET", "/api/v1/reports/reconciliation?day=2025-12-31&tz=America/Los_Angeles", "viewer"
    )
    assert status == 200 and west["totals"]["topups"]["count"] == 3
    assert (await api.call("GET", "/api/v1/reports/reconciliation?day=2026-1-1", "viewer"))[0] == 400
    assert (await api.call("GET", "/api/v1/reports/reconciliation?day=2026-01-01&tz=Mars/Base", "viewer"))[0] == 400


def _cli(w: World, *args: str) -> list[str]:
    """``edgegw central ...`` on the world's database (``token add``: two words of verb)."""
    where = ["--dsn", w.dsn] if w.dsn else ["--db", str(w.tmp / "central.db")]
    verb = 2 if args[0] in ("token", "account") else 1
    return ["central", *args[:verb], *where, *args[verb:]]


async def test_the_command_line_uses_the_same_service_and_keys_decide_the_role(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    w = world

    def run(*args: str) -> tuple[int, str, str]:
        rc = edgegw(_cli(w, *args))
        out, err = capsys.readouterr()
        return rc, out, err

    async def arun(*args: str) -> tuple[int, str, str]:
        return await asyncio.to_thread(run, *args)

    assert (await arun("account", "add", "--account", "acct-9", "--gateway", GW, "--purchase-counter", "2"))[0] == 0
    rc, out, _ = await arun("topup", "--keys", str(w.tmp / "keys"), "--account", "acct-9", "--amount", "9.90", "--channel", "agent")
    assert rc == 0 and "topup acct-9 9.90 #3 (agent)  queued" in out
    # a key directory holding only the billing key cannot operate a relay
    billing_only = w.tmp / "billing-only"
    billing_only.mkdir()
    (billing_only / "trust.json").write_bytes((w.tmp / "keys" / "trust.json").read_bytes())
    for pem in (w.tmp / "keys").glob("billing-*.pem"):
        (billing_only / pem.name).write_bytes(pem.read_bytes())
        (billing_only / pem.name).chmod(0o600)
    rc, _, err = await arun("relay", "--keys", str(billing_only), "--gateway", GW, "--meter", "m1", "--op", "trip")
    assert rc == 1 and "signed with an operations key, and none is available here" in err
    rc, out, _ = await arun("topup", "--keys", str(billing_only), "--account", "acct-9", "--amount", "1", "--channel", "bank")
    assert rc == 0 and "#4" in out
    rc, out, _ = await arun("commands", "--json")
    listed = json.loads(out)
    assert [v["purchase_counter"] for v in listed] == [4, 3]
    rc, out, _ = await arun("show", listed[0]["id"])
    assert rc == 0 and "created" in out
    day = dt.datetime.fromtimestamp(listed[0]["created_ms"] / 1000, dt.UTC).date().isoformat()
    rc, out, _ = await arun("report", "--day", day, "--json")
    assert rc == 0 and json.loads(out)["totals"]["topups"]["count"] >= 1
    rc, out, _ = await arun("report", "--day", day)
    assert rc == 0 and out.splitlines()[-1].startswith("total")
    # tokens at the command line
    rc, out, err = await arun("token", "add", "--name", "icbc", "--role", "channel", "--channel", "bank")
    assert rc == 0 and "shown once" in err
    token = out.strip().splitlines()[-1]
    assert (await w.central.authenticate(token)) is not None
    rc, out, _ = await arun("token", "list")
    assert "icbc  channel bank  active" in out
    rc, _, err = await arun("token", "add", "--name", "x", "--role", "billing", "--channel", "bank")
    assert rc == 1 and "only a channel token" in err
    if not w.dsn:  # the token itself is nowhere in the database file
        with sqlite3.connect(w.tmp / "central.db") as conn:
            dump = "\n".join(conn.iterdump())
        assert token.split(".")[2] not in dump


async def _documented_get(w: World, path: str, who: str | None, status: int, **params: str) -> Any:
    """GET ``path`` with ``who``'s token, the request and the answer validated against
    docs/openapi.yaml (openapi-core); the JSON answer."""
    from openapi_core.testing import MockRequest, MockResponse

    from tests.headend.test_read_api import SPEC

    headers = {} if who is None else {"Authorization": f"Bearer {w.api.tokens[who]}"}
    async with w.api.session.get(w.api.base + "/api/v1" + path, params=params, headers=headers) as r:
        body = await r.read()
        assert r.status == status, body
        ctype, resp_headers = r.headers["Content-Type"].split(";")[0], dict(r.headers)
    req = MockRequest("http://127.0.0.1", "get", "/api/v1" + path, args=params, headers=headers)
    if status == 200:
        SPEC.validate_request(req)
    SPEC.validate_response(req, MockResponse(body, status_code=status, content_type=ctype, headers=resp_headers))
    return json.loads(body)


async def test_command_states_are_as_documented_and_the_view_agrees(world: World) -> None:
    """Command states for integrators: ``GET /api/v1/commands`` and ``/commands/{id}``
    answer as docs/openapi.yaml says, in every state a command reaches; on PostgreSQL
    the ``edgegw_commands`` view gives the same states."""
    import yaml

    from headend.api import PREFIX
    from headend.read_api import ROUTES
    from tests.headend.test_read_api import CENTRAL_PATHS, ROOT

    api = world.api
    await api.call("PUT", "/api/v1/accounts/acct-1", "billing", {"gateway": GW})
    made = {}
    for name, who, path, body in (
        ("applied", "billing", "/api/v1/topups", TOPUP),
        ("refused", "billing", "/api/v1/topups", {**TOPUP, "amount": "2.00"}),
        ("snapshot", "billing", "/api/v1/snapshots", SNAPSHOT),
        ("relay", "operations", "/api/v1/relays", {**RELAY, "valid_for_s": 600}),
        ("config", "operations", "/api/v1/config", CONFIG),
    ):
        status, view, _ = await api.call("POST", path, who, body)
        assert status == 201, view
        made[name] = view["id"]
    status, tariffs, _ = await api.call("POST", "/api/v1/tariffs", "billing", TARIFF)
    assert status == 201
    made["tariff"] = tariffs["commands"][0]["id"]
    await world.answer(
        ("event", {"type": "command_result", "outcome": "applied", "id": made["applied"],
                   "effect": {"status": "applied", "account": "acct-1", "balance_after_micro": 50_000_000}}),
        ("charge", {"id": f"topup:{made['applied']}", "kind": "credit", "amount_micro": 50_000_000}),
        ("event", {"type": "command_result", "outcome": "rejected", "id": made["refused"],
                   "reason": "bad_body", "code": "hoarding_limit", "message": "over the limit"}),
    )  # fmt: skip
    # an hour later the dispatcher expires the relay operation (valid ten minutes) and
    # publishes the others (to no broker: they are marked sent first)
    d = Dispatcher(world.central.db, world.central.signer, "127.0.0.1", 1, clock_ms=lambda: T0 + 3_600_000)
    await d.take(T0 + 3_600_000)

    listing = (await _documented_get(world, "/commands", "viewer", 200))["commands"]
    by_id = {v["id"]: v for v in listing}
    assert set(by_id) == set(made.values())
    assert (by_id[made["applied"]]["state"], by_id[made["applied"]]["credited"]) == ("applied", "50.00")
    assert (by_id[made["refused"]]["state"], by_id[made["refused"]]["code"]) == ("refused", "hoarding_limit")
    assert by_id[made["relay"]]["state"] == "expired"
    for name in ("snapshot", "config", "tariff"):
        assert by_id[made[name]]["state"] == "sent" and by_id[made[name]]["attempts"] == 1
    filtered = await _documented_get(world, "/commands", "operations", 200, type="relay.operate", limit="5")
    assert [v["id"] for v in filtered["commands"]] == [made["relay"]]
    one = await _documented_get(world, f"/commands/{made['applied']}", "billing", 200)
    assert [s["event"] for s in one["log"]] == ["created", "result"]
    await _documented_get(world, "/commands/topup-0000000000000000", "viewer", 404)
    await _documented_get(world, "/commands", None, 401)
    await _documented_get(world, "/commands", "bank", 403)
    await _documented_get(world, "/commands", "viewer", 400, state="lost")

    # the document has central's command routes (served by headend.api) besides the read API's
    documented = set(yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())["paths"])
    central_routes = {
        r.resource.canonical.removeprefix(PREFIX)
        for r in build_app(world.central).router.routes()
        if r.method == "GET" and r.resource is not None
    }
    assert documented - {path for path, _ in ROUTES} == CENTRAL_PATHS
    assert CENTRAL_PATHS <= central_routes

    if world.dsn is not None:
        import psycopg

        with psycopg.connect(world.dsn) as conn:
            rows = conn.execute(
                "SELECT command_id, gateway_id, type, state, account, amount_micro, purchase_counter, signed_by,"
                " attempts, results, final_ms, reason, code, credited_micro, body, effect FROM edgegw_commands"
            ).fetchall()
        assert {r[0]: r[1:] for r in rows} == {
            v["id"]: (v["gateway"], v["type"], v["state"], v["account"], v["amount_micro"], v["purchase_counter"],
                      v["signed_by"], v["attempts"], v["results"], v["final_ms"], v["reason"], v["code"],
                      v["credited_micro"], v["body"], v["effect"])
            for v in listing
        }  # fmt: skip

"""Central's HTTP JSON API (version 1), mounted by :func:`headend.web.build_app`.

Every route but ``GET /api/v1/health`` needs ``Authorization: Bearer
<token>``, a token ``edgegw central token add`` made for one role
(:class:`headend.central.ApiRole`); the role decides what the token may do
(:mod:`headend.central`). Requests and answers are JSON; money is a decimal
string of yuan (``"50.00"``) or integer micro-yuan (``amount_micro``), never
a float. An error is ``{"error": {"code", "message"}}`` with its HTTP status:
400 a request central cannot take, 401 no valid token, 403 the token's role
may not, 404 not found, 409 a conflict (an idempotency key used for another
payment, an account registered to another gateway), 503 no key to sign with.

=======  ======================================  ===========================
method   path                                    role
=======  ======================================  ===========================
GET      /api/v1/health                          none
GET      /api/v1/whoami                          any
POST     /api/v1/topups                          billing
POST     /api/v1/tariffs                         billing
POST     /api/v1/snapshots                       billing
POST     /api/v1/relays                          operations
POST     /api/v1/config                          operations
GET      /api/v1/commands                        billing, operations, viewer
GET      /api/v1/commands/{id}                   billing, operations, viewer
PUT      /api/v1/accounts/{account}              billing
GET      /api/v1/accounts                        billing, operations, viewer
POST     /api/v1/payments                        channel
GET      /api/v1/payments/{idempotency key}      channel (its own)
GET      /api/v1/reports/reconciliation          billing, viewer
=======  ======================================  ===========================

docs/central.md describes each request and answer.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from headend.central import (
    Actor,
    Central,
    CentralError,
    Invalid,
    parse_amount,
    parse_amount_micro,
)

log = logging.getLogger(__name__)

CENTRAL = web.AppKey("central", Central)
PREFIX = "/api/v1"

Handler = Callable[[web.Request, Actor], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        data, status=status, headers=headers, dumps=lambda o: json.dumps(o, sort_keys=True)
    )


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json({"error": {"code": code, "message": message}}, status, headers)


def _central(request: web.Request) -> Central:
    return request.app[CENTRAL]


def authenticated(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The route with its caller's token checked; central's refusals as JSON errors."""

    async def route(request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        actor = None
        if scheme.lower() == "bearer" and token:
            actor = await _central(request).authenticate(token)
        if actor is None:
            return error(
                401, "unauthenticated", "a valid API token is needed (Authorization: Bearer <token>)",
                {"WWW-Authenticate": 'Bearer realm="edgegw"'},
            )  # fmt: skip
        try:
            return await handler(request, actor)
        except CentralError as exc:
            if exc.status >= 500 or exc.status == 403:
                log.warning("%s %s by %s: %s", request.method, request.path, actor.label, exc.message)
            return error(exc.status, exc.code, exc.message)

    return route


async def body_of(request: web.Request) -> dict[str, Any]:
    """The request's JSON object (a clear 400 for anything else)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Invalid("request body too large") from None
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise Invalid("request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise Invalid("request body must be a JSON object")
    return doc


def _only(doc: dict[str, Any], allowed: set[str], required: set[str]) -> None:
    extra = sorted(set(doc) - allowed)
    if extra:
        raise Invalid(f"unknown field(s) {', '.join(extra)} (allowed: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(doc))
    if missing:
        raise Invalid(f"missing field(s) {', '.join(missing)}")


def _money(doc: dict[str, Any], name: str) -> int:
    """``name`` (yuan, a decimal string) or ``name_micro`` (integer), exactly one."""
    micro_name = f"{name}_micro"
    if (name in doc) == (micro_name in doc):
        raise Invalid(f'give "{name}" (yuan, decimal string) or "{micro_name}", once')
    if name in doc:
        return parse_amount(doc[name], name)
    return parse_amount_micro(doc[micro_name], micro_name)


async def health(request: web.Request) -> web.Response:
    return _json({"ok": True})


async def whoami(request: web.Request, actor: Actor) -> web.Response:
    return _json({"name": actor.name, "role": actor.role.value, "channel": actor.channel})


async def post_topup(request: web.Request, actor: Actor) -> web.Response:
    doc = await body_of(request)
    _only(doc, {"account", "amount", "amount_micro", "payment_channel", "valid_for_s"},
          {"account", "payment_channel"})  # fmt: skip
    view = await _central(request).sell_topup(
        actor,
        account=doc["account"],
        amount_micro=_money(doc, "amount"),
        payment_channel=doc["payment_channel"],
        valid_for_s=doc.get("valid_for_s"),
    )
    return _json(view, 201)


async def post_tariff(request: web.Request, actor: Actor) -> web.Response:
    doc = await body_of(request)
    _only(doc, {"gateways", "tariff", "valid_for_s"}, {"gateways", "tariff"})
    if not isinstance(doc["gateways"], list):
        raise Invalid("gateways must be a list of gateway ids")
    views = await _central(request).publish_tariff(
        actor, gateways=doc["gateways"], tariff=doc["tariff"], valid_for_s=doc.get("valid_for_s")
    )
    return _json({"commands": views}, 201)


async def post_snapshot(request: web.Request, actor: Actor) -> web.Response:
    doc = await body_of(request)
    _only(
        doc,
        {"account", "balance", "balance_micro", "as_of_seq", "included_ids", "purchase_counter",
         "tier_period_start_ms", "tier_cumulative_ckwh", "valid_for_s"},
        {"account", "as_of_seq"},
    )  # fmt: skip
    included = doc.get("included_ids", [])
    if not isinstance(included, list):
        raise Invalid("included_ids must be a list")
    micro_name = "balance_micro"
    if ("balance" in doc) == (micro_name in doc):
        raise Invalid('give "balance" (yuan, decimal string, may be negative) or "balance_micro", once')
    if "balance" in doc:
        text = doc["balance"]
        negative = isinstance(text, str) and text.startswith("-")
        balance = parse_amount(text[1:] if negative else text, "balance")
        balance = -balance if negative else balance
    else:
        balance = parse_amount_micro(doc[micro_name], micro_name)
    view = await _central(request).snapshot_balance(
        actor,
        account=doc["account"],
        balance_micro=balance,
        as_of_seq=doc["as_of_seq"],
        included_ids=included,
        purchase_counter=doc.get("purchase_counter"),
        tier_period_start_ms=doc.get("tier_period_start_ms"),
        tier_cumulative_ckwh=doc.get("tier_cumulative_ckwh"),
        valid_for_s=doc.get("valid_for_s"),
    )
    return _json(view, 201)


async def post_relay(request: web.Request, actor: Actor) -> web.Response:
    doc = await body_of(request)
    _only(doc, {"gateway", "meter", "op", "reason", "valid_for_s"}, {"gateway", "meter", "op"})
    view = await _central(request).operate_relay(
        actor,
        gateway=doc["gateway"],
        meter=doc["meter"],
        op=doc["op"],
        reason=doc.get("reason"),
        valid_for_s=doc.get("valid_for_s"),
    )
    return _json(view, 201)


async def post_config(request: web.Request, actor: Actor) -> web.Response:
    doc = await body_of(request)
    _only(doc, {"gateway", "set", "confirm_within_s", "valid_for_s"}, {"gateway", "set"})
    view = await _central(request).change_config(
        actor,
        gateway=doc["gateway"],
        settings=doc["set"],
        confirm_within_s=doc.get("confirm_within_s"),
        valid_for_s=doc.get("valid_for_s"),
    )
    return _json(view, 201)


async def get_commands(request: web.Request, actor: Actor) -> web.Response:
    q = request.query
    try:
        limit = int(q.get("limit", "100"))
    except ValueError:
        raise Invalid("limit must be an integer") from None
    views = await _central(request).commands(
        actor,
        gateway=q.get("gateway"),
        account=q.get("account"),
        state=q.get("state"),
        type=q.get("type"),
        limit=limit,
    )
    return _json({"commands": views})


async def get_command(request: web.Request, actor: Actor) -> web.Response:
    return _json(await _central(request).command(actor, request.match_info["id"]))


async def put_account(request: web.Request, actor: Actor) -> web.Response:
    doc = await body_of(request)
    _only(doc, {"gateway", "purchase_counter"}, {"gateway"})
    view = await _central(request).add_account(
        actor,
        account=request.match_info["account"],
        gateway=doc["gateway"],
        purchase_counter=doc.get("purchase_counter", 0),
    )
    return _json(view)


async def get_accounts(request: web.Request, actor: Actor) -> web.Response:
    return _json({"accounts": await _central(request).accounts(actor, request.query.get("gateway"))})


async def post_payment(request: web.Request, actor: Actor) -> web.Response:
    doc = await body_of(request)
    header = request.headers.get("Idempotency-Key")
    if header is not None:
        if "idempotency_key" in doc and doc["idempotency_key"] != header:
            raise Invalid("the Idempotency-Key header and idempotency_key in the body differ")
        doc["idempotency_key"] = header
    answer = await _central(request).post_payment(actor, doc)
    headers = {"Idempotent-Replayed": "true"} if answer.replayed else None
    return _json(answer.body, answer.status, headers)


async def get_payment(request: web.Request, actor: Actor) -> web.Response:
    return _json(await _central(request).payment(actor, request.match_info["key"]))


async def get_reconciliation(request: web.Request, actor: Actor) -> web.Response:
    q = request.query
    try:
        day = dt.date.fromisoformat(q.get("day", ""))
    except ValueError:
        raise Invalid("day must be a date, YYYY-MM-DD") from None
    return _json(await _central(request).reconciliation(actor, day, q.get("tz", "UTC")))


def add_routes(app: web.Application) -> None:
    """The API's routes under ``/api/v1``."""
    p = PREFIX
    app.router.add_get(f"{p}/health", health)
    app.router.add_get(f"{p}/whoami", authenticated(whoami))
    app.router.add_post(f"{p}/topups", authenticated(post_topup))
    app.router.add_post(f"{p}/tariffs", authenticated(post_tariff))
    app.router.add_post(f"{p}/snapshots", authenticated(post_snapshot))
    app.router.add_post(f"{p}/relays", authenticated(post_relay))
    app.router.add_post(f"{p}/config", authenticated(post_config))
    app.router.add_get(f"{p}/commands", authenticated(get_commands))
    app.router.add_get(f"{p}/commands/{{id}}", authenticated(get_command))
    app.router.add_put(f"{p}/accounts/{{account}}", authenticated(put_account))
    app.router.add_get(f"{p}/accounts", authenticated(get_accounts))
    app.router.add_post(f"{p}/payments", authenticated(post_payment))
    app.router.add_get(f"{p}/payments/{{key}}", authenticated(get_payment))
    app.router.add_get(f"{p}/reports/reconciliation", authenticated(get_reconciliation))

"""The operator console: an aiohttp application of server-rendered pages.

:func:`console_app` builds it; :func:`mount_console` adds it under a prefix
(``/console`` by default) to the headend's web application
(:func:`headend.web.build_app`). Every route declares the permission it needs
with :func:`requires` (``None``: public — the login page, the language switch,
the style sheet); a route that declares nothing is refused, so a new page
cannot be left open by mistake. The middlewares, outermost first:

1. security headers on every answer (a Content-Security-Policy that allows no
   script at all, no framing, ``nosniff``, ``no-store``) and error pages;
2. the session from its cookie (:mod:`headend.console.auth`);
3. the route's permission: no session → the login page (or 403 for a POST);
   a session whose role lacks it → 403;
4. on every POST, the CSRF token: the session's (a hidden form field), or for
   the login form the value of a cookie the form was served with; and an
   ``Origin`` header, when the browser sends one, must be this host.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import jinja2
from aiohttp import web

from headend.console import charts
from headend.console.auth import Permission, Session, Users
from headend.console.db import ConsoleDb
from headend.console.desk import CommandDesk, DeskError
from headend.console.i18n import LANGUAGES, Translator, choose
from headend.console.queries import AccountView, ConsoleQueries, Event, PresenceSource

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "edgegw_session"
LOGIN_COOKIE = "edgegw_login"
LANG_COOKIE = "edgegw_lang"
MAX_TOPUP_MICRO = 10_000 * 1_000_000  # 10,000 yuan: a larger sale is a typing error
REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self';"
    " frame-ancestors 'none'; base-uri 'none'"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Handler)



@dataclass
class ConsoleSettings:
    db: ConsoleDb
    tz: tzinfo
    presence: PresenceSource | None = None
    desk: CommandDesk | None = None
    # Secure cookies: True/False, or None to follow the request (set over TLS).
    secure_cookies: bool | None = None
    clock_ms: Callable[[], int] = field(default=lambda: time.time_ns() // 1_000_000)
    max_topup_micro: int = MAX_TOPUP_MICRO


K_SETTINGS = web.AppKey("console_settings", ConsoleSettings)
K_ENV = web.AppKey("console_env", jinja2.Environment)
K_SESSION = web.RequestKey("console_session", Session)
K_LOGIN_NAME = web.RequestKey("console_login_name", str)


def _redirect(location: Any) -> web.Response:
    return web.Response(status=303, headers={"Location": str(location)})


def requires(permission: Permission | None) -> Callable[[H], H]:
    """Declare what a route needs (``None``: anyone, logged in or not)."""

    def mark(fn: H) -> H:
        fn.console_permission = permission  # type: ignore[attr-defined]
        return fn

    return mark


def declared_permission(handler: Any) -> tuple[bool, Permission | None]:
    """Whether ``handler`` declares a permission, and which."""
    if not hasattr(handler, "console_permission"):
        return False, None
    return True, handler.console_permission


# -- helpers --------------------------------------------------------------------------


def settings_of(request: web.Request) -> ConsoleSettings:
    return request.app[K_SETTINGS]


def _secure(request: web.Request) -> bool:
    s = settings_of(request).secure_cookies
    return request.secure if s is None else s


def _prefix(request: web.Request) -> str:
    return str(request.app.router["fleet"].url_for()).rstrip("/")


def _cookie(resp: web.StreamResponse, request: web.Request, name: str, value: str, *, max_age: int | None = None) -> None:
    resp.set_cookie(
        name, value, path=_prefix(request) + "/", httponly=True, samesite="Strict",
        secure=_secure(request), max_age=max_age,
    )  # fmt: skip


def _lang(request: web.Request) -> str:
    return choose(request.cookies.get(LANG_COOKIE), request.headers.get("Accept-Language"))


def fmt_yuan(micro: int | None) -> str:
    """Truncated toward zero to 0.01 yuan, as the gateway reports balances."""
    if micro is None:
        return "—"
    r = (Decimal(micro) / 1_000_000).quantize(Decimal("0.01"), rounding=ROUND_DOWN)
    return str(r if r != 0 else Decimal("0.00"))


def parse_yuan(text: str, max_micro: int) -> int:
    """A positive amount of yuan with at most two decimals, in micro-yuan; ValueError."""
    try:
        d = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError("amount") from None
    if not d.is_finite() or d <= 0 or d != d.quantize(Decimal("0.01")):
        raise ValueError("amount")
    micro = int(d * 1_000_000)
    if micro > max_micro:
        raise ValueError("amount_too_large")
    return micro


def _safe_next(request: web.Request, target: str | None) -> str:
    home = str(request.app.router["fleet"].url_for())
    if not target:
        return home
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or "\\" in target or "//" in target:
        return home
    if not target.startswith(_prefix(request) + "/"):
        return home
    return target


class _Formatter:
    def __init__(self, t: Translator, tz: tzinfo, now_ms: int) -> None:
        self.t, self.tz, self.now_ms = t, tz, now_ms

    def time(self, ms: int | None) -> str:
        if ms is None:
            return "—"
        return datetime.fromtimestamp(ms / 1000, self.tz).strftime("%Y-%m-%d %H:%M:%S")

    def age(self, ms: int | None) -> str:
        """How long ago, in the largest whole unit."""
        if ms is None:
            return "—"
        return self.duration(max(0, self.now_ms - ms))

    def duration(self, ms: int | None) -> str:
        if ms is None:
            return "—"
        s = ms // 1000
        for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
            if s >= size:
                return self.t(f"unit.{unit}", n=s // size)
        return self.t("unit.s", n=s)


# -- rendering ------------------------------------------------------------------------


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["fmt_yuan"] = fmt_yuan
    return env


def render(request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
    s = settings_of(request)
    lang = _lang(request)
    t = Translator(lang)
    session: Session | None = request.get(K_SESSION)

    def url(name: str, **parts: str) -> str:
        return str(request.app.router[name].url_for(**parts))

    def tx(prefix: str, value: Any) -> str:
        """The translation of ``prefix + value`` where the catalog has one, else the value."""
        key = f"{prefix}{value}"
        return t(key) if t.has(key) else str(value)

    def event_type(e: Event) -> str:
        key = f"event.{e.type}"
        return t(key) if t.has(key) else e.type

    html = request.app[K_ENV].get_template(template).render(
        t=t,
        lang=lang,
        languages=LANGUAGES,
        user=session.user if session else None,
        csrf=session.csrf if session else "",
        url=url,
        here=request.path_qs,
        fmt=_Formatter(t, s.tz, s.clock_ms()),
        event_type=event_type,
        tx=tx,
        Permission=Permission,
        **ctx,
    )
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")


# -- middlewares ------------------------------------------------------------------------


@web.middleware
async def _headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.status == 405:
            raise
        resp = render(
            request, "error.html", status=exc.status, code=exc.status, message=exc.text if exc.text and not exc.text.startswith(str(exc.status)) else "",
        )  # fmt: skip
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Referrer-Policy"] = "same-origin"
    if "Cache-Control" not in resp.headers:
        resp.headers["Cache-Control"] = "no-store"
    if request.secure:
        resp.headers["Strict-Transport-Security"] = "max-age=31536000"
    return resp


@web.middleware
async def _session(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        s = settings_of(request)
        session = await Users(s.db).session(token, s.clock_ms())
        if session is not None:
            request[K_SESSION] = session
    return await handler(request)


@web.middleware
async def _authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
    route_handler = request.match_info.handler
    if request.match_info.http_exception is not None:
        raise request.match_info.http_exception
    declared, permission = declared_permission(route_handler)
    if not declared:
        log.error("console route %s declares no permission: refused", request.path)
        raise web.HTTPForbidden()
    if permission is not None:
        session: Session | None = request.get(K_SESSION)
        if session is None:
            if request.method == "GET":
                login = request.app.router["login"].url_for().with_query(next=request.path_qs)
                return _redirect(login)
            raise web.HTTPForbidden()
        if not session.user.may(permission):
            raise web.HTTPForbidden(text="role")
    if request.method == "POST":
        await _check_csrf(request)
    return await handler(request)


async def _check_csrf(request: web.Request) -> None:
    origin = request.headers.get("Origin")
    if origin is not None and origin != "null" and urlsplit(origin).netloc != request.host:
        raise web.HTTPForbidden(text="csrf")
    form = await request.post()
    sent = form.get("csrf")
    session: Session | None = request.get(K_SESSION)
    if request.match_info.route.name == "login_post":
        expected = request.cookies.get(LOGIN_COOKIE, "")
    else:
        expected = session.csrf if session else ""
    if not isinstance(sent, str) or not expected or not hmac.compare_digest(sent, expected):
        log.warning("console: POST %s without a valid CSRF token refused", request.path)
        raise web.HTTPForbidden(text="csrf")


# -- routes -------------------------------------------------------------------------------

routes = web.RouteTableDef()


@routes.get("/static/console.css", name="css")
@requires(None)
async def css(request: web.Request) -> web.StreamResponse:
    resp = web.Response(body=(HERE / "static" / "console.css").read_bytes(), content_type="text/css")
    resp.headers["Cache-Control"] = "max-age=3600"
    return resp


@routes.get("/lang/{lang}", name="lang")
@requires(None)
async def set_lang(request: web.Request) -> web.StreamResponse:
    lang = request.match_info["lang"]
    if lang not in LANGUAGES:
        raise web.HTTPNotFound()
    resp = _redirect(_safe_next(request, request.query.get("next")))
    _cookie(resp, request, LANG_COOKIE, lang, max_age=365 * 86400)
    return resp


@routes.get("/login", name="login")
@requires(None)
async def login_page(request: web.Request) -> web.StreamResponse:
    return _login_form(request, None, 200)


def _login_form(request: web.Request, error: str | None, status: int) -> web.Response:
    token = secrets.token_urlsafe(32)
    resp = render(
        request, "login.html", status=status, login_csrf=token, error=error,
        next=_safe_next(request, request.query.get("next")), username=request.get(K_LOGIN_NAME, ""),
    )  # fmt: skip
    _cookie(resp, request, LOGIN_COOKIE, token)
    return resp


@routes.post("/login", name="login_post")
@requires(None)
async def login(request: web.Request) -> web.StreamResponse:
    s = settings_of(request)
    form = await request.post()
    username = str(form.get("username", "")).strip().lower()[:64]
    password = str(form.get("password", ""))[:1024]
    request[K_LOGIN_NAME] = username
    remote = request.remote or "unknown"
    users = Users(s.db)
    now = s.clock_ms()
    if await users.login_blocked(username, remote, now):
        log.warning("console: login of %r from %s refused: too many failed logins", username, remote)
        return _login_form(request, "login.too_many", 429)
    user = await users.authenticate(username, password, remote, now)
    if user is None:
        log.warning("console: failed login of %r from %s", username, remote)
        return _login_form(request, "login.failed", 401)
    old = request.cookies.get(SESSION_COOKIE)
    if old:
        await users.end_session(old)
    token, _ = await users.start_session(user, remote, now)
    log.info("console: %s (%s) logged in from %s", user.username, user.role.value, remote)
    resp = _redirect(_safe_next(request, str(form.get("next", "")) or None))
    _cookie(resp, request, SESSION_COOKIE, token)
    resp.del_cookie(LOGIN_COOKIE, path=_prefix(request) + "/")
    return resp


@routes.post("/logout", name="logout")
@requires(Permission.VIEW)
async def logout(request: web.Request) -> web.StreamResponse:
    token = request.cookies.get(SESSION_COOKIE, "")
    await Users(settings_of(request).db).end_session(token)
    resp = _redirect(request.app.router["login"].url_for())
    resp.del_cookie(SESSION_COOKIE, path=_prefix(request) + "/")
    return resp


def _queries(request: web.Request) -> ConsoleQueries:
    s = settings_of(request)
    return ConsoleQueries(s.db, s.presence)


PAGE = 100


@routes.get("/", name="fleet")
@requires(Permission.VIEW)
async def fleet(request: web.Request) -> web.StreamResponse:
    q = request.query.get("q", "")[:64]
    try:
        page = max(0, int(request.query.get("page", "0")))
    except ValueError:
        page = 0
    qs = _queries(request)
    rows, total = await qs.fleet(q, page * PAGE, PAGE)
    return render(
        request, "fleet.html", rows=rows, total=total, q=q, page=page, pages=(total + PAGE - 1) // PAGE,
        has_presence=qs.presence() is not None,
    )  # fmt: skip


@routes.get("/gw/{gateway}", name="gateway")
@requires(Permission.VIEW)
async def gateway(request: web.Request) -> web.StreamResponse:
    gw = request.match_info["gateway"]
    qs = _queries(request)
    if not await qs.known(gw):
        raise web.HTTPNotFound()
    s = settings_of(request)
    t = Translator(_lang(request))
    summary = await qs.gateway_summary(gw)
    meters = await qs.meters(gw)
    series, start = await qs.energy_series(gw, [m.meter for m in meters])
    chart = charts.line_chart(
        [charts.Series(m, pts) for m, pts in series], tz=s.tz, title=t("gateway.chart_title"), unit="kWh"
    )
    queued = await s.desk.commands(gw) if s.desk is not None else None
    return render(
        request, "gateway.html", gw=gw, summary=summary, batches=await qs.batch_counts(gw), meters=meters,
        chart=chart, chart_start=start, chart_more=max(0, len(meters) - len(series)),
        events=await qs.events(gw), results=await qs.command_results(gw), queued=queued,
        accounts=await qs.accounts(gw), has_presence=qs.presence() is not None, has_desk=s.desk is not None,
        relay_form_id=secrets.token_urlsafe(16),
    )  # fmt: skip


@routes.get("/gw/{gateway}/account/{account}", name="account")
@requires(Permission.VIEW)
async def account(request: web.Request) -> web.StreamResponse:
    gw, acc = request.match_info["gateway"], request.match_info["account"]
    s = settings_of(request)
    view = await _queries(request).account(gw, acc)
    if view is None:
        raise web.HTTPNotFound()
    t = Translator(_lang(request))
    pts = [(p.time_ms, p.balance_micro / 1_000_000) for p in view.path.points]
    markers = [
        charts.Marker(p.time_ms, p.balance_micro / 1_000_000, f"{t('account.topup')} +{fmt_yuan(p.amount_micro)}")
        for p in view.path.points
        if p.kind == "credit"
    ]
    chart = charts.line_chart(
        [charts.Series(t("account.balance"), pts, step=True)], tz=s.tz, title=t("account.chart_title"),
        unit=t("unit.yuan"), zero_line=True, markers=markers,
    )  # fmt: skip
    return render(
        request, "account.html", gw=gw, view=view, chart=chart, has_desk=s.desk is not None,
        form_id=secrets.token_urlsafe(16), sold=request.query.get("sold", "")[:80], error=None, amount="",
        **await _sales(request, view),
    )  # fmt: skip


async def _sales(request: web.Request, view: AccountView) -> dict[str, Any]:
    """The account's top-ups in the command queue (None without one), the gateway's
    ledger credit of each that central holds, by command id, and the gateway's presence."""
    s = settings_of(request)
    sales = await s.desk.topups(view.gateway, view.account) if s.desk is not None else None
    ledger = {e.entry_id.removeprefix("topup:"): e for e in view.credits if e.entry_id.startswith("topup:")}
    qs = _queries(request)
    await qs.load_presence()
    presence = qs.presence()
    return {
        "sales": sales, "ledger": ledger, "presence": (presence or {}).get(view.gateway),
        "has_presence": presence is not None,
    }  # fmt: skip


@routes.post("/gw/{gateway}/account/{account}/topup", name="topup")
@requires(Permission.TOPUP)
async def topup(request: web.Request) -> web.StreamResponse:
    gw, acc = request.match_info["gateway"], request.match_info["account"]
    s = settings_of(request)
    session: Session = request[K_SESSION]
    form = await request.post()
    request_id = str(form.get("request_id", ""))
    if not REQUEST_ID.fullmatch(request_id):
        raise web.HTTPBadRequest(text="request_id")
    try:
        micro = parse_yuan(str(form.get("amount", "")), s.max_topup_micro)
    except ValueError as bad:
        return await _account_error(request, f"topup.error.{bad}", str(form.get("amount", ""))[:20])
    if await _queries(request).account(gw, acc) is None:
        raise web.HTTPNotFound()
    if s.desk is None:
        raise web.HTTPServiceUnavailable(text="no_desk")
    try:
        command_id = await s.desk.sell_topup(
            gateway=gw, account=acc, amount_micro=micro, operator=session.user.username, request_id=request_id
        )
    except DeskError as refused:
        log.warning("console: top-up of %s for %s/%s by %s refused: %s", fmt_yuan(micro), gw, acc, session.user.username, refused)
        return await _account_error(request, str(refused), fmt_yuan(micro))
    log.info("console: %s sold a top-up of %s yuan for %s/%s (command %s)", session.user.username, fmt_yuan(micro), gw, acc, command_id)
    loc = request.app.router["account"].url_for(gateway=gw, account=acc).with_query(sold=command_id)
    return _redirect(loc)


async def _account_error(request: web.Request, error: str, amount: str) -> web.Response:
    gw, acc = request.match_info["gateway"], request.match_info["account"]
    s = settings_of(request)
    view = await _queries(request).account(gw, acc)
    if view is None:
        raise web.HTTPNotFound()
    t = Translator(_lang(request))
    pts = [(p.time_ms, p.balance_micro / 1_000_000) for p in view.path.points]
    chart = charts.line_chart(
        [charts.Series(t("account.balance"), pts, step=True)], tz=s.tz, title=t("account.chart_title"),
        unit=t("unit.yuan"), zero_line=True,
    )  # fmt: skip
    return render(
        request, "account.html", status=422, gw=gw, view=view, chart=chart, has_desk=s.desk is not None,
        form_id=secrets.token_urlsafe(16), sold="", error=error, amount=amount, **await _sales(request, view),
    )  # fmt: skip


@routes.post("/gw/{gateway}/meter/{meter}/relay", name="relay")
@requires(Permission.RELAY)
async def relay(request: web.Request) -> web.StreamResponse:
    gw, meter = request.match_info["gateway"], request.match_info["meter"]
    s = settings_of(request)
    session: Session = request[K_SESSION]
    form = await request.post()
    action = str(form.get("action", ""))
    request_id = str(form.get("request_id", ""))
    if action not in ("trip", "close") or not REQUEST_ID.fullmatch(request_id):
        raise web.HTTPBadRequest(text="relay")
    if meter not in await _queries(request).meter_ids(gw):
        raise web.HTTPNotFound()
    if s.desk is None:
        raise web.HTTPServiceUnavailable(text="no_desk")
    try:
        command_id = await s.desk.operate_relay(
            gateway=gw, meter=meter, action=action, operator=session.user.username, request_id=request_id
        )
    except DeskError as refused:
        raise web.HTTPConflict(text=str(refused)) from None
    log.info("console: %s asked relay %s of %s/%s (command %s)", session.user.username, action, gw, meter, command_id)
    return _redirect(request.app.router["gateway"].url_for(gateway=gw))


@routes.get("/alarms", name="alarms")
@requires(Permission.VIEW)
async def alarms(request: web.Request) -> web.StreamResponse:
    gw = request.query.get("gw", "")[:128] or None
    qs = _queries(request)
    return render(request, "alarms.html", gw=gw or "", alarms=await qs.alarms(gw), risks=await qs.risks(gw))


@routes.get("/users", name="users")
@requires(Permission.USERS)
async def users(request: web.Request) -> web.StreamResponse:
    s = settings_of(request)
    u = Users(s.db)
    return render(request, "users.html", users=await u.all(), sessions=await u.sessions(s.clock_ms()))


def console_app(settings: ConsoleSettings) -> web.Application:
    app = web.Application(middlewares=[_headers, _session, _authorize])
    app[K_SETTINGS] = settings
    app[K_ENV] = _env()
    app.add_routes(routes)
    return app


def mount_console(app: web.Application, settings: ConsoleSettings, prefix: str = "/console") -> web.Application:
    """Add the console under ``prefix``; the console's own application."""
    sub = console_app(settings)
    app.add_subapp(prefix, sub)
    return sub

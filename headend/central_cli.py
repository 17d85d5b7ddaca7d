"""``edgegw central ...``: central's commands, payments and reports at the command line.

    edgegw central keys init --keys DIR [--role billing] [--role operations]
    edgegw central serve (--db F | --dsn DSN) --keys DIR --broker HOST:PORT --listen HOST:PORT
        [--prefix P] [--tls-ca ca.pem [--tls-cert c.pem --tls-key c.key]]
        [--https-cert chain.pem --https-key key.pem] [--console [--timezone ZONE] [--secure-cookies]]
    edgegw central token add (--db F | --dsn DSN) --name N --role ROLE [--channel CH]
    edgegw central token list | revoke TOKEN_ID (--db F | --dsn DSN)
    edgegw central account add (--db|--dsn) --account A --gateway GW [--purchase-counter N]
    edgegw central account list (--db|--dsn) [--gateway GW]
    edgegw central topup (--db|--dsn) --keys DIR --account A --amount 50.00 --channel counter
    edgegw central tariff (--db|--dsn) --keys DIR --gateway GW [--gateway GW2 ...] --file T.toml
    edgegw central snapshot (--db|--dsn) --keys DIR --account A --balance 12.00 --as-of-seq N
        [--include topup:ID ...] [--purchase-counter N]
    edgegw central relay (--db|--dsn) --keys DIR --gateway GW --meter M --op trip [--reason R]
    edgegw central config (--db|--dsn) --keys DIR --gateway GW --set table.key=VALUE ...
    edgegw central commands (--db|--dsn) [--gateway GW] [--account A] [--state S] [--json]
    edgegw central show COMMAND_ID (--db|--dsn) [--json]
    edgegw central report (--db|--dsn) --day YYYY-MM-DD [--tz ZONE] [--json]

The database is the headend's (``edgegw headend run`` stores the gateways'
answers in it). A command is signed with the key of its role from ``--keys``
(:mod:`headend.signing`): a directory that holds only the billing key can sell
top-ups and nothing else. The commands queue; ``central serve`` (the
dispatcher, with the HTTP API) sends them. Exit codes: 0 done, 1 refused or
failed (message on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import json
import logging
import signal
import ssl
import sys
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from headend.central import (
    RELAY_OPS,
    Actor,
    ApiRole,
    Central,
    CentralError,
    parse_amount,
)
from headend.central_db import CentralDB
from headend.cli import hostport
from headend.signing import Signer, SigningError, init_keys, public_text
from headend.tls import BrokerTLS
from store_forward.command_envelope import PAYMENT_CHANNELS
from store_forward.command_roles import Role

log = logging.getLogger(__name__)


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def _actor(role: ApiRole) -> Actor:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Actor(f"cli:{user}", role)


async def _open(args: argparse.Namespace) -> CentralDB:
    try:
        return await CentralDB.open(db=args.db, dsn=args.dsn)
    except Exception as exc:  # sqlite3, psycopg or OS errors all mean "cannot open"
        shown = "the PostgreSQL database" if args.dsn else args.db
        raise CentralError(f"{shown}: cannot open the central database: {exc}") from exc


def _signer(args: argparse.Namespace) -> Signer | None:
    keys = getattr(args, "keys", None)
    return Signer.load(keys) if keys is not None else None


def _run(args: argparse.Namespace, work: Callable[[Central], Awaitable[int]]) -> int:
    async def main() -> int:
        signer = _signer(args)
        db = await _open(args)
        try:
            return await work(Central(db, signer))
        finally:
            await db.close()

    try:
        return asyncio.run(main())
    except (CentralError, SigningError) as exc:
        return _err(getattr(exc, "message", str(exc)))


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _ms(ms: int | None) -> str:
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _command_line(v: dict[str, Any]) -> str:
    what = v["type"]
    if v["type"] == "topup":
        what += f" {v['account']} {v['amount']} #{v['purchase_counter']} ({v['payment_channel']})"
    elif v["type"] == "relay.operate":
        what += f" {v['meter']} {v['body'].get('op')}"
    elif v["account"]:
        what += f" {v['account']}"
    state = v["state"]
    if v["reason"]:
        state += f" ({v['reason']}{': ' + v['code'] if v['code'] else ''})"
    return f"{v['id']}  {v['gateway']}  {what}  {state}  sent {v['attempts']}x  {_ms(v['created_ms'])}"


def _show_command(v: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(v)
        return
    print(_command_line(v))
    if v.get("message"):
        print(f"  message: {v['message']}")
    if v.get("effect"):
        print(f"  effect: {json.dumps(v['effect'], sort_keys=True)}")
    for step in v.get("log", []):
        detail = {k: x for k, x in step.items() if k not in ("at_ms", "event") and x is not None}
        print(f"  {_ms(step['at_ms'])}  {step['event']}  {json.dumps(detail, sort_keys=True)}")


# --------------------------------------------------------------------------- verbs


def _keys_init(args: argparse.Namespace) -> int:
    roles = [Role(r) for r in (args.role or ["billing", "operations"])]
    try:
        made = init_keys(args.keys, roles)
    except (SigningError, OSError) as exc:
        return _err(str(exc))
    for k in made:
        print(f"{k.role} key {k.key_id}: {args.keys}/{k.key_id}.pem (public {public_text(k)})")
    print(f"the gateways' trust file: {args.keys}/trust.json")
    return 0


def _token_add(args: argparse.Namespace) -> int:
    async def work(c: Central) -> int:
        row, text = await c.create_token(args.name, ApiRole(args.role), args.channel)
        print(f"token {row.token_id} ({row.role}{', ' + row.channel if row.channel else ''}) for {row.name}:")
        print(text)
        print("(shown once: only its hash is kept)", file=sys.stderr)
        return 0

    return _run(args, work)


def _token_list(args: argparse.Namespace) -> int:
    async def work(c: Central) -> int:
        async with c.db.transaction() as tx:
            rows = await c.db.tokens(tx)
        for t in rows:
            state = f"revoked {_ms(t.revoked_ms)}" if t.revoked_ms else "active"
            print(f"{t.token_id}  {t.name}  {t.role}{' ' + t.channel if t.channel else ''}  {state}")
        return 0

    return _run(args, work)


def _token_revoke(args: argparse.Namespace) -> int:
    async def work(c: Central) -> int:
        async with c.db.transaction() as tx:
            done = await c.db.revoke_token(tx, args.token_id, c.clock_ms())
        if not done:
            return _err(f"no active token {args.token_id}")
        print(f"token {args.token_id} revoked")
        return 0

    return _run(args, work)


def _account_add(args: argparse.Namespace) -> int:
    async def work(c: Central) -> int:
        v = await c.add_account(
            _actor(ApiRole.BILLING),
            account=args.account,
            gateway=args.gateway,
            purchase_counter=args.purchase_counter,
        )
        print(f"account {v['account']} on {v['gateway']}, last purchase counter {v['purchase_counter']}")
        return 0

    return _run(args, work)


def _account_list(args: argparse.Namespace) -> int:
    async def work(c: Central) -> int:
        for v in await c.accounts(_actor(ApiRole.VIEWER), args.gateway):
            print(f"{v['account']}  {v['gateway']}  purchase counter {v['purchase_counter']}")
        return 0

    return _run(args, work)


def _topup(args: argparse.Namespace) -> int:
    async def work(c: Central) -> int:
        v = await c.sell_topup(
            _actor(ApiRole.BILLING),
            account=args.account,
            amount_micro=parse_amount(args.amount),
            payment_channel=args.channel,
            valid_for_s=args.valid_for_s,
        )
        print(_command_line(v))
        return 0

    return _run(args, work)


def _plain(v: Any, where: str) -> Any:
    """A TOML value as JSON: dates and times as ISO strings."""
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, dict):
        return {k: _plain(x, f"{where}.{k}") for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x, f"{where}[{i}]") for i, x in enumerate(v)]
    return v


def load_tariff(path: Path) -> dict[str, Any]:
    """A tariff document from a JSON or TOML file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CentralError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CentralError(f"{path}: not a valid {'JSON' if path.suffix == '.json' else 'TOML'} file: {exc}") from exc
    if not isinstance(doc, dict):
        raise CentralError(f"{path}: a tariff is an object")
    out = _plain(doc, "tariff")
    assert isinstance(out, dict)
    return out


def _tariff(args: argparse.Namespace) -> int:
    async def work(c: Central) -> int:
        views = await c.publish_tariff(
            _actor(ApiRole.BILLING),
            gateways=args.gateway,
            tariff=load_tariff(args.file),
            valid_for_s=args.valid_for_s,
        )
        for v in views:
            print(_command_line(v))
        return 0

    return _run(args, work)


def _snapshot(args: argparse.Namespace) -> int:
    async def work(c: Central) -> int:
        text = args.balance
        negative = text.startswith("-")
        micro = parse_amount(text[1:] if negative else text, "--balance")
        v = await c.snapshot_balance(
            _actor(ApiRole.BILLING),
            account=args.account,
            balance_micro=-micro if negative else micro,
            as_of_seq=args.as_of_seq,
            included_ids=args.include or [],
            purchase_counter=args.purchase_counter,
            valid_for_s=args.valid_for_s,
        )
        print(_command_line(v))
        return 0

    return _run(args, work)


def _relay(args: argparse.Namespace) -> int:
    async def work(c: Central) -> int:
        v = await c.operate_relay(
            _actor(ApiRole.OPERATIONS),
            gateway=args.gateway,
            meter=args.meter,
            op=args.op,
            reason=args.reason,
            valid_for_s=args.valid_for_s,
        )
        print(_command_line(v))
        return 0

    return _run(args, work)


def parse_setting(text: str) -> tuple[str, Any]:
    """``table.key=VALUE``; VALUE is JSON when it reads as JSON (42, true, "x"), else text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise CentralError(f"--set {text!r}: expected table.key=VALUE")
    try:
        parsed: Any = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


def _config(args: argparse.Namespace) -> int:
    async def work(c: Central) -> int:
        settings = dict(parse_setting(s) for s in args.set)
        v = await c.change_config(
            _actor(ApiRole.OPERATIONS),
            gateway=args.gateway,
            settings=settings,
            confirm_within_s=args.confirm_within_s,
            valid_for_s=args.valid_for_s,
        )
        print(_command_line(v))
        return 0

    return _run(args, work)


def _commands(args: argparse.Namespace) -> int:
    async def work(c: Central) -> int:
        views = await c.commands(
            _actor(ApiRole.VIEWER),
            gateway=args.gateway,
            account=args.account,
            state=args.state,
            type=args.type,
            limit=args.limit,
        )
        if args.json:
            _print_json(views)
        else:
            for v in views:
                print(_command_line(v))
        return 0

    return _run(args, work)


def _show(args: argparse.Namespace) -> int:
    async def work(c: Central) -> int:
        _show_command(await c.command(_actor(ApiRole.VIEWER), args.command_id), args.json)
        return 0

    return _run(args, work)


def _report(args: argparse.Namespace) -> int:
    async def work(c: Central) -> int:
        r = await c.reconciliation(_actor(ApiRole.VIEWER), args.day, args.tz)
        if args.json:
            _print_json(r)
            return 0
        print(f"top-ups of {r['day']} ({r['timezone']}), as of {_ms(r['as_of_ms'])}")
        cols = ("topups", "via_payments", "applied", "credited", "pending", "refused", "expired", "unconfirmed")
        print("channel     " + "".join(f"{c:>22}" for c in cols))
        for row in [*r["channels"], {"channel": "total", **r["totals"]}]:
            cells = "".join(f"{row[c]['count']:>6} {row[c]['amount']:>15}" for c in cols)
            print(f"{row['channel']:<12}{cells}")
        return 0

    return _run(args, work)


def _serve(args: argparse.Namespace) -> int:
    # aiohttp (and for the console jinja2) is the ``headend`` extra: loaded only here.
    from headend.dispatch import Dispatcher
    from headend.web import build_app, serve, server_tls

    if (args.https_cert is None) != (args.https_key is None):
        return _err("--https-cert and --https-key go together")
    https: ssl.SSLContext | None = None
    if args.https_cert is not None:
        try:
            https = server_tls(str(args.https_cert), str(args.https_key))
        except (OSError, ssl.SSLError) as exc:
            return _err(f"--https-cert/--https-key: {exc}")

    tls: ssl.SSLContext | None = None
    if args.tls_ca is not None:
        try:
            tls = BrokerTLS(args.tls_ca, args.tls_cert, args.tls_key).context()
        except (OSError, ssl.SSLError) as exc:
            return _err(f"TLS files (--tls-ca/--tls-cert/--tls-key): {exc}")

    async def main() -> int:
        signer = Signer.load(args.keys)
        db = await _open(args)
        host, port = args.broker
        dispatcher = Dispatcher(db, signer, host, port, prefix=args.prefix, tls_context=tls)
        central = Central(db, signer, on_queued=[dispatcher.wake])
        console = None
        console_db: Any = None
        if args.console:
            from headend.central_desk import CentralDesk
            from headend.console.app import ConsoleSettings
            from headend.console.db import open_console_db

            console_db = await open_console_db(args.db and str(args.db), args.dsn)
            console = ConsoleSettings(
                db=console_db, tz=args.timezone or console_timezone(None), desk=CentralDesk(central),
                secure_cookies=True if args.secure_cookies else None,
            )  # fmt: skip
        runner, bound = await serve(build_app(central, console=console), args.listen[0], args.listen[1], https)
        scheme = "https" if https is not None else "http"
        log.info(
            "central API on %s://%s:%d/api/v1%s, dispatching to %s:%d", scheme, args.listen[0], bound,
            " (and the console at /console/)" if console is not None else "", host, port,
        )  # fmt: skip
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(dispatcher.run())
        try:
            await stop.wait()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await runner.cleanup()
            if console_db is not None:
                await console_db.close()
            await db.close()
        return 0

    try:
        return asyncio.run(main())
    except (CentralError, SigningError) as exc:
        return _err(getattr(exc, "message", str(exc)))
    except OSError as exc:
        return _err(f"cannot listen on {args.listen[0]}:{args.listen[1]}: {exc}")


# --------------------------------------------------------------------------- parser


def console_timezone(name: str | None) -> Any:
    """An IANA time zone for the console (this host's local zone by default)."""
    if not name:
        return dt.datetime.now().astimezone().tzinfo
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown time zone {name!r} (an IANA name, e.g. Asia/Shanghai)") from None


def _store(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", type=Path, help="the headend's SQLite database")
    where.add_argument("--dsn", help="the headend's PostgreSQL database")


def _keys(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", required=True, type=Path, help="central's key directory (trust.json, <key id>.pem)")


def _validity(p: argparse.ArgumentParser) -> None:
    p.add_argument("--valid-for-s", type=int, metavar="S", help="validity (default: per type)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``edgegw central ...``."""
    c = sub.add_parser("central", help="central: commands to gateways, payments, reconciliation")
    cs = c.add_subparsers(dest="central_command", required=True, metavar="ACTION")

    k = cs.add_parser("keys", help="central's signing keys")
    ks = k.add_subparsers(dest="keys_command", required=True)
    p = ks.add_parser("init", help="make a key per role and the gateways' trust file")
    p.add_argument("--keys", required=True, type=Path)
    p.add_argument("--role", action="append", choices=["billing", "operations"])
    p.set_defaults(func=_keys_init)

    p = cs.add_parser("serve", help="the HTTP API and the dispatcher that sends queued commands")
    _store(p)
    _keys(p)
    p.add_argument("--broker", type=hostport, required=True, metavar="HOST:PORT")
    p.add_argument("--listen", type=hostport, required=True, metavar="HOST:PORT")
    p.add_argument("--prefix", default="edgegw/v1", help="topic prefix (default: %(default)s)")
    p.add_argument("--tls-ca", type=Path, metavar="PEM", help="TLS to the broker: its CA")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="central's client certificate")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="its key")
    p.add_argument("--https-cert", type=Path, metavar="PEM", help="serve HTTPS with this chain")
    p.add_argument("--https-key", type=Path, metavar="PEM", help="and this key")
    p.add_argument("--console", action="store_true",
                   help="also serve the operator console at /console/, its forms on this queue")  # fmt: skip
    p.add_argument("--timezone", type=console_timezone, default=None, metavar="ZONE",
                   help="the console's time zone (default: this host's)")  # fmt: skip
    p.add_argument("--secure-cookies", action="store_true", help="the console's cookies only over HTTPS")
    p.set_defaults(func=_serve)

    t = cs.add_parser("token", help="API tokens (one role each)")
    ts = t.add_subparsers(dest="token_command", required=True)
    p = ts.add_parser("add", help="make a token (printed once)")
    _store(p)
    p.add_argument("--name", required=True, help="who holds it")
    p.add_argument("--role", required=True, choices=[r.value for r in ApiRole])
    p.add_argument("--channel", choices=sorted(PAYMENT_CHANNELS), help="a channel token's payment channel")
    p.set_defaults(func=_token_add)
    p = ts.add_parser("list")
    _store(p)
    p.set_defaults(func=_token_list)
    p = ts.add_parser("revoke")
    p.add_argument("token_id")
    _store(p)
    p.set_defaults(func=_token_revoke)

    a = cs.add_parser("account", help="accounts and the gateways that serve them")
    asub = a.add_subparsers(dest="account_command", required=True)
    p = asub.add_parser("add")
    _store(p)
    p.add_argument("--account", required=True)
    p.add_argument("--gateway", required=True)
    p.add_argument("--purchase-counter", type=int, default=0, help="the last one the gateway's ledger holds")
    p.set_defaults(func=_account_add)
    p = asub.add_parser("list")
    _store(p)
    p.add_argument("--gateway")
    p.set_defaults(func=_account_list)

    p = cs.add_parser("topup", help="sell a top-up (billing key)")
    _store(p)
    _keys(p)
    p.add_argument("--account", required=True)
    p.add_argument("--amount", required=True, help="yuan, e.g. 50.00")
    p.add_argument("--channel", required=True, choices=sorted(PAYMENT_CHANNELS))
    _validity(p)
    p.set_defaults(func=_topup)

    p = cs.add_parser("tariff", help="publish a tariff version (billing key)")
    _store(p)
    _keys(p)
    p.add_argument("--gateway", action="append", required=True)
    p.add_argument("--file", required=True, type=Path, help="the tariff (TOML or JSON)")
    _validity(p)
    p.set_defaults(func=_tariff)

    p = cs.add_parser("snapshot", help="central's balance of an account (billing key)")
    _store(p)
    _keys(p)
    p.add_argument("--account", required=True)
    p.add_argument("--balance", required=True, help="yuan, e.g. 12.00 or -1.50")
    p.add_argument("--as-of-seq", required=True, type=int, help="the gateway ledger's entry it is as of")
    p.add_argument("--include", action="append", metavar="ENTRY_ID", help="an entry counted beyond it")
    p.add_argument("--purchase-counter", type=int)
    _validity(p)
    p.set_defaults(func=_snapshot)

    p = cs.add_parser("relay", help="operate a relay (operations key)")
    _store(p)
    _keys(p)
    p.add_argument("--gateway", required=True)
    p.add_argument("--meter", required=True)
    p.add_argument("--op", required=True, choices=RELAY_OPS)
    p.add_argument("--reason")
    _validity(p)
    p.set_defaults(func=_relay)

    p = cs.add_parser("config", help="change a gateway's configuration (operations key)")
    _store(p)
    _keys(p)
    p.add_argument("--gateway", required=True)
    p.add_argument("--set", action="append", required=True, metavar="TABLE.KEY=VALUE")
    p.add_argument("--confirm-within-s", type=int)
    _validity(p)
    p.set_defaults(func=_config)

    p = cs.add_parser("commands", help="commands and their delivery state, newest first")
    _store(p)
    p.add_argument("--gateway")
    p.add_argument("--account")
    p.add_argument("--state", choices=["queued", "sent", "applied", "refused", "expired", "superseded"])
    p.add_argument("--type")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_commands)

    p = cs.add_parser("show", help="one command with every step of its delivery")
    p.add_argument("command_id")
    _store(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_show)

    p = cs.add_parser("report", help="the daily reconciliation per payment channel")
    _store(p)
    p.add_argument("--day", required=True, type=dt.date.fromisoformat, metavar="YYYY-MM-DD")
    p.add_argument("--tz", default="UTC", help="the day's time zone (default: %(default)s)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_report)


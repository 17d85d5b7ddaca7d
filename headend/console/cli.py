"""``edgegw headend console`` and ``edgegw headend user``: serve the console, manage its users.

    edgegw headend console --listen HOST:PORT (--db central.db | --dsn DSN) \\
        [--tls-cert cert.pem --tls-key key.pem] [--timezone Asia/Shanghai] [--secure-cookies]
    edgegw headend user add NAME --role ROLE (--db | --dsn) [--password-stdin]
    edgegw headend user passwd NAME (--db | --dsn) [--password-stdin]
    edgegw headend user role NAME ROLE (--db | --dsn)
    edgegw headend user disable|enable NAME (--db | --dsn)
    edgegw headend user list (--db | --dsn) [--json]

Passwords are read from the terminal (twice), or with ``--password-stdin``
as the first line of standard input. Changing a password, a role or
disabling a user ends the user's sessions. Exit codes: 0 done, 1 refused or
failed (message on stderr), 2 usage.

This module imports aiohttp only inside ``console`` (the ``headend`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from headend.console.auth import Role, UserError, Users, parse_role
from headend.console.db import ConsoleDb, open_console_db

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    first = getpass.getpass("new password: ")
    if getpass.getpass("again: ") != first:
        raise UserError("the two passwords differ")
    return first


def _with_db(args: argparse.Namespace, work: Callable[[ConsoleDb], Awaitable[int]]) -> int:
    async def main() -> int:
        db = await open_console_db(args.db, args.dsn)
        try:
            return await work(db)
        finally:
            await db.close()

    try:
        return asyncio.run(main())
    except UserError as exc:
        return _err(str(exc))
    except (OSError, ValueError) as exc:
        return _err(f"headend database: {exc}")
    except Exception as exc:  # sqlite3 / psycopg errors
        if type(exc).__module__.startswith(("sqlite3", "psycopg")):
            return _err(f"headend database: {exc}")
        raise


def _user_add(args: argparse.Namespace) -> int:
    role = parse_role(args.role) if args.role else None
    try:
        password = _read_password(args)
    except UserError as exc:
        return _err(str(exc))

    async def work(db: ConsoleDb) -> int:
        assert role is not None
        user = await Users(db).add(args.name, role, password, _now_ms())
        print(f"user {user.username} added ({user.role.value})")
        return 0

    return _with_db(args, work)


def _user_passwd(args: argparse.Namespace) -> int:
    try:
        password = _read_password(args)
    except UserError as exc:
        return _err(str(exc))

    async def work(db: ConsoleDb) -> int:
        await Users(db).set_password(args.name, password, _now_ms())
        print(f"password of {args.name} changed; its sessions ended")
        return 0

    return _with_db(args, work)


def _user_role(args: argparse.Namespace) -> int:
    try:
        role = parse_role(args.role)
    except UserError as exc:
        return _err(str(exc))

    async def work(db: ConsoleDb) -> int:
        await Users(db).set_role(args.name, role, _now_ms())
        print(f"{args.name} is now {role.value}; its sessions ended")
        return 0

    return _with_db(args, work)


def _user_disable(args: argparse.Namespace, disabled: bool) -> int:
    async def work(db: ConsoleDb) -> int:
        await Users(db).set_disabled(args.name, disabled, _now_ms())
        print(f"{args.name} {'disabled; its sessions ended' if disabled else 'enabled'}")
        return 0

    return _with_db(args, work)


def _user_list(args: argparse.Namespace) -> int:
    async def work(db: ConsoleDb) -> int:
        users = await Users(db).all()
        if args.json:
            doc = [
                {"user": u.username, "role": u.role.value, "created_ms": u.created_ms,
                 "changed_ms": u.changed_ms, "disabled": u.disabled}
                for u in users
            ]  # fmt: skip
            sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
            return 0
        if not users:
            print("no users (edgegw headend user add NAME --role administrator)")
        for u in users:
            changed = datetime.fromtimestamp(u.changed_ms / 1000).astimezone().strftime("%Y-%m-%d %H:%M")
            print(f"{u.username:<24} {u.role.value:<17} {'disabled' if u.disabled else 'enabled':<9} changed {changed}")
        return 0

    return _with_db(args, work)


def timezone(name: str | None) -> tzinfo:
    """The console's time zone: an IANA name, or this host's local zone."""
    if not name:
        tz = datetime.now().astimezone().tzinfo
        assert tz is not None
        return tz
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown time zone {name!r} (an IANA name, e.g. Asia/Shanghai)") from None


async def _serve_console(args: argparse.Namespace) -> int:
    try:
        from headend.console.app import ConsoleSettings
        from headend.web import build_app, serve, server_tls
    except ImportError as missing:
        return _err(f"the console needs aiohttp and jinja2 (pip install 'edge-gateway[headend]'): {missing}")
    tls = None
    if args.tls_cert is not None:
        try:
            tls = server_tls(args.tls_cert, args.tls_key)
        except (OSError, ValueError) as exc:
            return _err(f"--tls-cert/--tls-key: {exc}")
    db = await open_console_db(args.db, args.dsn)
    try:
        settings = ConsoleSettings(db=db, tz=args.timezone, secure_cookies=True if args.secure_cookies else None)
        host, port = args.listen
        try:
            runner, bound = await serve(build_app(console=settings), host, port, tls)
        except OSError as busy:
            return _err(f"--listen {host}:{port}: {busy}")
        scheme = "https" if tls else "http"
        log.info("console at %s://%s:%d/console/", scheme, host, bound)
        print(f"console at {scheme}://{host}:{bound}/console/", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
        return 0
    finally:
        await db.close()


def _console(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    try:
        return asyncio.run(_serve_console(args))
    except (OSError, ValueError) as exc:
        return _err(f"headend database: {exc}")


def _store_options(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", help="SQLite database file of the headend")
    where.add_argument("--dsn", help="PostgreSQL connection string of the headend")


def listen_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` to listen on (port 0: any free port, printed at start)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


def register_console(headend_subparsers: Any) -> None:
    """Add ``console`` and ``user`` under ``edgegw headend``."""
    import functools

    c = headend_subparsers.add_parser(
        "console",
        help="serve the operator console in the browser",
        description="Serve the operator console (http[s]://HOST:PORT/console/) until SIGTERM/SIGINT.",
    )
    c.add_argument("--listen", type=listen_address, required=True, metavar="HOST:PORT",
                   help="where to serve (port 0: a free port, printed at start)")  # fmt: skip
    _store_options(c)
    c.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate chain")
    c.add_argument("--tls-key", metavar="PEM", help="and this private key")
    c.add_argument("--timezone", type=timezone, default=timezone(None), metavar="ZONE",
                   help="time zone of the times shown (default: this host's)")  # fmt: skip
    c.add_argument("--secure-cookies", action="store_true",
                   help="mark cookies Secure although the console speaks plain HTTP (behind a TLS proxy)")  # fmt: skip
    c.set_defaults(func=functools.partial(_console, parser=c))

    u = headend_subparsers.add_parser("user", help="the console's users: add, passwd, role, disable, enable, list")
    us = u.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    roles = ", ".join(r.value for r in Role)
    a = us.add_parser("add", help="add a user")
    a.add_argument("name")
    a.add_argument("--role", required=True, help=f"one of: {roles}")
    a.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    _store_options(a)
    a.set_defaults(func=_user_add)
    pw = us.add_parser("passwd", help="set a user's password (ends its sessions)")
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    _store_options(pw)
    pw.set_defaults(func=_user_passwd)
    r = us.add_parser("role", help="change a user's role (ends its sessions)")
    r.add_argument("name")
    r.add_argument("role", help=f"one of: {roles}")
    _store_options(r)
    r.set_defaults(func=_user_role)
    for name, flag in (("disable", True), ("enable", False)):
        d = us.add_parser(name, help=f"{name} a user" + (" (ends its sessions)" if flag else ""))
        d.add_argument("name")
        _store_options(d)
        d.set_defaults(func=lambda args, flag=flag: _user_disable(args, flag))
    ls = us.add_parser("list", help="list the users")
    ls.add_argument("--json", action="store_true")
    _store_options(ls)
    ls.set_defaults(func=_user_list)

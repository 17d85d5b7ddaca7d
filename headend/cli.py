"""``edgegw headend run | import | keygen``: the reference headend's commands.

    edgegw headend run --broker HOST:PORT (--db central.db | --dsn DSN) [--prefix P] \\
        [--share GROUP] [--key headend.pem --registry DIR] \\
        [--tls-ca ca.pem [--tls-cert headend.pem --tls-key headend.key]] \\
        [--metrics HOST:PORT] [--console HOST:PORT] \\
        [--api HOST:PORT --api-tokens FILE] [--notify notify.toml]
    edgegw headend api-token NAME --tokens FILE
    edgegw headend import DIR (--db central.db | --dsn DSN) --key headend.pem --registry DIR
    edgegw headend keygen --out headend.x25519.pem

``headend run`` with ``--key``/``--registry`` accepts only sealed batches from
enrolled gateways; without them it accepts unsealed batches from anyone
(development); with ``--metrics`` it serves Prometheus metrics at
``http://HOST:PORT/metrics`` (:mod:`headend.metrics`, the ``headend`` extra:
prometheus-client); with ``--api`` it serves the read-only JSON API for
integrators at ``http://HOST:PORT/api/v1/`` (:mod:`headend.read_api`, tokens
from ``edgegw headend api-token``; the same address as ``--console`` serves
both); with ``--notify`` it sends the caring reminders the notice file
describes (:mod:`headend.notifier`). Exit codes: 0 success (``run``: stopped by SIGTERM/SIGINT),
1 refused or failed (message on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import logging
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from firmware_bridge import event_loop
from firmware_bridge.errors import EdgeGwError, ErrorKind
from headend.console.cli import listen_address, register_console, timezone
from headend.console.db import open_console_db
from headend.ingest import Headend
from headend.registry import GatewayRegistry, generate_headend_key, load_headend_key
from headend.store import HeadendDB, HeadendStore
from headend.tls import BrokerTLS
from headend.usb_import import ImportResult, SneakernetError, import_backlog
from store_forward.uplink_keys import UplinkKeyError

log = logging.getLogger(__name__)


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


class HeadendStoreError(EdgeGwError):
    """The headend's database cannot be opened."""

    kind = ErrorKind.STORAGE


def hostport(value: str) -> tuple[str, int]:
    """``HOST:PORT`` as an argparse type (an empty host means 127.0.0.1)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


async def open_headend_store(db: str | None, dsn: str | None) -> HeadendStore:
    """The headend's database: PostgreSQL at ``dsn`` (several headends may share
    it), else the SQLite file ``db``. Raises :class:`HeadendStoreError`."""
    where = dsn or db
    if not where:
        raise HeadendStoreError("no database: give --db FILE or --dsn DSN")
    try:
        if dsn:
            # psycopg is an optional dependency (the ``postgres`` extra): imported only here.
            from headend.store_pg import PostgresHeadendDB

            return await PostgresHeadendDB.open(dsn)
        return await HeadendDB.open(where)
    except Exception as exc:  # sqlite3, psycopg or OS errors: all mean "cannot open"
        shown = "the PostgreSQL database" if dsn else where  # a DSN may hold a password
        raise HeadendStoreError(f"{shown}: cannot open the headend database: {exc}") from exc


def load_registry(key: Path, registry: Path) -> GatewayRegistry:
    """The enrolled gateways under the headend key. Raises UplinkKeyError."""
    return GatewayRegistry.load(load_headend_key(key), registry)


def run_usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with a ``headend run`` command line that argparse cannot see."""
    if (args.key is None) != (args.registry is None):
        return (
            "--key and --registry go together: give both (only sealed batches from enrolled"
            " gateways are accepted) or neither (unsealed batches, development only)"
        )
    if (args.tls_cert is None) != (args.tls_key is None):
        return "--tls-cert and --tls-key go together (the headend's client certificate and its key)"
    if args.tls_cert is not None and args.tls_ca is None:
        return "--tls-cert/--tls-key need --tls-ca (the CA that signed the broker's certificate)"
    if getattr(args, "api", None) is not None and getattr(args, "api_tokens", None) is None:
        return "--api needs --api-tokens FILE (the read tokens: edgegw headend api-token NAME --tokens FILE)"
    return None


async def serve_headend(
    args: argparse.Namespace, registry: GatewayRegistry | None, tls: ssl.SSLContext | None
) -> int:
    """Run the headend until SIGTERM/SIGINT (0), or until it fails (1)."""
    log.info("headend starting", extra={"event_loop": event_loop.running_loop_name()})
    host, port = args.broker
    metrics = None
    if args.metrics is not None:
        try:
            from headend.metrics import HeadendMetrics
        except ImportError as missing:
            log.error("--metrics needs prometheus-client (pip install 'edge-gateway[headend]'): %s", missing)
            return 1
        metrics = HeadendMetrics()
    db = await open_headend_store(args.db, args.dsn)
    server = None
    refresh: asyncio.Task[None] | None = None
    console_runner: Any = None
    console_db: Any = None
    api_runner: Any = None
    api_db: Any = None
    notifier_task: asyncio.Task[None] | None = None
    try:
        if metrics is not None:
            try:
                server = metrics.serve(*args.metrics)
            except OSError as busy:
                log.error("--metrics %s:%d: cannot listen: %s", *args.metrics, busy)
                return 1
            refresh = asyncio.create_task(metrics.refresh_loop(db, args.metrics_refresh_s))
            log.info("metrics at http://%s:%d/metrics", args.metrics[0], server.port)
        if args.console is not None:
            web = await _start_console(args, metrics)
            if web is None:
                return 1
            console_runner, console_db = web
        if getattr(args, "api", None) is not None:
            started = await _start_api(args)
            if started is None:
                return 1
            api_runner, api_db = started
        if getattr(args, "notify", None) is not None:
            notifier = await _start_notifier(args)
            if notifier is None:
                return 1
            notifier_task = asyncio.create_task(notifier.run())
        headend = Headend(
            db,
            host=host,
            port=port,
            prefix=args.prefix,
            share_group=args.share,
            registry=registry,
            tls_context=tls,
            observer=metrics,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(headend.run())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():  # run() only returns by an error it does not recover from
            stopped.cancel()
            failure = task.exception()
            log.error("headend stopped: %r", failure, exc_info=failure)
            return 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return 0
    finally:
        if notifier_task is not None:
            notifier_task.cancel()
            await asyncio.gather(notifier_task, return_exceptions=True)
            await notifier.queue.close()
        if api_runner is not None:
            await api_runner.cleanup()
        if api_db is not None:
            await api_db.close()
        if console_runner is not None:
            await console_runner.cleanup()
        if console_db is not None:
            await console_db.close()
        if refresh is not None:
            refresh.cancel()
            await asyncio.gather(refresh, return_exceptions=True)
        if server is not None:
            server.close()
        await db.close()


async def _start_console(args: argparse.Namespace, metrics: Any) -> tuple[Any, Any] | None:
    """The operator console in this process (``--console``): its runner and its
    database connection, or None (logged) when it cannot start. With ``--metrics``
    the console shows the presence the metrics keep; without, it has none."""
    try:
        from headend.console.app import ConsoleSettings
        from headend.console.queries import Presence
        from headend.web import build_app, serve
    except ImportError as missing:
        log.error("--console needs aiohttp and jinja2 (pip install 'edge-gateway[headend]'): %s", missing)
        return None
    cdb = await open_console_db(args.db, args.dsn)
    presence = None
    if metrics is not None:

        def presence() -> dict[str, Presence]:
            return {gw: Presence(p.online, p.since_ms) for gw, p in dict(metrics.presence).items()}

    settings = ConsoleSettings(db=cdb, tz=timezone(None), presence=presence)
    read_api = None
    if getattr(args, "api", None) is not None and tuple(args.api) == tuple(args.console):
        read_api = _read_api_settings(args, cdb)
        args.api_served = True
    try:
        runner, bound = await serve(build_app(console=settings, read_api=read_api), *args.console)
    except OSError as busy:
        await cdb.close()
        log.error("--console %s:%d: cannot listen: %s", *args.console, busy)
        return None
    log.info("console at http://%s:%d/console/", args.console[0], bound)
    return runner, cdb


def _read_api_settings(args: argparse.Namespace, db: Any) -> Any:
    from headend.read_api import ReadApiSettings, TokenFile

    return ReadApiSettings(db=db, auth=TokenFile(args.api_tokens))


async def _start_api(args: argparse.Namespace) -> tuple[Any, Any] | None:
    """The read API on its own address (``--api``): its runner and database connection;
    (None, None) when the console's application already serves it; None on failure."""
    if getattr(args, "api_served", False):
        return None, None
    try:
        from headend.web import build_app, serve
    except ImportError as missing:
        log.error("--api needs aiohttp (pip install 'edge-gateway[headend]'): %s", missing)
        return None
    db = await open_console_db(args.db, args.dsn)
    try:
        runner, bound = await serve(build_app(read_api=_read_api_settings(args, db)), *args.api)
    except OSError as busy:
        await db.close()
        log.error("--api %s:%d: cannot listen: %s", *args.api, busy)
        return None
    log.info("read API at http://%s:%d/api/v1/", args.api[0], bound)
    return runner, db


async def _start_notifier(args: argparse.Namespace) -> Any:
    """The caring reminders (``--notify``), or None (logged) when the notice file is bad."""
    try:
        from headend.notifier import Notifier, WebhookSink
        from headend.notify_config import NotifyConfigError, load_notify_config
        from headend.notify_queue import NotifyQueue
    except ImportError as missing:
        log.error("--notify needs aiohttp (pip install 'edge-gateway[headend]'): %s", missing)
        return None
    try:
        config = load_notify_config(args.notify)
    except NotifyConfigError as exc:
        log.error("--notify %s:\n%s", args.notify, exc)
        return None
    queue = await (NotifyQueue.open_postgres(args.dsn) if args.dsn else NotifyQueue.open_sqlite(args.db))
    log.info("caring reminders to %s for %d customers", config.webhook.url.split("?")[0], len(config.customers))
    return Notifier(queue, config, WebhookSink(config.webhook), config_path=args.notify)


def _api_token(args: argparse.Namespace) -> int:
    from headend.read_api import new_token

    try:
        token = new_token(args.tokens, args.name)
    except (ValueError, OSError) as exc:
        return _err(str(exc))
    print(f"read token for {args.name} added to {args.tokens} (shown once):")
    print(token)
    return 0


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    problem = run_usage_problem(args)
    if problem is not None:
        parser.error(problem)  # exits 2 with the usage line
    registry = None
    if args.key is not None:
        try:
            registry = load_registry(args.key, args.registry)
        except UplinkKeyError as exc:
            return _err(str(exc))
    else:
        log.warning("headend: no --key/--registry: unsealed batches are accepted (development only)")
    tls = None
    if args.tls_ca is not None:
        try:
            tls = BrokerTLS(args.tls_ca, args.tls_cert, args.tls_key).context()
        except (OSError, ssl.SSLError) as exc:
            return _err(f"TLS files (--tls-ca/--tls-cert/--tls-key): {exc}")
    try:
        # uvloop unless EDGEGW_EVENT_LOOP=asyncio (firmware_bridge.event_loop)
        return event_loop.run(serve_headend(args, registry, tls))
    except HeadendStoreError as exc:
        return _err(str(exc))


def _import(args: argparse.Namespace) -> int:
    try:
        registry = load_registry(args.key, args.registry)
    except UplinkKeyError as exc:
        return _err(str(exc))

    async def main() -> ImportResult:
        db = await open_headend_store(args.db, args.dsn)
        try:
            return await import_backlog(
                db, args.dir, key_lookup=registry.key_lookup, now_ms=time.time_ns() // 1_000_000
            )
        finally:
            await db.close()

    try:
        r = asyncio.run(main())
    except (SneakernetError, HeadendStoreError) as exc:
        return _err(str(exc))
    print(f"{args.dir}: {r.stored} batch(es) stored ({r.records_new} records), {r.duplicate} already known")
    for line in r.refused:
        print(f"refused: {line}", file=sys.stderr)
    return 1 if r.refused else 0


def _keygen(args: argparse.Namespace) -> int:
    try:
        pub = generate_headend_key(args.out)
    except (UplinkKeyError, OSError) as exc:
        return _err(str(exc))
    print(f"headend key written to {args.out}")
    print(f"public key (uplink.headend_public_key): {base64.b64encode(pub).decode()}")
    return 0


def _add_store_options(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", help="SQLite database file")
    where.add_argument("--dsn", help="PostgreSQL connection string (several headends may share it)")


def register_headend(headend_subparsers: argparse._SubParsersAction) -> None:
    """Add ``run``, ``import`` and ``keygen`` under ``edgegw headend``."""
    r = headend_subparsers.add_parser(
        "run",
        help="subscribe to the gateways' batches, store them, then ack",
        description="Run the reference headend until SIGTERM/SIGINT.",
    )
    r.add_argument("--broker", type=hostport, required=True, metavar="HOST:PORT")
    _add_store_options(r)
    r.add_argument("--prefix", default="edgegw/v1", help="topic prefix (default: %(default)s)")
    r.add_argument("--share", metavar="GROUP", help="join shared subscription GROUP (scale-out)")
    sealed = r.add_argument_group(
        "enrolled gateways", "both or neither; with them only sealed batches from enrolled gateways are stored"
    )
    sealed.add_argument("--key", type=Path, metavar="PEM", help="headend X25519 private key (PEM)")
    sealed.add_argument("--registry", type=Path, metavar="DIR", help="directory of enrolled gateways")
    tls = r.add_argument_group("TLS to the broker", "--tls-cert and --tls-key together, and only with --tls-ca")
    tls.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA that signed the broker's certificate")
    tls.add_argument("--tls-cert", type=Path, metavar="PEM", help="the headend's client certificate")
    tls.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key")
    r.add_argument(
        "--metrics",
        type=hostport,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (needs the headend extra)",
    )
    r.add_argument(
        "--metrics-refresh-s",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="how often the fleet tables are read for the metrics (default: %(default)s)",
    )
    r.add_argument(
        "--console",
        type=listen_address,
        metavar="HOST:PORT",
        help="serve the operator console at http://HOST:PORT/console/ (needs the headend extra;"
        " with --metrics it shows the gateways' presence)",
    )
    r.add_argument(
        "--api",
        type=listen_address,
        metavar="HOST:PORT",
        help="serve the read-only JSON API at http://HOST:PORT/api/v1/ (docs/openapi.yaml;"
        " needs --api-tokens)",
    )
    r.add_argument("--api-tokens", type=Path, metavar="FILE", help="the read API's tokens (edgegw headend api-token)")
    r.add_argument(
        "--notify",
        type=Path,
        metavar="FILE",
        help="send caring reminders as the notice file says (docs/integration.md)",
    )
    r.set_defaults(func=functools.partial(_run, parser=r))

    p = headend_subparsers.add_parser("import", help="ingest a sneakernet backlog export")
    p.add_argument("dir", type=Path)
    _add_store_options(p)
    p.add_argument("--key", required=True, type=Path, help="headend X25519 private key (PEM)")
    p.add_argument("--registry", required=True, type=Path, help="directory of enrolled gateways")
    p.set_defaults(func=_import)
    k = headend_subparsers.add_parser("keygen", help="create the headend's X25519 key")
    k.add_argument("--out", required=True, type=Path)
    k.set_defaults(func=_keygen)

    t = headend_subparsers.add_parser(
        "api-token", help="make a token for the read API", description="Print a new read token once; "
        "its SHA-256 is appended to the tokens file."
    )
    t.add_argument("name", help="who the token is for (letters, digits, - _ .)")
    t.add_argument("--tokens", type=Path, required=True, metavar="FILE")
    t.set_defaults(func=_api_token)
    register_console(headend_subparsers)

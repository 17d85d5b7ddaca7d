"""``edgegw``: the command line of the gateway, the headend and the technician tools."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from firmware_bridge import event_loop, logfmt
from gateway import __version__
from gateway.config import ConfigError, check_config, load_config
from gateway.preflight import account_for, preflight
from gateway.security.roles import TrustError
from headend.cli import hostport as _hostport  # also the demo's --broker
from headend.cli import register_headend
from provisioning.keys import KeystoreError
from store_forward.outbox import (
    OutboxError,
)
from store_forward.sealing import StorageKeyError
from store_forward.uplink_keys import UplinkKeyError

# Modules that add their own subcommands with ``register(subparsers)``.
COMMAND_MODULES: tuple[str, ...] = (
    "gateway.status_cli",  # status
    "gateway.meters_cli",  # meters scan / read / relay
    "gateway.billing.cli",  # tariff simulate
    "gateway.technician",  # topup apply
    "gateway.security.cli",  # audit verify, command sign / verify / keygen
    "provisioning.keys_cli",  # keys init / show / export-public
    "gateway.provision_cli",  # provision make / inspect / verify / apply
    "gateway.backlog_cli",  # backlog export
    "gateway.update_cli",  # update apply / recover / status, release build / verify / offer
    "headend.central_cli",  # central keys / serve / token / account / topup / relay / ... / report
)


# Commands that run as services: their INFO lines (started, connected, a meter back
# online, a recovery with its count) belong in the journal by default.
DAEMON_COMMANDS = frozenset({("run", None), ("headend", "run")})


def _setup_logging(verbose: int, *, daemon: bool = False) -> None:
    """Log to stderr through :mod:`firmware_bridge.logfmt` (priority prefixes when
    stderr is the journal, ``key=value`` fields, repeated lines folded). Services
    log from INFO, the other commands from WARNING (``-v``: INFO); ``-vv``: DEBUG."""
    steps = [logging.WARNING, logging.INFO, logging.DEBUG]
    level = steps[min(len(steps) - 1, max(verbose, 1 if daemon else 0))]
    logfmt.configure(level)


def _load(path: str) -> Any:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        return None


# -- config check ---------------------------------------------------------


def cmd_config_check(args: argparse.Namespace) -> int:
    """The loader's checks and the machine's (gateway.preflight), all in one pass."""
    try:
        account = account_for(args.as_user)
    except KeyError:
        print(f"error: --as-user: no user {args.as_user!r} on this machine", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(f"error: --as-user: {exc}", file=sys.stderr)
        return 2
    report = check_config(args.file)
    found = preflight(report, account)
    problems = report.problems + found.problems
    for line in found.warnings:
        print(f"warning: {line}", file=sys.stderr)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"{args.file}: {len(problems)} problem(s); files {account.how()}", file=sys.stderr)
        return 2
    cfg = report.config
    assert cfg is not None
    print(
        f"{args.file}: ok — gateway {cfg.gateway.id}, {len(cfg.buses)} bus(es),"
        f" {len(cfg.meters)} meter(s); files {account.how()}"
    )
    return 0


# -- run ------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 2
    logfmt.set_fields(gateway=cfg.gateway.id)
    # The daemon (MQTT client, billing, commands) is loaded by `run` only: every
    # other command starts without it.
    from gateway.daemon import Daemon, StartupError
    from gateway.remote_config import RESTART_EXIT_CODE

    start_errors = (
        StartupError, OutboxError, StorageKeyError, KeystoreError, TrustError, UplinkKeyError, OSError,
    )  # fmt: skip

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        daemon = Daemon(cfg)
        await daemon.run(stop)
        # A configuration change from central is in the file: systemd starts us again.
        return RESTART_EXIT_CODE if daemon.restart_reason else 0

    try:
        # uvloop unless EDGEGW_EVENT_LOOP=asyncio (firmware_bridge.event_loop)
        return event_loop.run(main())
    except start_errors as exc:
        # One line naming the file and the cause, not a traceback (-vv for that).
        logging.getLogger("gateway").error(
            "cannot start: %s", exc, exc_info=logging.getLogger().isEnabledFor(logging.DEBUG)
        )
        return 1


# -- headend --------------------------------------------------------------
# ``edgegw headend run | import | keygen`` live in headend.cli (register_headend).


# -- demo -----------------------------------------------------------------


DEMO_MODULE = "testbed.demo"
DEMO_MISSING = (
    "edgegw demo: the demo is part of the test bench, which installed edge-gateway does not"
    " carry; run ./dev demo from a source checkout of edge-gateway"
)


def cmd_demo(args: argparse.Namespace) -> int:
    # The demo is test bench code (testbed/, not in the wheel, never imported by the
    # product): loaded by name where a source checkout has it.
    try:
        demo = importlib.import_module(DEMO_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name not in ("testbed", DEMO_MODULE):
            raise
        print(DEMO_MISSING, file=sys.stderr)
        return 2
    rc: int = demo.run_demo(args)
    return rc


# -- parser ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgegw", description="Prepaid metering edge gateway")
    p.add_argument("--version", action="version", version=f"edgegw {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run the gateway daemon")
    r.add_argument("--config", required=True, help="TOML configuration file")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    cc = csub.add_parser(
        "check",
        help="validate a configuration file and what it names on this machine",
        description="Report every problem of the file and of the files, devices and storage it"
        " names, in one pass. As root, files are checked as the service user "
        "'edgegw' when it exists (its sandbox included).",
    )
    cc.add_argument("file")
    cc.add_argument("--as-user", metavar="USER", help="check file access as USER (needs root)")
    cc.set_defaults(func=cmd_config_check)

    h = sub.add_parser("headend", help="the reference headend: run, import a USB backlog, keygen")
    register_headend(h.add_subparsers(dest="headend_command", required=True, metavar="ACTION"))

    d = sub.add_parser("demo", help="run a simulated transformer area end to end")
    d.add_argument("--duration", type=float, default=40.0, metavar="SECONDS")
    d.add_argument("--report", metavar="FILE.json")
    d.add_argument("--broker", type=_hostport, metavar="HOST:PORT", help="use this broker")
    d.add_argument("--meters", type=int, default=6, help="simulated Modbus TCP meters")
    d.add_argument("--dlt645-meters", type=int, default=4, help="simulated DL/T 645 meters (pty)")
    d.add_argument("--workdir", help="keep the demo's files here (default: a temp dir)")
    d.set_defaults(func=cmd_demo)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = getattr(args, "headend_command", None)
    _setup_logging(args.verbose, daemon=(args.command, sub) in DAEMON_COMMANDS)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())

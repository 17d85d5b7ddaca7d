"""``edgegw backlog export``: the sealed backlog onto a technician's USB stick.

    edgegw backlog export --config site.toml --to /media/usb/backlog \\
        [--keystore /var/lib/edgegw/keys] [--headend-public-key B64]

Exit codes: 0 success, 1 refused or failed (message on stderr), 2 usage.
The headend takes the export in with ``edgegw headend import``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from gateway.config import ConfigError, load_config
from gateway.storage_setup import DEFAULT_KEYSTORE, export_backlog_for_config
from provisioning.keys import KeystoreError
from store_forward.outbox import OutboxError
from store_forward.sealing import SealingError
from store_forward.sneakernet import SneakernetError
from store_forward.uplink_keys import UplinkKeyError


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def _export(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        return _err("; ".join(exc.problems))
    try:
        n = asyncio.run(
            export_backlog_for_config(
                cfg, args.to, keystore=args.keystore, headend_public_key=args.headend_public_key
            )
        )
    except (KeystoreError, UplinkKeyError, OutboxError, SneakernetError, SealingError, OSError) as exc:
        return _err(str(exc))
    print(f"{n} sealed batch(es) of gateway {cfg.gateway.id} written to {args.to}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``backlog export`` to an ``edgegw`` argument parser."""
    backlog = subparsers.add_parser("backlog", help="the gateway's buffered data")
    sub = backlog.add_subparsers(dest="backlog_command", required=True)
    p = sub.add_parser("export", help="write the sealed backlog to a directory (USB stick)")
    p.add_argument("--config", required=True, help="gateway TOML configuration")
    p.add_argument("--to", required=True, type=Path, help="target directory (created 0700)")
    p.add_argument(
        "--keystore",
        type=Path,
        help=f"keystore directory (default: security.keystore or {DEFAULT_KEYSTORE})",
    )
    p.add_argument("--headend-public-key", help="base64 X25519 key of the headend")
    p.set_defaults(func=_export)

"""``edgegw keys ...``: create and inspect a gateway keystore.

    edgegw keys init --dir /var/lib/edgegw/keys --gateway-id gw-0001
    edgegw keys show --dir /var/lib/edgegw/keys
    edgegw keys export-public --dir /var/lib/edgegw/keys [--out gw-0001.pub.json]

Exit codes: 0 success, 1 the keystore refused (exists, bad permissions,
malformed), 2 usage errors (argparse).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

from firmware_bridge.durable import write_atomic
from provisioning.keys import Keystore, KeystoreError


def _init(args: argparse.Namespace) -> int:
    try:
        ks = Keystore.init(args.dir, args.gateway_id)
    except KeystoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pub = ks.export_public()
    print(f"keystore created in {ks.path} for gateway {ks.gateway_id}")
    print(f"identity   {pub['identity_fingerprint']}")
    print(f"exchange   {pub['exchange_fingerprint']}")
    return 0


def _show(args: argparse.Namespace) -> int:
    try:
        ks = Keystore.open(args.dir)
    except KeystoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pub = ks.export_public()
    print(f"gateway    {ks.gateway_id}")
    print(f"directory  {ks.path}")
    print(f"identity   {pub['identity_fingerprint']}  ed25519 {pub['identity_ed25519']}")
    print(f"exchange   {pub['exchange_fingerprint']}  x25519  {pub['exchange_x25519']}")
    for purpose, version in sorted(ks.versions().items()):
        print(f"purpose    {purpose} v{version}")
    return 0


def _export(args: argparse.Namespace) -> int:
    try:
        ks = Keystore.open(args.dir)
    except KeystoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    data = orjson.dumps(ks.export_public(), option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)
    if args.out:
        write_atomic(Path(args.out), data + b"\n", mode=0o644)
    else:
        sys.stdout.write(data.decode() + "\n")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``keys init|show|export-public`` to an ``edgegw`` argument parser."""
    keys = subparsers.add_parser("keys", help="gateway keystore (identity and purpose keys)")
    sub = keys.add_subparsers(dest="keys_command", required=True)

    p = sub.add_parser("init", help="generate this gateway's keys (refuses to overwrite)")
    p.add_argument("--dir", required=True, type=Path, help="keystore directory (created 0700)")
    p.add_argument("--gateway-id", required=True, help="gateway id, as in the config file")
    p.set_defaults(func=_init)

    p = sub.add_parser("show", help="print gateway id, public keys, fingerprints, key versions")
    p.add_argument("--dir", required=True, type=Path)
    p.set_defaults(func=_show)

    p = sub.add_parser("export-public", help="JSON with the public keys for registration")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--out", type=Path, help="write to this file instead of standard output")
    p.set_defaults(func=_export)

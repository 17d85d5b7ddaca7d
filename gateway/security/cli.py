"""``edgegw audit ...`` and ``edgegw command ...``: offline security tools.

    edgegw audit verify --db /var/lib/edgegw/gateway.db [--keystore DIR | --public-key B64]
    edgegw command verify --file top-up.json --trust central_keys.json --gateway-id gw-0001

``audit verify`` exits 0 when the chain (and every signed checkpoint) is
intact, 1 when it names the first bad entry, 2 when the file cannot be read.
``command verify`` checks shape, signature, role and target of a signed
envelope (e.g. a top-up on a USB stick) without applying it or touching any
state: 0 authentic and addressed to this gateway, 1 refused (reason printed).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import sys
from pathlib import Path

import orjson

from gateway.security.audit import AuditError, verify
from gateway.security.envelope import MAX_ENVELOPE_BYTES, CommandResult, authenticate
from gateway.security.roles import TrustError, TrustStore


def _audit_verify(args: argparse.Namespace) -> int:
    public_key: bytes | None = None
    if args.public_key:
        try:
            public_key = base64.b64decode(args.public_key, validate=True)
        except binascii.Error:
            print("error: --public-key is not valid base64", file=sys.stderr)
            return 2
    elif args.keystore:
        from provisioning.keys import Keystore, KeystoreError

        try:
            public_key = Keystore.open(args.keystore).identity_public_bytes()
        except KeystoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        result = verify(args.db, public_key=public_key)
    except AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    if result.ok and public_key is None and result.checkpoints:
        print("note: checkpoint key not pinned (pass --keystore or --public-key)")
    return 0 if result.ok else 1


def _command_verify(args: argparse.Namespace) -> int:
    try:
        trust = TrustStore.load(args.trust)
    except TrustError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        raw = Path(args.file).read_bytes()[: MAX_ENVELOPE_BYTES + 1]
    except OSError as exc:
        print(f"error: {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    res = authenticate(raw.strip(), trust)
    if isinstance(res, CommandResult):
        print(f"REFUSED {res.reason}: {res.message}")
        return 1
    if res.target != args.gateway_id:
        print(f"REFUSED wrong_target: command is for {res.target!r}, not {args.gateway_id!r}")
        return 1
    print(
        f"AUTHENTIC {res.type} id={res.command_id} issuer={res.issuer} counter={res.counter} "
        f"issued_at={res.issued_at_ms} expires_at={res.expires_at_ms}"
    )
    print(orjson.dumps(dict(res.body), option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2).decode())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``audit verify`` and ``command verify`` to an ``edgegw`` argument parser."""
    audit = subparsers.add_parser("audit", help="tamper-evident audit log")
    sub = audit.add_subparsers(dest="audit_command", required=True)
    p = sub.add_parser("verify", help="check the hash chain and signed checkpoints")
    p.add_argument("--db", required=True, type=Path, help="the gateway database file")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--keystore", type=Path, help="pin checkpoints to this gateway's identity")
    key.add_argument("--public-key", help="pin checkpoints to this Ed25519 key (base64)")
    p.set_defaults(func=_audit_verify)

    command = subparsers.add_parser("command", help="signed command envelopes")
    csub = command.add_subparsers(dest="command_command", required=True)
    p = csub.add_parser("verify", help="check a signed envelope without applying it")
    p.add_argument("--file", required=True, type=Path)
    p.add_argument("--trust", required=True, type=Path, help="central keys (JSON trust store)")
    p.add_argument("--gateway-id", required=True)
    p.set_defaults(func=_command_verify)

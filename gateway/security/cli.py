"""``edgegw audit ...`` and ``edgegw command ...``: offline security tools.

    edgegw audit verify --db /var/lib/edgegw/gateway.db [--keystore DIR | --public-key B64]
        [--expect-head SEQ:HASH ...]
    edgegw command verify --file top-up.json --trust central_keys.json --gateway-id gw-0001
    edgegw command keygen --role billing --key-id billing-2026a --private-out billing.pem \
        --trust central_keys.json
    edgegw command sign --key billing.pem --issuer billing-2026a --target gw-0001 \
        --type topup --id pay-0001 --counter 17 --valid-for-s 86400 --body '{...}'

``audit verify`` exits 0 when the chain (and every signed checkpoint) is
intact, 1 when it names the first bad entry, 2 when the file cannot be read.
``command verify`` checks shape, signature, role and target of a signed
envelope (e.g. a top-up on a USB stick) without applying it or touching any
state: 0 authentic and addressed to this gateway, 1 refused (reason printed).

``command keygen`` and ``command sign`` are the central side, for test sites,
drills and the reference headend: the private role keys belong on central's
signing host (the ``key_management`` key offline), never on a gateway.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import sys
import time
from pathlib import Path

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware_bridge.durable import write_atomic
from gateway.security.audit import AuditError, verify
from gateway.security.envelope import (
    MAX_ENVELOPE_BYTES,
    CommandResult,
    EnvelopeError,
    authenticate,
    sign_command,
)
from gateway.security.roles import CentralKey, CommandType, Role, TrustError, TrustStore
from provisioning.keys import Keystore, KeystoreError, load_private


def _audit_verify(args: argparse.Namespace) -> int:
    public_key: bytes | None = None
    if args.public_key:
        try:
            public_key = base64.b64decode(args.public_key, validate=True)
        except binascii.Error:
            print("error: --public-key is not valid base64", file=sys.stderr)
            return 2
    elif args.keystore:
        try:
            public_key = Keystore.open(args.keystore).identity_public_bytes()
        except KeystoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    heads: list[tuple[int, bytes]] = []
    for text in args.expect_head or ():
        seq, sep, hexhash = text.partition(":")
        try:
            head = (int(seq), bytes.fromhex(hexhash))
        except ValueError:
            head = (0, b"")
        if not sep or head[0] < 1 or len(head[1]) != 32:
            print(f"error: --expect-head {text!r}: expected SEQ:HASH (64 hex digits)", file=sys.stderr)
            return 2
        heads.append(head)
    try:
        result = verify(args.db, public_key=public_key, expect_heads=heads)
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


def _command_keygen(args: argparse.Namespace) -> int:
    out = Path(args.private_out)
    if out.exists():
        print(f"error: {out} exists; refusing to overwrite a private key", file=sys.stderr)
        return 1
    trust_path = Path(args.trust)
    try:
        trust = TrustStore.load(trust_path) if trust_path.exists() else TrustStore()
        key = Ed25519PrivateKey.generate()
        pub = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        trust = trust.with_keys([CentralKey(args.key_id, Role(args.role), pub)])
    except TrustError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(out, pem, mode=0o600)
    doc = orjson.dumps(trust.to_dict(), option=orjson.OPT_INDENT_2) + b"\n"
    write_atomic(trust_path, doc, mode=0o644)
    print(f"{args.role} key {args.key_id}: private key in {out}, public key added to {trust_path}")
    return 0


def _command_sign(args: argparse.Namespace) -> int:
    try:
        key = load_private(Path(args.key), Ed25519PrivateKey)
    except KeystoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        body = orjson.loads(args.body)
    except orjson.JSONDecodeError as exc:
        print(f"error: --body is not valid JSON: {exc}", file=sys.stderr)
        return 1
    if not isinstance(body, dict):
        print("error: --body must be a JSON object", file=sys.stderr)
        return 1
    issued = args.issued_at_ms if args.issued_at_ms is not None else time.time_ns() // 1_000_000
    try:
        wire = sign_command(
            key,
            issuer=args.issuer,
            target=args.target,
            command_id=args.id,
            counter=args.counter,
            issued_at_ms=issued,
            expires_at_ms=issued + int(args.valid_for_s * 1000),
            type=CommandType(args.type),
            body=body,
        )
    except EnvelopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.out:
        Path(args.out).write_bytes(wire + b"\n")
    else:
        sys.stdout.write(wire.decode() + "\n")
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
    p.add_argument(
        "--expect-head",
        action="append",
        metavar="SEQ:HASH",
        help="a checkpoint central received (audit_checkpoint event): the log must contain it",
    )
    p.set_defaults(func=_audit_verify)

    command = subparsers.add_parser("command", help="signed command envelopes")
    csub = command.add_subparsers(dest="command_command", required=True)
    p = csub.add_parser("verify", help="check a signed envelope without applying it")
    p.add_argument("--file", required=True, type=Path)
    p.add_argument("--trust", required=True, type=Path, help="central keys (JSON trust store)")
    p.add_argument("--gateway-id", required=True)
    p.set_defaults(func=_command_verify)

    p = csub.add_parser("keygen", help="central: new role key, public part into a trust store")
    p.add_argument("--role", required=True, choices=[r.value for r in Role])
    p.add_argument("--key-id", required=True)
    p.add_argument("--private-out", required=True, type=Path, help="PEM, written 0600")
    p.add_argument("--trust", required=True, type=Path, help="trust store to create or extend")
    p.set_defaults(func=_command_keygen)

    p = csub.add_parser("sign", help="central: sign a command envelope")
    p.add_argument("--key", required=True, type=Path, help="role private key (PEM, 0600)")
    p.add_argument("--issuer", required=True, help="key id of --key")
    p.add_argument("--target", required=True, help="gateway id")
    p.add_argument("--type", required=True, choices=[t.value for t in CommandType])
    p.add_argument("--id", required=True, help="command id (stable across re-signing)")
    p.add_argument("--counter", required=True, type=int, help="next counter for this issuer")
    p.add_argument("--body", required=True, help="JSON object")
    p.add_argument("--valid-for-s", type=float, default=3600.0)
    p.add_argument("--issued-at-ms", type=int, help="default: now")
    p.add_argument("--out", type=Path, help="write here instead of standard output")
    p.set_defaults(func=_command_sign)

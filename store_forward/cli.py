"""``edgegw backlog export`` and the headend's ``import`` / ``keygen`` commands.

    edgegw backlog export --config site.toml --to /media/usb/backlog \\
        [--keystore /var/lib/edgegw/keys] [--headend-public-key B64]
    edgegw headend import DIR (--db central.db | --dsn DSN) --key headend.pem --registry DIR
    edgegw headend keygen --out headend.x25519.pem

Exit codes: 0 success, 1 refused or failed (message on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_KEYSTORE = Path("/var/lib/edgegw/keys")


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def storage_keys_for(cfg: Any, keystore_dir: Path | None) -> Any:
    """The outbox's master keys for a config: ``storage.key_file`` if set, else the
    keystore's ``storage`` purpose, else the key file beside the database."""
    from store_forward.storage_keys import StorageKeys

    key_file = getattr(cfg.storage, "key_file", None)
    if key_file:
        return StorageKeys.from_key_file(key_file)
    if keystore_dir is not None and (keystore_dir / "manifest.json").exists():
        from provisioning.keys import Keystore

        return StorageKeys.from_keystore(Keystore.open(keystore_dir))
    return StorageKeys.beside(cfg.storage.path)


async def export_backlog_for_config(
    cfg: Any, directory: Path, *, keystore: Path | None = None, headend_public_key: str | None = None
) -> int:
    """Open the gateway's outbox from its config and export the sealed backlog (for
    the USB carry-back, which runs outside the daemon). Returns batch files written.
    Raises KeystoreError, UplinkKeyError, OutboxError or SneakernetError."""
    from provisioning.keys import Keystore
    from store_forward.codec import SealedCodec
    from store_forward.outbox import Outbox
    from store_forward.sneakernet import SneakernetError, export_backlog
    from store_forward.uplink_keys import gateway_uplink_key, parse_public_key

    pub = headend_public_key or getattr(cfg.uplink, "headend_public_key", None)
    if not pub:
        raise SneakernetError("no headend public key (uplink.headend_public_key)")
    ks_dir = keystore or Path(getattr(cfg.gateway, "keystore", None) or DEFAULT_KEYSTORE)
    key = gateway_uplink_key(Keystore.open(ks_dir), parse_public_key(pub))
    codec = SealedCodec(key.key_id, key.key)
    ob = await Outbox.open(cfg.storage.path, keys=storage_keys_for(cfg, ks_dir))
    try:
        return await export_backlog(
            ob,
            directory,
            pack=lambda seq, recs, n: codec.pack(cfg.gateway.id, seq, recs, n),
            gateway_id=cfg.gateway.id,
            max_bytes=max(cfg.uplink.batch_max_bytes, 256 * 1024),
        )
    finally:
        await ob.close()


def _export(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError, load_config
    from provisioning.keys import KeystoreError
    from store_forward.outbox import OutboxError
    from store_forward.sealing import SealingError
    from store_forward.sneakernet import SneakernetError
    from store_forward.uplink_keys import UplinkKeyError

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


def _import(args: argparse.Namespace) -> int:
    from store_forward.headend import HeadendDB, HeadendStore
    from store_forward.sneakernet import SneakernetError, import_backlog
    from store_forward.uplink_keys import GatewayRegistry, UplinkKeyError, load_headend_key

    try:
        registry = GatewayRegistry.load(load_headend_key(args.key), args.registry)
    except UplinkKeyError as exc:
        return _err(str(exc))

    async def main() -> Any:
        db: HeadendStore
        if args.dsn:
            from store_forward.headend_pg import PostgresHeadendDB

            db = await PostgresHeadendDB.open(args.dsn)
        else:
            db = await HeadendDB.open(args.db)
        try:
            return await import_backlog(
                db, args.dir, key_lookup=registry.key_lookup, now_ms=time.time_ns() // 1_000_000
            )
        finally:
            await db.close()

    try:
        r = asyncio.run(main())
    except SneakernetError as exc:
        return _err(str(exc))
    print(f"{args.dir}: {r.stored} batch(es) stored ({r.records_new} records), {r.duplicate} already known")
    for line in r.refused:
        print(f"refused: {line}", file=sys.stderr)
    return 1 if r.refused else 0


def _keygen(args: argparse.Namespace) -> int:
    import base64

    from store_forward.uplink_keys import UplinkKeyError, generate_headend_key

    try:
        pub = generate_headend_key(args.out)
    except (UplinkKeyError, OSError) as exc:
        return _err(str(exc))
    print(f"headend key written to {args.out}")
    print(f"public key (uplink.headend_public_key): {base64.b64encode(pub).decode()}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``backlog export`` to an ``edgegw`` argument parser."""
    backlog = subparsers.add_parser("backlog", help="the gateway's buffered data")
    sub = backlog.add_subparsers(dest="backlog_command", required=True)
    p = sub.add_parser("export", help="write the sealed backlog to a directory (USB stick)")
    p.add_argument("--config", required=True, help="gateway TOML configuration")
    p.add_argument("--to", required=True, type=Path, help="target directory (created 0700)")
    p.add_argument("--keystore", type=Path, help=f"keystore directory (default: gateway.keystore or {DEFAULT_KEYSTORE})")
    p.add_argument("--headend-public-key", help="base64 X25519 key of the headend")
    p.set_defaults(func=_export)


def register_headend(headend_subparsers: argparse._SubParsersAction) -> None:
    """Add ``import`` and ``keygen`` under ``edgegw headend``."""
    p = headend_subparsers.add_parser("import", help="ingest a sneakernet backlog export")
    p.add_argument("dir", type=Path)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", help="SQLite database file")
    where.add_argument("--dsn", help="PostgreSQL connection string")
    p.add_argument("--key", required=True, type=Path, help="headend X25519 private key (PEM)")
    p.add_argument("--registry", required=True, type=Path, help="directory of enrolled gateways")
    p.set_defaults(func=_import)
    k = headend_subparsers.add_parser("keygen", help="create the headend's X25519 key")
    k.add_argument("--out", required=True, type=Path)
    k.set_defaults(func=_keygen)

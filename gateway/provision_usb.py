"""Step 2 of ``edgegw-usb@.service``: apply the bundles a stick brought, as the gateway.

``python -m gateway.provision_usb process`` runs as the service user in the
unit's sandbox between the privileged ``import`` and ``export`` steps of
:mod:`provisioning.usb`. It trusts the provisioning keys given with
``--pubkey`` and the provisioning-role keys of the central trust file, judges
every release by the gateway's configuration rules
(:data:`gateway.release_check.RULES`), and writes the carry-back.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from firmware_bridge.durable import fsync_dir
from gateway import __version__
from gateway.release_check import RULES
from gateway.security.roles import Role, TrustStore
from provisioning.apply import ApplyResult
from provisioning.bundle import DEFAULT_MAX_BUNDLE_BYTES, BundleError, VerifyKey
from provisioning.keyfiles import load_public_key
from provisioning.keys import Keystore
from provisioning.software_bundle import DEFAULT_MAX_BYTES as SOFTWARE_MAX_BYTES
from provisioning.software_bundle import SUFFIX as SOFTWARE_SUFFIX
from provisioning.software_bundle import open_bundle
from provisioning.usb import (
    AUDIT_SPOOL,
    audit_spool_writer,
    board_serial,
    gateway_identity,
    process_spool,
    run_step,
)


def _load_keystore(path: Path) -> Keystore | None:
    try:
        return Keystore.open(path)
    except Exception as exc:
        print(f"keystore {path}: {exc}", file=sys.stderr)
        return None


def software_queue(
    update_spool: Path, verify_key: VerifyKey, max_bytes: int
) -> Callable[[Path], Awaitable[ApplyResult]]:
    """Verify a software bundle from the stick and queue it for the updater
    (``<update spool>/ready/<sha256>.egws``, where edgegw-update.path starts it)."""

    async def queue(path: Path) -> ApplyResult:
        try:
            vs = await asyncio.to_thread(open_bundle, path, verify_key, max_bytes=max_bytes)
        except (BundleError, OSError) as exc:
            code = exc.code if isinstance(exc, BundleError) else "io-error"
            return ApplyResult("refused", code, str(exc), path.name)

        def move() -> None:
            ready = update_spool / "ready"
            ready.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = ready / f".{vs.digest}.tmp"
            shutil.copyfile(path, tmp)
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, ready / f"{vs.digest}{SOFTWARE_SUFFIX}")
            fsync_dir(ready)

        await asyncio.to_thread(move)
        m = vs.manifest
        return ApplyResult(
            "queued",
            "software-queued",
            f"software {m.version} (floor {m.min_version}) verified and queued for the updater",
            path.name,
            vs.digest,
            vs.size,
        )

    return queue


def cmd_process(args: argparse.Namespace) -> int:
    spool = Path(args.spool)
    state_dir = Path(args.state_dir)
    keys = [load_public_key(Path(p)) for p in args.pubkey]
    if args.trust_store and Path(args.trust_store).exists():
        keys += TrustStore.load(args.trust_store).public_keys_for(Role.PROVISIONING)
    keystore = _load_keystore(Path(args.keystore))
    identity = gateway_identity(state_dir, keystore, RULES.installed_identity)
    enrollment = (lambda: dict(keystore.export_public())) if keystore is not None else None
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    results = asyncio.run(
        process_spool(
            spool,
            state_dir=state_dir,
            verify_key=keys,
            identity=identity,
            check=RULES.check_release,
            audit=audit_spool_writer(state_dir / AUDIT_SPOOL),
            software_version=__version__,
            serial=args.serial or board_serial(),
            enrollment=enrollment,
            export_backlog=None,
            max_bytes=args.max_bytes,
            software=software_queue(Path(args.update_spool), keys, SOFTWARE_MAX_BYTES),
        )
    )
    for r in results:
        print(f"{r.source}: {r.outcome} ({r.code}): {r.reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gateway.provision_usb")
    sub = p.add_subparsers(dest="step", required=True)
    pr = sub.add_parser("process")
    pr.add_argument("--spool", required=True)
    pr.add_argument("--state-dir", required=True)
    pr.add_argument("--pubkey", action="append", default=[], help="provisioning key (PEM)")
    pr.add_argument(
        "--trust-store", help="central trust store; its provisioning-role keys are trusted too"
    )
    pr.add_argument("--keystore", default="/var/lib/edgegw/keys")
    pr.add_argument("--serial", help="board serial for the enrollment record")
    pr.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BUNDLE_BYTES)
    pr.add_argument(
        "--update-spool",
        default="/var/lib/edgegw/updates",
        help="software bundles (*.egws) go, verified, into its ready/ for the updater",
    )
    pr.set_defaults(func=cmd_process)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_step(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

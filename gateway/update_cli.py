"""``edgegw release …`` (central: build, verify, offer, publish software bundles) and
``edgegw update …`` (gateway: apply, recover, status), see docs/operations.md."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import aiomqtt

from gateway.commands.bodies import CommandRefused
from gateway.config import ConfigError, load_config
from gateway.security.roles import Role, TrustError, TrustStore
from gateway.update import (
    DEFAULT_REQUIRE,
    MILESTONES,
    UpdateError,
    Updater,
    UpdateSettings,
    restart_command,
)
from gateway.update_transfer import (
    check_digest,
    offer_for,
    parse_offer,
    publish_chunks,
    withdraw_chunks,
)
from provisioning.bundle import BundleError
from provisioning.keyfiles import KeyFileError, load_private_key, load_public_key
from provisioning.software_bundle import (
    DEFAULT_MAX_BYTES,
    PROJECT,
    PROJECT_WHEEL_PREFIX,
    match_wheelhouse,
    open_bundle,
    parse_lock,
    read_manifest_unverified,
    wheel_name_version,
    write_bundle,
)
from store_forward.settings import BrokerSettings
from store_forward.uplink import tls_context

DEFAULT_ROOT = "/opt/edgegw"
DEFAULT_SPOOL = "/var/lib/edgegw/updates"
DEFAULT_HEARTBEAT = "/run/edgegw/heartbeat.json"
DEFAULT_AUDIT_SPOOL = "/var/lib/edgegw/provisioning/audit-spool.jsonl"
DEFAULT_RESTART = "systemctl --no-block restart edgegw.service"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# -- release (central) ---------------------------------------------------------


def requirements_for(lock_text: str, wheelhouse: Path) -> tuple[bytes, list[Path], Path]:
    """The bundle's requirements file, its wheels and the project's wheel: every pin
    of the lock with a wheel of a locked hash, plus the project's wheel by hash."""
    pins = parse_lock(lock_text)
    files = {p.name: _sha256(p) for p in sorted(wheelhouse.glob("*.whl"))}
    project = [n for n in files if n.startswith(PROJECT_WHEEL_PREFIX)]
    if len(project) != 1:
        raise ValueError(
            f"{wheelhouse}: {len(project)} {PROJECT} wheels, need exactly one "
            "(build it with: pip wheel --no-deps --no-build-isolation -w DIR .)"
        )
    chosen = match_wheelhouse(pins, {n: h for n, h in files.items() if n not in project})
    _, version = wheel_name_version(project[0])
    text = lock_text.rstrip("\n") + (
        f"\n# the release itself\n{PROJECT}=={version} \\\n"
        f"    --hash=sha256:{files[project[0]]}\n"
    )
    return text.encode(), [wheelhouse / n for n in [*chosen, project[0]]], wheelhouse / project[0]


def cmd_release_build(args: argparse.Namespace) -> int:
    wheelhouse = Path(args.wheelhouse)
    try:
        key = load_private_key(Path(args.key))
        req, wheels, project = requirements_for(Path(args.lock).read_text(), wheelhouse)
        _, version = wheel_name_version(project.name)
        if not any(w.name.startswith("pip-") for w in wheels):
            raise ValueError("the lock pins no pip: the gateway installs with the bundle's pip")
        manifest = write_bundle(
            Path(args.out),
            version=version,
            min_version=args.min_version,
            requirements=req,
            wheels=wheels,
            key=key,
            python=args.python,
            machine=args.machine,
            bundle_id=args.bundle_id,
        )
    except (OSError, ValueError, KeyFileError, BundleError) as exc:
        print(f"release build: {exc}", file=sys.stderr)
        return 2
    print(
        f"{args.out}: {PROJECT} {manifest.version} (floor {manifest.min_version}) for Python "
        f"{manifest.python} on {manifest.machine}, {len(manifest.files) - 1} wheels, "
        f"sha256 {_sha256(Path(args.out))}"
    )
    return 0


def cmd_release_verify(args: argparse.Namespace) -> int:
    try:
        keys = [load_public_key(Path(p)) for p in args.pubkey]
        out = Path(args.extract) if args.extract else None
        vs = open_bundle(Path(args.bundle), keys, extract_to=out, max_bytes=args.max_bytes)
    except (OSError, KeyFileError, BundleError) as exc:
        code = exc.code if isinstance(exc, BundleError) else "io-error"
        print(f"{args.bundle}: refused ({code}): {exc}", file=sys.stderr)
        return 1
    m = vs.manifest
    print(
        f"{args.bundle}: ok — {PROJECT} {m.version} (floor {m.min_version}), Python {m.python} "
        f"on {m.machine}, {len(m.files)} files, sha256 {vs.digest}"
        + (f"; wheelhouse written to {out}" if out else "")
    )
    return 0


def cmd_release_inspect(args: argparse.Namespace) -> int:
    try:
        doc = read_manifest_unverified(Path(args.bundle), args.max_bytes)
    except (OSError, BundleError) as exc:
        print(f"{args.bundle}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"signature": "NOT CHECKED", "manifest": doc}, indent=2))
    return 0


def cmd_release_offer(args: argparse.Namespace) -> int:
    """The body of a ``software.offer`` for ``edgegw command sign --body``."""
    bundle = Path(args.bundle)
    try:
        version = read_manifest_unverified(bundle)["version"]
        offer = offer_for(bundle, version=str(version), chunk_size=args.chunk_size)
    except (OSError, BundleError, KeyError) as exc:
        print(f"{args.bundle}: {exc}", file=sys.stderr)
        return 1
    body: dict[str, Any] = offer.to_json()
    body["allow_downgrade"] = bool(args.allow_downgrade)
    try:
        parse_offer(body)  # never print an offer a gateway refuses
    except CommandRefused as exc:
        print(f"{args.bundle}: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(body, separators=(",", ":")))
    return 0


def _release_broker(args: argparse.Namespace) -> BrokerSettings:
    host, _, port = args.broker.rpartition(":")
    return BrokerSettings(
        host=host or "127.0.0.1",
        port=int(port),
        tls=bool(args.ca_file),
        ca_file=Path(args.ca_file) if args.ca_file else None,
        cert_file=Path(args.cert_file) if args.cert_file else None,
        key_file=Path(args.key_file) if args.key_file else None,
        topic_prefix=args.prefix,
    )


def _release_client(args: argparse.Namespace, broker: BrokerSettings) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=args.client_id,
        tls_context=tls_context(broker) if broker.tls else None,
    )


def cmd_release_publish(args: argparse.Namespace) -> int:
    bundle = Path(args.bundle)
    broker = _release_broker(args)

    async def run() -> int:
        version = read_manifest_unverified(bundle)["version"]
        offer = offer_for(bundle, version=str(version), chunk_size=args.chunk_size)
        async with _release_client(args, broker) as client:
            n = await publish_chunks(client, bundle, offer, broker.topic_prefix)
        print(f"{bundle}: {n} chunks of {offer.chunk_size} bytes published retained "
              f"under {broker.topic_prefix}/_software/{offer.sha256}/")  # fmt: skip
        return 0

    try:
        return asyncio.run(run())
    except (OSError, aiomqtt.MqttError, BundleError, KeyError) as exc:
        print(f"release publish: {exc}", file=sys.stderr)
        return 1


def cmd_release_withdraw(args: argparse.Namespace) -> int:
    """Clear a bundle's retained chunks from the broker (by its file or its digest)."""
    if (args.bundle is None) == (args.sha256 is None):
        print("release withdraw: give the bundle file or --sha256, not both", file=sys.stderr)
        return 2
    try:
        digest = check_digest(args.sha256) if args.bundle is None else _sha256(Path(args.bundle))
        broker = _release_broker(args)

        async def run() -> int:
            async with _release_client(args, broker) as client:
                return await withdraw_chunks(
                    client, broker.topic_prefix, digest, quiet_s=args.quiet, limit_s=args.limit
                )

        n = asyncio.run(run())
    except (OSError, ValueError, aiomqtt.MqttError) as exc:
        print(f"release withdraw: {exc}", file=sys.stderr)
        return 1
    where = f"{broker.topic_prefix}/_software/{digest}/"
    print(f"{n} retained chunks cleared under {where}" if n else f"no retained chunk under {where}")
    return 0


# -- update (gateway) ------------------------------------------------------------


def _require(text: str) -> frozenset[str]:
    names = frozenset(t.strip() for t in text.split(",") if t.strip())
    unknown = names - set(MILESTONES)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown milestone(s) {', '.join(sorted(unknown))} (known: {', '.join(MILESTONES)})"
        )
    return names


def _updater(args: argparse.Namespace) -> Updater:
    keys = [load_public_key(Path(p)) for p in args.pubkey]
    trust = None
    gateway_id = args.gateway_id
    trust_file = Path(args.trust_store) if args.trust_store else None
    if args.config and Path(args.config).exists():
        # the gateway's configuration names its id and central's trust file
        try:
            cfg = load_config(args.config)
        except ConfigError as exc:
            print(f"update: {args.config}: {len(exc.problems)} problem(s); no downgrade "
                  "permit can be checked", file=sys.stderr)  # fmt: skip
        else:
            gateway_id = gateway_id or cfg.gateway.id
            trust_file = trust_file or cfg.security.trust_file
    if trust_file is not None and trust_file.exists():
        trust = TrustStore.load(trust_file)
        keys += trust.public_keys_for(Role.PROVISIONING)
    settings = UpdateSettings(
        root=Path(args.root),
        heartbeat_file=Path(args.heartbeat_file),
        restart=restart_command(shlex.split(args.restart_command)),
        verify_key=keys,
        health_timeout_s=args.health_timeout,
        settle_s=args.settle,
        require=args.require,
        audit_spool=Path(args.audit_spool) if args.audit_spool else None,
        trust=trust,
        gateway_id=gateway_id,
        max_bytes=args.max_bytes,
    )
    if args.python:
        settings.python = args.python
    return Updater(settings)


def cmd_update_apply(args: argparse.Namespace) -> int:
    try:
        up = _updater(args)
        if args.bundle:
            results = [up.apply(Path(b)) for b in args.bundle]
        else:
            up.recover()
            results = up.apply_spool(Path(args.spool))
    except (UpdateError, KeyFileError, TrustError, OSError) as exc:
        print(f"update: {exc}", file=sys.stderr)
        return 2
    for r in results:
        print(f"{r.source}: {r.outcome} ({r.code}): {r.reason}")
    return 1 if any(r.outcome in ("refused", "rolled-back") for r in results) else 0


def cmd_update_recover(args: argparse.Namespace) -> int:
    try:
        result = _updater(args).recover(restart=not args.boot)
    except (UpdateError, KeyFileError, TrustError, OSError) as exc:
        print(f"update recover: {exc}", file=sys.stderr)
        return 2
    print("nothing to recover" if result is None else f"{result.outcome}: {result.reason}")
    return 0


def cmd_update_status(args: argparse.Namespace) -> int:
    root = Path(args.root)
    settings = UpdateSettings(
        root=root, heartbeat_file=Path(args.heartbeat_file), restart=lambda: None, verify_key=[]
    )
    st = Updater(settings).status()
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    print(f"running: {st['current']}  committed: {st['committed']}  floor: {st.get('floor')}")
    print(f"state: {st['phase']}  releases: {', '.join(st['releases']) or 'none'}")
    last = st.get("last")
    if isinstance(last, dict):
        print(f"last update: {last.get('outcome')} {last.get('from')} -> {last.get('to')}")
    return 0


def register(sub: Any) -> None:
    rel = sub.add_parser("release", help="central: build, verify, offer and publish software bundles")
    rsub = rel.add_subparsers(dest="release_command", required=True, metavar="ACTION")
    b = rsub.add_parser("build", help="sign a software bundle from a wheelhouse and the lock file")
    b.add_argument("--wheelhouse", required=True, help="the project's wheel and the locked wheels")
    b.add_argument("--lock", default="requirements.lock")
    b.add_argument("--key", required=True, help="provisioning role private key (PEM)")
    b.add_argument("--out", required=True)
    b.add_argument("--min-version", help="the version floor it sets (default: its own version)")
    b.add_argument("--python", default=f"{sys.version_info[0]}.{sys.version_info[1]}")
    b.add_argument("--machine", default=platform.machine())
    b.add_argument("--bundle-id")
    b.set_defaults(func=cmd_release_build)
    v = rsub.add_parser("verify", help="check a software bundle's signature and every file")
    v.add_argument("bundle")
    v.add_argument("--pubkey", action="append", required=True)
    v.add_argument("--extract", metavar="DIR", help="write the verified wheelhouse here")
    v.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    v.set_defaults(func=cmd_release_verify)
    i = rsub.add_parser("inspect", help="show the manifest (signature NOT checked)")
    i.add_argument("bundle")
    i.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    i.set_defaults(func=cmd_release_inspect)
    o = rsub.add_parser("offer", help="print the software.offer body for `edgegw command sign`")
    o.add_argument("bundle")
    o.add_argument("--chunk-size", type=int)
    o.add_argument("--allow-downgrade", action="store_true", help="below the gateway's floor")
    o.set_defaults(func=cmd_release_offer)
    def broker_options(x: argparse.ArgumentParser) -> None:
        x.add_argument("--broker", required=True, metavar="HOST:PORT")
        x.add_argument("--prefix", default="edgegw/v1")
        x.add_argument("--client-id", default="edgegw-release-publisher")
        x.add_argument("--ca-file")
        x.add_argument("--cert-file")
        x.add_argument("--key-file")

    p = rsub.add_parser("publish", help="publish a bundle's chunks retained on the broker")
    p.add_argument("bundle")
    p.add_argument("--chunk-size", type=int)
    broker_options(p)
    p.set_defaults(func=cmd_release_publish)
    w = rsub.add_parser(
        "withdraw", help="clear a bundle's retained chunks from the broker (once the fleet has it)"
    )
    w.add_argument("bundle", nargs="?", help="the bundle file (or give --sha256)")
    w.add_argument("--sha256", help="the bundle's SHA-256, as in its offer")
    w.add_argument("--quiet", type=float, default=2.0, help="seconds without a retained chunk that end the look")
    w.add_argument("--limit", type=float, default=60.0, help="seconds the look may take in all")
    broker_options(w)
    w.set_defaults(func=cmd_release_withdraw)

    up = sub.add_parser("update", help="gateway: install software bundles side by side, recover")
    usub = up.add_subparsers(dest="update_command", required=True, metavar="ACTION")

    def common(x: argparse.ArgumentParser) -> None:
        x.add_argument("--root", default=DEFAULT_ROOT, help="releases root")
        x.add_argument("--heartbeat-file", default=DEFAULT_HEARTBEAT, help="the daemon's heartbeat")
        x.add_argument("--pubkey", action="append", default=[], help="provisioning key (PEM)")
        x.add_argument(
            "--config",
            help="the gateway's configuration: its id and trust file (downgrade permits)",
        )
        x.add_argument("--trust-store", help="central trust store (default: the config's)")
        x.add_argument("--gateway-id", help="this gateway (default: the config's)")
        x.add_argument("--restart-command", default=DEFAULT_RESTART)
        x.add_argument("--health-timeout", type=float, default=300.0, metavar="SECONDS")
        x.add_argument("--settle", type=float, default=30.0, metavar="SECONDS")
        x.add_argument(
            "--require",
            type=_require,
            default=DEFAULT_REQUIRE,
            help=f"health milestones (default: {','.join(sorted(DEFAULT_REQUIRE))})",
        )
        x.add_argument("--audit-spool", default=DEFAULT_AUDIT_SPOOL)
        x.add_argument("--python", help="interpreter for new releases (default: this one's base)")
        x.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)

    a = usub.add_parser("apply", help="install bundles (default: those in the spool's ready/)")
    a.add_argument("bundle", nargs="*")
    a.add_argument("--spool", default=DEFAULT_SPOOL)
    common(a)
    a.set_defaults(func=cmd_update_apply)
    r = usub.add_parser("recover", help="finish or undo an interrupted switch (at every boot)")
    r.add_argument("--boot", action="store_true", help="at boot: the daemon is not running yet")
    common(r)
    r.set_defaults(func=cmd_update_recover)
    s = usub.add_parser("status", help="releases, the one running, the floor, the last update")
    s.add_argument("--root", default=DEFAULT_ROOT)
    s.add_argument("--heartbeat-file", default=DEFAULT_HEARTBEAT)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_update_status)

"""Technician and central-side commands: ``edgegw provision keygen|make|inspect|verify|apply|...``.

The commands that judge a configuration (``make``, ``verify``, ``apply``) use
the rules the application registers them with (:func:`register`; the gateway's
are wired in by ``gateway.provision_cli``).

Exit codes: 0 success (accepted, or already installed), 1 refused / invalid,
2 usage or environment problem.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import getpass
import hashlib
import json
import os
import re
import stat
import sys
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware_bridge.durable import append_durably, write_atomic, write_new
from firmware_bridge.errors import EdgeGwError, ErrorKind
from provisioning.apply import (
    ApplyError,
    apply_bundle,
    carry_over,
    current_release,
    previous_release,
    read_bundle_file,
    release_problems,
    rollback,
    write_carry_back,
)
from provisioning.bundle import (
    DEFAULT_MAX_BUNDLE_BYTES,
    BundleError,
    CarryBack,
    DeviceIdentity,
    Installed,
    Target,
    check_path,
    check_policy,
    encode_bundle,
    format_time,
    inspect_unverified,
    parse_time,
    verify_bundle,
)
from provisioning.keyfiles import load_private_key, load_public_key, public_key_fingerprint
from provisioning.rules import CONFIG_FILE, ConfigRules, ReleaseCheck

DEFAULT_VALID_DAYS = 14


class UsageError(EdgeGwError):
    """The command line asks for something that cannot be done."""

    kind = ErrorKind.INVALID


# ---------------------------------------------------------------------------
# Keys (plain PEM files, provisioning.keyfiles; the gateway's keystore plugs in
# through verify_key)


def cmd_keygen(args: argparse.Namespace) -> int:
    out = Path(args.out)
    pub = out.with_name(out.name + ".pub")
    for p in (out, pub):
        if p.exists() or p.is_symlink():
            raise UsageError(f"{p} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    write_new(
        out,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    write_new(
        pub,
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        0o644,
    )
    print(f"private key: {out} (keep offline; mode 0600)")
    print(f"public key:  {pub}  {public_key_fingerprint(key.public_key())}")
    return 0


# ---------------------------------------------------------------------------
# make


def collect_files(src: Path) -> dict[str, bytes]:
    """Read a bundle source tree; refuse links, special files and unacceptable names."""
    if not src.is_dir():
        raise UsageError(f"{src}: not a directory")
    files: dict[str, bytes] = {}
    problems: list[str] = []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(src).as_posix()
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                problems.append(f"{rel}: symbolic links are not allowed in a bundle")
            elif stat.S_ISDIR(st.st_mode):
                problem = check_path(rel)
                if problem:
                    problems.append(f"{rel}/: {problem}")
            elif not stat.S_ISREG(st.st_mode):
                problems.append(f"{rel}: not a regular file")
            else:
                problem = check_path(rel)
                if problem:
                    problems.append(f"{rel}: {problem}")
                else:
                    files[rel] = p.read_bytes()
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    if problems:
        raise UsageError("cannot bundle " + str(src) + ":\n  " + "\n  ".join(problems))
    if not files:
        raise UsageError(f"{src}: no files to bundle")
    return files


def _default_technician() -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", getpass.getuser() or "central")
    return name.lstrip("._-")[:64] or "central"


def _print_check(check: ReleaseCheck, refused: str) -> bool:
    """Print a release check; True when it refuses."""
    for note in check.notes:
        print(f"note: {note}", file=sys.stderr)
    if not check.problems:
        return False
    print(refused, file=sys.stderr)
    for line in check.problems:
        print(f"  {line}", file=sys.stderr)
    return True


def cmd_make(args: argparse.Namespace, rules: ConfigRules) -> int:
    src = Path(args.from_dir)
    files = collect_files(src)
    now = datetime.now(UTC)
    cfg_id = cfg_site = None
    if CONFIG_FILE in files:
        cfg_id, cfg_site = rules.declared_identity(src / CONFIG_FILE)
    if args.target:
        try:
            target = Target.parse(args.target)
        except ValueError as exc:
            raise UsageError(f"--target: {exc}") from exc
    elif cfg_id:
        target = Target("gateway", cfg_id)
    elif CONFIG_FILE not in files:
        raise UsageError(f"--target is required when {src} has no {CONFIG_FILE}")
    else:
        target = None
    # What apply will check on the gateway, checked now: a bundle apply would
    # refuse is never signed.
    if CONFIG_FILE in files:
        identity = _identity_of(target, cfg_id, cfg_site)
        check = release_problems(
            src,
            target or Target("gateway", "unknown"),
            identity,
            rules.check_release,
            now=now,
            carried_over_unknown=True,
        )
        if _print_check(check, "bundle would be refused by the gateway; not signing:"):
            return 1
    else:
        print(
            f"note: no {CONFIG_FILE} in {src}: the gateway keeps its configuration; apply checks it"
            " with this bundle's files",
            file=sys.stderr,
        )
    assert target is not None
    expires = parse_time(args.expires) if args.expires else now + timedelta(days=args.valid_days)
    version = args.version if args.version is not None else int(now.strftime("%Y%m%d%H%M%S"))
    key = load_private_key(Path(args.key))
    data = encode_bundle(
        bundle_id=args.bundle_id or uuid.uuid4().hex,
        version=version,
        target=target,
        created=now,
        expires=expires,
        technician=args.technician or _default_technician(),
        files=files,
        key=key,
        carry_back=CarryBack(backlog_export=args.backlog_export),
    )
    out = Path(args.out)
    write_atomic(out, data, 0o644, chmod=False)
    print(
        f"{out}: version {version}, target {target}, {len(files)} files, {len(data)} bytes, "
        f"expires {format_time(expires)}, sha256 {hashlib.sha256(data).hexdigest()}"
    )
    return 0


# ---------------------------------------------------------------------------
# inspect / verify


def cmd_inspect(args: argparse.Namespace) -> int:
    data = read_bundle_file(Path(args.file), args.max_bytes)
    info = inspect_unverified(data, args.max_bytes)
    print(
        "UNVERIFIED: the signature has not been checked (use 'provision verify')", file=sys.stderr
    )
    print(json.dumps(info, indent=2, sort_keys=True))
    return 0


def _identity_from(
    args: argparse.Namespace, state_dir: Path | None, rules: ConfigRules
) -> DeviceIdentity | None:
    gateway_id, site_id = args.gateway_id, args.site_id
    if state_dir is not None and (gateway_id is None or site_id is None):
        rel = current_release(state_dir)
        if rel is not None and rel.config_path.is_file():
            cfg = rules.installed_identity(rel.config_path)
            if cfg is not None:
                gateway_id = gateway_id or cfg.gateway_id
                site_id = site_id or cfg.site_id
    if gateway_id is None:
        return None
    return DeviceIdentity(gateway_id, site_id)


def _identity_of(target: Target | None, cfg_id: str | None, cfg_site: str | None) -> DeviceIdentity | None:
    """The gateway a bundle is for, as far as its target and configuration say."""
    if target is not None and target.kind == "gateway":
        return DeviceIdentity(target.id, cfg_site)
    if cfg_id:
        return DeviceIdentity(cfg_id, target.id if target is not None else cfg_site)
    return None


def cmd_verify(args: argparse.Namespace, rules: ConfigRules) -> int:
    keys = [load_public_key(Path(p)) for p in args.pubkey]
    data = read_bundle_file(Path(args.file), args.max_bytes)
    vb = verify_bundle(data, keys, max_bytes=args.max_bytes)
    m = vb.manifest
    print(
        f"OK: signature and {len(m.files)} file hashes verified; version {m.version}, "
        f"target {m.target}, technician {m.technician}, expires {format_time(m.expires)}"
    )
    state_dir = Path(args.state_dir) if args.state_dir else None
    identity = _identity_from(args, state_dir, rules)
    now = parse_time(args.now) if args.now else datetime.now(UTC)
    if identity is not None:
        installed = None
        if state_dir is not None and (rel := current_release(state_dir)) is not None:
            installed = Installed(rel.version, rel.digest)
        if not check_policy(m, vb.digest, identity, installed, now):
            print(f"OK: version {m.version} is already installed (apply changes nothing)")
            return 0
        print(f"OK: applicable to gateway {identity.gateway_id} at {format_time(now)}")
    # The release apply would build (the installed release's files under the
    # bundle's, with --state-dir), checked as apply checks it.
    with tempfile.TemporaryDirectory(prefix="edgegw-verify-") as tmp:
        files_dir = Path(tmp) / "files"
        files_dir.mkdir()
        current = current_release(state_dir) if state_dir is not None else None
        plan: dict[str, bytes | Path] = dict(carry_over(current.files_dir)) if current is not None else {}
        plan.update(vb.files)
        for rel_path, content in plan.items():
            dest = files_dir / rel_path
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(content if isinstance(content, bytes) else content.read_bytes())
        if not (files_dir / CONFIG_FILE).exists():
            print(f"note: no {CONFIG_FILE} in the bundle: apply checks the installed one", file=sys.stderr)
            return 0
        cfg_id, cfg_site = rules.declared_identity(files_dir / CONFIG_FILE)
        who = identity or _identity_of(m.target, cfg_id, cfg_site)
        check = release_problems(
            files_dir,
            m.target,
            who,
            rules.check_release,
            now=now,
            carried_over_unknown=state_dir is None,
        )
    if _print_check(check, "REFUSED (config): the gateway would refuse this bundle:"):
        return 1
    print(f"OK: {CONFIG_FILE} passes the checks apply runs")
    return 0


# ---------------------------------------------------------------------------
# apply / rollback / status


def cmd_apply(args: argparse.Namespace, rules: ConfigRules, software_version: str) -> int:
    state_dir = Path(args.state_dir)
    keys = [load_public_key(Path(p)) for p in args.pubkey]
    identity = _identity_from(args, state_dir, rules)
    if identity is None:
        raise UsageError("gateway identity unknown: pass --gateway-id (no configuration installed)")
    now = parse_time(args.now) if args.now else datetime.now(UTC)
    audit_log = Path(args.audit_log) if args.audit_log else None

    async def audit(kind: str, detail: dict[str, Any]) -> None:
        if audit_log is not None:
            line = json.dumps({"kind": kind, **detail}, sort_keys=True) + "\n"
            await asyncio.to_thread(append_durably, audit_log, line.encode())

    async def run() -> int:
        result = await apply_bundle(
            Path(args.file),
            root=state_dir,
            verify_key=keys,
            identity=identity,
            check=rules.check_release,
            now=now,
            audit=audit,
            max_bytes=args.max_bytes,
        )
        print(json.dumps(result.to_json(), indent=2, sort_keys=True))
        if args.carry_back:
            await write_carry_back(
                Path(args.carry_back),
                [result],
                identity=identity,
                software_version=software_version,
                now=now,
                technician_asked_backlog=False,
            )
        return 0 if result.ok else 1

    return asyncio.run(run())


def cmd_rollback(args: argparse.Namespace) -> int:
    rel = rollback(Path(args.state_dir))
    print(f"rolled back: version {rel.version} ({rel.name}) is current")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    root = Path(args.state_dir)
    out: dict[str, Any] = {}
    for label, rel in (("current", current_release(root)), ("previous", previous_release(root))):
        out[label] = (
            None
            if rel is None
            else {
                "version": rel.version,
                "release": rel.name,
                "bundle_sha256": rel.digest,
                "technician": rel.manifest.technician,
                "target": str(rel.manifest.target),
                "config": str(rel.config_path),
            }
        )
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


# ---------------------------------------------------------------------------
# Wiring


def _guard(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except BundleError as exc:
            print(f"REFUSED ({exc.code}): {exc}", file=sys.stderr)
            return 1
        except ApplyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def register(
    subparsers: argparse._SubParsersAction, *, rules: ConfigRules, software_version: str
) -> None:
    """Add ``provision`` and its subcommands to an argparse subparsers object.

    ``rules`` judge the configuration a bundle carries (make, verify, apply);
    ``software_version`` is reported in apply's carry-back.
    """
    p = subparsers.add_parser("provision", help="signed provisioning bundles (USB)")
    sub = p.add_subparsers(dest="provision_command", required=True)

    k = sub.add_parser("keygen", help="create a provisioning role key pair (central side)")
    k.add_argument("--out", required=True, help="private key file; the public key is OUT.pub")
    k.set_defaults(func=_guard(cmd_keygen))

    m = sub.add_parser("make", help="build and sign a bundle from a directory")
    m.add_argument("--from", dest="from_dir", required=True, metavar="DIR")
    m.add_argument("--key", required=True, help="provisioning role private key (PEM)")
    m.add_argument("--out", required=True, metavar="FILE")
    m.add_argument("--version", type=int, help="bundle version (default: UTC YYYYMMDDhhmmss)")
    m.add_argument("--target", help="gateway:ID, site:ID or ID (default: gateway.id of DIR)")
    m.add_argument("--expires", help="ISO-8601 time with offset, e.g. 2026-12-01T00:00:00Z")
    m.add_argument("--valid-days", type=int, default=DEFAULT_VALID_DAYS)
    m.add_argument("--technician", help="technician id (default: login name)")
    m.add_argument("--bundle-id", help="default: random")
    m.add_argument(
        "--backlog-export",
        action="store_true",
        help="ask the gateway to write its sealed backlog export to the stick",
    )
    m.set_defaults(func=_guard(functools.partial(cmd_make, rules=rules)))

    def size_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BUNDLE_BYTES)

    i = sub.add_parser("inspect", help="show a bundle's manifest (signature NOT checked)")
    i.add_argument("file")
    size_opt(i)
    i.set_defaults(func=_guard(cmd_inspect))

    v = sub.add_parser("verify", help="check a bundle's signature and file hashes")
    v.add_argument("file")
    v.add_argument("--pubkey", action="append", required=True, help="trusted key (PEM), repeatable")
    v.add_argument("--gateway-id", help="also check target and expiry for this gateway")
    v.add_argument("--site-id")
    v.add_argument("--now", help="time for the expiry check (default: now)")
    v.add_argument(
        "--state-dir",
        help="check against this gateway's installed release, as apply would (identity, version,"
        " files carried over)",
    )
    size_opt(v)
    v.set_defaults(func=_guard(functools.partial(cmd_verify, rules=rules)))

    a = sub.add_parser("apply", help="verify and apply a bundle to a state directory")
    a.add_argument("file")
    a.add_argument(
        "--state-dir", required=True, help="provisioning root, e.g. /var/lib/edgegw/provisioning"
    )
    a.add_argument("--pubkey", action="append", required=True, help="trusted key (PEM), repeatable")
    a.add_argument("--gateway-id", help="default: gateway.id of the installed configuration")
    a.add_argument("--site-id", help="default: gateway.site of the installed configuration")
    a.add_argument("--now", help="override the clock (ISO-8601 with offset)")
    a.add_argument("--audit-log", help="append one JSON line per attempt to this file")
    a.add_argument(
        "--carry-back", metavar="DIR", help="write result.json into DIR (must not exist)"
    )
    size_opt(a)
    a.set_defaults(
        func=_guard(
            functools.partial(cmd_apply, rules=rules, software_version=software_version)
        )
    )

    r = sub.add_parser("rollback", help="make the previous release current again")
    r.add_argument("--state-dir", required=True)
    r.set_defaults(func=_guard(cmd_rollback))

    s = sub.add_parser("status", help="show the current and previous releases")
    s.add_argument("--state-dir", required=True)
    s.set_defaults(func=_guard(cmd_status))


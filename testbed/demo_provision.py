"""Provision the demo site the way a technician provisions a real gateway.

Every step is the production code path; only the hardware is stood in for:

1. central side: ``edgegw provision keygen`` makes the provisioning role key
   pair (once; kept in ``<workdir>/central-provisioning/``), and
   ``edgegw provision make`` signs the site's configuration files into a bundle;
2. the bundle goes onto "the stick", a directory laid out like a real one
   (``<workdir>/usb-stick/edgegw/*.egwb``);
3. gateway side: the three steps of ``edgegw-usb@.service`` without the mount
   (``provisioning.usb``): copy the bundles off the stick into a spool, apply
   each (``provisioning.apply.apply_bundle``: signature, policy, atomic
   release) against the provisioning public key with this gateway's identity,
   and write the carry-back (``result.json``, ``enrollment.json``) back to the
   stick under ``edgegw/results/<gateway>-<UTC time>/``.

The daemon then runs from ``<state>/provisioning/current/files/gateway.toml``,
exactly as ``edgegw.service`` does on a gateway.

4. central side again: :func:`enroll_from_carry_back` takes the gateway's public
   keys from the carry-back's ``enrollment.json`` into the headend's gateway
   registry (one ``<gateway>.json`` per gateway, the document ``edgegw keys
   export-public`` prints), so the headend accepts that gateway's sealed batches.

Rules the files must follow (the gateway enforces them, this module does not
relax them): the configuration is named ``gateway.toml`` at the top of the
bundle; relative paths in it (trust file, account and tariff files) are
resolved inside the release, so those files must be in the bundle too; and
``storage.path`` must be an absolute path outside the release, because a new
release must not leave the database behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from firmware_bridge.durable import write_atomic
from firmware_bridge.errors import EdgeGwError
from gateway import __version__, provision_cli
from gateway.release_check import check_release
from headend.registry import parse_enrollment
from provisioning.apply import CONFIG_FILE, ApplyResult, current_release
from provisioning.bundle import SUFFIX, DeviceIdentity, Manifest
from provisioning.keyfiles import load_public_key, public_key_fingerprint
from provisioning.keys import Keystore
from provisioning.usb import (
    AUDIT_SPOOL,
    STICK_DIR,
    audit_spool_writer,
    copy_bundles_to_spool,
    copy_out,
    process_spool,
)
from store_forward.uplink_keys import UplinkKeyError

__all__ = [
    "DemoProvisionError",
    "ProvisionedSite",
    "enroll_from_carry_back",
    "keystore_dir",
    "provision_demo_site",
]

CENTRAL_DIR = "central-provisioning"
STICK = "usb-stick"
STATE_DIR = "gateway-state"
TECHNICIAN = "demo-technician"


class DemoProvisionError(EdgeGwError):
    """A step of the provisioning failed; the message says which and why."""


@dataclass(frozen=True)
class ProvisionedSite:
    """What the provisioning produced, for the daemon and for one line of output."""

    config_path: Path  # <state>/provisioning/current/files/gateway.toml (through `current`)
    state_dir: Path  # the provisioning root (releases/, current, previous)
    release: str  # the release in force, e.g. v00020261124001500-3fa9...
    outcome: str  # "accepted" (new release) or "noop" (already installed)
    bundle_id: str
    version: int
    bundle_sha256: str
    bundle_path: Path  # the bundle as it lies on the stick
    stick: Path  # the directory standing for the USB stick
    carry_back: Path  # <stick>/edgegw/results/<gateway>-<time>/ (result.json, enrollment.json)
    public_key: Path  # the provisioning role public key the gateway verified against
    fingerprint: str

    def line(self) -> str:
        """One line for the demo's output."""
        return (
            f"provisioned: bundle {self.bundle_id} version {self.version} "
            f"(sha256 {self.bundle_sha256[:16]}..., key {self.fingerprint}) {self.outcome} "
            f"as {self.release}; carry-back in {self.carry_back}; config {self.config_path}"
        )


def _edgegw(argv: list[str]) -> str:
    """Run ``edgegw provision ...`` in process; return its standard output, raise on failure."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = provision_cli.main(["provision", *argv])
    if rc != 0:
        raise DemoProvisionError(
            f"edgegw provision {argv[0]} failed (exit {rc}): {err.getvalue().strip()}"
        )
    return out.getvalue()


def _write_tree(root: Path, files: Mapping[str, bytes]) -> None:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(mode=0o700, parents=True)
    for rel, data in files.items():
        dest = root / rel
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        dest.write_bytes(data)


def _next_version(root: Path, now: datetime) -> int:
    """``edgegw provision make``'s default (UTC YYYYMMDDhhmmss), kept above what is installed."""
    version = int(now.strftime("%Y%m%d%H%M%S"))
    installed = current_release(root) if root.exists() else None
    if installed is not None and installed.version >= version:
        version = installed.version + 1
    return version


def keystore_dir(workdir: Path) -> Path:
    """Where :func:`provision_demo_site` keeps the gateway's keystore (absolute, outside
    every release: the configuration's ``[security] keystore`` may name it before the
    first provisioning creates it)."""
    return Path(workdir).absolute() / STATE_DIR / "keys"


def enroll_from_carry_back(site: ProvisionedSite, registry: Path) -> Path:
    """Central's side of the carry-back: enrol the gateway in the headend's registry.

    Reads ``enrollment.json`` from the stick's carry-back directory and writes its
    ``public_keys`` (what ``edgegw keys export-public`` prints; no secret) as
    ``<registry>/<gateway>.json``, replacing an older entry of that gateway.
    Returns the path written. Raises :class:`DemoProvisionError` if the
    carry-back has no usable enrollment.
    """
    source = site.carry_back / "enrollment.json"
    try:
        doc = json.loads(source.read_bytes())
        keys = doc["public_keys"]
        enrollment = parse_enrollment(keys, str(source))
    except (OSError, ValueError, KeyError, TypeError, UplinkKeyError) as exc:
        raise DemoProvisionError(f"{source}: no usable enrollment: {exc}") from exc
    if enrollment.gateway_id != doc.get("gateway_id"):
        raise DemoProvisionError(
            f"{source}: public keys of {enrollment.gateway_id!r} in the enrollment of "
            f"{doc.get('gateway_id')!r}"
        )
    registry.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = registry / f"{enrollment.gateway_id}.json"
    write_atomic(path, json.dumps(keys, indent=2, sort_keys=True).encode() + b"\n", mode=0o644)
    return path


def _gateway_keystore(path: Path, gateway_id: str) -> Keystore:
    """This gateway's own keys (made once, on first provisioning); they are enrolled."""
    ks = Keystore.open(path) if path.exists() else Keystore.init(path, gateway_id)
    if ks.gateway_id != gateway_id:
        raise DemoProvisionError(
            f"{path}: keystore belongs to gateway {ks.gateway_id!r}, not {gateway_id!r}"
        )
    return ks


def _ours(results: list[ApplyResult], bundle_name: str) -> ApplyResult:
    for r in results:
        if r.source.endswith(bundle_name):
            return r
    raise DemoProvisionError(f"the gateway reported no result for {bundle_name}")


async def provision_demo_site(
    workdir: Path, files: Mapping[str, bytes], *, gateway_id: str
) -> ProvisionedSite:
    """Sign ``files`` into a bundle, carry it to a gateway state directory, apply it.

    ``files`` maps bundle paths to contents and must hold ``gateway.toml``
    (whose ``gateway.id`` is ``gateway_id``). Everything is written under
    ``workdir``: ``central-provisioning/`` (role key, bundle source),
    ``usb-stick/`` and ``gateway-state/`` (``provisioning/`` and ``keys/``).
    A state directory left by an earlier run is upgraded (the new bundle gets
    a higher version). Raises :class:`DemoProvisionError` if any step fails or
    the gateway refuses the bundle; prints nothing.
    """
    if CONFIG_FILE not in files:
        raise DemoProvisionError(
            f"the bundle must carry the configuration as {CONFIG_FILE!r} "
            f"(got {', '.join(sorted(files)) or 'no files'})"
        )
    workdir = Path(workdir)
    central = workdir / CENTRAL_DIR
    stick = workdir / STICK
    state = workdir / STATE_DIR
    root = state / "provisioning"
    key, pub = central / "provisioning.key", central / "provisioning.key.pub"

    # -- central: role key (once) and the signed bundle ---------------------------
    central.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not key.exists():
        _edgegw(["keygen", "--out", str(key)])
    public_key = load_public_key(pub)
    now = datetime.now(UTC)
    version = _next_version(root, now)
    bundle_id = f"{gateway_id}-v{version}"
    src = central / "bundle-src"
    await asyncio.to_thread(_write_tree, src, files)
    on_stick = stick / STICK_DIR
    on_stick.mkdir(parents=True, exist_ok=True)
    for old in on_stick.glob(f"*{SUFFIX}"):  # the technician carries only the new bundle
        old.unlink()
    bundle = on_stick / f"{bundle_id}{SUFFIX}"
    made = central / bundle.name
    _edgegw(
        [
            "make",
            "--from", str(src),
            "--key", str(key),
            "--out", str(made),
            "--version", str(version),
            "--target", f"gateway:{gateway_id}",
            "--technician", TECHNICIAN,
            "--bundle-id", bundle_id,
        ]
    )  # fmt: skip
    await asyncio.to_thread(shutil.copyfile, made, bundle)  # onto the stick

    # -- gateway: edgegw-usb@.service's import, process and export steps -----------
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    keystore = await asyncio.to_thread(_gateway_keystore, keystore_dir(workdir), gateway_id)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    spool = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="usb-spool-", dir=state))
    try:
        await asyncio.to_thread(copy_bundles_to_spool, stick, spool)
        results = await process_spool(
            spool,
            state_dir=root,
            verify_key=[public_key],
            identity=DeviceIdentity(gateway_id),
            check=check_release,
            audit=audit_spool_writer(root / AUDIT_SPOOL),
            software_version=__version__,
            enrollment=keystore.export_public,
        )
        carry_back = await asyncio.to_thread(
            copy_out, spool / "out", stick, gateway_id, datetime.now(UTC)
        )
    finally:
        await asyncio.to_thread(shutil.rmtree, spool, True)

    result = _ours(results, bundle.name)
    if not result.ok:
        raise DemoProvisionError(
            f"gateway {gateway_id} refused {bundle.name} ({result.code}): {result.reason}"
        )
    release = current_release(root)
    if release is None or release.version != version:
        raise DemoProvisionError(f"{root}: version {version} is not the current release")
    manifest: Manifest = release.manifest
    return ProvisionedSite(
        config_path=root / "current" / "files" / CONFIG_FILE,
        state_dir=root,
        release=release.name,
        outcome=result.outcome,
        bundle_id=manifest.bundle_id,
        version=manifest.version,
        bundle_sha256=release.digest,
        bundle_path=bundle,
        stick=stick,
        carry_back=carry_back,
        public_key=pub,
        fingerprint=public_key_fingerprint(public_key),
    )

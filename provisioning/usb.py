"""The USB provisioning flow run by ``edgegw-usb@.service``.

Three steps: ``import`` and ``export`` are subcommands of ``python -m
provisioning.usb`` (the privileged steps load no code above this package);
``process`` is ``python -m gateway.provision_usb process``, which hands
:func:`process_spool` the gateway's configuration rules, trust file and keys.

``import``  (root, in a private mount namespace made by ``unshare``)
    mount the stick read-only with ``nosuid,nodev,noexec``; copy at most
    MAX_BUNDLES regular ``edgegw/*.egwb`` files of at most the size cap into
    ``<spool>/in/``; note whether the technician asked for the backlog
    (a file ``edgegw/export-backlog`` on the stick); unmount; hand the spool
    to the service user.
``process`` (user edgegw, sandboxed, no network)
    apply each bundle (verification, policy, atomic install: provisioning.apply),
    append one audit record per attempt to the audit spool, and write the
    carry-back (result, enrollment, backlog export when asked) into ``<spool>/out/``.
``export``  (root, private mount namespace; runs even when ``process`` failed)
    when ``<spool>/out/`` holds anything: mount the stick read-write with
    ``nosuid,nodev,noexec``, copy it into a new directory
    ``edgegw/results/<gateway>-<UTC time>/``, sync, unmount; then restart the
    gateway service if a bundle was accepted (it picks up the new ``current``).

Only FAT and exFAT sticks are handled: they carry no ownership, symlinks or
device nodes, and keeping the set of file-system drivers that parse an
untrusted stick small reduces the kernel's exposure.

The audit spool (``<state>/provisioning/audit-spool.jsonl``) exists because the
daemon is the only writer of the hash-chained audit log; it imports the spool
with :func:`drain_audit_spool` at start and periodically.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import stat
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from firmware_bridge.durable import append_durably, write_all, write_atomic, write_new
from firmware_bridge.errors import EdgeGwError
from firmware_bridge.identifiers import is_name
from provisioning.apply import (
    ApplyResult,
    ExportFn,
    apply_bundle,
    current_release,
    read_bundle_file,
    write_carry_back,
)
from provisioning.bundle import (
    DEFAULT_MAX_BUNDLE_BYTES,
    SUFFIX,
    BundleError,
    DeviceIdentity,
    VerifyKey,
)
from provisioning.rules import ConfigIdentity, ReleaseChecker
from provisioning.software_bundle import DEFAULT_MAX_BYTES as SOFTWARE_MAX_BYTES
from provisioning.software_bundle import SUFFIX as SOFTWARE_SUFFIX

STICK_DIR = "edgegw"
BACKLOG_MARKER = "export-backlog"
RESULTS_DIR = "results"
MAX_BUNDLES = 16
ALLOWED_FS = ("vfat", "exfat")
MOUNT_OPTS_RO = "ro,nosuid,nodev,noexec,noatime"
MOUNT_OPTS_RW = "rw,nosuid,nodev,noexec,noatime,sync"
AUDIT_SPOOL = "audit-spool.jsonl"


class UsbError(EdgeGwError):
    """A step of the USB unit cannot be carried out."""


# ---------------------------------------------------------------------------
# Step 1: import (privileged)


def select_bundles(stick_root: Path, limit: int = MAX_BUNDLES) -> list[Path]:
    """Candidate bundle files on a mounted stick, in name order (not yet trusted)."""
    d = stick_root / STICK_DIR
    if not d.is_dir() or d.is_symlink():
        return []
    found = sorted(
        (p for p in d.iterdir() if p.name.lower().endswith((SUFFIX, SOFTWARE_SUFFIX))),
        key=lambda p: p.name,
    )
    return found[:limit]


def _open_dir(path: Path | str, dir_fd: int | None = None) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def copy_regular(src: Path, name: str, dir_fd: int, max_bytes: int) -> None:
    """Copy a regular file (never through a link, never blocking on a FIFO) of at
    most ``max_bytes`` into a new file ``name`` in ``dir_fd``, fsynced."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise BundleError(f"{src.name}: cannot open: {exc.strerror}", code="unreadable") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BundleError(f"{src.name}: not a regular file", code="not-regular")
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                      dir_fd=dir_fd)  # fmt: skip
        try:
            total = 0
            while chunk := os.read(fd, 1 << 20):
                total += len(chunk)
                if total > max_bytes:
                    os.unlink(name, dir_fd=dir_fd)
                    raise BundleError(
                        f"{src.name}: larger than the limit of {max_bytes} bytes", code="oversized"
                    )
                write_all(out, chunk)
            os.fsync(out)
        finally:
            os.close(out)
    finally:
        os.close(fd)


def copy_bundles_to_spool(
    stick_root: Path,
    spool: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
    software_max_bytes: int = SOFTWARE_MAX_BYTES,
) -> dict[str, Any]:
    """Copy candidate bundles off a mounted stick; return the request description.

    Runs privileged and writes into a spool the service user owns, so every
    write goes through directory file descriptors with O_NOFOLLOW|O_EXCL, and
    ``in/`` must not exist yet.
    """
    spool_fd = _open_dir(spool)
    try:
        os.mkdir("in", 0o700, dir_fd=spool_fd)
        in_fd = _open_dir("in", spool_fd)
        copied: list[str] = []
        skipped: list[dict[str, str]] = []
        try:
            for i, src in enumerate(select_bundles(stick_root)):
                name = f"{i:02d}-{src.name}"
                try:
                    if src.name.lower().endswith(SOFTWARE_SUFFIX):
                        # a software bundle: streamed, never held in memory
                        copy_regular(src, name, in_fd, software_max_bytes)
                    else:
                        write_new(name, read_bundle_file(src, max_bytes), dir_fd=in_fd)
                except BundleError as exc:
                    skipped.append({"file": src.name, "code": exc.code, "reason": str(exc)})
                    continue
                copied.append(name)
        finally:
            os.close(in_fd)
        marker = stick_root / STICK_DIR / BACKLOG_MARKER
        request = {
            "bundles": copied,
            "skipped": skipped,
            "technician_asked_backlog": marker.is_file() and not marker.is_symlink(),
        }
        write_new("request.json", json.dumps(request, indent=2).encode(), dir_fd=spool_fd)
    finally:
        os.close(spool_fd)
    return request


def _run(cmd: Sequence[str]) -> None:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, check=False)
    if r.returncode != 0:
        raise UsbError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")


def detect_fs(device: str) -> str:
    r = subprocess.run(
        ["blkid", "-o", "value", "-s", "TYPE", device],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    fs = r.stdout.strip()
    if fs not in ALLOWED_FS:
        raise UsbError(f"{device}: file system {fs or 'unknown'!r} not accepted (only FAT/exFAT)")
    return fs


@contextlib.contextmanager
def mounted(device: str, options: str) -> Iterator[Path]:
    """Mount ``device`` on a fresh root-only directory (call inside a private mount namespace)."""
    fs = detect_fs(device)
    mountpoint = Path(tempfile.mkdtemp(prefix="edgegw-usb-", dir="/run"))
    try:
        _run(["mount", "-t", fs, "-o", options, device, str(mountpoint)])
        try:
            yield mountpoint
        finally:
            with contextlib.suppress(UsbError):
                _run(["umount", str(mountpoint)])
    finally:
        with contextlib.suppress(OSError):
            mountpoint.rmdir()


def _chown_tree(root: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames]:
            os.chown(Path(dirpath) / n, pw.pw_uid, pw.pw_gid, follow_symlinks=False)
    os.chown(root, pw.pw_uid, pw.pw_gid)


def cmd_import(args: argparse.Namespace) -> int:
    spool = Path(args.spool)
    with mounted(args.device, MOUNT_OPTS_RO) as mnt:
        req = copy_bundles_to_spool(mnt, spool, max_bytes=args.max_bytes)
    if args.owner:
        _chown_tree(spool, args.owner)
    print(
        f"{args.device}: {len(req['bundles'])} bundle(s) copied, {len(req['skipped'])} skipped; "
        f"backlog asked by technician: {req['technician_asked_backlog']}"
    )
    for s in req["skipped"]:
        print(f"  skipped {s['file']}: {s['reason']}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------
# Step 2: process (service user; the command is gateway.provision_usb)


def audit_spool_writer(path: Path) -> Callable[[str, dict[str, Any]], Awaitable[None]]:
    """An ``audit`` callable appending fsynced JSON lines for the daemon to import."""

    async def audit(kind: str, detail: dict[str, Any]) -> None:
        line = json.dumps({"kind": kind, "detail": detail}, sort_keys=True).encode() + b"\n"
        await asyncio.to_thread(append_durably, path, line)

    return audit


async def drain_audit_spool(
    path: Path, audit: Callable[[str, dict[str, Any]], Awaitable[None]]
) -> int:
    """Feed spooled records to the real audit log, then remove the spool.

    Each record is passed once per call; the spool is renamed before reading
    so records appended meanwhile go to a fresh file. If ``audit`` raises, the
    records not yet passed stay in ``<spool>.draining`` and are retried first
    on the next call (a record may then be passed twice; audit records carry
    the bundle digest and time, so a duplicate is recognisable).
    """
    draining = path.with_name(path.name + ".draining")
    if not await asyncio.to_thread(draining.exists):
        try:
            await asyncio.to_thread(os.rename, path, draining)
        except FileNotFoundError:
            return 0
    lines = (await asyncio.to_thread(draining.read_bytes)).splitlines()
    n = 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            kind, detail = str(rec["kind"]), dict(rec["detail"])
        except (ValueError, KeyError, TypeError):
            kind, detail = (
                "provisioning.audit-spool-corrupt",
                {"line": line.decode(errors="replace")},
            )
        try:
            await audit(kind, detail)
        except BaseException:
            rest = b"\n".join(lines[i:]) + b"\n"
            await asyncio.to_thread(write_atomic, draining, rest)
            raise
        n += 1
    await asyncio.to_thread(draining.unlink)
    return n


def gateway_identity(
    state_dir: Path,
    keystore: Any | None,
    installed_identity: Callable[[Path], ConfigIdentity | None],
) -> DeviceIdentity | None:
    """This gateway's id (keystore first, else installed config) and site (installed
    config, as ``installed_identity`` reads a configuration that loads)."""
    gateway_id = getattr(keystore, "gateway_id", None) if keystore is not None else None
    site_id = None
    with contextlib.suppress(Exception):
        rel = current_release(state_dir)
        if rel is not None and rel.config_path.is_file():
            cfg = installed_identity(rel.config_path)
            if cfg is not None:
                gateway_id = gateway_id or cfg.gateway_id
                site_id = cfg.site_id
    return None if gateway_id is None else DeviceIdentity(gateway_id, site_id)


async def process_spool(
    spool: Path,
    *,
    state_dir: Path,
    verify_key: VerifyKey,
    identity: DeviceIdentity | None,
    check: ReleaseChecker,
    audit: Callable[[str, dict[str, Any]], Awaitable[None]] | None,
    software_version: str,
    serial: str | None = None,
    enrollment: Callable[[], dict[str, Any]] | None = None,
    export_backlog: ExportFn | None = None,
    now: datetime | None = None,
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
    software: Callable[[Path], Awaitable[ApplyResult]] | None = None,
) -> list[ApplyResult]:
    """Apply every bundle in ``<spool>/in`` (``check``: the application's release
    check) and write ``<spool>/out``. Returns the results. A software bundle
    (``*.egws``) goes to ``software`` (the application queues it for its
    updater); without one it is refused."""
    req_path = spool / "request.json"
    request = json.loads(await asyncio.to_thread(req_path.read_text))
    at = now or datetime.now(UTC)
    results: list[ApplyResult] = []
    if identity is None:
        for name in request["bundles"]:
            results.append(
                ApplyResult(
                    "refused",
                    "no-identity",
                    "gateway identity unknown: no keystore and no configuration installed",
                    name,
                    at=at,
                )
            )
            if audit is not None:
                await audit("provisioning.apply", results[-1].to_json())
        identity = DeviceIdentity("unknown")
    else:
        for name in request["bundles"]:
            if name.lower().endswith(SOFTWARE_SUFFIX):
                if software is not None:
                    results.append(await software(spool / "in" / name))
                else:
                    refused = "software bundles are not taken here"
                    results.append(ApplyResult("refused", "no-updater", refused, name, at=at))
                if audit is not None:
                    await audit("provisioning.software", results[-1].to_json())
                continue
            results.append(
                await apply_bundle(
                    spool / "in" / name,
                    root=state_dir,
                    verify_key=verify_key,
                    identity=identity,
                    check=check,
                    now=at,
                    audit=audit,
                    max_bytes=max_bytes,
                )
            )
    for s in request.get("skipped", []):
        r = ApplyResult("refused", s["code"], s["reason"], s["file"], at=at)
        results.append(r)
        if audit is not None:
            await audit("provisioning.apply", r.to_json())
    await write_carry_back(
        spool / "out",
        results,
        identity=identity,
        software_version=software_version,
        serial=serial,
        enrollment=enrollment,
        export_backlog=export_backlog,
        technician_asked_backlog=bool(request.get("technician_asked_backlog")),
        now=at,
    )
    return results


def board_serial() -> str | None:
    """The board's serial number from the device tree (Raspberry Pi and most ARM boards)."""
    for p in (
        Path("/sys/firmware/devicetree/base/serial-number"),
        Path("/proc/device-tree/serial-number"),
    ):
        with contextlib.suppress(OSError):
            text = p.read_bytes().rstrip(b"\0\n").decode("ascii", errors="replace").strip()
            if text:
                return text
    return None


# ---------------------------------------------------------------------------
# Step 3: export (privileged)


MAX_CARRY_BACK_DEPTH = 4


def _read_regular(dir_fd: int, name: str, limit: int | None = None) -> bytes | None:
    """Read a regular file in an open directory without following links; None otherwise."""
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks = []
        total = 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if limit is not None and total > limit:
                return None
        return b"".join(chunks)
    finally:
        os.close(fd)


def _copy_dir_fd(src_fd: int, dest: Path, depth: int) -> None:
    with os.scandir(src_fd) as it:
        names = sorted(e.name for e in it)
    for name in names:
        st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode) and depth < MAX_CARRY_BACK_DEPTH:
            sub = _open_dir(name, src_fd)
            try:
                (dest / name).mkdir()
                _copy_dir_fd(sub, dest / name, depth + 1)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            data = _read_regular(src_fd, name)
            if data is None:
                continue
            write_new(dest / name, data, 0o666)  # the stick's own modes (umask)


def copy_out(spool_out: Path, stick_root: Path, gateway_id: str, now: datetime) -> Path:
    """Copy the carry-back into a new directory on the stick; never overwrite anything.

    Runs privileged over a directory the service user wrote: the tree is read
    through directory file descriptors, links and special files are skipped.
    """
    base = stick_root / STICK_DIR / RESULTS_DIR
    base.mkdir(parents=True, exist_ok=True)
    stem = f"{gateway_id}-{now.strftime('%Y%m%dT%H%M%SZ')}"
    dest = base / stem
    n = 0
    while True:
        try:
            dest.mkdir()
            break
        except FileExistsError:
            n += 1
            dest = base / f"{stem}.{n}"
    src_fd = _open_dir(spool_out)
    try:
        _copy_dir_fd(src_fd, dest, 0)
    finally:
        os.close(src_fd)
    os.sync()
    return dest


def _accepted(spool_out: Path) -> tuple[str, bool]:
    try:
        fd = _open_dir(spool_out)
    except OSError:
        return "unknown", False
    try:
        raw = _read_regular(fd, "result.json", limit=1 << 20)
    finally:
        os.close(fd)
    try:
        doc = json.loads(raw or b"")
    except ValueError:
        return "unknown", False
    gateway_id = str(doc.get("gateway_id", "unknown"))
    if not is_name(gateway_id):
        gateway_id = "unknown"
    return gateway_id, any(r.get("outcome") == "accepted" for r in doc.get("results", []))


def cmd_export(args: argparse.Namespace) -> int:
    spool = Path(args.spool)
    out = spool / "out"
    if out.is_symlink() or not out.is_dir() or not any(out.iterdir()):
        print("nothing to carry back")
        return 0
    gateway_id, accepted = _accepted(out)
    rc = 0
    try:
        with mounted(args.device, MOUNT_OPTS_RW) as mnt:
            dest = copy_out(out, mnt, gateway_id, datetime.now(UTC))
            print(f"carry-back written to {STICK_DIR}/{RESULTS_DIR}/{dest.name}")
    except (UsbError, OSError) as exc:
        print(f"carry-back not written (stick read-only or removed?): {exc}", file=sys.stderr)
        rc = 1
    if accepted and args.restart_unit:
        # A new release is current: start (first provisioning) or restart the gateway.
        with contextlib.suppress(UsbError, OSError, subprocess.SubprocessError):
            _run(["systemctl", "--no-block", "restart", args.restart_unit])
    return rc


# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The privileged steps; ``process`` is ``python -m gateway.provision_usb``."""
    p = argparse.ArgumentParser(prog="python -m provisioning.usb")
    sub = p.add_subparsers(dest="step", required=True)
    i = sub.add_parser("import")
    i.add_argument("--device", required=True)
    i.add_argument("--spool", required=True)
    i.add_argument("--owner", help="hand the spool to this user afterwards")
    i.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BUNDLE_BYTES)
    i.set_defaults(func=cmd_import)
    e = sub.add_parser("export")
    e.add_argument("--device", required=True)
    e.add_argument("--spool", required=True)
    e.add_argument("--restart-unit")
    e.set_defaults(func=cmd_export)
    return p


def run_step(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Run the step ``argv`` names; a :class:`UsbError` is one line on stderr and exit 1."""
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsbError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    return run_step(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

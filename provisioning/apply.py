"""Verify a provisioning bundle and apply it atomically; write the carry-back.

On-disk layout under the provisioning root (``<StateDirectory>/provisioning``)::

    .lock                         flock(2): one apply/rollback at a time
    releases/v<version>-<digest>/ one complete, fsynced release
        manifest.json             the signed manifest bytes, exactly as received
        manifest.sig              its Ed25519 signature
        bundle.sha256             SHA-256 of the bundle file
        files/                    the configuration tree (gateway.toml, keys/, ...)
    releases/.staging-<random>/   a release being written (removed by recover())
    current  -> releases/...      symlink: the release in force
    previous -> releases/...      symlink: the release before it (for rollback)

Why a symlink swap and not a directory rename: rename(2) replaces an existing
*symlink* atomically, but it cannot replace a non-empty *directory*; swapping
directories takes two renames with a moment where no configuration exists.
With symlinks every reader that resolves ``current`` sees one complete release,
old or new, and a SIGKILL or power cut at any point leaves exactly one of them
(each file and directory is fsynced before the rename that publishes it, and
the parent directory is fsynced after it).

A release is the previous release's files overlaid with the bundle's files
(the bundle wins on equal paths), except ``topups/`` and ``commands/``, which
are never carried over: signed commands are one-shot, not configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from firmware_bridge.durable import fsync_dir, write_new
from firmware_bridge.errors import EdgeGwError, ErrorKind
from provisioning.bundle import (
    DEFAULT_MAX_BUNDLE_BYTES,
    BundleContentError,
    BundleError,
    BundleFormatError,
    DeviceIdentity,
    Installed,
    Manifest,
    Target,
    VerifiedBundle,
    VerifyKey,
    check_policy,
    format_time,
    parse_manifest,
    verify_bundle,
)
from provisioning.rules import CONFIG_FILE, ReleaseCheck, ReleaseChecker

NOT_CARRIED_OVER = ("topups/", "commands/")
AUDIT_KIND = "provisioning.apply"

AuditFn = Callable[[str, dict[str, Any]], Awaitable[None]]
ReloadFn = Callable[["Release"], Awaitable[None]]
StepFn = Callable[[str], None]
ExportFn = Callable[[Path], Awaitable[object]]


class ApplyError(EdgeGwError):
    """The provisioning state itself is unusable (not a bundle problem)."""

    kind = ErrorKind.STORAGE


# ---------------------------------------------------------------------------
# Small durable-file helpers


def _swap_symlink(link: Path, target: str) -> None:
    tmp = link.with_name(f"{link.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.rename(tmp, link)
    fsync_dir(link.parent)


def read_bundle_file(source: Path, max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> bytes:
    """Copy a bundle off removable media into memory, refusing anything but a regular file.

    The file is opened without following symlinks and without blocking (a FIFO
    would otherwise hang here); at most ``max_bytes`` + 1 bytes are ever read.
    """
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BundleFormatError(f"{source.name}: is a symbolic link", code="link") from exc
        raise BundleFormatError(
            f"{source.name}: cannot open: {exc.strerror}", code="unreadable"
        ) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = {
                stat.S_IFCHR: "a character device",
                stat.S_IFBLK: "a block device",
                stat.S_IFIFO: "a FIFO",
                stat.S_IFSOCK: "a socket",
                stat.S_IFDIR: "a directory",
            }.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise BundleFormatError(f"{source.name}: is {kind}", code="not-regular")
        if st.st_size > max_bytes:
            raise BundleFormatError(
                f"{source.name}: {st.st_size} bytes, larger than the limit of {max_bytes}",
                code="oversized",
            )
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise BundleFormatError(
                    f"{source.name}: grew beyond the limit of {max_bytes} bytes while reading",
                    code="oversized",
                )
        return b"".join(chunks)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# Releases


@dataclass(frozen=True)
class Release:
    path: Path
    manifest: Manifest
    digest: str

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def files_dir(self) -> Path:
        return self.path / "files"

    @property
    def config_path(self) -> Path:
        return self.files_dir / CONFIG_FILE


def _load_release(path: Path) -> Release:
    manifest = parse_manifest(json.loads((path / "manifest.json").read_bytes()))
    digest = (path / "bundle.sha256").read_text().strip()
    return Release(path=path, manifest=manifest, digest=digest)


def _link_target(root: Path, name: str) -> str | None:
    try:
        target = os.readlink(root / name)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise ApplyError(f"{root / name} is not a symlink") from exc
        raise
    p = Path(target)
    if p.is_absolute() or len(p.parts) != 2 or p.parts[0] != "releases":
        raise ApplyError(f"{root / name} points outside releases/: {target!r}")
    return p.parts[1]


def current_release(root: Path) -> Release | None:
    """The release in force, or None before the first bundle."""
    name = _link_target(root, "current")
    return None if name is None else _load_release(root / "releases" / name)


def previous_release(root: Path) -> Release | None:
    name = _link_target(root, "previous")
    return None if name is None else _load_release(root / "releases" / name)


def installed(root: Path) -> Installed | None:
    rel = current_release(root)
    return None if rel is None else Installed(rel.version, rel.digest)


def release_name(version: int, digest: str) -> str:
    return f"v{version:016d}-{digest[:16]}"


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    (root / "releases").mkdir(mode=0o700, exist_ok=True)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _recover_locked(root: Path) -> list[str]:
    removed: list[str] = []
    for name in ("current.tmp", "previous.tmp"):
        p = root / name
        if p.is_symlink() or p.exists():
            p.unlink()
            removed.append(name)
    keep = {_link_target(root, "current"), _link_target(root, "previous")}
    releases = root / "releases"
    for entry in sorted(releases.iterdir()):
        if entry.name in keep:
            continue
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink()
        else:
            shutil.rmtree(entry)
        removed.append(f"releases/{entry.name}")
    if removed:
        fsync_dir(releases)
        fsync_dir(root)
    return removed


def recover(root: Path) -> list[str]:
    """Remove what an interrupted apply left behind; return what was removed.

    Safe to call at every start: it only deletes staging directories, temporary
    symlinks and releases that neither ``current`` nor ``previous`` points to.
    """
    with _locked(root):
        return _recover_locked(root)


def carry_over(src: Path) -> dict[str, Path]:
    """Regular files of an installed release that a new release inherits."""
    out: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        dirnames.sort()
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            rel = p.relative_to(src).as_posix()
            if rel.startswith(NOT_CARRIED_OVER):
                continue
            if stat.S_ISREG(p.lstat().st_mode):
                out[rel] = p
    return out


def release_problems(
    files_dir: Path,
    manifest_target: Target,
    identity: DeviceIdentity | None,
    check: ReleaseChecker,
    *,
    now: datetime | None = None,
    carried_over_unknown: bool = False,
) -> ReleaseCheck:
    """Every reason the configuration tree ``files_dir`` cannot be put in force
    on ``identity`` (None: not known, not checked): the checks ``apply`` runs,
    shared with ``provision make`` and ``provision verify`` so a bundle apply
    would refuse is refused there.

    A tree without :data:`CONFIG_FILE` is refused here; ``check`` (the
    application's rules, see :mod:`provisioning.rules`) judges the rest. Paths
    in what it reports are shown relative to the bundle, not to a private
    staging directory.
    """
    cfg_path = files_dir / CONFIG_FILE
    if not cfg_path.exists():
        return ReleaseCheck(
            problems=[
                f"no {CONFIG_FILE} in the bundle and none installed: a first bundle must "
                "carry the gateway configuration"
            ]
        )

    def shown(line: str) -> str:
        return line.replace(str(cfg_path), CONFIG_FILE).replace(str(files_dir) + "/", "")

    found = check(
        files_dir,
        manifest_target,
        identity,
        now=now or datetime.now(UTC),
        carried_over_unknown=carried_over_unknown,
    )
    return ReleaseCheck([shown(p) for p in found.problems], [shown(n) for n in found.notes])


def validate_release_files(
    files_dir: Path,
    manifest: Manifest,
    identity: DeviceIdentity,
    check: ReleaseChecker,
    now: datetime | None = None,
) -> None:
    """Refuse (:class:`BundleContentError`, code ``config``) a staged release with
    any of the problems of :func:`release_problems`, all of them in the message."""
    problems = release_problems(files_dir, manifest.target, identity, check, now=now).problems
    if len(problems) == 1:
        raise BundleContentError(problems[0], code="config")
    if problems:
        raise BundleContentError(
            f"configuration invalid ({len(problems)} problems):\n" + "\n".join(problems), code="config"
        )


def _step(step: StepFn | None, label: str) -> None:
    if step is not None:
        step(label)


def install_bundle(
    root: Path,
    vb: VerifiedBundle,
    identity: DeviceIdentity,
    *,
    check: ReleaseChecker,
    step: StepFn | None = None,
    now: datetime | None = None,
) -> Release:
    """Stage, validate (``check``: the application's release check) and publish a
    verified bundle as the current release.

    Synchronous and blocking (fsync); holds the provisioning lock. ``step`` is
    called with a label at every point where an interruption is possible, so
    crash tests can stop the process exactly there. Policy (expiry, target,
    rollback) is the caller's business: see :func:`apply_bundle`.
    """
    with _locked(root):
        _recover_locked(root)
        releases = root / "releases"
        old = current_release(root)
        name = release_name(vb.manifest.version, vb.digest)
        if old is not None and old.name == name:
            return old  # this exact bundle is already in force
        if _link_target(root, "previous") == name:
            raise ApplyError(f"release {name} is the previous release: use rollback()")
        staging = releases / f".staging-{secrets.token_hex(6)}"
        staging.mkdir(mode=0o700)
        files_dir = staging / "files"
        files_dir.mkdir(mode=0o700)
        _step(step, "staging-created")

        plan: dict[str, bytes | Path] = {}
        if old is not None:
            plan.update(carry_over(old.files_dir))
        # A bundle file replaces a carried-over file or directory it collides with.
        for rel in vb.files:
            for kept in [k for k in plan if k.startswith(rel + "/") or rel.startswith(k + "/")]:
                del plan[kept]
        plan.update(vb.files)
        made_dirs: set[Path] = {files_dir}
        for rel in sorted(plan):
            dest = files_dir / rel
            for parent in reversed(dest.relative_to(files_dir).parents):
                d = files_dir / parent
                if d not in made_dirs:
                    d.mkdir(mode=0o700, exist_ok=True)
                    made_dirs.add(d)
            src = plan[rel]
            data = src if isinstance(src, bytes) else src.read_bytes()
            write_new(dest, data)
            _step(step, f"file:{rel}")
        write_new(staging / "manifest.json", vb.manifest_bytes)
        write_new(staging / "manifest.sig", vb.signature)
        write_new(staging / "bundle.sha256", (vb.digest + "\n").encode())
        for d in sorted(made_dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)
        fsync_dir(staging)
        _step(step, "staged")

        try:
            validate_release_files(files_dir, vb.manifest, identity, check, now)
        except BundleError:
            shutil.rmtree(staging)
            raise
        _step(step, "validated")

        final = releases / name
        os.rename(staging, final)
        fsync_dir(releases)
        _step(step, "release-published")
        if old is not None:
            _swap_symlink(root / "previous", f"releases/{old.name}")
            _step(step, "previous-swapped")
        _swap_symlink(root / "current", f"releases/{name}")
        _step(step, "current-swapped")
        _recover_locked(root)
        _step(step, "pruned")
        return _load_release(final)


def rollback(root: Path) -> Release:
    """Make ``previous`` current again. The rolled-back release is discarded."""
    with _locked(root):
        prev = _link_target(root, "previous")
        if prev is None:
            raise ApplyError("no previous release to roll back to")
        _swap_symlink(root / "current", f"releases/{prev}")
        (root / "previous").unlink()
        fsync_dir(root)
        _recover_locked(root)
        return _load_release(root / "releases" / prev)


def _restore_links(root: Path, current: str | None, previous: str | None) -> None:
    with _locked(root):
        if current is None:
            with contextlib.suppress(FileNotFoundError):
                (root / "current").unlink()
        else:
            _swap_symlink(root / "current", f"releases/{current}")
        if previous is None:
            with contextlib.suppress(FileNotFoundError):
                (root / "previous").unlink()
        else:
            _swap_symlink(root / "previous", f"releases/{previous}")
        fsync_dir(root)
        _recover_locked(root)


# ---------------------------------------------------------------------------
# The whole attempt: read, verify, decide, install, reload, audit


@dataclass(frozen=True)
class ApplyResult:
    outcome: str  # "accepted" | "noop" | "refused"
    code: str  # "ok", "already-installed", or the refusal code
    reason: str
    source: str
    bundle_sha256: str | None = None
    size: int | None = None
    manifest: Manifest | None = None  # set once the signature has verified
    release: str | None = None
    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def ok(self) -> bool:
        return self.outcome != "refused"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "outcome": self.outcome,
            "code": self.code,
            "reason": self.reason,
            "source": self.source,
            "bundle_sha256": self.bundle_sha256,
            "size": self.size,
            "authenticated": self.manifest is not None,
            "at": format_time(self.at),
        }
        if self.manifest is not None:
            m = self.manifest
            d.update(
                bundle_id=m.bundle_id,
                version=m.version,
                target=str(m.target),
                technician=m.technician,
                expires=format_time(m.expires),
                backlog_export_requested=m.carry_back.backlog_export,
            )
        if self.release is not None:
            d["release"] = self.release
        return d


async def apply_bundle(
    source: Path,
    *,
    root: Path,
    verify_key: VerifyKey,
    identity: DeviceIdentity,
    check: ReleaseChecker,
    now: datetime | None = None,
    audit: AuditFn | None = None,
    reload: ReloadFn | None = None,
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
) -> ApplyResult:
    """Read, verify and apply one bundle file; never raises for a bad bundle.

    ``check`` is the application's release check (:mod:`provisioning.rules`):
    a release it finds a problem in is refused with code ``config``.

    Every attempt, accepted or refused, is passed to ``audit(AUDIT_KIND, detail)``.
    ``reload`` is awaited after the new release is in force; if it raises, the
    previous release is put back and the attempt is reported as refused.
    """
    at = now if now is not None else datetime.now(UTC)
    digest: str | None = None
    size: int | None = None
    manifest: Manifest | None = None
    try:
        data = await asyncio.to_thread(read_bundle_file, source, max_bytes)
        digest, size = hashlib.sha256(data).hexdigest(), len(data)
        vb = await asyncio.to_thread(verify_bundle, data, verify_key, max_bytes=max_bytes)
        manifest = vb.manifest
        before = await asyncio.to_thread(current_release, root)
        inst = None if before is None else Installed(before.version, before.digest)
        if not check_policy(vb.manifest, vb.digest, identity, inst, at):
            result = ApplyResult(
                "noop",
                "already-installed",
                f"bundle version {vb.manifest.version} is already installed",
                source.name,
                digest,
                size,
                manifest,
                before.name if before else None,
                at,
            )
        else:
            old_prev = await asyncio.to_thread(_link_target, root, "previous")
            release = await asyncio.to_thread(install_bundle, root, vb, identity, check=check, now=at)
            try:
                if reload is not None:
                    await reload(release)
            except Exception as exc:
                await asyncio.to_thread(
                    _restore_links, root, before.name if before else None, old_prev
                )
                raise BundleError(
                    f"reload failed ({type(exc).__name__}: {exc}); previous release restored",
                    code="reload-failed",
                ) from exc
            result = ApplyResult(
                "accepted",
                "ok",
                f"version {release.version} installed as {release.name}",
                source.name,
                digest,
                size,
                manifest,
                release.name,
                at,
            )
    except BundleError as exc:
        result = ApplyResult(
            "refused", exc.code, str(exc), source.name, digest, size, manifest, None, at
        )
    except (OSError, ApplyError) as exc:
        result = ApplyResult(
            "refused", "io-error", f"{type(exc).__name__}: {exc}", source.name, digest, size,
            manifest, None, at,
        )  # fmt: skip
    if audit is not None:
        await audit(AUDIT_KIND, result.to_json())
    return result


# ---------------------------------------------------------------------------
# Carry-back: what the gateway writes onto the stick for the technician


def backlog_export_wanted(results: Sequence[ApplyResult], technician_asked: bool) -> bool:
    """Export when the technician asked, or an authenticated bundle for this gateway did."""
    return technician_asked or any(
        r.manifest is not None and r.outcome != "refused" and r.manifest.carry_back.backlog_export
        for r in results
    )


async def write_carry_back(
    out_dir: Path,
    results: Sequence[ApplyResult],
    *,
    identity: DeviceIdentity,
    software_version: str,
    serial: str | None = None,
    enrollment: Callable[[], Mapping[str, Any]] | None = None,
    export_backlog: ExportFn | None = None,
    technician_asked_backlog: bool = False,
    now: datetime | None = None,
) -> list[Path]:
    """Write ``result.json``, ``enrollment.json`` and (if wanted) ``backlog/`` into ``out_dir``.

    ``out_dir`` is created and must not exist yet. Returns the paths written.
    The backlog export is produced by ``export_backlog(out_dir / "backlog")``;
    a failure there is recorded in ``result.json`` instead of raising.
    """
    at = now if now is not None else datetime.now(UTC)
    await asyncio.to_thread(out_dir.mkdir, mode=0o700, parents=True)
    written: list[Path] = []
    backlog: dict[str, Any] = {
        "requested": backlog_export_wanted(results, technician_asked_backlog)
    }
    if backlog["requested"]:
        if export_backlog is None:
            backlog["status"] = "failed"
            backlog["error"] = "no backlog exporter is available on this gateway"
        else:
            bdir = out_dir / "backlog"
            await asyncio.to_thread(bdir.mkdir, mode=0o700)
            try:
                info = await export_backlog(bdir)
            except Exception as exc:
                backlog["status"] = "failed"
                backlog["error"] = f"{type(exc).__name__}: {exc}"
            else:
                backlog["status"] = "written"
                if isinstance(info, Mapping):
                    backlog["info"] = dict(info)
                written.append(bdir)
    docs: list[tuple[Path, dict[str, Any]]] = []
    if enrollment is not None:
        docs.append(
            (
                out_dir / "enrollment.json",
                {
                    "gateway_id": identity.gateway_id,
                    "site_id": identity.site_id,
                    "serial": serial,
                    "software_version": software_version,
                    "public_keys": dict(enrollment()),
                    "at": format_time(at),
                },
            )
        )
    docs.append(
        (
            out_dir / "result.json",
            {
                "gateway_id": identity.gateway_id,
                "site_id": identity.site_id,
                "software_version": software_version,
                "at": format_time(at),
                "results": [r.to_json() for r in results],
                "backlog_export": backlog,
            },
        )
    )

    def write_docs() -> None:
        for path, doc in docs:
            write_new(path, json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")
        fsync_dir(out_dir)

    await asyncio.to_thread(write_docs)
    written.extend(p for p, _ in docs)
    return written

"""Signed software bundles: one release of the gateway software as one file.

A software bundle carries everything a gateway needs to install a release
without a network: the project's wheel, the wheelhouse of its pinned,
hash-locked dependencies (``requirements.lock`` in the source tree) and the
requirements file that names each of them with its SHA-256. It uses the
container of provisioning bundles (:mod:`provisioning.bundle`) and the same
trust: an Ed25519 signature by a **provisioning role key** over the header and
the manifest bytes, checked before anything of the manifest is parsed. Only
the magic and the signing context differ, so a provisioning bundle can never
pass as a software bundle nor the reverse::

    offset  size  field
    0       8     magic  b"EGWSOFT" + container version byte (0x01)
    8       4     manifest length M (1 .. MAX_MANIFEST_BYTES)
    12      M     manifest: UTF-8 JSON object (exact bytes that were signed)
    12+M    64    Ed25519 signature over SIGNING_CONTEXT + bytes[0 : 12+M]
    76+M    ...   file bodies, concatenated in manifest order

Manifest::

    {"format": 1, "bundle_id": "edgegw-0.2.0", "version": "0.2.0",
     "min_version": "0.2.0", "created": "2026-11-23T12:00:00Z",
     "python": "3.11", "machine": "x86_64",
     "files": [{"path": "requirements.txt", "sha256": "...", "size": 1234},
               {"path": "wheels/edge_gateway-0.2.0-py3-none-any.whl", ...}, ...]}

``min_version`` is the **version floor** this release sets once it has
proved healthy on a gateway: from then on the gateway refuses bundles older
than it, except one that a signed operations-role command names
(:func:`decide`). Bundles are verified as a stream (:func:`open_bundle`): a
bundle of a few hundred MiB is never held in memory.

Versions are dotted numbers (``1``, ``0.2``, ``1.4.2``, at most four parts),
compared numerically with missing parts as zero; the project's wheel must
carry the bundle's version.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware_bridge.durable import fsync_dir
from firmware_bridge.identifiers import is_release_id
from provisioning.bundle import (
    HEADER,
    MAX_MANIFEST_BYTES,
    SIGNATURE_LEN,
    BundleContentError,
    BundleError,
    BundleFormatError,
    BundlePolicyError,
    RawBundle,
    VerifyKey,
    check_signature,
    decode_manifest_json,
    format_time,
    parse_time,
    read_header,
)

MAGIC = b"EGWSOFT\x01"
SIGNING_CONTEXT = b"edgegw/software-bundle/v1\x00"
WHAT = "software bundle"
FORMAT = 1
SUFFIX = ".egws"
PROJECT = "edge-gateway"
PROJECT_WHEEL_PREFIX = "edge_gateway-"
REQUIREMENTS = "requirements.txt"
WHEELS = "wheels"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
MAX_FILES = 256

_VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,8})(\.(0|[1-9][0-9]{0,8})){0,3}$")
_WHEEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}\.whl$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_PYTHON_RE = re.compile(r"^3\.[0-9]{1,2}$")
_MACHINE_RE = re.compile(r"^[A-Za-z0-9_]{1,32}$")


# ---------------------------------------------------------------------------
# Versions


@functools.total_ordering
@dataclass(frozen=True, eq=False)
class Version:
    """A release version: dotted numbers, compared numerically (``0.2`` == ``0.2.0``)."""

    key: tuple[int, int, int, int]
    text: str

    @classmethod
    def parse(cls, text: object) -> Version:
        if not isinstance(text, str) or not _VERSION_RE.match(text):
            raise ValueError(
                f"version {text!r} is not dotted numbers (e.g. 1.4.2; at most four parts)"
            )
        parts = [int(p) for p in text.split(".")]
        padded = (*parts, 0, 0, 0)[:4]
        return cls((padded[0], padded[1], padded[2], padded[3]), text)

    def __str__(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __lt__(self, other: Version) -> bool:
        return self.key < other.key


def version_of_wheel(name: str) -> str:
    """The version in a wheel's file name (``edge_gateway-0.2.0-py3-none-any.whl``)."""
    parts = name[: -len(".whl")].split("-") if name.endswith(".whl") else []
    if len(parts) < 5:
        raise ValueError(f"{name!r} is not a wheel file name")
    return parts[1]


# ---------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class SoftwareManifest:
    bundle_id: str
    version: Version
    min_version: Version
    created: datetime
    python: str  # "3.11": the interpreter the wheelhouse was made for
    machine: str  # platform.machine() of the target ("x86_64", "aarch64", "armv7l")
    files: tuple[FileEntry, ...]

    @property
    def project_wheel(self) -> str:
        """The path of the project's own wheel in the bundle."""
        for f in self.files:
            name = f.path.rpartition("/")[2]
            if f.path.startswith(WHEELS + "/") and name.startswith(PROJECT_WHEEL_PREFIX):
                return f.path
        raise KeyError("no project wheel")  # parse_manifest made sure there is one

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "bundle_id": self.bundle_id,
            "version": self.version.text,
            "min_version": self.min_version.text,
            "created": format_time(self.created),
            "python": self.python,
            "machine": self.machine,
            "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in self.files],
        }


def check_file_path(path: object) -> str | None:
    """A problem with a software bundle's file path, or None: ``requirements.txt``
    or ``wheels/<wheel file name>``, nothing else (no directory can be expressed)."""
    if path == REQUIREMENTS:
        return None
    if not isinstance(path, str):
        return f"path must be a string, got {type(path).__name__}"
    head, sep, name = path.partition("/")
    if head != WHEELS or not sep or not _WHEEL_RE.match(name):
        return f"path {path!r} is neither {REQUIREMENTS!r} nor {WHEELS}/<name>.whl"
    return None


_KEYS = {"format", "bundle_id", "version", "min_version", "created", "python", "machine", "files"}


def _fail(message: str, code: str = "manifest") -> BundleContentError:
    return BundleContentError(f"manifest: {message}", code=code)


def _field(doc: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in doc:
        raise _fail(f"{key}: missing")
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise _fail(f"{key}: wrong type {type(value).__name__}")
    return value


def parse_manifest(doc: Any) -> SoftwareManifest:
    """Strictly validate a decoded manifest: unknown keys anywhere are refused."""
    if not isinstance(doc, dict):
        raise _fail("must be a JSON object")
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise _fail(f"unknown key(s) {', '.join(map(repr, unknown))}")
    if _field(doc, "format", int) != FORMAT:
        raise _fail(f"format {doc['format']} not supported (supported: {FORMAT})")
    bundle_id = _field(doc, "bundle_id", str)
    if not is_release_id(bundle_id):
        raise _fail(f"bundle_id {bundle_id!r} invalid")
    try:
        version = Version.parse(_field(doc, "version", str))
        floor = Version.parse(_field(doc, "min_version", str))
        created = parse_time(_field(doc, "created", str))
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    if floor > version:
        raise _fail(f"min_version {floor} is above version {version}")
    python = _field(doc, "python", str)
    if not _PYTHON_RE.match(python):
        raise _fail(f"python {python!r} is not 3.N")
    machine = _field(doc, "machine", str)
    if not _MACHINE_RE.match(machine):
        raise _fail(f"machine {machine!r} invalid")
    files_raw = _field(doc, "files", list)
    if len(files_raw) > MAX_FILES:
        raise _fail(f"{len(files_raw)} files, more than {MAX_FILES}")
    entries: list[FileEntry] = []
    seen: set[str] = set()
    for i, f in enumerate(files_raw):
        if not isinstance(f, dict) or set(f) != {"path", "sha256", "size"}:
            raise _fail(f"files[{i}]: must be an object with path, sha256 and size")
        path, sha, size = f["path"], f["sha256"], f["size"]
        problem = check_file_path(path)
        if problem:
            raise _fail(f"files[{i}]: {problem}", code="path")
        if path.casefold() in seen:
            raise _fail(f"files[{i}]: duplicate path {path!r}", code="duplicate-path")
        seen.add(path.casefold())
        if not isinstance(sha, str) or not _SHA256_RE.match(sha):
            raise _fail(f"files[{i}].sha256: not 64 lowercase hex digits")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _fail(f"files[{i}].size: not a non-negative integer")
        entries.append(FileEntry(path, sha, size))
    if REQUIREMENTS not in seen:
        raise _fail(f"no {REQUIREMENTS}")
    project = [
        e for e in entries if e.path.startswith(f"{WHEELS}/{PROJECT_WHEEL_PREFIX}")
    ]
    if len(project) != 1:
        raise _fail(f"{len(project)} wheels of {PROJECT}, need exactly one")
    wheel_version = version_of_wheel(project[0].path.rpartition("/")[2])
    if wheel_version != version.text:
        raise _fail(f"the {PROJECT} wheel is version {wheel_version}, the bundle {version}")
    return SoftwareManifest(bundle_id, version, floor, created, python, machine, tuple(entries))


# ---------------------------------------------------------------------------
# The lock file (requirements.lock, pip-compile --generate-hashes)


def normalize_name(name: str) -> str:
    """A distribution name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Pin:
    name: str  # normalized
    version: str
    hashes: frozenset[str]


_PIN_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)$")


def parse_lock(text: str) -> dict[str, Pin]:
    """The pins of a hash-locked requirements file: every requirement must be
    ``name==version`` with at least one ``--hash=sha256:``; ValueError otherwise."""
    pins: dict[str, Pin] = {}
    logical: list[str] = []
    buf = ""
    for line in text.splitlines():
        line = line.split(" #", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            logical.append(buf.strip())
        buf = ""
    if buf.strip():
        logical.append(buf.strip())
    for entry in logical:
        words = entry.split()
        m = _PIN_RE.match(words[0])
        if m is None:
            raise ValueError(f"not a pinned requirement (name==version): {words[0]!r}")
        hashes = set()
        for w in words[1:]:
            if not w.startswith("--hash=sha256:") or not _SHA256_RE.match(w[14:]):
                raise ValueError(f"{words[0]}: unexpected {w!r} (only --hash=sha256:HEX)")
            hashes.add(w[14:])
        if not hashes:
            raise ValueError(f"{words[0]}: no --hash (the lock file must be hash-locked)")
        name = normalize_name(m.group(1))
        if name in pins:
            raise ValueError(f"{name} is pinned twice")
        pins[name] = Pin(name, m.group(2), frozenset(hashes))
    return pins


def wheel_name_version(filename: str) -> tuple[str, str]:
    """(normalized distribution name, version) of a wheel file name."""
    parts = filename[: -len(".whl")].split("-") if filename.endswith(".whl") else []
    if len(parts) < 5:
        raise ValueError(f"{filename!r} is not a wheel file name")
    return normalize_name(parts[0]), parts[1]


def match_wheelhouse(pins: Mapping[str, Pin], wheels: Mapping[str, str]) -> list[str]:
    """Which wheels (file name -> SHA-256) install the pins: exactly one per pin,
    of the pinned version and with a hash the lock lists. ValueError names every
    pin without one; wheels of other distributions are left out."""
    chosen: list[str] = []
    problems: list[str] = []
    for pin in sorted(pins.values(), key=lambda p: p.name):
        found = [
            name for name, sha in wheels.items()
            if wheel_name_version(name) == (pin.name, pin.version) and sha in pin.hashes
        ]  # fmt: skip
        if not found:
            problems.append(f"{pin.name}=={pin.version}: no wheel with a locked hash")
        else:
            chosen.append(sorted(found)[0])
    if problems:
        raise ValueError("wheelhouse does not match the lock: " + "; ".join(problems))
    return chosen


# ---------------------------------------------------------------------------
# Building (central)


def write_bundle(
    out: Path,
    *,
    version: str,
    min_version: str | None,
    requirements: bytes,
    wheels: Sequence[Path],
    key: Ed25519PrivateKey,
    python: str,
    machine: str,
    bundle_id: str | None = None,
    created: datetime | None = None,
) -> SoftwareManifest:
    """Sign and write a software bundle to ``out`` (atomically; streamed, not in memory).

    ``min_version`` defaults to ``version``: a release that proved healthy
    refuses every older release unless an operations command allows it.
    """
    at = created or datetime.now(UTC)
    entries = [FileEntry(REQUIREMENTS, hashlib.sha256(requirements).hexdigest(), len(requirements))]
    sources: dict[str, Path] = {}
    for w in sorted(wheels, key=lambda p: p.name):
        path = f"{WHEELS}/{w.name}"
        h = hashlib.sha256()
        size = 0
        with w.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
        entries.append(FileEntry(path, h.hexdigest(), size))
        sources[path] = w
    raw = {
        "format": FORMAT,
        "bundle_id": bundle_id or f"edgegw-{version}",
        "version": version,
        "min_version": min_version or version,
        "created": format_time(at),
        "python": python,
        "machine": machine,
        "files": [{"path": e.path, "sha256": e.sha256, "size": e.size} for e in entries],
    }
    manifest = parse_manifest(raw)  # never sign what a gateway refuses
    manifest_bytes = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise _fail(f"{len(manifest_bytes)} bytes, more than {MAX_MANIFEST_BYTES}")
    header = HEADER.pack(MAGIC, len(manifest_bytes))
    signature = key.sign(SIGNING_CONTEXT + header + manifest_bytes)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("xb") as fh:
            fh.write(header + manifest_bytes + signature)
            fh.write(requirements)
            for e in entries[1:]:
                with sources[e.path].open("rb") as src:
                    shutil.copyfileobj(src, fh, 1 << 20)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(out.parent)
    return manifest


# ---------------------------------------------------------------------------
# Verification (gateway): a stream, never the whole bundle in memory


@dataclass(frozen=True)
class VerifiedSoftware:
    """A bundle whose signature, size and every file hash have been checked."""

    manifest: SoftwareManifest
    manifest_bytes: bytes
    signature: bytes
    digest: str  # SHA-256 of the whole bundle file, hex
    size: int


def _open_regular(path: Path, max_bytes: int) -> IO[bytes]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BundleFormatError(f"{path.name}: is a symbolic link", code="link") from exc
        raise BundleFormatError(f"{path.name}: cannot open: {exc.strerror}", code="unreadable") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise BundleFormatError(f"{path.name}: not a regular file", code="not-regular")
    if st.st_size > max_bytes:
        os.close(fd)
        raise BundleFormatError(
            f"{path.name}: {st.st_size} bytes, larger than the limit of {max_bytes}",
            code="oversized",
        )
    return os.fdopen(fd, "rb")


def _read_exact(fh: IO[bytes], n: int, what: str, whole: Any) -> bytes:
    data = fh.read(n)
    whole.update(data)
    if len(data) < n:
        raise BundleFormatError(f"truncated: file ends inside the {what}", code="truncated")
    return data


def read_manifest_unverified(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
    """The manifest WITHOUT checking the signature (for display only)."""
    with _open_regular(path, max_bytes) as fh:
        head = fh.read(HEADER.size)
        mlen = read_header(head, magic=MAGIC, what=WHAT)
        doc = decode_manifest_json(fh.read(mlen))
    return doc if isinstance(doc, dict) else {"manifest": doc}


def open_bundle(
    path: Path,
    verify_key: VerifyKey,
    *,
    extract_to: Path | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> VerifiedSoftware:
    """Verify a software bundle file, in one pass; with ``extract_to``, write its
    files there (a new directory: ``requirements.txt`` and ``wheels/``).

    Order: header, signature over the raw manifest bytes, then the strict
    manifest, then every file's size and SHA-256 and the exact body length.
    Files are written as they are hashed, from the same bytes, so what is
    extracted is what was verified; on any failure the directory is removed.
    """
    whole = hashlib.sha256()
    made = False
    try:
        with _open_regular(path, max_bytes) as fh:
            header = _read_exact(fh, HEADER.size, "header", whole)
            mlen = read_header(header, magic=MAGIC, what=WHAT)
            manifest_bytes = _read_exact(fh, mlen, "manifest", whole)
            signature = _read_exact(fh, SIGNATURE_LEN, "signature", whole)
            check_signature(
                RawBundle(header, manifest_bytes, signature, b""),
                verify_key,
                context=SIGNING_CONTEXT,
                what=WHAT,
            )
            manifest = parse_manifest(decode_manifest_json(manifest_bytes))
            if extract_to is not None:
                extract_to.mkdir(mode=0o755)
                made = True
                (extract_to / WHEELS).mkdir(mode=0o755)
            size = HEADER.size + mlen + SIGNATURE_LEN
            for f in manifest.files:
                h = hashlib.sha256()
                left = f.size
                with _writer(extract_to, f.path) as out:
                    while left:
                        chunk = fh.read(min(left, 1 << 20))
                        if not chunk:
                            raise BundleContentError(
                                f"file {f.path!r} missing or truncated in the body: "
                                f"{f.size - left} of {f.size} bytes present",
                                code="truncated",
                            )
                        h.update(chunk)
                        whole.update(chunk)
                        if out is not None:
                            out.write(chunk)
                        left -= len(chunk)
                size += f.size
                if h.hexdigest() != f.sha256:
                    raise BundleContentError(
                        f"file {f.path!r}: SHA-256 mismatch (manifest {f.sha256[:16]}..., "
                        f"content {h.hexdigest()[:16]}...)",
                        code="hash-mismatch",
                    )
            extra = fh.read(1)
            if extra:
                raise BundleContentError(
                    "body has bytes not listed in the manifest", code="unlisted-data"
                )
        if extract_to is not None:
            fsync_dir(extract_to / WHEELS)
            fsync_dir(extract_to)
        return VerifiedSoftware(manifest, manifest_bytes, signature, whole.hexdigest(), size)
    except BaseException:
        if made and extract_to is not None:
            shutil.rmtree(extract_to, ignore_errors=True)
        raise


@contextlib.contextmanager
def _writer(base: Path | None, rel: str) -> Iterator[IO[bytes] | None]:
    if base is None:
        yield None
        return
    fd = os.open(
        base / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
    )
    with os.fdopen(fd, "wb") as out:
        yield out
        out.flush()
        os.fsync(out.fileno())


# ---------------------------------------------------------------------------
# Policy (pure)


class SoftwarePolicyError(BundlePolicyError):
    """A valid software bundle that must not be installed here."""


@dataclass(frozen=True)
class InstalledSoftware:
    """What runs on the gateway: the committed release and the version floor."""

    version: Version
    digest: str | None  # of the bundle it came from (None: installed by install.sh)
    floor: Version


def decide(
    manifest: SoftwareManifest,
    digest: str,
    installed: InstalledSoftware | None,
    *,
    python: str,
    machine: str,
    downgrade_allowed: bool = False,
) -> bool:
    """Whether a verified bundle is installed (True), is the release already in
    force (False), or is refused (:class:`SoftwarePolicyError` with a code).

    * ``platform``: made for another interpreter or machine;
    * ``version-conflict``: the version in force, with different content;
    * ``below-floor``: older than the version floor (the highest ``min_version``
      of a release that proved healthy here), unless a signed operations-role
      command allowed exactly this bundle (``downgrade_allowed``).
    """
    if manifest.python != python or manifest.machine != machine:
        raise SoftwarePolicyError(
            f"bundle is for Python {manifest.python} on {manifest.machine}, this gateway "
            f"runs Python {python} on {machine}",
            code="platform",
        )
    if installed is None:
        return True
    if manifest.version == installed.version:
        if installed.digest is None or digest == installed.digest:
            return False
        raise SoftwarePolicyError(
            f"version {manifest.version} is installed with different content "
            f"(installed {installed.digest[:16]}..., this {digest[:16]}...); "
            "a new bundle needs a new version",
            code="version-conflict",
        )
    if manifest.version < installed.floor and not downgrade_allowed:
        raise SoftwarePolicyError(
            f"version {manifest.version} is below the version floor {installed.floor} "
            f"(installed {installed.version}); only a signed software.offer with "
            "allow_downgrade for this bundle installs it",
            code="below-floor",
        )
    return True


__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAGIC",
    "SUFFIX",
    "BundleError",
    "InstalledSoftware",
    "SoftwareManifest",
    "SoftwarePolicyError",
    "VerifiedSoftware",
    "Version",
    "decide",
    "open_bundle",
    "parse_manifest",
    "read_manifest_unverified",
    "write_bundle",
]

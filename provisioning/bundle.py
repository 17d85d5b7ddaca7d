"""Signed provisioning bundles: the container format and its verification.

A bundle is one file a technician carries to a gateway on a USB stick. It is a
small custom container rather than tar or zip, because neither of those can be
made to say *only* "regular files with these names and these bytes": tar has
symlinks, hard links, device nodes, pax headers and long-name extensions; zip
has a central directory that can disagree with its local headers and may list
one name twice. Here the only thing a bundle can express is a list of regular
files, so there is nothing to switch off and nothing to get wrong on extraction.

Layout (all integers big-endian)::

    offset  size  field
    0       8     magic  b"EGWBNDL" + container version byte (0x01)
    8       4     manifest length M (1 .. MAX_MANIFEST_BYTES)
    12      M     manifest: UTF-8 JSON object (exact bytes that were signed)
    12+M    64    Ed25519 signature over SIGNING_CONTEXT + bytes[0 : 12+M]
    76+M    ...   file bodies, concatenated in manifest order, no padding

The signature lives outside the manifest and covers the header and the exact
manifest bytes, so no manifest field can influence whether it is checked. The
manifest lists every file with its path, size and SHA-256; the body must be
exactly the concatenation of those files (one byte more or less is refused).

Verification order (see :func:`verify_bundle`): container structure, signature
over the raw manifest bytes, then (only then) JSON parsing and the strict
manifest schema, then body length and every file hash. Policy (expiry, target,
anti-rollback) is :func:`check_policy`, a pure function of the verified
manifest, the device identity, the installed version and the time.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.identifiers import is_name

MAGIC = b"EGWBNDL\x01"
SIGNING_CONTEXT = b"edgegw/provisioning-bundle/v1\x00"
HEADER = struct.Struct(">8sI")
SIGNATURE_LEN = 64
FORMAT = 1

MAX_MANIFEST_BYTES = 256 * 1024
MAX_FILES = 512
MAX_PATH_CHARS = 200
MAX_PATH_DEPTH = 6
MAX_VERSION = 2**53 - 1
DEFAULT_MAX_BUNDLE_BYTES = 32 * 1024 * 1024

SUFFIX = ".egwb"

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

# Which role key a verifier is given: one key, several (rotation), or a lookup
# callable (the provisioning role of gateway.security plugs in here).
VerifyKey = Ed25519PublicKey | Iterable[Ed25519PublicKey] | Callable[[], Iterable[Ed25519PublicKey]]


# ---------------------------------------------------------------------------
# Errors


class BundleError(EdgeGwError):
    """A bundle was refused. ``code`` is a stable short reason, the message says exactly why."""

    kind = ErrorKind.REFUSED

    code = "refused"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def reason(self) -> str:
        return f"{self.code}: {self}"


class BundleFormatError(BundleError):
    """The container structure is broken (magic, lengths, truncation, trailing bytes)."""

    code = "format"


class BundleSignatureError(BundleError):
    """The signature does not verify with any trusted provisioning key."""

    kind = ErrorKind.AUTH

    code = "signature"


class BundleContentError(BundleError):
    """The signed manifest is malformed, or a file does not match it."""

    code = "content"


class BundlePolicyError(BundleError):
    """A valid bundle that must not be applied here or now (expired, rollback, target)."""

    code = "policy"


# ---------------------------------------------------------------------------
# Manifest model


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Target:
    kind: str  # "gateway" | "site"
    id: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}"

    @classmethod
    def parse(cls, text: str) -> Target:
        """``gateway:ID``, ``site:ID`` or a bare ``ID`` (a gateway)."""
        kind, sep, ident = text.partition(":")
        if not sep:
            kind, ident = "gateway", text
        if kind not in ("gateway", "site"):
            raise ValueError(f"target kind must be 'gateway' or 'site', got {kind!r}")
        if not is_name(ident):
            raise ValueError(f"target id {ident!r} is not a valid identifier")
        return cls(kind, ident)


@dataclass(frozen=True)
class CarryBack:
    """What the gateway should write back to the stick besides its result and enrollment."""

    backlog_export: bool = False


@dataclass(frozen=True)
class Manifest:
    bundle_id: str
    version: int
    target: Target
    created: datetime
    expires: datetime
    technician: str
    carry_back: CarryBack
    files: tuple[FileEntry, ...]

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature and every file hash have been checked."""

    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    digest: str  # SHA-256 of the whole bundle file, hex
    files: Mapping[str, bytes]


@dataclass(frozen=True)
class DeviceIdentity:
    gateway_id: str
    site_id: str | None = None


# ---------------------------------------------------------------------------
# Helpers


def format_time(t: datetime) -> str:
    if t.tzinfo is None:
        raise ValueError("time must be timezone-aware")
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """Parse an ISO-8601 time with an explicit offset (``Z`` or ``+hh:mm``)."""
    t = datetime.fromisoformat(text)
    if t.tzinfo is None:
        raise ValueError(f"time {text!r} has no UTC offset")
    return t.astimezone(UTC)


def check_path(path: object) -> str | None:
    """Return a problem with a bundle file path, or None if it is acceptable.

    Paths are relative, '/'-separated, at most MAX_PATH_DEPTH components, each
    starting with a letter or digit (so no '', '.', '..' or hidden names) and
    made of ``A-Z a-z 0-9 . _ -`` only (no backslash, colon, NUL or spaces).
    """
    if not isinstance(path, str):
        return f"path must be a string, got {type(path).__name__}"
    if not path:
        return "empty path"
    if len(path) > MAX_PATH_CHARS:
        return f"path longer than {MAX_PATH_CHARS} characters"
    if path.startswith("/"):
        return f"absolute path {path!r}"
    parts = path.split("/")
    if any(p == ".." for p in parts):
        return f"path {path!r} contains '..'"
    if len(parts) > MAX_PATH_DEPTH:
        return f"path {path!r} deeper than {MAX_PATH_DEPTH} components"
    for p in parts:
        if not is_name(p):
            return f"path {path!r}: component {p!r} not allowed (letters, digits, . _ -; no leading dot)"
    return None


def _load_keys(verify_key: VerifyKey) -> list[Ed25519PublicKey]:
    if isinstance(verify_key, Ed25519PublicKey):
        return [verify_key]
    if callable(verify_key):
        keys = list(verify_key())
    else:
        keys = list(verify_key)
    for k in keys:
        if not isinstance(k, Ed25519PublicKey):
            raise TypeError(f"verify key must be an Ed25519 public key, got {type(k).__name__}")
    return keys


# ---------------------------------------------------------------------------
# Encoding (central side / technician tooling)


def manifest_to_json(manifest: Manifest) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "bundle_id": manifest.bundle_id,
        "version": manifest.version,
        "target": {"kind": manifest.target.kind, "id": manifest.target.id},
        "created": format_time(manifest.created),
        "expires": format_time(manifest.expires),
        "technician": manifest.technician,
        "carry_back": {"backlog_export": manifest.carry_back.backlog_export},
        "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in manifest.files],
    }


def seal_manifest(manifest_bytes: bytes, body: bytes, key: Ed25519PrivateKey) -> bytes:
    """Assemble a bundle from already-serialised manifest bytes (used by tests too)."""
    header = HEADER.pack(MAGIC, len(manifest_bytes))
    signature = key.sign(SIGNING_CONTEXT + header + manifest_bytes)
    return header + manifest_bytes + signature + body


def encode_bundle(
    *,
    bundle_id: str,
    version: int,
    target: Target,
    created: datetime,
    expires: datetime,
    technician: str,
    files: Mapping[str, bytes],
    key: Ed25519PrivateKey,
    carry_back: CarryBack | None = None,
) -> bytes:
    """Build and sign a bundle. Files are stored in sorted path order."""
    entries = []
    for path in sorted(files):
        problem = check_path(path)
        if problem:
            raise BundleContentError(problem, code="path")
        data = files[path]
        entries.append(FileEntry(path, hashlib.sha256(data).hexdigest(), len(data)))
    manifest = Manifest(
        bundle_id=bundle_id,
        version=version,
        target=target,
        created=created,
        expires=expires,
        technician=technician,
        carry_back=carry_back or CarryBack(),
        files=tuple(entries),
    )
    raw = manifest_to_json(manifest)
    # Round-trip through the strict parser so the tool never signs what a gateway refuses.
    parse_manifest(raw)
    manifest_bytes = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    body = b"".join(files[e.path] for e in entries)
    return seal_manifest(manifest_bytes, body, key)


# ---------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True)
class RawBundle:
    """The structural split of a bundle; nothing in it is trusted yet."""

    header: bytes
    manifest_bytes: bytes
    signature: bytes
    body: bytes


def read_header(
    data: bytes,
    *,
    magic: bytes = MAGIC,
    what: str = "provisioning bundle",
    max_manifest: int = MAX_MANIFEST_BYTES,
) -> int:
    """Check the fixed header at the start of ``data`` (magic, container version,
    manifest length) and return the manifest length. Shared by every signed
    container of the project (provisioning bundles, software bundles)."""
    if len(data) < HEADER.size:
        raise BundleFormatError(
            f"truncated: {len(data)} bytes is shorter than the {HEADER.size}-byte header",
            code="truncated",
        )
    found, mlen = HEADER.unpack_from(data, 0)
    if found[:7] != magic[:7]:
        raise BundleFormatError(f"not a {what} (bad magic)", code="magic")
    if found != magic:
        raise BundleFormatError(
            f"unsupported {what} container version {found[7]} (supported: {magic[7]})",
            code="container-version",
        )
    if mlen == 0 or mlen > max_manifest:
        raise BundleFormatError(
            f"manifest length {mlen} out of range 1..{max_manifest}", code="manifest-length"
        )
    return int(mlen)


def split_bundle(data: bytes, max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> RawBundle:
    """Split a bundle into its parts, checking only the container structure."""
    if len(data) > max_bytes:
        raise BundleFormatError(
            f"bundle is {len(data)} bytes, larger than the limit of {max_bytes}", code="oversized"
        )
    mlen = read_header(data)
    end_manifest = HEADER.size + mlen
    end_sig = end_manifest + SIGNATURE_LEN
    if len(data) < end_sig:
        what = "manifest" if len(data) < end_manifest else "signature"
        raise BundleFormatError(
            f"truncated: file ends inside the {what} ({len(data)} bytes, need {end_sig})",
            code="truncated",
        )
    return RawBundle(
        header=data[: HEADER.size],
        manifest_bytes=data[HEADER.size : end_manifest],
        signature=data[end_manifest:end_sig],
        body=data[end_sig:],
    )


def check_signature(
    raw: RawBundle,
    verify_key: VerifyKey,
    *,
    context: bytes = SIGNING_CONTEXT,
    what: str = "bundle",
) -> None:
    """Ed25519 over ``context`` + header + manifest bytes with any trusted key.

    ``context`` separates the kinds of signed container (a provisioning bundle
    can never pass as a software bundle, nor the reverse) under the one
    provisioning role key."""
    keys = _load_keys(verify_key)
    if not keys:
        raise BundleSignatureError("no trusted provisioning key is configured", code="no-key")
    if raw.signature == b"\x00" * SIGNATURE_LEN:
        raise BundleSignatureError(f"{what} is unsigned (all-zero signature)", code="unsigned")
    message = context + raw.header + raw.manifest_bytes
    for key in keys:
        try:
            key.verify(raw.signature, message)
        except InvalidSignature:
            continue
        return
    raise BundleSignatureError(
        f"signature does not verify with any of the {len(keys)} trusted provisioning key(s)",
        code="bad-signature",
    )


_MANIFEST_KEYS = {
    "format",
    "bundle_id",
    "version",
    "target",
    "created",
    "expires",
    "technician",
    "carry_back",
    "files",
}


def _need(obj: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise BundleContentError(f"manifest: {where}{key}: missing", code="manifest")
    v = obj[key]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise BundleContentError(f"manifest: {where}{key}: must not be a boolean", code="manifest")
    if not isinstance(v, types):
        raise BundleContentError(
            f"manifest: {where}{key}: wrong type {type(v).__name__}", code="manifest"
        )
    return v


def _exact_keys(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise BundleContentError(
            f"manifest: {where}unknown key(s) {', '.join(repr(k) for k in unknown)} "
            f"(allowed: {', '.join(sorted(allowed))})",
            code="manifest",
        )


def parse_manifest(raw: Any) -> Manifest:
    """Strictly validate a decoded manifest. Unknown keys anywhere are refused."""
    if not isinstance(raw, dict):
        raise BundleContentError("manifest: must be a JSON object", code="manifest")
    _exact_keys(raw, _MANIFEST_KEYS, "")
    fmt = _need(raw, "format", int, "")
    if fmt != FORMAT:
        raise BundleContentError(
            f"manifest: format {fmt} not supported (supported: {FORMAT})", code="manifest"
        )
    bundle_id = _need(raw, "bundle_id", str, "")
    if not is_name(bundle_id):
        raise BundleContentError(f"manifest: bundle_id {bundle_id!r} invalid", code="manifest")
    version = _need(raw, "version", int, "")
    if not 1 <= version <= MAX_VERSION:
        raise BundleContentError(
            f"manifest: version {version} out of range 1..{MAX_VERSION}", code="manifest"
        )
    t = _need(raw, "target", dict, "")
    _exact_keys(t, {"kind", "id"}, "target.")
    kind = _need(t, "kind", str, "target.")
    tid = _need(t, "id", str, "target.")
    if kind not in ("gateway", "site") or not is_name(tid):
        raise BundleContentError(f"manifest: target {kind}:{tid} invalid", code="manifest")
    times = {}
    for k in ("created", "expires"):
        s = _need(raw, k, str, "")
        try:
            times[k] = parse_time(s)
        except ValueError as exc:
            raise BundleContentError(f"manifest: {k}: {exc}", code="manifest") from exc
    if times["expires"] <= times["created"]:
        raise BundleContentError("manifest: expires is not after created", code="manifest")
    technician = _need(raw, "technician", str, "")
    if not is_name(technician):
        raise BundleContentError(f"manifest: technician {technician!r} invalid", code="manifest")
    cb = _need(raw, "carry_back", dict, "")
    _exact_keys(cb, {"backlog_export"}, "carry_back.")
    backlog = _need(cb, "backlog_export", bool, "carry_back.")
    files_raw = _need(raw, "files", list, "")
    if len(files_raw) > MAX_FILES:
        raise BundleContentError(
            f"manifest: {len(files_raw)} files, more than {MAX_FILES}", code="manifest"
        )
    entries: list[FileEntry] = []
    seen: dict[str, str] = {}
    for i, f in enumerate(files_raw):
        where = f"files[{i}]."
        if not isinstance(f, dict):
            raise BundleContentError(f"manifest: files[{i}]: must be an object", code="manifest")
        _exact_keys(f, {"path", "sha256", "size"}, where)
        path = _need(f, "path", str, where)
        problem = check_path(path)
        if problem:
            raise BundleContentError(f"manifest: files[{i}]: {problem}", code="path")
        folded = path.casefold()
        if folded in seen:
            raise BundleContentError(
                f"manifest: files[{i}]: duplicate path {path!r} (same as {seen[folded]!r})",
                code="duplicate-path",
            )
        seen[folded] = path
        sha = _need(f, "sha256", str, where)
        if not _SHA256_RE.match(sha):
            raise BundleContentError(
                f"manifest: files[{i}].sha256: not 64 lowercase hex digits", code="manifest"
            )
        size = _need(f, "size", int, where)
        if size < 0:
            raise BundleContentError(f"manifest: files[{i}].size: negative", code="manifest")
        entries.append(FileEntry(path, sha, size))
    # A path may not be both a file and a directory ("a" and "a/b").
    for folded, path in seen.items():
        parts = folded.split("/")
        for n in range(1, len(parts)):
            prefix = "/".join(parts[:n])
            if prefix in seen:
                raise BundleContentError(
                    f"manifest: path {seen[prefix]!r} is a file and also a directory of {path!r}",
                    code="path",
                )
    return Manifest(
        bundle_id=bundle_id,
        version=version,
        target=Target(kind, tid),
        created=times["created"],
        expires=times["expires"],
        technician=technician,
        carry_back=CarryBack(backlog_export=backlog),
        files=tuple(entries),
    )


def decode_manifest_json(manifest_bytes: bytes) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise BundleContentError(f"manifest: duplicate JSON key {k!r}", code="manifest")
            out[k] = v
        return out

    try:
        text = manifest_bytes.decode("utf-8")
        return json.loads(text, object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleContentError(f"manifest: not valid UTF-8 JSON: {exc}", code="manifest") from exc


def verify_bundle(
    data: bytes, verify_key: VerifyKey, *, max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES
) -> VerifiedBundle:
    """Check structure, signature, manifest schema and every file; return the contents.

    Nothing of the manifest is parsed before the signature has verified.
    """
    raw = split_bundle(data, max_bytes)
    check_signature(raw, verify_key)
    manifest = parse_manifest(decode_manifest_json(raw.manifest_bytes))
    expected = sum(f.size for f in manifest.files)
    body = raw.body
    if len(body) > expected:
        raise BundleContentError(
            f"body has {len(body) - expected} byte(s) not listed in the manifest "
            f"(expected {expected} bytes for {len(manifest.files)} files)",
            code="unlisted-data",
        )
    files: dict[str, bytes] = {}
    offset = 0
    for f in manifest.files:
        chunk = body[offset : offset + f.size]
        if len(chunk) < f.size:
            raise BundleContentError(
                f"file {f.path!r} missing or truncated in the body: "
                f"{len(chunk)} of {f.size} bytes present",
                code="truncated",
            )
        actual = hashlib.sha256(chunk).hexdigest()
        if actual != f.sha256:
            raise BundleContentError(
                f"file {f.path!r}: SHA-256 mismatch (manifest {f.sha256[:16]}..., "
                f"content {actual[:16]}...)",
                code="hash-mismatch",
            )
        files[f.path] = chunk
        offset += f.size
    return VerifiedBundle(
        manifest=manifest,
        manifest_bytes=raw.manifest_bytes,
        signature=raw.signature,
        digest=hashlib.sha256(data).hexdigest(),
        files=files,
    )


def inspect_unverified(data: bytes, max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> dict[str, Any]:
    """Decode the manifest WITHOUT checking the signature (for display only)."""
    raw = split_bundle(data, max_bytes)
    manifest = decode_manifest_json(raw.manifest_bytes)
    return {
        "container_version": MAGIC[7],
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "manifest_bytes": len(raw.manifest_bytes),
        "body_bytes": len(raw.body),
        "signature": raw.signature.hex(),
        "manifest": manifest,
    }


# ---------------------------------------------------------------------------
# Policy


@dataclass(frozen=True)
class Installed:
    version: int
    digest: str  # SHA-256 of the bundle that produced the installed release


def check_policy(
    manifest: Manifest,
    digest: str,
    identity: DeviceIdentity,
    installed: Installed | None,
    now: datetime,
) -> bool:
    """Decide whether a verified bundle may be applied.

    Returns True to apply, False when the identical bundle is already installed
    (a no-op); raises :class:`BundlePolicyError` with the precise reason otherwise.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if now >= manifest.expires:
        raise BundlePolicyError(
            f"bundle expired at {format_time(manifest.expires)} (gateway time {format_time(now)})",
            code="expired",
        )
    t = manifest.target
    if t.kind == "gateway" and t.id != identity.gateway_id:
        raise BundlePolicyError(
            f"bundle is for gateway {t.id!r}, this is gateway {identity.gateway_id!r}",
            code="wrong-target",
        )
    if t.kind == "site" and t.id != identity.site_id:
        here = repr(identity.site_id) if identity.site_id else "no site configured"
        raise BundlePolicyError(
            f"bundle is for site {t.id!r}, this gateway is in {here}", code="wrong-target"
        )
    if installed is not None:
        if manifest.version < installed.version:
            raise BundlePolicyError(
                f"rollback refused: bundle version {manifest.version} is lower than "
                f"installed version {installed.version}",
                code="rollback",
            )
        if manifest.version == installed.version:
            if digest == installed.digest:
                return False
            raise BundlePolicyError(
                f"bundle version {manifest.version} is already installed with different "
                f"content (installed {installed.digest[:16]}..., this {digest[:16]}...); "
                "a new bundle needs a higher version",
                code="version-conflict",
            )
    return True

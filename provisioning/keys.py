"""Per-gateway key material: a keystore directory.

Every gateway generates its own keys at provisioning; no two gateways share
a private key, and no private key ever leaves the device. The directory
holds::

    manifest.json          gateway id, format, current purpose-key versions
    identity.ed25519.pem   Ed25519 identity key (signs uplink, audit checkpoints)
    exchange.x25519.pem    X25519 key (central seals data *to* the gateway)
    root.secret            32 random bytes; purpose keys are derived from it

Private files are written atomically (temporary file, fsync, rename, fsync of
the directory) with mode 0600, the directory with mode 0700. Loading refuses
a private file or directory that group or others can access, with a message
naming the file and the command that fixes it.

Purpose keys (``storage``, ``uplink-seal``, ...) are derived with
HKDF-SHA256 from the root secret::

    salt = b"edgegw/keystore/v1"
    info = b"edgegw purpose=<purpose> version=<n> gateway=<gateway id>"

Rotating a purpose bumps its version in the manifest; earlier versions stay
derivable (``purpose_key(p, version=k)``) so that data buffered under an
older version can still be opened. The root secret itself is never rotated by
this module: replacing it would orphan every buffered record.
"""

from __future__ import annotations

import base64
import os
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from firmware_bridge.durable import fsync_dir, write_atomic
from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.identifiers import is_name, is_purpose
from store_forward.uplink_keys import fingerprint

MANIFEST = "manifest.json"
IDENTITY_FILE = "identity.ed25519.pem"
EXCHANGE_FILE = "exchange.x25519.pem"
ROOT_FILE = "root.secret"
FORMAT = 1
DEFAULT_PURPOSES: tuple[str, ...] = ("storage", "uplink-seal")
HKDF_SALT = b"edgegw/keystore/v1"
ROOT_SECRET_BYTES = 32
PURPOSE_KEY_BYTES = 32



class KeystoreError(EdgeGwError):
    """The keystore is missing, malformed, or a request on it is invalid."""

    kind = ErrorKind.INVALID


class KeyPermissionError(KeystoreError):
    """A private key file (or the keystore directory) is accessible to others."""

    kind = ErrorKind.AUTH


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def derive_purpose_key(root: bytes, gateway_id: str, purpose: str, version: int) -> bytes:
    """HKDF-SHA256 purpose key (pure; exposed so tests and tools can check vectors)."""
    _check_purpose(purpose)
    if version < 1:
        raise KeystoreError(f"key version must be >= 1, got {version}")
    info = f"edgegw purpose={purpose} version={version} gateway={gateway_id}".encode()
    return HKDF(
        algorithm=hashes.SHA256(), length=PURPOSE_KEY_BYTES, salt=HKDF_SALT, info=info
    ).derive(root)


def _check_purpose(purpose: str) -> None:
    if not is_purpose(purpose):
        raise KeystoreError(
            f"invalid purpose name {purpose!r} (lower-case letters, digits and '-', max 32)"
        )


# ---------------------------------------------------------------------------
# Files


def _check_private_mode(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeystoreError(f"{path}: missing (keystore incomplete)") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeystoreError(f"{path}: not a regular file")
    if st.st_mode & 0o077:
        raise KeyPermissionError(
            f"{path}: private key file is accessible by group/others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it. "
            f"Fix with: chmod 600 {path}"
        )


def _read_private(path: Path) -> bytes:
    _check_private_mode(path)
    return path.read_bytes()


def _check_dir_mode(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeystoreError(f"{path}: keystore directory does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise KeystoreError(f"{path}: not a directory")
    if st.st_mode & 0o077:
        raise KeyPermissionError(
            f"{path}: keystore directory is accessible by group/others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it. "
            f"Fix with: chmod 700 {path}"
        )


# ---------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class Manifest:
    gateway_id: str
    versions: dict[str, int]
    format: int = FORMAT

    def to_json(self) -> bytes:
        return orjson.dumps(
            {"format": self.format, "gateway_id": self.gateway_id, "versions": self.versions},
            option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2,
        )

    @classmethod
    def parse(cls, raw: bytes, source: Path) -> Manifest:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise KeystoreError(f"{source}: not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise KeystoreError(f"{source}: must be a JSON object")
        if doc.get("format") != FORMAT:
            raise KeystoreError(f"{source}: unsupported format {doc.get('format')!r}")
        gid = doc.get("gateway_id")
        if not is_name(gid):
            raise KeystoreError(f"{source}: gateway_id missing or invalid: {gid!r}")
        versions = doc.get("versions")
        if not isinstance(versions, dict):
            raise KeystoreError(f"{source}: versions must be an object")
        out: dict[str, int] = {}
        for purpose, v in versions.items():
            if not is_purpose(purpose):
                raise KeystoreError(f"{source}: versions: invalid purpose {purpose!r}")
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise KeystoreError(f"{source}: versions.{purpose}: must be an integer >= 1")
            out[purpose] = v
        return cls(gateway_id=gid, versions=out)


# ---------------------------------------------------------------------------
# Keystore


class Keystore:
    """A gateway's keys on disk. Create with :meth:`init`, load with :meth:`open`."""

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        identity: Ed25519PrivateKey,
        exchange: X25519PrivateKey,
        root: bytes,
    ) -> None:
        self._path = path
        self._manifest = manifest
        self._identity = identity
        self._exchange = exchange
        self._root = root

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    def init(
        cls, path: str | Path, gateway_id: str, purposes: Iterable[str] = DEFAULT_PURPOSES
    ) -> Keystore:
        """Generate fresh keys for ``gateway_id`` in ``path`` (created 0700).

        Refuses to touch a directory that already holds a keystore: regenerating
        the identity silently would orphan the gateway's registration and its
        buffered data.
        """
        p = Path(path)
        if not is_name(gateway_id):
            raise KeystoreError(
                f"invalid gateway id {gateway_id!r} (letters, digits, _ . -, max 64)"
            )
        purposes = tuple(purposes)
        for purpose in purposes:
            _check_purpose(purpose)
        if (p / MANIFEST).exists() or (p / ROOT_FILE).exists():
            raise KeystoreError(f"{p}: a keystore already exists here; refusing to overwrite it")
        created = [d for d in (p, *p.parents) if not d.exists()]
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(p, 0o700)
        for d in reversed(created):  # the new directories' names survive a power cut too
            fsync_dir(d.parent)
        identity = Ed25519PrivateKey.generate()
        exchange = X25519PrivateKey.generate()
        root = secrets.token_bytes(ROOT_SECRET_BYTES)
        pem = serialization.Encoding.PEM
        pkcs8 = serialization.PrivateFormat.PKCS8
        nocrypt = serialization.NoEncryption()
        write_atomic(p / IDENTITY_FILE, identity.private_bytes(pem, pkcs8, nocrypt))
        write_atomic(p / EXCHANGE_FILE, exchange.private_bytes(pem, pkcs8, nocrypt))
        write_atomic(p / ROOT_FILE, root)
        manifest = Manifest(gateway_id=gateway_id, versions=dict.fromkeys(purposes, 1))
        # the manifest is written last: its presence marks a complete keystore
        write_atomic(p / MANIFEST, manifest.to_json(), mode=0o600)
        return cls(p, manifest, identity, exchange, root)

    @classmethod
    def open(cls, path: str | Path) -> Keystore:
        """Load a keystore, refusing private files readable by group or others."""
        p = Path(path)
        _check_dir_mode(p)
        mpath = p / MANIFEST
        if not mpath.exists():
            raise KeystoreError(f"{mpath}: missing; run 'edgegw keys init' first")
        manifest = Manifest.parse(mpath.read_bytes(), mpath)
        identity = _load_private(p / IDENTITY_FILE, Ed25519PrivateKey)
        exchange = _load_private(p / EXCHANGE_FILE, X25519PrivateKey)
        root = _read_private(p / ROOT_FILE)
        if len(root) != ROOT_SECRET_BYTES:
            raise KeystoreError(
                f"{p / ROOT_FILE}: expected {ROOT_SECRET_BYTES} bytes, found {len(root)}"
            )
        return cls(p, manifest, identity, exchange, root)

    # -- identity ----------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def gateway_id(self) -> str:
        return self._manifest.gateway_id

    def identity_public_bytes(self) -> bytes:
        return self._identity.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def exchange_public_bytes(self) -> bytes:
        return self._exchange.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, msg: bytes) -> bytes:
        """Ed25519 signature (64 bytes) with the identity key.

        Callers prefix ``msg`` with their own context string (e.g.
        ``b"edgegw-audit-checkpoint-v1\\0"``) so that a signature made for one
        purpose can never be presented as another.
        """
        return self._identity.sign(msg)

    def exchange(self, peer_public: bytes) -> bytes:
        """X25519 shared secret with ``peer_public`` (raw 32 bytes)."""
        if len(peer_public) != 32:
            raise KeystoreError(f"X25519 public key must be 32 bytes, got {len(peer_public)}")
        return self._exchange.exchange(X25519PublicKey.from_public_bytes(peer_public))

    # -- purpose keys --------------------------------------------------------

    def versions(self) -> dict[str, int]:
        return dict(self._manifest.versions)

    def purpose_key(self, purpose: str, version: int | None = None) -> tuple[int, bytes]:
        """``(version, key)`` for ``purpose``; the current version unless one is given.

        Versions 1..current are derivable; anything else is refused.
        """
        _check_purpose(purpose)
        current = self._manifest.versions.get(purpose)
        if current is None:
            known = ", ".join(sorted(self._manifest.versions)) or "none"
            raise KeystoreError(f"unknown key purpose {purpose!r} (known: {known})")
        v = current if version is None else version
        if not 1 <= v <= current:
            raise KeystoreError(
                f"purpose {purpose!r} has versions 1..{current}; version {v} does not exist"
            )
        return v, derive_purpose_key(self._root, self.gateway_id, purpose, v)

    def rotate(self, purpose: str) -> int:
        """Make version n+1 current for ``purpose`` (added at version 1 if new).

        The manifest is replaced atomically; returns the new version.
        """
        _check_purpose(purpose)
        versions = dict(self._manifest.versions)
        versions[purpose] = versions.get(purpose, 0) + 1
        manifest = Manifest(gateway_id=self.gateway_id, versions=versions)
        write_atomic(self._path / MANIFEST, manifest.to_json(), mode=0o600)
        self._manifest = manifest
        return versions[purpose]

    # -- export --------------------------------------------------------------

    def export_public(self) -> dict[str, Any]:
        """What central needs to register this gateway; contains no secret."""
        ident = self.identity_public_bytes()
        exch = self.exchange_public_bytes()
        return {
            "gateway_id": self.gateway_id,
            "identity_ed25519": b64(ident),
            "identity_fingerprint": fingerprint(ident),
            "exchange_x25519": b64(exch),
            "exchange_fingerprint": fingerprint(exch),
            "key_versions": self.versions(),
        }


def load_private(path: Path, kind: type[Any]) -> Any:
    """Load a PEM private key of ``kind``, refusing a file readable by group or others."""
    return _load_private(path, kind)


def _load_private(path: Path, kind: type[Any]) -> Any:
    data = _read_private(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeystoreError(f"{path}: not a readable PEM private key: {exc}") from exc
    if not isinstance(key, kind):
        raise KeystoreError(f"{path}: expected a {kind.__name__}, found {type(key).__name__}")
    return key


def load_ed25519_public(raw: bytes) -> Ed25519PublicKey:
    if len(raw) != 32:
        raise KeystoreError(f"Ed25519 public key must be 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)

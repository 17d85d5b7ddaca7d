"""The headend's key and the gateways enrolled with it.

The headend's X25519 key (``edgegw headend keygen``) is the other side of
every gateway's uplink key (:mod:`store_forward.uplink_keys`: the derivation).
:class:`GatewayRegistry` is a directory of the JSON files that ``edgegw keys
export-public`` writes (one per enrolled gateway), each optionally with
``"revoked": true`` (or ``"revoked_key_ids": [..]``). Unknown and revoked
gateways get no key, so their batches are refused.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from firmware_bridge.durable import write_atomic
from store_forward.uplink_keys import PURPOSE, UplinkKeyError, derive_uplink_key, parse_public_key

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- headend key


def generate_headend_key(path: str | Path) -> bytes:
    """Create the headend's X25519 key (PEM, 0600; never replaces a file). Returns the public key."""
    p = Path(path)
    if p.exists():
        raise UplinkKeyError(f"{p} exists; refusing to replace the headend key")
    key = X25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(p, pem, mode=0o600)
    return _public_bytes(key)


def load_headend_key(path: str | Path) -> X25519PrivateKey:
    p = Path(path)
    try:
        st = p.stat()
        if st.st_mode & 0o077:
            raise UplinkKeyError(f"{p}: headend key is accessible by group/others; chmod 600 {p}")
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except OSError as exc:
        raise UplinkKeyError(f"{p}: cannot read headend key: {exc}") from exc
    except ValueError as exc:
        raise UplinkKeyError(f"{p}: not a PEM private key: {exc}") from exc
    if not isinstance(key, X25519PrivateKey):
        raise UplinkKeyError(f"{p}: not an X25519 key")
    return key


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Enrollment:
    gateway_id: str
    exchange_public: bytes
    max_key_id: int
    revoked: bool
    revoked_key_ids: frozenset[int]
    source: str


def parse_enrollment(doc: Any, source: str) -> Enrollment:
    """One ``edgegw keys export-public`` document (plus optional revocation fields)."""
    if not isinstance(doc, dict):
        raise UplinkKeyError(f"{source}: not a JSON object")
    gid = doc.get("gateway_id")
    if not isinstance(gid, str) or not gid:
        raise UplinkKeyError(f"{source}: gateway_id missing")
    exch = doc.get("exchange_x25519")
    if not isinstance(exch, str):
        raise UplinkKeyError(f"{source}: exchange_x25519 missing")
    versions = doc.get("key_versions") or {}
    max_id = versions.get(PURPOSE, 1) if isinstance(versions, dict) else 1
    if not isinstance(max_id, int) or isinstance(max_id, bool) or max_id < 1:
        raise UplinkKeyError(f"{source}: key_versions.{PURPOSE} must be an integer >= 1")
    revoked_ids = doc.get("revoked_key_ids", [])
    if not isinstance(revoked_ids, list) or not all(isinstance(i, int) for i in revoked_ids):
        raise UplinkKeyError(f"{source}: revoked_key_ids must be a list of integers")
    return Enrollment(
        gateway_id=gid,
        exchange_public=parse_public_key(exch),
        max_key_id=max_id,
        revoked=bool(doc.get("revoked", False)),
        revoked_key_ids=frozenset(revoked_ids),
        source=source,
    )


class GatewayRegistry:
    """Enrolled gateways and the batch keys the headend shares with each."""

    def __init__(self, headend_key: X25519PrivateKey, enrollments: dict[str, Enrollment]) -> None:
        self._key = headend_key
        self._public = _public_bytes(headend_key)
        self._enrolled = enrollments
        self._cache: dict[tuple[str, int], bytes] = {}

    @property
    def headend_public(self) -> bytes:
        return self._public

    @classmethod
    def load(cls, headend_key: X25519PrivateKey, directory: str | Path) -> GatewayRegistry:
        """Every ``*.json`` in ``directory``; a malformed file is an error (named)."""
        d = Path(directory)
        if not d.is_dir():
            raise UplinkKeyError(f"{d}: gateway registry directory does not exist")
        enrolled: dict[str, Enrollment] = {}
        for f in sorted(d.glob("*.json")):
            try:
                doc = orjson.loads(f.read_bytes())
            except orjson.JSONDecodeError as exc:
                raise UplinkKeyError(f"{f}: not JSON: {exc}") from exc
            e = parse_enrollment(doc, str(f))
            if e.gateway_id in enrolled:
                raise UplinkKeyError(f"{f}: gateway {e.gateway_id} is also in {enrolled[e.gateway_id].source}")
            enrolled[e.gateway_id] = e
        log.info("gateway registry %s: %d gateways enrolled", d, len(enrolled))
        return cls(headend_key, enrolled)

    def enroll(self, doc: Any, source: str = "<memory>") -> Enrollment:
        e = parse_enrollment(doc, source)
        self._enrolled[e.gateway_id] = e
        self._cache = {k: v for k, v in self._cache.items() if k[0] != e.gateway_id}
        return e

    def revoke(self, gateway_id: str) -> None:
        e = self._enrolled.get(gateway_id)
        if e is not None:
            self._enrolled[gateway_id] = Enrollment(
                e.gateway_id, e.exchange_public, e.max_key_id, True, e.revoked_key_ids, e.source
            )
        self._cache = {k: v for k, v in self._cache.items() if k[0] != gateway_id}

    def status(self, gateway_id: str, key_id: int) -> str:
        """"ok", "unknown", "revoked" or "bad-key-id"."""
        e = self._enrolled.get(gateway_id)
        if e is None:
            return "unknown"
        if e.revoked or key_id in e.revoked_key_ids:
            return "revoked"
        if not 1 <= key_id <= e.max_key_id:
            return "bad-key-id"
        return "ok"

    def key_lookup(self, gateway_id: str, key_id: int) -> bytes | None:
        """For :func:`store_forward.wire.decode_batch`: None when not allowed."""
        if self.status(gateway_id, key_id) != "ok":
            return None
        cached = self._cache.get((gateway_id, key_id))
        if cached is None:
            e = self._enrolled[gateway_id]
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(e.exchange_public))
            cached = derive_uplink_key(shared, gateway_id, self._public, key_id)
            self._cache[(gateway_id, key_id)] = cached
        return cached


def headend_public_b64(path: str | Path) -> str:
    return base64.b64encode(_public_bytes(load_headend_key(path))).decode()

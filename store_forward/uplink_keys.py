"""Uplink keys: bound to the enrolled gateway identity, known only to it and the headend.

The gateway's X25519 exchange key (keystore, ``edgegw keys init``) and the
headend's X25519 key agree on a shared secret; the batch key is derived from
it with HKDF-SHA256::

    ikm  = X25519(gateway exchange key, headend key)
    salt = "edgegw/uplink-key/v1"
    info = "gateway=<id> key_id=<n> headend=<fingerprint of the headend public key>"

``key_id`` is the keystore's ``uplink-seal`` purpose version: rotating that
purpose (``Keystore.rotate("uplink-seal")``) moves the gateway to a new batch
key that the headend can derive as soon as its registry entry says the
version exists. A batch that verifies under the key for (gateway, key id)
was sealed by the holder of that gateway's exchange private key — nobody
else, not the broker, not another gateway — so the headend knows who sent it.

The headend derives the same keys from its side of the exchange
(:class:`headend.registry.GatewayRegistry`, which knows the enrolled gateways).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from firmware_bridge.errors import EdgeGwError, ErrorKind

PURPOSE = "uplink-seal"
_SALT = b"edgegw/uplink-key/v1"


class UplinkKeyError(EdgeGwError):
    """An uplink key, headend key or registry entry is missing or malformed."""

    kind = ErrorKind.INVALID


def fingerprint(public_key: bytes) -> str:
    """Short, stable identifier of a raw public key: ``sha256:`` + 32 hex digits
    (names the headend in the key derivation; shown for keystore keys)."""
    return "sha256:" + hashlib.sha256(public_key).hexdigest()[:32]


def derive_uplink_key(shared: bytes, gateway_id: str, headend_public: bytes, key_id: int) -> bytes:
    """The 32-byte batch key for ``key_id`` (pure)."""
    if key_id < 1:
        raise UplinkKeyError(f"uplink key id must be >= 1, got {key_id}")
    info = f"gateway={gateway_id} key_id={key_id} headend={fingerprint(headend_public)}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=info).derive(shared)


@dataclass(frozen=True)
class UplinkKey:
    key_id: int
    key: bytes


class _Exchanger(Protocol):
    @property
    def gateway_id(self) -> str: ...

    def exchange(self, peer_public: bytes) -> bytes: ...

    def versions(self) -> dict[str, int]: ...


def gateway_uplink_key(keystore: _Exchanger, headend_public: bytes) -> UplinkKey:
    """The gateway's current batch key towards the headend with ``headend_public``."""
    key_id = keystore.versions().get(PURPOSE)
    if key_id is None:
        raise UplinkKeyError(f"the keystore has no {PURPOSE!r} purpose")
    shared = keystore.exchange(headend_public)
    return UplinkKey(key_id, derive_uplink_key(shared, keystore.gateway_id, headend_public, key_id))


def parse_public_key(text: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UplinkKeyError(f"not base64: {text!r}") from exc
    if len(raw) != 32:
        raise UplinkKeyError(f"an X25519 public key is 32 bytes, got {len(raw)}")
    return raw

"""Wiring helpers for the daemon: the outbox and uplink as a config asks for them.

    outbox = await Outbox.open(cfg.storage.path, keys=storage_keys(cfg), policy=storage_policy(cfg))
    uplink = Uplink(outbox, ..., codec=uplink_codec(cfg), max_bytes_per_s=max_bytes_per_s(cfg))

Config keys read here (``gateway.keystore``, ``uplink.headend_public_key``,
``uplink.max_bytes_per_s``) are optional: until ``gateway/config.py`` has them
the defaults below apply.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from store_forward.codec import SealedCodec
from store_forward.outbox import StoragePolicy
from store_forward.storage_keys import StorageKeys

log = logging.getLogger(__name__)

DEFAULT_KEYSTORE = Path("/var/lib/edgegw/keys")


def keystore_dir(cfg: Any) -> Path:
    security = getattr(cfg, "security", None)
    configured = getattr(security, "keystore", None) or getattr(cfg.gateway, "keystore", None)
    return Path(configured or DEFAULT_KEYSTORE)


def _keystore(cfg: Any) -> Any | None:
    d = keystore_dir(cfg)
    if not (d / "manifest.json").exists():
        return None
    from provisioning.keys import Keystore

    return Keystore.open(d)


def storage_keys(cfg: Any) -> StorageKeys:
    """``storage.key_file`` if set; else the keystore's ``storage`` purpose key;
    else ``<db>.key`` beside the database (created; logged as weaker)."""
    if cfg.storage.key_file:
        return StorageKeys.from_key_file(cfg.storage.key_file)
    ks = _keystore(cfg)
    if ks is not None:
        return StorageKeys.from_keystore(ks)
    log.warning(
        "no keystore at %s and no storage.key_file: sealing the outbox under a key file"
        " beside the database", keystore_dir(cfg)
    )
    return StorageKeys.beside(cfg.storage.path)


def storage_policy(cfg: Any) -> StoragePolicy:
    return StoragePolicy(max_bytes=cfg.storage.max_bytes, reserve_bytes=cfg.storage.reserve_bytes)


def uplink_codec(cfg: Any) -> SealedCodec | None:
    """The sealed codec when both the keystore and the headend's public key are
    configured; None otherwise (the uplink then warns and sends encoding 1)."""
    from store_forward.uplink_keys import derive_uplink_key, gateway_uplink_key, parse_public_key

    pub = getattr(cfg.uplink, "headend_public_key", None)
    ks = _keystore(cfg)
    if not pub or ks is None:
        return None
    headend = parse_public_key(pub)
    key = gateway_uplink_key(ks, headend)
    # Keys of earlier ids: acks for batches sealed before a rotation still verify.
    shared = ks.exchange(headend) if key.key_id > 1 else b""
    older = {i: derive_uplink_key(shared, ks.gateway_id, headend, i) for i in range(1, key.key_id)}
    return SealedCodec(key.key_id, key.key, older=older)


def max_bytes_per_s(cfg: Any) -> float | None:
    value = getattr(cfg.uplink, "max_bytes_per_s", None)
    return float(value) if value else None

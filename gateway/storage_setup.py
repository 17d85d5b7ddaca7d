"""The outbox and the uplink as a gateway's configuration asks for them.

    outbox = await open_database(cfg.storage.path, keys=storage_keys(cfg), policy=storage_policy(cfg))
    uplink = Uplink(outbox, ..., codec=uplink_codec(cfg), max_bytes_per_s=max_bytes_per_s(cfg))

The keys come from the gateway's keystore (``security.keystore``, default
/var/lib/edgegw/keys): the storage key seals the outbox, the uplink key seals
batches towards the headend whose public key is ``uplink.headend_public_key``.
The daemon and ``edgegw backlog export`` (which runs beside it) open the
database the same way, with every table's schema (:mod:`gateway.database`).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from provisioning.keys import Keystore
from store_forward.codec import SealedCodec
from store_forward.outbox import StoragePolicy
from store_forward.sneakernet import SneakernetError, export_backlog
from store_forward.storage_keys import StorageKeys
from store_forward.storage_policy import reserve_for
from store_forward.uplink_keys import derive_uplink_key, gateway_uplink_key, parse_public_key

log = logging.getLogger(__name__)

DEFAULT_KEYSTORE = Path("/var/lib/edgegw/keys")


def keystore_dir(cfg: Any) -> Path:
    security = getattr(cfg, "security", None)
    configured = getattr(security, "keystore", None) or getattr(cfg.gateway, "keystore", None)
    return Path(configured or DEFAULT_KEYSTORE)


def _keystore(d: Path) -> Keystore | None:
    if not (d / "manifest.json").exists():
        return None
    return Keystore.open(d)


def storage_keys(cfg: Any, keystore: Path | None = None) -> StorageKeys:
    """``storage.key_file`` if set; else the ``storage`` purpose key of the keystore
    (``keystore``, default :func:`keystore_dir`); else ``<db>.key`` beside the
    database (created; logged as weaker)."""
    if cfg.storage.key_file:
        return StorageKeys.from_key_file(cfg.storage.key_file)
    d = keystore or keystore_dir(cfg)
    ks = _keystore(d)
    if ks is not None:
        return StorageKeys.from_keystore(ks)
    log.warning(
        "no keystore at %s and no storage.key_file: sealing the outbox under a key file"
        " beside the database", d
    )
    return StorageKeys.beside(cfg.storage.path)


def storage_policy(cfg: Any) -> StoragePolicy:
    """The configured ceiling and free-space reserve; the reserve file (and with it
    the write-ahead log's checkpoint size) follows the number of meters."""
    return StoragePolicy(
        max_bytes=cfg.storage.max_bytes,
        reserve_bytes=cfg.storage.reserve_bytes,
        ballast_bytes=reserve_for(len(getattr(cfg, "meters", ()))),
    )


def uplink_codec(cfg: Any) -> SealedCodec | None:
    """The sealed codec when both the keystore and the headend's public key are
    configured; None otherwise (the uplink then warns and sends encoding 1)."""
    pub = getattr(cfg.uplink, "headend_public_key", None)
    ks = _keystore(keystore_dir(cfg))
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


async def export_backlog_for_config(
    cfg: Any, directory: Path, *, keystore: Path | None = None, headend_public_key: str | None = None
) -> int:
    """Open the gateway's outbox from its config and export the sealed backlog (for
    the USB carry-back, which runs outside the daemon). Returns batch files written.
    Raises KeystoreError, UplinkKeyError, OutboxError or SneakernetError."""
    pub = headend_public_key or getattr(cfg.uplink, "headend_public_key", None)
    if not pub:
        raise SneakernetError("no headend public key (uplink.headend_public_key)")
    ks_dir = keystore or keystore_dir(cfg)
    key = gateway_uplink_key(Keystore.open(ks_dir), parse_public_key(pub))
    codec = SealedCodec(key.key_id, key.key)
    # Loaded here, not with the module: every `edgegw` command imports this one, and
    # the database's schema brings the daemon's components (commands, billing) along.
    from gateway.database import open_database

    ob = await open_database(cfg.storage.path, keys=storage_keys(cfg, ks_dir))
    try:
        return await export_backlog(
            ob,
            directory,
            pack=functools.partial(codec.pack, cfg.gateway.id),
            gateway_id=cfg.gateway.id,
            max_bytes=max(cfg.uplink.batch_max_bytes, 256 * 1024),
        )
    finally:
        await ob.close()

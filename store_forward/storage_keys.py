"""Where the outbox's storage key comes from, and the per-database key under it.

Master key sources, in the order a deployment should prefer them:

1. the gateway keystore's ``storage`` purpose key (``edgegw keys init``), all
   versions 1..current, so records sealed before a rotation still open;
2. a key file named by ``storage.key_file`` (format of
   :func:`store_forward.sealing.create_storage_key`, one version), for sites
   that keep the key on another medium than the database;
3. without either, a key file beside the database (``<db>.key``), created on
   first use. That still protects copies of the database file (backups, a
   database carried off on a stick) but not a stolen SD card: deployments use
   1 or 2.

The outbox never seals under the master key itself. Each database holds a
random 16-byte salt (made when the database is created) and seals under
``HKDF-SHA256(master_v, salt, "edgegw/outbox/v1 version=v")``. A new database
(also one that replaces a damaged one) therefore always starts a fresh nonce
space, so "no epoch record for this key in this database" provably means
"nothing was ever sealed under it" — see :mod:`store_forward.outbox`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from store_forward.sealing import (
    KEY_BYTES,
    StorageKeyError,
    create_storage_key,
    load_storage_key,
)

_INFO = "edgegw/outbox/v1 version={v}"


class _PurposeKeys(Protocol):
    def versions(self) -> dict[str, int]: ...

    def purpose_key(self, purpose: str, version: int | None = None) -> tuple[int, bytes]: ...


@dataclass(frozen=True)
class StorageKeys:
    """Master storage keys by version; ``current`` seals, every version opens."""

    current: int
    keys: Mapping[int, bytes]
    source: str

    def __post_init__(self) -> None:
        if self.current not in self.keys:
            raise StorageKeyError(f"current storage key version {self.current} is not loaded")
        for v, k in self.keys.items():
            if len(k) != KEY_BYTES:
                raise StorageKeyError(f"storage key version {v} is not {KEY_BYTES} bytes")

    @classmethod
    def from_keystore(cls, keystore: _PurposeKeys, purpose: str = "storage") -> StorageKeys:
        current = keystore.versions().get(purpose)
        if current is None:
            raise StorageKeyError(f"the keystore has no {purpose!r} purpose key")
        keys = {v: keystore.purpose_key(purpose, v)[1] for v in range(1, current + 1)}
        return cls(current, keys, f"keystore purpose {purpose!r} v{current}")

    @classmethod
    def from_key_file(cls, path: str | Path, *, create: bool = False) -> StorageKeys:
        p = Path(path)
        if create and not p.exists():
            key = create_storage_key(p)
        else:
            key = load_storage_key(p)
        return cls(1, {1: key}, f"key file {p}")

    @classmethod
    def beside(cls, db_path: str | Path) -> StorageKeys:
        """The fallback: ``<db>.key`` next to the database, created on first use."""
        p = Path(db_path)
        return cls.from_key_file(p.with_name(p.name + ".key"), create=True)


def database_key(master: bytes, salt: bytes, version: int) -> bytes:
    """The key one database seals under (pure)."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=salt,
        info=_INFO.format(v=version).encode(),
    ).derive(master)

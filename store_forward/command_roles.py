"""Central signing roles, which command types each role may sign, and the trust store.

Central signs every downlink command with a key that belongs to exactly one
role. A key can only sign the command types of its role, so a leaked
operations key cannot mint money and a leaked billing key cannot cut supply:

=================  ==============================================================
role               command types
=================  ==============================================================
billing            ``topup``, ``tariff.publish``, ``balance.snapshot``,
                   ``meter.replace`` (a meter exchange: the registers it is billed by)
operations         ``relay.operate``, ``config.patch``, ``meter.roster``,
                   ``time.sync``, ``uplink.resend``, ``software.offer``
provisioning       ``provisioning.bundle`` (technician USB bundles)
key_management     ``keys.rotate`` (add / revoke central keys, rotate gateway
                   purpose keys)
=================  ==============================================================

Key rotation has its own role, held offline: whoever can install a central
key can give itself every other role, so that power must not sit with a key
that is online for day-to-day billing or operations work.

The trust store is provisioned as a JSON file::

    {"format": 1,
     "keys": [{"key_id": "billing-2026a", "role": "billing", "public_key": "<base64>"}],
     "revoked": ["billing-2025b"]}

Keys added and revoked later by signed ``keys.rotate`` commands live in the
daemon's database (see :mod:`gateway.security.envelope`); a revocation there
always wins over the file.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.identifiers import is_issued_id


class Role(enum.StrEnum):
    BILLING = "billing"
    OPERATIONS = "operations"
    PROVISIONING = "provisioning"
    KEY_MANAGEMENT = "key_management"


class CommandType(enum.StrEnum):
    TOPUP = "topup"
    TARIFF_PUBLISH = "tariff.publish"
    BALANCE_SNAPSHOT = "balance.snapshot"
    METER_REPLACE = "meter.replace"
    RELAY_OPERATE = "relay.operate"
    CONFIG_PATCH = "config.patch"
    METER_ROSTER = "meter.roster"
    TIME_SYNC = "time.sync"
    UPLINK_RESEND = "uplink.resend"
    SOFTWARE_OFFER = "software.offer"
    PROVISIONING_BUNDLE = "provisioning.bundle"
    KEYS_ROTATE = "keys.rotate"


COMMAND_ROLE: Mapping[CommandType, Role] = MappingProxyType(
    {
        CommandType.TOPUP: Role.BILLING,
        CommandType.TARIFF_PUBLISH: Role.BILLING,
        CommandType.BALANCE_SNAPSHOT: Role.BILLING,
        CommandType.METER_REPLACE: Role.BILLING,
        CommandType.RELAY_OPERATE: Role.OPERATIONS,
        CommandType.CONFIG_PATCH: Role.OPERATIONS,
        CommandType.METER_ROSTER: Role.OPERATIONS,
        CommandType.TIME_SYNC: Role.OPERATIONS,
        CommandType.UPLINK_RESEND: Role.OPERATIONS,
        CommandType.SOFTWARE_OFFER: Role.OPERATIONS,
        CommandType.PROVISIONING_BUNDLE: Role.PROVISIONING,
        CommandType.KEYS_ROTATE: Role.KEY_MANAGEMENT,
    }
)

_DAY_MS = 86_400_000

# Longest validity (expires_at - issued_at) central may give each type. A
# signed command that leaks stays dangerous for at most this long. Top-ups and
# bundles travel on USB sticks to sites that are offline for weeks, so they get
# longer windows; a time sync must be fresh.
MAX_VALIDITY_MS: Mapping[CommandType, int] = MappingProxyType(
    {
        CommandType.TOPUP: 45 * _DAY_MS,
        CommandType.TARIFF_PUBLISH: 90 * _DAY_MS,
        CommandType.BALANCE_SNAPSHOT: 7 * _DAY_MS,
        CommandType.METER_REPLACE: 45 * _DAY_MS,  # travels on USB like a top-up
        CommandType.RELAY_OPERATE: 2 * _DAY_MS,
        CommandType.CONFIG_PATCH: 30 * _DAY_MS,
        CommandType.METER_ROSTER: 30 * _DAY_MS,
        CommandType.TIME_SYNC: 15 * 60_000,
        CommandType.UPLINK_RESEND: 7 * _DAY_MS,
        CommandType.SOFTWARE_OFFER: 30 * _DAY_MS,
        CommandType.PROVISIONING_BUNDLE: 90 * _DAY_MS,
        CommandType.KEYS_ROTATE: 30 * _DAY_MS,
    }
)

class TrustError(EdgeGwError):
    """The trust store file or a key in it is invalid."""

    kind = ErrorKind.INVALID


@dataclass(frozen=True, slots=True)
class CentralKey:
    key_id: str
    role: Role
    public_key: bytes  # raw Ed25519, 32 bytes

    def __post_init__(self) -> None:
        if not is_issued_id(self.key_id):
            raise TrustError(f"invalid key id {self.key_id!r}")
        if len(self.public_key) != 32:
            raise TrustError(
                f"key {self.key_id}: Ed25519 public key must be 32 bytes, got {len(self.public_key)}"
            )


@dataclass(frozen=True)
class TrustStore:
    """Central public keys by key id, plus the ids that are revoked."""

    keys: Mapping[str, CentralKey] = field(default_factory=dict)
    revoked: frozenset[str] = frozenset()

    @classmethod
    def of(cls, keys: Iterable[CentralKey], revoked: Iterable[str] = ()) -> TrustStore:
        table: dict[str, CentralKey] = {}
        for k in keys:
            if k.key_id in table:
                raise TrustError(f"duplicate key id {k.key_id!r}")
            table[k.key_id] = k
        return cls(keys=MappingProxyType(table), revoked=frozenset(revoked))

    def lookup(self, key_id: str) -> CentralKey | None:
        return self.keys.get(key_id)

    def is_revoked(self, key_id: str) -> bool:
        return key_id in self.revoked

    def public_keys_for(self, role: Role) -> list[Ed25519PublicKey]:
        """Non-revoked keys of ``role`` (e.g. provisioning keys for USB bundle checks)."""
        return [
            Ed25519PublicKey.from_public_bytes(k.public_key)
            for k in sorted(self.keys.values(), key=lambda k: k.key_id)
            if k.role is role and k.key_id not in self.revoked
        ]

    def with_keys(self, keys: Iterable[CentralKey]) -> TrustStore:
        """A store with ``keys`` added; an id already bound to another key is refused."""
        table = dict(self.keys)
        for k in keys:
            old = table.get(k.key_id)
            if old is not None and old != k:
                raise TrustError(f"key id {k.key_id!r} is already bound to a different key/role")
            table[k.key_id] = k
        return TrustStore(keys=MappingProxyType(table), revoked=self.revoked)

    def with_revoked(self, key_ids: Iterable[str]) -> TrustStore:
        return TrustStore(keys=self.keys, revoked=self.revoked | frozenset(key_ids))

    @classmethod
    def from_dict(cls, doc: object, source: str = "trust store") -> TrustStore:
        if not isinstance(doc, dict):
            raise TrustError(f"{source}: must be a JSON object")
        if doc.get("format") != 1:
            raise TrustError(f"{source}: unsupported format {doc.get('format')!r}")
        raw_keys = doc.get("keys")
        if not isinstance(raw_keys, list):
            raise TrustError(f"{source}: keys must be an array")
        keys: list[CentralKey] = []
        for i, rk in enumerate(raw_keys):
            where = f"{source}: keys[{i}]"
            if not isinstance(rk, dict):
                raise TrustError(f"{where}: must be an object")
            try:
                role = Role(str(rk.get("role")))
            except ValueError:
                raise TrustError(
                    f"{where}.role: must be one of {', '.join(r.value for r in Role)}"
                ) from None
            kid = rk.get("key_id")
            if not isinstance(kid, str):
                raise TrustError(f"{where}.key_id: must be a string")
            pk = rk.get("public_key")
            if not isinstance(pk, str):
                raise TrustError(f"{where}.public_key: must be a base64 string")
            try:
                raw = base64.b64decode(pk, validate=True)
            except binascii.Error:
                raise TrustError(f"{where}.public_key: not valid base64") from None
            try:
                keys.append(CentralKey(kid, role, raw))
            except TrustError as exc:
                raise TrustError(f"{where}: {exc}") from None
        revoked = doc.get("revoked", [])
        if not isinstance(revoked, list) or not all(isinstance(r, str) for r in revoked):
            raise TrustError(f"{source}: revoked must be an array of key ids")
        try:
            return cls.of(keys, revoked)
        except TrustError as exc:
            raise TrustError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, object]:
        return {
            "format": 1,
            "keys": [
                {
                    "key_id": k.key_id,
                    "role": k.role.value,
                    "public_key": base64.b64encode(k.public_key).decode("ascii"),
                }
                for k in sorted(self.keys.values(), key=lambda k: k.key_id)
            ],
            "revoked": sorted(self.revoked),
        }

    @classmethod
    def load(cls, path: str | Path) -> TrustStore:
        p = Path(path)
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raise TrustError(f"{p}: cannot read: {exc.strerror or exc}") from exc
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise TrustError(f"{p}: not valid JSON: {exc}") from exc
        return cls.from_dict(doc, str(p))

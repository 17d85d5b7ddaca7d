"""Central's signing keys: one per role, each signing only the command types of its role.

A key directory (``--keys DIR``) holds

* ``trust.json`` — the trust store the gateways are provisioned with
  (:class:`store_forward.command_roles.TrustStore`: key id, role, public key;
  revoked ids), and
* ``<key id>.pem`` — the Ed25519 private key of each key central signs with
  (PKCS#8 PEM, mode 0600; ``edgegw central keys init`` makes them, and
  ``edgegw command keygen --private-out DIR/<key id>.pem --trust
  DIR/trust.json`` adds one).

For each role the directory must hold at most one usable key: listed in the
trust store, not revoked, its private file present and matching the listed
public key. A directory may hold only some roles' keys — a billing office's
machine only the billing key — and then commands of the other roles cannot be
signed there (:class:`SigningError`). The ``key_management`` key belongs
offline and is refused here.

Signing uses :func:`store_forward.command_envelope.sign_command`, the same
code the gateway verifies with, so a command that signs is one the gateway
can parse.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware_bridge.durable import fsync_dir, write_atomic
from firmware_bridge.errors import EdgeGwError, ErrorKind
from store_forward.command_envelope import EnvelopeError, sign_command
from store_forward.command_roles import (
    COMMAND_ROLE,
    CentralKey,
    CommandType,
    Role,
    TrustError,
    TrustStore,
)

TRUST_FILE = "trust.json"
# The roles whose keys may sit on central's online host.
ONLINE_ROLES = frozenset({Role.BILLING, Role.OPERATIONS})


class SigningError(EdgeGwError):
    """No key to sign with, or a key directory that is not right."""

    kind = ErrorKind.AUTH


@dataclass(frozen=True)
class RoleKey:
    key_id: str
    role: Role
    private: Ed25519PrivateKey


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _load_pem(path: Path) -> Ed25519PrivateKey:
    try:
        st = path.stat()
        if st.st_mode & 0o077:
            raise SigningError(f"{path}: private key is readable by group or others; chmod 600 {path}")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise SigningError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise SigningError(f"{path}: not a PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path}: not an Ed25519 key")
    return key


class Signer:
    """The role keys central may sign with."""

    def __init__(self, keys: Iterable[RoleKey]) -> None:
        self.keys: dict[Role, RoleKey] = {}
        for k in keys:
            if k.role in self.keys:
                raise SigningError(
                    f"two {k.role} keys ({self.keys[k.role].key_id}, {k.key_id}): keep one"
                )
            if k.role not in ONLINE_ROLES:
                raise SigningError(f"{k.key_id}: a {k.role} key does not belong on central's online host")
            self.keys[k.role] = k

    @classmethod
    def load(cls, directory: str | Path) -> Signer:
        """The usable keys of ``directory`` (see the module's description)."""
        d = Path(directory)
        try:
            trust = TrustStore.load(d / TRUST_FILE)
        except TrustError as exc:
            raise SigningError(str(exc)) from exc
        found: list[RoleKey] = []
        for k in sorted(trust.keys.values(), key=lambda k: k.key_id):
            pem = d / f"{k.key_id}.pem"
            if trust.is_revoked(k.key_id) or not pem.exists():
                continue
            private = _load_pem(pem)
            if _raw_public(private) != k.public_key:
                raise SigningError(f"{pem}: does not match the public key of {k.key_id} in {TRUST_FILE}")
            found.append(RoleKey(k.key_id, k.role, private))
        if not found:
            raise SigningError(f"{d}: no usable signing key (a <key id>.pem listed in {TRUST_FILE})")
        return cls(found)

    def roles(self) -> frozenset[Role]:
        return frozenset(self.keys)

    def only(self, role: Role) -> Signer:
        """A signer holding only ``role``'s key: whoever acts in a role gets this one,
        so a mistake further up cannot have another role's key sign for them."""
        k = self.keys.get(role)
        return Signer([k] if k is not None else [])

    def key_for(self, type: CommandType) -> RoleKey:
        role = COMMAND_ROLE[type]
        k = self.keys.get(role)
        if k is None:
            article = "an" if role.value[0] in "aeiou" else "a"
            raise SigningError(f"{type} is signed with {article} {role} key, and none is available here")
        return k

    def sign(
        self,
        type: CommandType,
        *,
        target: str,
        command_id: str,
        counter: int,
        issued_ms: int,
        expires_ms: int,
        body: Mapping[str, Any],
    ) -> bytes:
        """The envelope's wire bytes, signed with the key of the type's role."""
        k = self.key_for(type)
        try:
            return sign_command(
                k.private,
                issuer=k.key_id,
                target=target,
                command_id=command_id,
                counter=counter,
                issued_at_ms=issued_ms,
                expires_at_ms=expires_ms,
                type=type,
                body=body,
            )
        except EnvelopeError as exc:
            raise SigningError(f"{type} for {target}: {exc}") from exc


def init_keys(directory: str | Path, roles: Iterable[Role] = (Role.BILLING, Role.OPERATIONS)) -> list[CentralKey]:
    """Make a key for each role in ``directory`` and list its public part in
    ``trust.json`` (created, or extended). Existing files are never replaced."""
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    trust_path = d / TRUST_FILE
    try:
        trust = TrustStore.load(trust_path) if trust_path.exists() else TrustStore.of([])
    except TrustError as exc:
        raise SigningError(str(exc)) from exc
    stamp = time.strftime("%Y%m%d", time.gmtime())
    made: list[CentralKey] = []
    for role in roles:
        if role not in ONLINE_ROLES:
            raise SigningError(f"a {role} key does not belong on central's online host")
        key_id = f"{role.value}-{stamp}-{secrets.token_hex(2)}"
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path = d / f"{key_id}.pem"
        if path.exists():
            raise SigningError(f"{path} exists; refusing to replace a key")
        write_atomic(path, pem, mode=0o600)
        ck = CentralKey(key_id, role, _raw_public(key))
        trust = trust.with_keys([ck])
        made.append(ck)
    write_atomic(trust_path, orjson.dumps(trust.to_dict(), option=orjson.OPT_INDENT_2) + b"\n", mode=0o644)
    fsync_dir(d)
    return made


def public_text(k: CentralKey) -> str:
    return base64.b64encode(k.public_key).decode("ascii")

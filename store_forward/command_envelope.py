"""Signed command envelopes: the wire format, signing and the pure checks.

This is the part of the command protocol both ends share: central (the
reference headend, :mod:`headend.signing`) signs with it and the gateway
(:mod:`gateway.security.envelope`, which adds the replay state and the
decision steps 3-6) verifies with it. Nothing here touches a database or a
clock.

Wire form (UTF-8 JSON, at most :data:`MAX_ENVELOPE_BYTES`)::

    {"payload": "<base64 of the canonical payload bytes>",
     "signature": "<base64 of the 64-byte Ed25519 signature>"}

The canonical payload is the JSON object below serialised with keys sorted
(recursively) and no whitespace, exactly as ``orjson.dumps(obj,
option=OPT_SORT_KEYS)`` writes it; floats are not allowed anywhere (money and
energy travel as integers or decimal strings)::

    {"body": {...}, "counter": 17, "expires_at": 1767225600000, "id": "cmd-...",
     "issued_at": 1767139200000, "issuer": "billing-2026a", "target": "gw-0001",
     "type": "topup", "v": 1}

The signature covers ``SIGN_CONTEXT + payload`` (the context string keeps a
command signature from ever being valid as any other kind of signature). The
verifier checks the signature over the bytes as received and then requires
that they *are* the canonical form: a payload signed in any other
serialisation (spaces, unsorted keys, duplicate keys) is refused, so there is
exactly one byte string per command and no parser differential.

Steps 1 (size, shape, canonical form, body schema: :func:`parse_envelope`)
and 2 (issuer known and not revoked, Ed25519 signature, role allowed for the
type: :func:`check_signature`) live here; docs/security.md §3 gives the
whole order.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.identifiers import is_issued_id, is_name
from store_forward.command_roles import (
    COMMAND_ROLE,
    MAX_VALIDITY_MS,
    CommandType,
    TrustStore,
)

ENVELOPE_VERSION = 1
SIGN_CONTEXT = b"edgegw-command-v1\x00"
MAX_ENVELOPE_BYTES = 64 * 1024
MAX_DEPTH = 12
MAX_COUNTER = 2**63 - 1
MAX_TIME_MS = 2**53  # far beyond any real date; keeps values exact everywhere
# The sales channels a top-up's body may name (``payment_channel``).
PAYMENT_CHANNELS = frozenset({"counter", "bank", "mobile_app", "agent"})

# Why a body cannot be right before any key is used (the gateway's body rules,
# gateway.commands.bodies.problem_before_signature): (type, body, command id)
# -> a message, or None. Without one, only the envelope's own shape is checked.
BodyProblem = Callable[[CommandType, Mapping[str, Any], str], "str | None"]

_COMMAND_TYPES = frozenset(t.value for t in CommandType)
_PAYLOAD_KEYS = frozenset(
    {"v", "target", "id", "issuer", "counter", "issued_at", "expires_at", "type", "body"}
)


class Outcome(enum.StrEnum):
    APPLIED = "applied"  # new and valid: apply the body in this transaction, then commit
    DUPLICATE = "duplicate"  # valid, but this command id was applied before: no effect
    REJECTED = "rejected"


class RejectReason(enum.StrEnum):
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    NON_CANONICAL = "non_canonical"
    VALIDITY_TOO_LONG = "validity_too_long"
    BAD_BODY = "bad_body"
    UNKNOWN_ISSUER = "unknown_issuer"
    KEY_REVOKED = "key_revoked"
    BAD_SIGNATURE = "bad_signature"
    WRONG_ROLE = "wrong_role"
    WRONG_TARGET = "wrong_target"
    REPLAY = "replay"
    COUNTER_STALE = "counter_stale"
    EXPIRED = "expired"
    ISSUED_BEFORE_RECOVERY = "issued_before_recovery"


class EnvelopeError(EdgeGwError, ValueError):
    """Raised by :func:`sign_command` for arguments that would make an invalid envelope."""

    kind = ErrorKind.INVALID


@dataclass(frozen=True)
class Envelope:
    """A parsed command. Only :func:`authenticate` returns one whose signature was checked."""

    target: str
    command_id: str
    issuer: str
    counter: int
    issued_at_ms: int
    expires_at_ms: int
    type: CommandType
    body: Mapping[str, Any]
    payload: bytes  # canonical signed bytes
    signature: bytes
    version: int = ENVELOPE_VERSION

    @property
    def digest(self) -> bytes:
        """SHA-256 of the signed payload: names this exact envelope."""
        return hashlib.sha256(self.payload).digest()


@dataclass(frozen=True)
class CommandResult:
    outcome: Outcome
    envelope: Envelope | None = None
    reason: RejectReason | None = None
    message: str = ""
    # With ``bad_body`` from a verified command: the refusing owner's own reason
    # code (e.g. the ledger's ``counter_gap``), so central can tell them apart.
    code: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is not Outcome.REJECTED

    def to_reply(self) -> dict[str, Any]:
        """What the gateway answers to central (no secrets, no payload echo)."""
        out: dict[str, Any] = {"outcome": self.outcome.value}
        if self.envelope is not None:
            out["id"] = self.envelope.command_id
        if self.reason is not None:
            out["reason"] = self.reason.value
        if self.code is not None:
            out["code"] = self.code
        if self.message:
            out["message"] = self.message
        return out


def reject(reason: RejectReason, message: str, env: Envelope | None = None) -> CommandResult:
    """A rejection with its reason and message (``env``: the envelope, once parsed)."""
    return CommandResult(Outcome.REJECTED, env, reason, message)


# ---------------------------------------------------------------------------
# Canonical form and signing


def canonical_payload(
    *,
    target: str,
    command_id: str,
    issuer: str,
    counter: int,
    issued_at_ms: int,
    expires_at_ms: int,
    type: CommandType | str,
    body: Mapping[str, Any],
) -> bytes:
    obj = {
        "v": ENVELOPE_VERSION,
        "target": target,
        "id": command_id,
        "issuer": issuer,
        "counter": counter,
        "issued_at": issued_at_ms,
        "expires_at": expires_at_ms,
        "type": str(type),
        "body": dict(body),
    }
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def encode_wire(payload: bytes, signature: bytes) -> bytes:
    return orjson.dumps(
        {
            "payload": base64.b64encode(payload).decode("ascii"),
            "signature": base64.b64encode(signature).decode("ascii"),
        }
    )


def sign_payload(private_key: Ed25519PrivateKey, payload: bytes) -> bytes:
    return private_key.sign(SIGN_CONTEXT + payload)


def sign_command(
    private_key: Ed25519PrivateKey,
    *,
    issuer: str,
    target: str,
    command_id: str,
    counter: int,
    issued_at_ms: int,
    expires_at_ms: int,
    type: CommandType | str,
    body: Mapping[str, Any],
    body_problem: BodyProblem | None = None,
) -> bytes:
    """Build a signed envelope (wire bytes) — for central, tests and the technician CLI.

    The arguments are checked with the rules the gateway applies before the
    signature (the envelope's shape, and with ``body_problem`` the body's), so
    a command that this returns is one the gateway can parse.
    """
    payload = canonical_payload(
        target=target,
        command_id=command_id,
        issuer=issuer,
        counter=counter,
        issued_at_ms=issued_at_ms,
        expires_at_ms=expires_at_ms,
        type=type,
        body=body,
    )
    wire = encode_wire(payload, sign_payload(private_key, payload))
    parsed = parse_envelope(wire, max_bytes=MAX_ENVELOPE_BYTES, body_problem=body_problem)
    if isinstance(parsed, CommandResult):
        raise EnvelopeError(f"{parsed.reason}: {parsed.message}")
    return wire


# ---------------------------------------------------------------------------
# Step 1: size and shape (pure)


def _show(v: Any, limit: int = 64) -> str:
    """``repr`` of an untrusted value for a message, cut to ``limit`` characters."""
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def b64_strict(text: str) -> bytes | None:
    """Strict base64 (alphabet and padding checked); None for anything else,
    non-ASCII text included (``b64decode`` raises ValueError, not binascii.Error, there)."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _no_floats(v: Any, depth: int = 0) -> str | None:
    if depth > MAX_DEPTH:
        return f"nested deeper than {MAX_DEPTH} levels"
    if isinstance(v, float):
        return "floats are not allowed (use integers or decimal strings)"
    if isinstance(v, dict):
        for x in v.values():
            p = _no_floats(x, depth + 1)
            if p:
                return p
    elif isinstance(v, list):
        for x in v:
            p = _no_floats(x, depth + 1)
            if p:
                return p
    return None


def parse_envelope(
    raw: bytes, *, max_bytes: int = MAX_ENVELOPE_BYTES, body_problem: BodyProblem | None = None
) -> Envelope | CommandResult:
    """Step 1 (pure): size, shape, canonical form, and with ``body_problem`` the
    body rules of the types checked before the signature. No key is used yet.

    Never raises: whatever ``raw`` holds, the answer is an :class:`Envelope` or
    a rejection, so every failure before the signature check takes the one
    rejection path (and its flood limits). The rules below are meant to catch
    everything; an input that still trips the parser is ``malformed`` too.
    """
    try:
        return _parse_envelope(raw, max_bytes, body_problem)
    except Exception as exc:  # a gap in the rules must not become a crash path
        return reject(
            RejectReason.MALFORMED, f"envelope could not be parsed ({type(exc).__name__})"
        )


def _parse_envelope(raw: bytes, max_bytes: int, body_problem: BodyProblem | None) -> Envelope | CommandResult:
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        return reject(RejectReason.MALFORMED, "envelope must be bytes")
    if len(raw) > max_bytes:
        return reject(RejectReason.OVERSIZED, f"envelope is {len(raw)} bytes, limit {max_bytes}")
    try:
        outer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return reject(RejectReason.MALFORMED, "envelope is not valid JSON")
    if not isinstance(outer, dict) or set(outer) != {"payload", "signature"}:
        return reject(
            RejectReason.MALFORMED, "envelope must be an object with payload and signature only"
        )
    p64, s64 = outer["payload"], outer["signature"]
    if not isinstance(p64, str) or not isinstance(s64, str):
        return reject(RejectReason.MALFORMED, "payload and signature must be base64 strings")
    payload, signature = b64_strict(p64), b64_strict(s64)
    if payload is None or signature is None:
        return reject(RejectReason.MALFORMED, "payload or signature is not valid base64")
    if base64.b64encode(payload).decode("ascii") != p64 or (
        base64.b64encode(signature).decode("ascii") != s64
    ):
        # unused low bits in the last base64 character would give one payload many spellings
        return reject(RejectReason.MALFORMED, "payload or signature is not canonical base64")
    if len(signature) != 64:
        return reject(RejectReason.MALFORMED, f"signature must be 64 bytes, got {len(signature)}")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return reject(RejectReason.MALFORMED, "payload is not valid JSON")
    if not isinstance(doc, dict):
        return reject(RejectReason.MALFORMED, "payload must be a JSON object")
    if set(doc) != _PAYLOAD_KEYS:
        missing = sorted(_PAYLOAD_KEYS - set(doc))
        extra = sorted(set(doc) - _PAYLOAD_KEYS)
        return reject(
            RejectReason.MALFORMED, f"payload fields: missing {missing}, unknown {extra}"
        )
    floats = _no_floats(doc)
    if floats:
        return reject(RejectReason.MALFORMED, f"payload: {floats}")
    if doc["v"] != ENVELOPE_VERSION or not _int(doc["v"]):
        return reject(RejectReason.MALFORMED, f"unsupported envelope version {_show(doc['v'])}")
    for name, valid in (("target", is_name), ("id", is_issued_id), ("issuer", is_issued_id)):
        v = doc[name]
        if not valid(v):
            return reject(RejectReason.MALFORMED, f"{name} must be an identifier, got {_show(v)}")
    counter = doc["counter"]
    if not _int(counter) or not 1 <= counter <= MAX_COUNTER:
        return reject(RejectReason.MALFORMED, "counter must be an integer 1..2^63-1")
    issued, expires = doc["issued_at"], doc["expires_at"]
    for name, v in (("issued_at", issued), ("expires_at", expires)):
        if not _int(v) or not 0 <= v < MAX_TIME_MS:
            return reject(RejectReason.MALFORMED, f"{name} must be Unix milliseconds")
    ctype_raw = doc["type"]
    if not isinstance(ctype_raw, str) or ctype_raw not in _COMMAND_TYPES:
        return reject(RejectReason.MALFORMED, f"unknown command type {_show(ctype_raw)}")
    ctype = CommandType(ctype_raw)
    if expires <= issued:
        return reject(RejectReason.MALFORMED, "expires_at must be after issued_at")
    limit = MAX_VALIDITY_MS[ctype]
    if expires - issued > limit:
        return reject(
            RejectReason.VALIDITY_TOO_LONG,
            f"{ctype} may be valid for at most {limit} ms, this one for {expires - issued} ms",
        )
    body = doc["body"]
    if not isinstance(body, dict):
        return reject(RejectReason.BAD_BODY, "body must be a JSON object")
    problem = body_problem(ctype, body, doc["id"]) if body_problem is not None else None
    if problem:
        return reject(RejectReason.BAD_BODY, problem)
    sync_at = body.get("time_ms")
    if ctype is CommandType.TIME_SYNC and _int(sync_at) and not issued <= sync_at < expires:
        return reject(
            RejectReason.BAD_BODY, "time.sync.time_ms must lie within issued_at..expires_at"
        )
    if orjson.dumps(doc, option=orjson.OPT_SORT_KEYS) != payload:
        return reject(
            RejectReason.NON_CANONICAL,
            "payload is not in canonical form (sorted keys, no whitespace, no duplicate keys)",
        )
    return Envelope(
        target=doc["target"],
        command_id=doc["id"],
        issuer=doc["issuer"],
        counter=counter,
        issued_at_ms=issued,
        expires_at_ms=expires,
        type=ctype,
        body=body,
        payload=payload,
        signature=signature,
    )


# ---------------------------------------------------------------------------
# Step 2: signature and role (pure)


def check_signature(
    env: Envelope, trust: TrustStore, *, revoked: frozenset[str] = frozenset()
) -> Envelope | CommandResult:
    """Step 2 (pure): issuer known, not revoked, signature valid, role allowed for the type.

    ``revoked`` adds key ids revoked since ``trust`` was built (from the database).
    """
    key = trust.lookup(env.issuer)
    if key is None:
        return reject(RejectReason.UNKNOWN_ISSUER, f"no central key with id {env.issuer!r}")
    if trust.is_revoked(env.issuer) or env.issuer in revoked:
        return reject(RejectReason.KEY_REVOKED, f"central key {env.issuer!r} is revoked")
    try:
        Ed25519PublicKey.from_public_bytes(key.public_key).verify(
            env.signature, SIGN_CONTEXT + env.payload
        )
    except InvalidSignature:
        return reject(
            RejectReason.BAD_SIGNATURE, f"signature does not verify with key {env.issuer!r}"
        )
    needed = COMMAND_ROLE[env.type]
    if key.role is not needed:
        return reject(
            RejectReason.WRONG_ROLE,
            f"{env.type} needs a {needed} key; {env.issuer!r} is a {key.role} key",
            env,
        )
    return env


def authenticate(
    raw: bytes,
    trust: TrustStore,
    *,
    revoked: frozenset[str] = frozenset(),
    max_bytes: int = MAX_ENVELOPE_BYTES,
    body_problem: BodyProblem | None = None,
) -> Envelope | CommandResult:
    """Steps 1-2 (pure): an :class:`Envelope` whose signature and role were checked."""
    parsed = parse_envelope(raw, max_bytes=max_bytes, body_problem=body_problem)
    if isinstance(parsed, CommandResult):
        return parsed
    return check_signature(parsed, trust, revoked=revoked)

"""Signed downlink command envelopes: format, verification, replay state.

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

Verification order (each step sees only inputs that passed the previous one):

1. size and shape (outer JSON, base64, payload fields and types, canonical
   form, body schema for the types the gateway interprets here);
2. issuer known and not revoked, Ed25519 signature, role allowed for the type;
3. target is this gateway;
4. counter above the issuer's persisted floor (a re-delivery of the very same
   envelope is reported as ``replay``, anything else at or below the floor
   as ``counter_stale``);
5. not expired against trusted time (except a signed time-floor reset, see
   :func:`is_floor_reset`);
6. idempotency by command id: a known id returns ``duplicate``; an unknown one
   issued before the replay fence is refused (``issued_before_recovery``): after
   a storage fault the record of which commands were applied may be incomplete
   (:func:`set_replay_fence`), so central re-signs such a command.

State (the counter floor per issuer and the seen command ids) changes only
after steps 1-5 pass, so a forged or misdirected envelope with a huge counter
cannot lock out the real issuer. Counters must arrive in order per issuer: a
command that arrives after a higher counter is refused as stale and central
re-signs it with a fresh counter under the same command id (idempotent).

Persistence lives in the daemon's SQLite database (:data:`SCHEMA`); the async
functions run on the daemon's single writer ``aiosqlite.Connection`` and never
commit: the caller applies the command body (e.g. credits the top-up) in the
same transaction and commits once, so "command seen" and "command applied"
can never disagree after a power cut.
"""

from __future__ import annotations

import base64
import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import aiosqlite
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.identifiers import is_issued_id, is_name
from gateway.commands.bodies import (
    MAX_TIME_MS,
    b64_strict,
    parse_key_rotation,
    problem_before_signature,
)
from gateway.security.roles import (
    COMMAND_ROLE,
    MAX_VALIDITY_MS,
    CentralKey,
    CommandType,
    Role,
    TrustError,
    TrustStore,
)
from store_forward.schema import Schema, Step

ENVELOPE_VERSION = 1
SIGN_CONTEXT = b"edgegw-command-v1\x00"
MAX_ENVELOPE_BYTES = 64 * 1024
MAX_DEPTH = 12
MAX_COUNTER = 2**63 - 1

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


def _reject(reason: RejectReason, message: str, env: Envelope | None = None) -> CommandResult:
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
) -> bytes:
    """Build a signed envelope (wire bytes) — for central, tests and the technician CLI.

    The arguments are checked with the same rules the gateway applies, so a
    command that this returns is one the gateway can accept.
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
    parsed = parse_envelope(wire, max_bytes=MAX_ENVELOPE_BYTES)
    if isinstance(parsed, CommandResult):
        raise EnvelopeError(f"{parsed.reason}: {parsed.message}")
    return wire


# ---------------------------------------------------------------------------
# Step 1: size and shape (pure)


def _show(v: Any, limit: int = 64) -> str:
    """``repr`` of an untrusted value for a message, cut to ``limit`` characters."""
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def parse_envelope(raw: bytes, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> Envelope | CommandResult:
    """Step 1 (pure): size, shape, canonical form, body schema. No key is used yet.

    Never raises: whatever ``raw`` holds, the answer is an :class:`Envelope` or
    a rejection, so every failure before the signature check takes the one
    rejection path (and its flood limits). The rules below are meant to catch
    everything; an input that still trips the parser is ``malformed`` too.
    """
    try:
        return _parse_envelope(raw, max_bytes)
    except Exception as exc:  # a gap in the rules must not become a crash path
        return _reject(
            RejectReason.MALFORMED, f"envelope could not be parsed ({type(exc).__name__})"
        )


def _parse_envelope(raw: bytes, max_bytes: int) -> Envelope | CommandResult:
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        return _reject(RejectReason.MALFORMED, "envelope must be bytes")
    if len(raw) > max_bytes:
        return _reject(RejectReason.OVERSIZED, f"envelope is {len(raw)} bytes, limit {max_bytes}")
    try:
        outer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _reject(RejectReason.MALFORMED, "envelope is not valid JSON")
    if not isinstance(outer, dict) or set(outer) != {"payload", "signature"}:
        return _reject(
            RejectReason.MALFORMED, "envelope must be an object with payload and signature only"
        )
    p64, s64 = outer["payload"], outer["signature"]
    if not isinstance(p64, str) or not isinstance(s64, str):
        return _reject(RejectReason.MALFORMED, "payload and signature must be base64 strings")
    payload, signature = b64_strict(p64), b64_strict(s64)
    if payload is None or signature is None:
        return _reject(RejectReason.MALFORMED, "payload or signature is not valid base64")
    if base64.b64encode(payload).decode("ascii") != p64 or (
        base64.b64encode(signature).decode("ascii") != s64
    ):
        # unused low bits in the last base64 character would give one payload many spellings
        return _reject(RejectReason.MALFORMED, "payload or signature is not canonical base64")
    if len(signature) != 64:
        return _reject(RejectReason.MALFORMED, f"signature must be 64 bytes, got {len(signature)}")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return _reject(RejectReason.MALFORMED, "payload is not valid JSON")
    if not isinstance(doc, dict):
        return _reject(RejectReason.MALFORMED, "payload must be a JSON object")
    if set(doc) != _PAYLOAD_KEYS:
        missing = sorted(_PAYLOAD_KEYS - set(doc))
        extra = sorted(set(doc) - _PAYLOAD_KEYS)
        return _reject(
            RejectReason.MALFORMED, f"payload fields: missing {missing}, unknown {extra}"
        )
    floats = _no_floats(doc)
    if floats:
        return _reject(RejectReason.MALFORMED, f"payload: {floats}")
    if doc["v"] != ENVELOPE_VERSION or not _int(doc["v"]):
        return _reject(RejectReason.MALFORMED, f"unsupported envelope version {_show(doc['v'])}")
    for name, valid in (("target", is_name), ("id", is_issued_id), ("issuer", is_issued_id)):
        v = doc[name]
        if not valid(v):
            return _reject(RejectReason.MALFORMED, f"{name} must be an identifier, got {_show(v)}")
    counter = doc["counter"]
    if not _int(counter) or not 1 <= counter <= MAX_COUNTER:
        return _reject(RejectReason.MALFORMED, "counter must be an integer 1..2^63-1")
    issued, expires = doc["issued_at"], doc["expires_at"]
    for name, v in (("issued_at", issued), ("expires_at", expires)):
        if not _int(v) or not 0 <= v < MAX_TIME_MS:
            return _reject(RejectReason.MALFORMED, f"{name} must be Unix milliseconds")
    ctype_raw = doc["type"]
    if not isinstance(ctype_raw, str) or ctype_raw not in _COMMAND_TYPES:
        return _reject(RejectReason.MALFORMED, f"unknown command type {_show(ctype_raw)}")
    ctype = CommandType(ctype_raw)
    if expires <= issued:
        return _reject(RejectReason.MALFORMED, "expires_at must be after issued_at")
    limit = MAX_VALIDITY_MS[ctype]
    if expires - issued > limit:
        return _reject(
            RejectReason.VALIDITY_TOO_LONG,
            f"{ctype} may be valid for at most {limit} ms, this one for {expires - issued} ms",
        )
    body = doc["body"]
    if not isinstance(body, dict):
        return _reject(RejectReason.BAD_BODY, "body must be a JSON object")
    problem = problem_before_signature(ctype, body, doc["id"])
    if problem:
        return _reject(RejectReason.BAD_BODY, problem)
    if ctype is CommandType.TIME_SYNC and not issued <= body["time_ms"] < expires:
        return _reject(
            RejectReason.BAD_BODY, "time.sync.time_ms must lie within issued_at..expires_at"
        )
    if orjson.dumps(doc, option=orjson.OPT_SORT_KEYS) != payload:
        return _reject(
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
        return _reject(RejectReason.UNKNOWN_ISSUER, f"no central key with id {env.issuer!r}")
    if trust.is_revoked(env.issuer) or env.issuer in revoked:
        return _reject(RejectReason.KEY_REVOKED, f"central key {env.issuer!r} is revoked")
    try:
        Ed25519PublicKey.from_public_bytes(key.public_key).verify(
            env.signature, SIGN_CONTEXT + env.payload
        )
    except InvalidSignature:
        return _reject(
            RejectReason.BAD_SIGNATURE, f"signature does not verify with key {env.issuer!r}"
        )
    needed = COMMAND_ROLE[env.type]
    if key.role is not needed:
        return _reject(
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
) -> Envelope | CommandResult:
    """Steps 1-2 (pure): an :class:`Envelope` whose signature and role were checked."""
    parsed = parse_envelope(raw, max_bytes=max_bytes)
    if isinstance(parsed, CommandResult):
        return parsed
    return check_signature(parsed, trust, revoked=revoked)


# ---------------------------------------------------------------------------
# Steps 3-6: target, counter, expiry, idempotency (pure)


def is_floor_reset(env: Envelope) -> bool:
    """A signed ``time.sync`` that may lower the time floor.

    It is exempt from the expiry check: when the floor has been pushed into
    the future (e.g. by a spoofed NTP server) every command looks expired, the
    reset included, and nothing else could repair the gateway remotely. Its
    replay is still refused by the operations key's counter floor; the residual
    risk (an attacker who intercepted and withheld a reset can deliver it later
    and move time back to its signing time) is written down in
    docs/security.md.
    """
    return env.type is CommandType.TIME_SYNC and env.body.get("reset_floor") is True


@dataclass(frozen=True)
class SeenCommand:
    command_id: str
    issuer: str
    counter: int
    type: str
    digest: bytes
    channel: str
    accepted_ms: int


def decide(
    env: Envelope,
    *,
    gateway_id: str,
    floor: int | None,
    seen: SeenCommand | None,
    now_ms: int,
    fence_ms: int | None = None,
) -> CommandResult:
    """Steps 3-6 for an authenticated envelope (pure).

    ``floor`` is the highest counter accepted from ``env.issuer`` (None: none yet),
    ``seen`` the record of ``env.command_id`` if it was applied before, ``now_ms``
    trusted time (never earlier than the persisted time floor), ``fence_ms`` the
    replay fence (None: none).
    """
    if env.target != gateway_id:
        return _reject(
            RejectReason.WRONG_TARGET,
            f"command is for gateway {env.target!r}, this is {gateway_id!r}",
            env,
        )
    if floor is not None and env.counter <= floor:
        if seen is not None and seen.digest == env.digest:
            return _reject(
                RejectReason.REPLAY,
                f"this envelope (command {env.command_id}) was already accepted",
                env,
            )
        return _reject(
            RejectReason.COUNTER_STALE,
            f"counter {env.counter} from {env.issuer!r} is not above {floor}; "
            "re-sign with a fresh counter",
            env,
        )
    if now_ms >= env.expires_at_ms and not is_floor_reset(env):
        return _reject(
            RejectReason.EXPIRED,
            f"expired at {env.expires_at_ms} (trusted time {now_ms})",
            env,
        )
    if seen is None and fence_ms is not None and env.issued_at_ms < fence_ms:
        return _reject(
            RejectReason.ISSUED_BEFORE_RECOVERY,
            f"issued at {env.issued_at_ms}, before the storage recovery at {fence_ms}: whether"
            f" command {env.command_id} was applied before cannot be proved; re-sign it with a"
            " later issued_at",
            env,
        )
    if seen is not None:
        note = "" if seen.type == env.type else f" (first seen as {seen.type})"
        return CommandResult(
            Outcome.DUPLICATE,
            env,
            None,
            f"command {env.command_id} was applied before{note}",
        )
    return CommandResult(Outcome.APPLIED, env, None, "")


# ---------------------------------------------------------------------------
# Persistence (imperative shell)

TABLES: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS sec_counter_floor (
        issuer TEXT PRIMARY KEY,
        floor INTEGER NOT NULL CHECK (floor >= 1),
        updated_ms INTEGER NOT NULL
    ) STRICT""",
    """CREATE TABLE IF NOT EXISTS sec_seen_command (
        command_id TEXT PRIMARY KEY,
        issuer TEXT NOT NULL,
        counter INTEGER NOT NULL,
        type TEXT NOT NULL,
        digest BLOB NOT NULL,
        channel TEXT NOT NULL,
        accepted_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL
    ) STRICT""",
    "CREATE INDEX IF NOT EXISTS sec_seen_command_expires ON sec_seen_command (expires_ms)",
    """CREATE TABLE IF NOT EXISTS sec_replay_fence (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        issued_before_ms INTEGER NOT NULL,
        set_ms INTEGER NOT NULL,
        reason TEXT NOT NULL
    ) STRICT""",
    """CREATE TABLE IF NOT EXISTS sec_central_key (
        key_id TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        public_key BLOB NOT NULL CHECK (length(public_key) = 32),
        added_ms INTEGER NOT NULL,
        added_by TEXT NOT NULL
    ) STRICT""",
    """CREATE TABLE IF NOT EXISTS sec_revoked_key (
        key_id TEXT PRIMARY KEY,
        revoked_ms INTEGER NOT NULL,
        revoked_by TEXT NOT NULL,
        reason TEXT NOT NULL
    ) STRICT""",
)


# Declared to the gateway database's schema registry (gateway.database).
SCHEMA = Schema("security", Step(4, "counter floors, seen commands, replay fence, central keys", TABLES))


async def create_schema(conn: aiosqlite.Connection) -> None:
    """The tables on a connection of their own (tests, tools); the gateway's database
    gets them from its schema registry (:mod:`gateway.database`)."""
    await SCHEMA.create(conn)


async def get_floor(conn: aiosqlite.Connection, issuer: str) -> int | None:
    async with conn.execute(
        "SELECT floor FROM sec_counter_floor WHERE issuer = ?", (issuer,)
    ) as cur:
        row = await cur.fetchone()
    return None if row is None else int(row[0])


async def get_seen(conn: aiosqlite.Connection, command_id: str) -> SeenCommand | None:
    async with conn.execute(
        "SELECT command_id, issuer, counter, type, digest, channel, accepted_ms "
        "FROM sec_seen_command WHERE command_id = ?",
        (command_id,),
    ) as cur:
        row = await cur.fetchone()
    if row is None:
        return None
    return SeenCommand(
        str(row[0]), str(row[1]), int(row[2]), str(row[3]), bytes(row[4]), str(row[5]), int(row[6])
    )


async def get_replay_fence(conn: aiosqlite.Connection) -> int | None:
    async with conn.execute("SELECT issued_before_ms FROM sec_replay_fence WHERE id = 1") as cur:
        row = await cur.fetchone()
    return None if row is None else int(row[0])


async def set_replay_fence(
    conn: aiosqlite.Connection, issued_before_ms: int, now_ms: int, reason: str
) -> None:
    """Refuse, from now on, every command issued before ``issued_before_ms`` whose id
    is not recorded as seen (the fence only ever moves forward). Set when the
    replay state (seen ids, counter floors) came back from a damaged database."""
    await conn.execute(
        "INSERT INTO sec_replay_fence (id, issued_before_ms, set_ms, reason) VALUES (1, ?, ?, ?) "
        "ON CONFLICT(id) DO UPDATE SET issued_before_ms = excluded.issued_before_ms, "
        "set_ms = excluded.set_ms, reason = excluded.reason "
        "WHERE excluded.issued_before_ms > issued_before_ms",
        (issued_before_ms, now_ms, reason),
    )


async def _raise_floor(conn: aiosqlite.Connection, issuer: str, counter: int, now_ms: int) -> None:
    await conn.execute(
        "INSERT INTO sec_counter_floor (issuer, floor, updated_ms) VALUES (?, ?, ?) "
        "ON CONFLICT(issuer) DO UPDATE SET floor = excluded.floor, updated_ms = excluded.updated_ms "
        "WHERE excluded.floor > sec_counter_floor.floor",
        (issuer, counter, now_ms),
    )


async def revoked_key_ids(conn: aiosqlite.Connection) -> frozenset[str]:
    async with conn.execute("SELECT key_id FROM sec_revoked_key") as cur:
        rows = await cur.fetchall()
    return frozenset(str(r[0]) for r in rows)


async def load_trust(conn: aiosqlite.Connection, base: TrustStore) -> TrustStore:
    """``base`` (the provisioned file) plus keys added and revoked by signed commands."""
    async with conn.execute("SELECT key_id, role, public_key FROM sec_central_key") as cur:
        rows = await cur.fetchall()
    added = [CentralKey(str(r[0]), Role(str(r[1])), bytes(r[2])) for r in rows]
    return base.with_keys(added).with_revoked(await revoked_key_ids(conn))


async def process_command(
    conn: aiosqlite.Connection,
    raw: bytes,
    *,
    trust: TrustStore,
    gateway_id: str,
    now_ms: int,
    channel: str,
    max_bytes: int = MAX_ENVELOPE_BYTES,
) -> CommandResult:
    """Verify ``raw`` in the fixed order and record it; the caller owns the transaction.

    On ``APPLIED`` the command id is recorded and the issuer's counter floor
    raised: the caller applies the body in the same transaction and commits
    (or rolls back everything if applying fails). On ``DUPLICATE`` only the
    floor is raised (the envelope was authentic and fresh). On ``REJECTED``
    nothing is written. ``channel`` names the transport (``mqtt``, ``usb``,
    ``cli``) and is stored with the command id.
    """
    parsed = parse_envelope(raw, max_bytes=max_bytes)
    if isinstance(parsed, CommandResult):
        return parsed
    async with conn.execute(
        "SELECT 1 FROM sec_revoked_key WHERE key_id = ?", (parsed.issuer,)
    ) as cur:
        revoked = frozenset({parsed.issuer}) if await cur.fetchone() else frozenset()
    auth = check_signature(parsed, trust, revoked=revoked)
    if isinstance(auth, CommandResult):
        return auth
    env = auth
    floor = await get_floor(conn, env.issuer)
    seen = await get_seen(conn, env.command_id)
    result = decide(
        env,
        gateway_id=gateway_id,
        floor=floor,
        seen=seen,
        now_ms=now_ms,
        fence_ms=await get_replay_fence(conn),
    )
    if result.outcome is Outcome.APPLIED:
        await conn.execute(
            "INSERT INTO sec_seen_command (command_id, issuer, counter, type, digest, channel, "
            "accepted_ms, expires_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                env.command_id,
                env.issuer,
                env.counter,
                env.type.value,
                env.digest,
                channel,
                now_ms,
                env.expires_at_ms,
            ),
        )
        await _raise_floor(conn, env.issuer, env.counter, now_ms)
    elif result.outcome is Outcome.DUPLICATE:
        await _raise_floor(conn, env.issuer, env.counter, now_ms)
    return result


async def apply_key_rotation(conn: aiosqlite.Connection, env: Envelope, now_ms: int) -> str:
    """Apply an APPLIED ``keys.rotate`` command's key changes; caller's transaction.

    ``add_key`` stores a new central key (an id is never re-bound to another
    key), ``revoke_key`` revokes one for good. ``rotate_purpose`` changes
    nothing here: the returned text tells the caller to rotate that purpose in
    the gateway keystore. Returns a one-line description for the audit log.
    """
    if env.type is not CommandType.KEYS_ROTATE:
        raise TrustError(f"not a key rotation command: {env.type}")
    rotation = parse_key_rotation(env.body, env.command_id)
    if rotation.op == "add_key":
        kid, role, raw = rotation.key_id, rotation.role, rotation.public_key
        assert role is not None
        async with conn.execute(
            "SELECT role, public_key FROM sec_central_key WHERE key_id = ?", (kid,)
        ) as cur:
            row = await cur.fetchone()
        if row is not None and (str(row[0]) != role.value or bytes(row[1]) != raw):
            raise TrustError(f"key id {kid!r} is already bound to a different key/role")
        if row is None:
            await conn.execute(
                "INSERT INTO sec_central_key (key_id, role, public_key, added_ms, added_by) "
                "VALUES (?, ?, ?, ?, ?)",
                (kid, role.value, raw, now_ms, env.command_id),
            )
        return f"added central key {kid} ({role})"
    if rotation.op == "revoke_key":
        kid = rotation.key_id
        await conn.execute(
            "INSERT OR IGNORE INTO sec_revoked_key (key_id, revoked_ms, revoked_by, reason) "
            "VALUES (?, ?, ?, ?)",
            (kid, now_ms, env.command_id, rotation.reason),
        )
        return f"revoked central key {kid}"
    return f"rotate gateway purpose key {rotation.purpose}"


async def prune_seen(conn: aiosqlite.Connection, expired_before_ms: int) -> int:
    """Forget command ids whose envelopes expired before ``expired_before_ms``.

    Safe for exact replays (the counter floor still refuses them) but central
    must never re-sign a command id older than the retention it relies on.
    """
    cur = await conn.execute(
        "DELETE FROM sec_seen_command WHERE expires_ms < ?", (expired_before_ms,)
    )
    n = cur.rowcount
    await cur.close()
    return int(n)

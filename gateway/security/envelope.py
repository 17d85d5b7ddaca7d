"""Signed downlink command envelopes on the gateway: verification order and replay state.

The wire format, signing and the pure steps 1-2 (size and shape; issuer,
signature and role) are shared with central and live in
:mod:`store_forward.command_envelope`; this module gives them the gateway's
body rules (:func:`gateway.commands.bodies.problem_before_signature`: the
bodies checked before the signature) and adds what only the gateway does.

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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiosqlite
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.commands.bodies import parse_key_rotation, problem_before_signature
from gateway.security.roles import CentralKey, CommandType, Role, TrustError, TrustStore
from store_forward import command_envelope as shared

# The wire format, signing and steps 1-2 are shared with central
# (store_forward.command_envelope); re-exported here for the gateway.
from store_forward.command_envelope import (
    ENVELOPE_VERSION,
    MAX_COUNTER,
    MAX_DEPTH,
    MAX_ENVELOPE_BYTES,
    MAX_TIME_MS,
    SIGN_CONTEXT,
    CommandResult,
    Envelope,
    EnvelopeError,
    Outcome,
    RejectReason,
    canonical_payload,
    check_signature,
    encode_wire,
    reject,
    sign_payload,
)
from store_forward.schema import Schema, Step

__all__ = [
    "ENVELOPE_VERSION",
    "MAX_COUNTER",
    "MAX_DEPTH",
    "MAX_ENVELOPE_BYTES",
    "MAX_TIME_MS",
    "SCHEMA",
    "SIGN_CONTEXT",
    "CommandResult",
    "Envelope",
    "EnvelopeError",
    "Outcome",
    "RejectReason",
    "SeenCommand",
    "apply_key_rotation",
    "authenticate",
    "canonical_payload",
    "check_signature",
    "create_schema",
    "decide",
    "encode_wire",
    "get_floor",
    "get_replay_fence",
    "get_seen",
    "is_floor_reset",
    "load_trust",
    "parse_envelope",
    "process_command",
    "prune_seen",
    "revoked_key_ids",
    "set_replay_fence",
    "sign_command",
    "sign_payload",
]


def parse_envelope(raw: bytes, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> Envelope | CommandResult:
    """Step 1 with the gateway's body rules (:func:`store_forward.command_envelope.parse_envelope`)."""
    return shared.parse_envelope(raw, max_bytes=max_bytes, body_problem=problem_before_signature)


def authenticate(
    raw: bytes,
    trust: TrustStore,
    *,
    revoked: frozenset[str] = frozenset(),
    max_bytes: int = MAX_ENVELOPE_BYTES,
) -> Envelope | CommandResult:
    """Steps 1-2 (pure) with the gateway's body rules."""
    return shared.authenticate(
        raw, trust, revoked=revoked, max_bytes=max_bytes, body_problem=problem_before_signature
    )


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
    """A signed envelope the gateway accepts up to the signature (its body rules
    included) — for tests, drills and the technician tools."""
    return shared.sign_command(
        private_key,
        issuer=issuer,
        target=target,
        command_id=command_id,
        counter=counter,
        issued_at_ms=issued_at_ms,
        expires_at_ms=expires_at_ms,
        type=type,
        body=body,
        body_problem=problem_before_signature,
    )


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
        return reject(
            RejectReason.WRONG_TARGET,
            f"command is for gateway {env.target!r}, this is {gateway_id!r}",
            env,
        )
    if floor is not None and env.counter <= floor:
        if seen is not None and seen.digest == env.digest:
            return reject(
                RejectReason.REPLAY,
                f"this envelope (command {env.command_id}) was already accepted",
                env,
            )
        return reject(
            RejectReason.COUNTER_STALE,
            f"counter {env.counter} from {env.issuer!r} is not above {floor}; "
            "re-sign with a fresh counter",
            env,
        )
    if now_ms >= env.expires_at_ms and not is_floor_reset(env):
        return reject(
            RejectReason.EXPIRED,
            f"expired at {env.expires_at_ms} (trusted time {now_ms})",
            env,
        )
    if seen is None and fence_ms is not None and env.issued_at_ms < fence_ms:
        return reject(
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

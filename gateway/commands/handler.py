"""The command path: a signed downlink command is verified and applied exactly once.

:meth:`CommandHandler.handle` runs every command in **one** outbox
transaction (the daemon's single SQLite writer)::

    BEGIN IMMEDIATE
      SAVEPOINT cmd
        process_command()           verify; on APPLIED: command id seen, floor raised
        apply the body via a port   same transaction
      RELEASE cmd                   (ROLLBACK TO cmd if a port refused the body)
      audit entry                   applied / duplicate / (aggregated) rejected
      EVENT outbox record           the result, for central
    COMMIT
    after commit: hand relay intents to the relay port, rotate purpose keys

so "command seen" and "command applied" commit together or not at all: after
a power cut either both are on disk or neither is, and central's re-send of
the same command id is then applied (neither) or answered ``duplicate``
(both).

Effects that are not rows in this database are recorded as *intents* in the
transaction and carried out after the commit, idempotently:

* relay operations (``cmd_relay_intent``): handed to :class:`RelayPort` after
  the commit and marked ``handed``; an intent left ``pending`` by a crash is
  handed again by :meth:`CommandHandler.recover` (so the port must treat a
  repeated ``command_id`` as the same request), unless its command expired
  meanwhile, which is reported instead;
* gateway purpose-key rotation (``cmd_purpose_rotation``): the target version
  is stored; the keystore is rotated up to it after the commit and again at
  start-up, so a crash can neither skip nor double a rotation.

Ports (small :class:`typing.Protocol` s) are the collaborators that own each
effect: billing (top-ups, tariffs, balance snapshots, meter replacements), relays, configuration
staging, uplink re-send. A port refuses a body it cannot apply in exactly one
way: it raises :class:`CommandRefused` with a reason code and a message (a
port never *returns* a refusal). Everything the command did is rolled back to
the savepoint (the id is *not* marked seen, the counter floor is not raised)
and the result is ``rejected``/``bad_body`` with the port's code (e.g. the
ledger's ``counter_gap``) and message. Any other exception rolls back the
whole transaction and is reported as a failure in a second transaction.

Rejections and failures are audited aggregated, so a flood of garbage cannot
fill the disk: the first one per (reason, hour) is written in full, later ones
are counted in memory and one summary row per (reason, hour) with the count
is written when the hour is over (or on :meth:`CommandHandler.flush_rejections`).
Result events for central follow the same rule with a larger budget
(``event_budget_per_hour`` detailed events per reason and hour). The reason of
a port's refusal includes its code (:func:`tally_key`), a failure's bucket is
``failed:<exception>``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiosqlite

from firmware_bridge.events import event
from firmware_bridge.relay_ops import RelayIntent, RelayOp
from gateway.commands.bodies import (
    BODIES,
    CommandRefused,
    ConfigChange,
    parse_key_rotation,
    parse_relay,
    parse_resend,
    parse_time_sync,
)
from gateway.commands.tally import Bucket, due_summaries, tally_key, tally_rejection
from gateway.security import audit
from gateway.security.envelope import (
    CommandResult,
    Envelope,
    Outcome,
    RejectReason,
    apply_key_rotation,
    load_trust,
    process_command,
    prune_seen,
)
from gateway.security.envelope import create_schema as envelope_schema
from gateway.security.roles import CommandType, TrustError, TrustStore
from gateway.security.trusted_time import (
    TrustedClock,
    TrustedTime,
    apply_time_sync,
    load_floor,
)
from gateway.security.trusted_time import create_schema as time_schema
from store_forward.outbox import Outbox
from store_forward.records import RecordClass, RecordKind
from store_forward.schema import Schema, Step

log = logging.getLogger(__name__)

# Seen command ids are kept this long after their envelope expired (measured on
# the trusted-time floor): central re-signing an old command id within that span
# is answered ``duplicate``, never applied twice.
SEEN_GRACE_MS = 7 * 24 * 3_600_000


# ---------------------------------------------------------------------------
# Ports


class BillingPort(Protocol):
    """Money effects, applied in the caller's transaction ``db``.

    Return a small JSON-able dict (ints, strings, lists) describing the effect
    that *was* applied (``status`` ``applied``, or ``duplicate`` when the
    ledger already holds this very effect); it goes into the audit entry and
    the result event. Anything the ledger does not apply is refused by raising
    :class:`CommandRefused` with the ledger's reason code — never returned.
    """

    async def apply_topup_in(
        self,
        db: aiosqlite.Connection,
        body: Mapping[str, Any],
        *,
        command_id: str,
        channel: str,
        now_ms: int,
    ) -> dict[str, Any]: ...

    async def install_tariff_in(
        self, db: aiosqlite.Connection, doc: Mapping[str, Any], *, now_ms: int
    ) -> dict[str, Any]: ...

    async def apply_snapshot_in(
        self, db: aiosqlite.Connection, body: Mapping[str, Any], *, now_ms: int
    ) -> dict[str, Any]: ...

    async def replace_meter_in(
        self, db: aiosqlite.Connection, body: Mapping[str, Any], *, command_id: str, now_ms: int
    ) -> dict[str, Any]: ...


class RelayPort(Protocol):
    """Takes a relay request after the command committed.

    Must return promptly (queue the work, do not wait for the relay's
    verification) and treat a repeated ``command_id`` as the same request: a
    crash between handing over and recording it makes the handler hand it
    again at start-up.
    """

    async def request(
        self, meter_id: str, op: RelayOp, *, reason: str, command_id: str
    ) -> None: ...


class ConfigPort(Protocol):
    """Validates and stages a configuration change in ``db``; applying it is its owner's job.

    Raise :class:`CommandRefused` for an invalid change.
    """

    async def stage_in(
        self,
        db: aiosqlite.Connection,
        change: ConfigChange,
        body: Mapping[str, Any],
        *,
        command_id: str,
        now_ms: int,
    ) -> dict[str, Any]: ...


class ResendPort(Protocol):
    """Queues outbox records ``from_id..to_id`` (inclusive) for sending again, in ``db``.

    Returns what it could do, e.g. ``{"queued": n, "missing": m}`` (records
    already deleted after an ack cannot be re-sent).
    """

    async def resend_in(
        self,
        db: aiosqlite.Connection,
        *,
        from_id: int,
        to_id: int,
        command_id: str,
        now_ms: int,
    ) -> dict[str, Any]: ...


async def audit_and_report(
    db: aiosqlite.Connection,
    outbox: Outbox,
    *,
    actor: str,
    action: str,
    details: Mapping[str, Any],
    event: dict[str, Any],
    time_ms: int,
    time_source: str = "system",
) -> None:
    """An audit entry and the event that tells central about it, in ``db``'s transaction."""
    await audit.append(
        db, actor=actor, action=action, details=details, time_ms=time_ms, time_source=time_source
    )
    await outbox.add_in(db, RecordClass.EVENT, RecordKind.EVENT, time_ms, event)


class NoResend:
    """A :class:`ResendPort` for an outbox that keeps nothing after the ack: says so."""

    async def resend_in(
        self,
        db: aiosqlite.Connection,
        *,
        from_id: int,
        to_id: int,
        command_id: str,
        now_ms: int,
    ) -> dict[str, Any]:
        return {
            "queued": 0,
            "missing": to_id - from_id + 1,
            "note": "acknowledged records are not kept",
        }


class NoRemoteConfig:
    """A :class:`ConfigPort` for a gateway that takes configuration changes only on site."""

    async def stage_in(
        self,
        db: aiosqlite.Connection,
        change: ConfigChange,
        body: Mapping[str, Any],
        *,
        command_id: str,
        now_ms: int,
    ) -> dict[str, Any]:
        raise CommandRefused(
            "not_accepted", f"{change} is not accepted remotely by this gateway"
        )


class SoftwarePort(Protocol):
    """Takes a verified ``software.offer`` (gateway.update_transfer) in ``db``'s
    transaction; ``after_commit`` (optional) starts the transfer."""

    async def offer_in(
        self, db: aiosqlite.Connection, env: Envelope, *, command_id: str, now_ms: int
    ) -> dict[str, Any]: ...


class NoSoftwareUpdates:
    """A :class:`SoftwarePort` for a gateway that takes software on site only."""

    async def offer_in(
        self, db: aiosqlite.Connection, env: Envelope, *, command_id: str, now_ms: int
    ) -> dict[str, Any]:
        raise CommandRefused("not_accepted", "software.offer is not accepted by this gateway")


class PurposeKeys(Protocol):
    """The part of :class:`provisioning.keys.Keystore` that key rotation needs."""

    def versions(self) -> dict[str, int]: ...

    def rotate(self, purpose: str) -> int: ...


# ---------------------------------------------------------------------------
# Persistence of intents

TABLES: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS cmd_relay_intent (
        command_id TEXT PRIMARY KEY,
        meter_id TEXT NOT NULL,
        op TEXT NOT NULL,
        reason TEXT NOT NULL,
        accepted_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'handed', 'expired')),
        done_ms INTEGER
    ) STRICT""",
    "CREATE INDEX IF NOT EXISTS cmd_relay_intent_pending ON cmd_relay_intent (state) "
    "WHERE state = 'pending'",
    """CREATE TABLE IF NOT EXISTS cmd_purpose_rotation (
        purpose TEXT PRIMARY KEY,
        target_version INTEGER NOT NULL CHECK (target_version >= 1),
        command_id TEXT NOT NULL,
        accepted_ms INTEGER NOT NULL
    ) STRICT""",
)


# Declared to the gateway database's schema registry (gateway.database).
SCHEMA = Schema("commands", Step(4, "relay operations central commanded, key rotations in progress", TABLES))


async def create_schema(conn: aiosqlite.Connection) -> None:
    """Tables of the command path and the security tables it writes, on a connection
    of their own (tests, tools); the gateway's database gets them from its schema
    registry (:mod:`gateway.database`)."""
    await envelope_schema(conn)
    await audit.create_schema(conn)
    await time_schema(conn)
    await SCHEMA.create(conn)


async def pending_relay_intents(conn: aiosqlite.Connection) -> list[RelayIntent]:
    async with conn.execute(
        "SELECT command_id, meter_id, op, reason, expires_ms FROM cmd_relay_intent "
        "WHERE state = 'pending' ORDER BY rowid"
    ) as cur:
        rows = await cur.fetchall()
    return [
        RelayIntent(str(r[1]), RelayOp(str(r[2])), str(r[3]), command_id=str(r[0]), expires_ms=int(r[4]))
        for r in rows
    ]


# ---------------------------------------------------------------------------
# The handler


@dataclass
class HandlerStats:
    applied: int = 0
    duplicate: int = 0
    rejected: int = 0
    failed: int = 0
    relay_handed: int = 0
    relay_expired: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class _Outcome:
    result: CommandResult
    relay: bool = False
    purpose: bool = False
    trust_changed: bool = False
    config: bool = False
    software: bool = False


class CommandHandler:
    """Verifies and applies signed commands; see the module docstring."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        trust: TrustStore,
        gateway_id: str,
        clock: TrustedClock,
        billing: BillingPort,
        relay: RelayPort,
        config: ConfigPort,
        resend: ResendPort,
        keys: PurposeKeys | None = None,
        known_meter: Callable[[str], bool] | None = None,
        event_budget_per_hour: int = 20,
        software: SoftwarePort | None = None,
    ) -> None:
        self.outbox = outbox
        self.base_trust = trust
        self.gateway_id = gateway_id
        self.clock = clock
        self.billing = billing
        self.relay = relay
        self.config = config
        self.resend = resend
        self.keys = keys
        self.software: SoftwarePort = software or NoSoftwareUpdates()
        self.known_meter = known_meter
        self.event_budget = event_budget_per_hour
        self.stats = HandlerStats()
        self._trust: TrustStore | None = None
        self._tally: dict[tuple[str, int], Bucket] = {}
        self._after_commit = asyncio.Lock()

    # -- life cycle ----------------------------------------------------------

    async def start(self) -> None:
        """Finish what a crash interrupted (see :meth:`recover`)."""
        await self.recover()

    async def recover(self) -> None:
        """Hand pending relay intents (or expire them), rotate keys up to their targets,
        and put a committed configuration change in force."""
        await self.reconcile_purpose_keys()
        await self.hand_pending_relays()
        await self._config_after_commit()

    # -- the command path ----------------------------------------------------

    async def handle(self, raw: bytes, *, channel: str) -> CommandResult:
        """Verify ``raw`` and apply it exactly once; never raises for bad input."""
        try:
            async with self.outbox.transaction() as db:
                now = self.clock.now()
                tally = self._tally
                out, tally = await self._handle_in(db, raw, channel, now, tally)
            self._tally = tally
        except Exception as exc:  # everything rolled back; the id stays unseen
            self.stats.failed += 1
            await self._record_failure(channel, exc)
            return CommandResult(
                Outcome.REJECTED,
                None,
                None,
                f"not applied ({type(exc).__name__}); nothing was kept, central may re-send",
            )
        res = out.result
        if res.outcome is Outcome.APPLIED:
            self.stats.applied += 1
        elif res.outcome is Outcome.DUPLICATE:
            self.stats.duplicate += 1
        else:
            self.stats.rejected += 1
            key = res.reason.value if res.reason else "unknown"
            self.stats.by_reason[key] = self.stats.by_reason.get(key, 0) + 1
        if out.trust_changed:
            self._trust = None
        if out.purpose:
            await self.reconcile_purpose_keys()
        if out.relay:
            await self.hand_pending_relays()
        if out.config:
            await self._config_after_commit()
        if out.software and (after := getattr(self.software, "after_commit", None)):
            await after()
        return res

    async def _config_after_commit(self) -> None:
        """Let the configuration port put a committed change in force (if it can)."""
        after = getattr(self.config, "after_commit", None)
        if after is not None:
            async with self._after_commit:
                await after()

    def invalidate_trust(self) -> None:
        """Re-read central keys from the database before the next command.

        Call after anything other than this handler changed ``sec_central_key``
        (e.g. a provisioning bundle); revocations are always read fresh.
        """
        self._trust = None

    async def _trust_in(self, db: aiosqlite.Connection) -> TrustStore:
        if self._trust is None:
            self._trust = await load_trust(db, self.base_trust)
        return self._trust

    async def _handle_in(
        self,
        db: aiosqlite.Connection,
        raw: bytes,
        channel: str,
        now: TrustedTime,
        tally: dict[tuple[str, int], Bucket],
    ) -> tuple[_Outcome, dict[tuple[str, int], Bucket]]:
        now_ms = now.time_ms
        tsrc = now.quality.value
        tally, summaries = due_summaries(tally, now_ms)
        for b in summaries:
            await self._write_summary(db, b, now_ms, tsrc)
        trust = await self._trust_in(db)
        await db.execute("SAVEPOINT cmd")
        result = await process_command(
            db, raw, trust=trust, gateway_id=self.gateway_id, now_ms=now_ms, channel=channel
        )
        out = _Outcome(result)
        effect: dict[str, Any] = {}
        if result.outcome is Outcome.APPLIED:
            env = result.envelope
            assert env is not None
            try:
                effect = await self._apply(db, env, channel, now_ms, out)
            except CommandRefused as exc:
                await db.execute("ROLLBACK TO cmd")
                out = _Outcome(
                    CommandResult(
                        Outcome.REJECTED, env, RejectReason.BAD_BODY, exc.message, exc.reason
                    )
                )
            except TrustError as exc:
                await db.execute("ROLLBACK TO cmd")
                out = _Outcome(
                    CommandResult(
                        Outcome.REJECTED, env, RejectReason.BAD_BODY, str(exc), "key_conflict"
                    )
                )
        await db.execute("RELEASE cmd")
        result = out.result
        env = result.envelope
        if result.outcome is Outcome.REJECTED:
            tally, note = tally_rejection(
                tally, tally_key(result), now_ms, channel, event_budget=self.event_budget
            )
            if note.audit:
                await audit.append(
                    db,
                    actor=env.issuer if env else f"unauthenticated:{channel}",
                    action="command.rejected",
                    details=self._details(result, channel, {"hour_ms": note.bucket.hour_ms}),
                    time_ms=now_ms,
                    time_source=tsrc,
                )
            if note.event:
                await self._event(db, result, channel, now_ms, effect)
        else:
            assert env is not None
            await audit.append(
                db,
                actor=env.issuer,
                action=f"command.{result.outcome.value}",
                details=self._details(result, channel, {"effect": effect} if effect else {}),
                time_ms=now_ms,
                time_source=tsrc,
            )
            await self._event(db, result, channel, now_ms, effect)
        return out, tally

    async def _apply(
        self, db: aiosqlite.Connection, env: Envelope, channel: str, now_ms: int, out: _Outcome
    ) -> dict[str, Any]:
        t, body, cid = env.type, env.body, env.command_id
        if t is CommandType.TOPUP:
            return await self.billing.apply_topup_in(
                db, body, command_id=cid, channel=channel, now_ms=now_ms
            )
        if t is CommandType.TARIFF_PUBLISH:
            return await self.billing.install_tariff_in(db, body, now_ms=now_ms)
        if t is CommandType.BALANCE_SNAPSHOT:
            return await self.billing.apply_snapshot_in(db, body, now_ms=now_ms)
        if t is CommandType.METER_REPLACE:
            return await self.billing.replace_meter_in(db, body, command_id=cid, now_ms=now_ms)
        if t is CommandType.RELAY_OPERATE:
            req = parse_relay(body, cid)
            if self.known_meter is not None and not self.known_meter(req.meter_id):
                raise CommandRefused(
                    "unknown_meter", f"relay.operate: no meter {req.meter_id!r} on this gateway"
                )
            await db.execute(
                "INSERT INTO cmd_relay_intent (command_id, meter_id, op, reason, accepted_ms, "
                "expires_ms, state) VALUES (?, ?, ?, ?, ?, ?, 'pending')",
                (cid, req.meter_id, req.op.command_word, req.reason, now_ms, env.expires_at_ms),
            )
            out.relay = True
            return {"meter": req.meter_id, "op": req.op.command_word, "state": "pending"}
        if t is CommandType.TIME_SYNC:
            sync = parse_time_sync(body, cid)
            events = await apply_time_sync(db, self.clock, sync.time_ms, reset_floor_flag=sync.reset_floor)
            return {
                "floor_ms": self.clock.state.floor.time_ms,
                "clock_events": [e.kind.value for e in events],
            }
        if t is CommandType.KEYS_ROTATE:
            rotation = parse_key_rotation(body, cid)
            if rotation.op == "add_key":
                # apply_key_rotation only sees keys added by earlier commands; an id from
                # the provisioned trust file must not be re-bound either, or every later
                # load of the trust store would fail
                have = (await self._trust_in(db)).lookup(rotation.key_id)
                if have is not None and (
                    have.role is not rotation.role or have.public_key != rotation.public_key
                ):
                    raise CommandRefused(
                        "key_conflict",
                        f"key id {have.key_id!r} is already bound to a different key/role",
                    )
            text = await apply_key_rotation(db, env, now_ms)
            effect: dict[str, Any] = {"change": text}
            if rotation.op == "rotate_purpose":
                effect["target_version"] = await self._stage_rotation(
                    db, rotation.purpose, env, now_ms
                )
                out.purpose = True
            else:
                out.trust_changed = True
                self._trust = None  # re-read inside this transaction if needed again
            return effect
        if t is CommandType.UPLINK_RESEND:
            span = parse_resend(body, cid)
            return await self.resend.resend_in(
                db, from_id=span.from_id, to_id=span.to_id, command_id=cid, now_ms=now_ms
            )
        if t in (CommandType.CONFIG_PATCH, CommandType.METER_ROSTER):
            out.config = True
            return await self.config.stage_in(
                db, ConfigChange(t.value), body, command_id=cid, now_ms=now_ms
            )
        if t is CommandType.SOFTWARE_OFFER:
            out.software = True
            return await self.software.offer_in(db, env, command_id=cid, now_ms=now_ms)
        BODIES[t].parse(body, cid)  # provisioning.bundle: refused on this path
        raise CommandRefused("not_accepted", f"{t} is not accepted on the command path")

    async def _stage_rotation(
        self, db: aiosqlite.Connection, purpose: str, env: Envelope, now_ms: int
    ) -> int:
        if self.keys is None:
            raise CommandRefused("no_keystore", "this gateway has no keystore to rotate")
        async with db.execute(
            "SELECT target_version FROM cmd_purpose_rotation WHERE purpose = ?", (purpose,)
        ) as cur:
            row = await cur.fetchone()
        current = max(self.keys.versions().get(purpose, 0), int(row[0]) if row else 0)
        target = current + 1
        await db.execute(
            "INSERT INTO cmd_purpose_rotation (purpose, target_version, command_id, accepted_ms) "
            "VALUES (?, ?, ?, ?) ON CONFLICT(purpose) DO UPDATE SET "
            "target_version = excluded.target_version, command_id = excluded.command_id, "
            "accepted_ms = excluded.accepted_ms",
            (purpose, target, env.command_id, now_ms),
        )
        return target

    # -- after the commit ----------------------------------------------------

    async def reconcile_purpose_keys(self) -> None:
        """Rotate keystore purposes up to the committed target versions (idempotent)."""
        if self.keys is None:
            return
        async with self._after_commit:
            async with self.outbox.transaction() as db:
                async with db.execute(
                    "SELECT purpose, target_version FROM cmd_purpose_rotation"
                ) as cur:
                    targets = [(str(r[0]), int(r[1])) for r in await cur.fetchall()]
            for purpose, target in targets:
                while self.keys.versions().get(purpose, 0) < target:
                    self.keys.rotate(purpose)

    async def hand_pending_relays(self) -> None:
        """Hand every pending relay intent to the port, oldest first; expire stale ones.

        Stops at the first port error (the intent stays pending and is handed
        on the next command or :meth:`recover`).
        """
        async with self._after_commit:
            async with self.outbox.transaction() as db:
                intents = await pending_relay_intents(db)
            for it in intents:
                assert it.command_id is not None and it.expires_ms is not None  # a command's intent
                now = self.clock.now()
                if now.time_ms >= it.expires_ms:
                    async with self.outbox.transaction() as db:
                        await db.execute(
                            "UPDATE cmd_relay_intent SET state = 'expired', done_ms = ? "
                            "WHERE command_id = ? AND state = 'pending'",
                            (now.time_ms, it.command_id),
                        )
                        details = {
                            "id": it.command_id,
                            "meter": it.meter,
                            "op": it.op.command_word,
                            "expires_ms": it.expires_ms,
                        }
                        await audit_and_report(
                            db,
                            self.outbox,
                            actor="gateway",
                            action="relay.intent_expired",
                            details=details,
                            event=event("relay_intent_expired", details),
                            time_ms=now.time_ms,
                            time_source=now.quality.value,
                        )
                    self.stats.relay_expired += 1
                    continue
                try:
                    await self.relay.request(
                        it.meter, it.op, reason=it.reason, command_id=it.command_id
                    )
                except Exception:
                    log.exception("relay port refused intent %s; it stays pending", it.command_id)
                    return
                async with self.outbox.transaction() as db:
                    await db.execute(
                        "UPDATE cmd_relay_intent SET state = 'handed', done_ms = ? "
                        "WHERE command_id = ? AND state = 'pending'",
                        (now.time_ms, it.command_id),
                    )
                self.stats.relay_handed += 1

    async def prune_replay_table(self, *, grace_ms: int | None = None) -> int:
        """Forget command ids that no command can be accepted under any more (daemon timer).

        An id is dropped only when its envelope expired more than ``grace_ms``
        (default :data:`SEEN_GRACE_MS`) before the persisted trusted-time floor:
        trusted time never runs below the floor, so that envelope would be
        refused as ``expired`` anyway, and its exact replay is still refused by
        the issuer's counter floor. Finished relay intents of those commands go
        with them. Returns the number of ids forgotten.
        """
        grace = SEEN_GRACE_MS if grace_ms is None else grace_ms
        async with self.outbox.transaction() as db:
            before = await load_floor(db) - grace
            if before <= 0:
                return 0
            n = await prune_seen(db, before)
            await db.execute(
                "DELETE FROM cmd_relay_intent WHERE state != 'pending' AND expires_ms < ?",
                (before,),
            )
        if n:
            log.info("forgot %d command id(s) that expired before %d", n, before)
        return n

    async def flush_rejections(self) -> int:
        """Write the summaries of finished hours now (daemon timer, shutdown). Returns rows."""
        async with self.outbox.transaction() as db:
            now = self.clock.now()
            tally, summaries = due_summaries(self._tally, now.time_ms)
            for b in summaries:
                await self._write_summary(db, b, now.time_ms, now.quality.value)
        self._tally = tally
        return len(summaries)

    async def flush_all_rejections(self) -> int:
        """Write summaries of every bucket, the current hour included (before shutdown)."""
        async with self.outbox.transaction() as db:
            now = self.clock.now()
            summaries = sorted(
                (b for b in self._tally.values() if b.count > 1),
                key=lambda b: (b.hour_ms, b.reason),
            )
            for b in summaries:
                await self._write_summary(db, b, now.time_ms, now.quality.value)
        self._tally = {}
        return len(summaries)

    # -- records ---------------------------------------------------------------

    @staticmethod
    def _details(result: CommandResult, channel: str, extra: dict[str, Any]) -> dict[str, Any]:
        d: dict[str, Any] = {"outcome": result.outcome.value, "channel": channel}
        env = result.envelope
        if env is not None:
            d.update(
                id=env.command_id,
                type=env.type.value,
                issuer=env.issuer,
                counter=env.counter,
                digest=env.digest.hex(),
            )
        if result.reason is not None:
            d["reason"] = result.reason.value
        if result.code is not None:
            d["code"] = result.code
        if result.message:
            d["message"] = result.message[:500]
        d.update(extra)
        return d

    async def _event(
        self,
        db: aiosqlite.Connection,
        result: CommandResult,
        channel: str,
        now_ms: int,
        effect: Mapping[str, Any],
    ) -> None:
        fields: dict[str, Any] = {**result.to_reply(), "channel": channel}
        if result.envelope is not None:
            fields["command_type"] = result.envelope.type.value
            fields["issuer"] = result.envelope.issuer
        if effect:
            fields["effect"] = dict(effect)
        fields["at_ms"] = now_ms
        await self.outbox.add_in(
            db, RecordClass.EVENT, RecordKind.EVENT, now_ms, event("command_result", fields)
        )

    async def _write_summary(
        self, db: aiosqlite.Connection, b: Bucket, now_ms: int, tsrc: str
    ) -> None:
        details = {
            "reason": b.reason,
            "hour_ms": b.hour_ms,
            "count": b.count,
            "first_ms": b.first_ms,
            "last_ms": b.last_ms,
            "channels": list(b.channels),
        }
        await audit_and_report(
            db,
            self.outbox,
            actor="gateway",
            action="command.rejected_summary",
            details=details,
            event=event("command_rejections", details),
            time_ms=now_ms,
            time_source=tsrc,
        )

    async def _record_failure(self, channel: str, exc: BaseException) -> None:
        """Audit and report a command that failed (everything it did was rolled back).

        Failures are counted under the same flood limits as rejections (bucket
        ``failed:<exception>``): whatever makes a command fail, repeating it
        cannot write a row and an event per message.
        """
        try:
            async with self.outbox.transaction() as db:
                now = self.clock.now()
                tally, summaries = due_summaries(self._tally, now.time_ms)
                for b in summaries:
                    await self._write_summary(db, b, now.time_ms, now.quality.value)
                tally, note = tally_rejection(
                    tally,
                    f"failed:{type(exc).__name__}",
                    now.time_ms,
                    channel,
                    event_budget=self.event_budget,
                )
                details = {"outcome": "failed", "channel": channel, "error": type(exc).__name__}
                if note.audit:
                    log.error(
                        "command via %s could not be applied (further failures of this "
                        "kind this hour are counted)",
                        channel,
                        exc_info=exc,
                    )
                    await audit.append(
                        db,
                        actor=f"unattributed:{channel}",
                        action="command.failed",
                        details={**details, "hour_ms": note.bucket.hour_ms},
                        time_ms=now.time_ms,
                        time_source=now.quality.value,
                    )
                if note.event:
                    await self.outbox.add_in(
                        db,
                        RecordClass.EVENT,
                        RecordKind.EVENT,
                        now.time_ms,
                        event("command_result", details, at_ms=now.time_ms),
                    )
            self._tally = tally
        except Exception:
            log.exception("could not record the failed command")



"""The body of every command type: one parser each, in one registry.

:data:`BODIES` maps each :class:`~gateway.security.roles.CommandType` to the
one function that reads its body (the JSON object under ``body`` in the
signed payload, docs/security.md) into a typed value. Whoever needs a body
calls that function, so the keys central sends are named, checked and
explained in one place:

==========================  ============================================  ==============================
type                        parsed into                                   checked
==========================  ============================================  ==============================
``topup``                   :class:`TopUpBody`                            before the signature
``time.sync``               :class:`TimeSyncBody`                         before the signature
``keys.rotate``             :class:`KeyRotation`                          before the signature
``relay.operate``           :class:`RelayRequest`                         by the handler
``uplink.resend``           :class:`ResendRange`                          by the handler
``balance.snapshot``        :class:`~gateway.billing.reconcile.CentralSnapshot`   by the billing port
``meter.replace``           :class:`~gateway.billing.rating.MeterReplacement`     by the billing port
``tariff.publish``          :class:`~gateway.billing.tariff.Tariff`       by the billing port
``config.patch``            :class:`ConfigPatch`                          by the configuration port
``meter.roster``            :class:`MeterRoster`                          by the configuration port
``software.offer``          :class:`Offer`                                by the software port
``provisioning.bundle``     never: a bundle comes on USB                  refused on the command path
==========================  ============================================  ==============================

A parser says no by raising :class:`CommandRefused` with a reason code and a
message naming the key. Bodies checked *before the signature* are refused in
step 1 of verification as ``bad_body`` with that message (no key has been
used yet, so no owner's code goes with it); the others after verification, as
``rejected``/``bad_body`` with the parser's code.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple, TypeGuard

from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.identifiers import is_code, is_issued_id, is_name, is_purpose
from firmware_bridge.relay_ops import RelayOp
from gateway.billing.messages import MessageError, parse_meter_replacement, parse_snapshot
from gateway.billing.rating import MeterReplacement
from gateway.billing.reconcile import CentralSnapshot
from gateway.billing.tariff import Tariff, TariffError
from gateway.billing.tariff_file import parse_tariff
from gateway.billing.topup import Channel
from gateway.security.roles import CommandType, Role
from provisioning.software_bundle import Version
from store_forward.command_envelope import MAX_TIME_MS, b64_strict

MAX_RESEND_SPAN = 1_000_000  # record ids per uplink.resend command
MAX_REASON_CHARS = 200
PAYMENT_CHANNELS = frozenset(c.value for c in Channel)

# table -> keys a config.patch may set (docs/security.md, "Remote configuration")
PATCHABLE: Mapping[str, frozenset[str]] = {
    "gateway": frozenset({"site", "poll_interval_s"}),
    "uplink": frozenset(
        {
            "batch_max_records",
            "batch_max_bytes",
            "ack_timeout_s",
            "window",
            "reconnect_min_s",
            "reconnect_max_s",
            "max_bytes_per_s",
        }
    ),
    "broker": frozenset({"host", "port", "keepalive_s", "topic_prefix"}),
    "metrics": frozenset({"interval_s"}),
}
# Why some keys that look operational are not patchable (said in the refusal).
_NOT_PATCHABLE_WHY: Mapping[str, str] = {
    "gateway.timezone": "it places tariff periods and billing days",
    "uplink.headend_public_key": "it is the key uplink batches are sealed to",
    "broker.tls": "transport security is set by provisioning",
    "broker.ca_file": "transport security is set by provisioning",
    "broker.cert_file": "transport security is set by provisioning",
    "broker.key_file": "transport security is set by provisioning",
    "broker.username": "broker credentials are set by provisioning",
    "broker.password": "broker credentials are set by provisioning",
}
MIN_CONFIRM_S = 60
MAX_CONFIRM_S = 24 * 3600
_SCALARS = (str, int, float, bool)


class CommandRefused(EdgeGwError):
    """Raised by a body parser, a port or the handler when a command cannot be applied.

    ``reason`` is a short code of the refusing owner (``counter_gap``,
    ``hoarding_limit``, ``not_patchable``, ...), ``message`` says what to fix.
    This is the one way a port says no: nothing of the command is kept, the id
    stays unseen (central may send a corrected command under the same id) and
    central gets ``rejected``/``bad_body`` with the code and the message.
    """

    kind = ErrorKind.REFUSED

    def __init__(self, reason: str, message: str) -> None:
        if not is_code(reason):
            raise ValueError(f"refusal reason must be a short code, got {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message


class ConfigChange(enum.StrEnum):
    CONFIG_PATCH = "config.patch"
    METER_ROSTER = "meter.roster"


def _int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _malformed(message: str) -> CommandRefused:
    return CommandRefused("malformed", message)


def _object(body: object, what: str) -> Mapping[str, Any]:
    """``body`` if it is a JSON object (a port may be called with anything)."""
    if not isinstance(body, Mapping):
        raise _malformed(f"{what} must be a JSON object")
    return body


def _only(body: Mapping[str, Any], what: str, allowed: set[str]) -> None:
    """Refuse keys the body of ``what`` does not have (``unknown_keys``)."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise CommandRefused("unknown_keys", f"{what}: unknown keys {unknown}")


# ---------------------------------------------------------------------------
# Checked before the signature


@dataclass(frozen=True)
class TopUpBody:
    """A sale: ``amount_micro`` (1e-6 currency units) for ``account``, the account's
    ``purchase_counter``-th, paid through ``payment_channel``; ``issued_ms`` when
    central recorded it (the gateway's time when absent). The command id is the
    top-up's id."""

    account: str
    amount_micro: int
    purchase_counter: int
    payment_channel: Channel
    issued_ms: int | None = None


def parse_topup(body: Mapping[str, Any], command_id: str) -> TopUpBody:
    body = _object(body, "topup")
    account = body.get("account")
    if not is_name(account):
        raise _malformed("topup.account must be an account id")
    amount = body.get("amount_micro")
    if not _int(amount) or amount <= 0:
        raise _malformed("topup.amount_micro must be a positive integer (1e-6 currency units)")
    pc = body.get("purchase_counter")
    if not _int(pc) or pc < 1:
        raise _malformed("topup.purchase_counter must be an integer >= 1")
    ch = body.get("payment_channel")
    if not isinstance(ch, str) or ch not in PAYMENT_CHANNELS:
        raise _malformed(f"topup.payment_channel must be one of {', '.join(sorted(PAYMENT_CHANNELS))}")
    issued = body.get("issued_ms")
    if issued is not None and (not _int(issued) or not 0 <= issued < MAX_TIME_MS):
        raise _malformed("topup.issued_ms must be Unix milliseconds")
    return TopUpBody(account, amount, pc, Channel(ch), issued)


@dataclass(frozen=True)
class TimeSyncBody:
    """Central's time (``time_ms``, within the envelope's validity); ``reset_floor``
    also lowers the trusted-time floor (docs/security.md, "Trusted time")."""

    time_ms: int
    reset_floor: bool = False


def parse_time_sync(body: Mapping[str, Any], command_id: str) -> TimeSyncBody:
    body = _object(body, "time.sync")
    t = body.get("time_ms")
    if not _int(t) or not 0 <= t < MAX_TIME_MS:
        raise _malformed("time.sync.time_ms must be a non-negative integer (Unix ms)")
    reset = body.get("reset_floor", False)
    if not isinstance(reset, bool):
        raise _malformed("time.sync.reset_floor must be true or false")
    return TimeSyncBody(t, reset)


@dataclass(frozen=True)
class KeyRotation:
    """``add_key`` (``key_id``, ``role``, ``public_key``: raw Ed25519), ``revoke_key``
    (``key_id``, ``reason``) or ``rotate_purpose`` (``purpose``)."""

    op: str
    key_id: str = ""
    role: Role | None = None
    public_key: bytes = b""
    purpose: str = ""
    reason: str = ""


def parse_key_rotation(body: Mapping[str, Any], command_id: str) -> KeyRotation:
    body = _object(body, "keys.rotate")
    op = body.get("op")
    if op == "add_key":
        kid = body.get("key_id")
        if not is_issued_id(kid):
            raise _malformed("keys.rotate.key_id must be a key id")
        role = body.get("role")
        if not isinstance(role, str) or role not in {r.value for r in Role}:
            raise _malformed("keys.rotate.role must be a role name")
        pk = body.get("public_key")
        raw = (b64_strict(pk) if isinstance(pk, str) else None) or b""
        if len(raw) != 32:
            raise _malformed("keys.rotate.public_key must be a base64 Ed25519 public key (32 bytes)")
        return KeyRotation(op, key_id=kid, role=Role(role), public_key=raw)
    if op == "revoke_key":
        kid = body.get("key_id")
        if not is_issued_id(kid):
            raise _malformed("keys.rotate.key_id must be a key id")
        return KeyRotation(op, key_id=kid, reason=str(body.get("reason", "")))
    if op == "rotate_purpose":
        p = body.get("purpose")
        if not is_purpose(p):
            raise _malformed("keys.rotate.purpose must be a purpose name")
        return KeyRotation(op, purpose=p)
    raise _malformed("keys.rotate.op must be add_key, revoke_key or rotate_purpose")


# ---------------------------------------------------------------------------
# Checked by the handler


@dataclass(frozen=True)
class RelayRequest:
    meter_id: str
    op: RelayOp
    reason: str


def parse_relay(body: Mapping[str, Any], command_id: str = "") -> RelayRequest:
    """``{"meter": id, "op": word, "reason": text?}``.

    ``op`` is a :class:`RelayOp` in central's words (``alarm``, ``protect``, ...;
    :attr:`RelayOp.command_word`) or in the gateway's (``alarm_on``, ...)."""
    body = _object(body, "relay.operate")
    _only(body, "relay.operate", {"meter", "op", "reason"})
    meter = body.get("meter")
    if not is_name(meter):
        raise CommandRefused("bad_meter", "relay.operate.meter must be a meter id")
    try:
        op = RelayOp(str(body.get("op")))
    except ValueError:
        raise CommandRefused(
            "bad_op", f"relay.operate.op must be one of {', '.join(o.command_word for o in RelayOp)}"
        ) from None
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
        raise CommandRefused(
            "bad_reason", f"relay.operate.reason must be text of at most {MAX_REASON_CHARS}"
        )
    return RelayRequest(meter, op, reason or "central command")


class ResendRange(NamedTuple):
    """Outbox records ``from_id..to_id`` (inclusive)."""

    from_id: int
    to_id: int


def parse_resend(body: Mapping[str, Any], command_id: str = "") -> ResendRange:
    """``{"from_id": a, "to_id": b}`` with 1 <= a <= b and a bounded span."""
    body = _object(body, "uplink.resend")
    _only(body, "uplink.resend", {"from_id", "to_id"})
    a, b = body.get("from_id"), body.get("to_id")
    if not _int(a) or not _int(b):
        raise CommandRefused("bad_range", "uplink.resend.from_id and to_id must be integers")
    if not 1 <= a <= b:
        raise CommandRefused("bad_range", "uplink.resend needs 1 <= from_id <= to_id")
    if b - a >= MAX_RESEND_SPAN:
        raise CommandRefused(
            "bad_range", f"uplink.resend spans at most {MAX_RESEND_SPAN} record ids"
        )
    return ResendRange(a, b)


# ---------------------------------------------------------------------------
# Checked by the billing port


def parse_balance_snapshot(body: Mapping[str, Any], command_id: str) -> CentralSnapshot:
    """A balance snapshot (:func:`gateway.billing.messages.parse_snapshot`)."""
    try:
        return parse_snapshot(dict(body))
    except MessageError as exc:
        raise _malformed(str(exc)) from None


def parse_meter_replace(body: Mapping[str, Any], command_id: str) -> MeterReplacement:
    """A meter exchange (:func:`gateway.billing.messages.parse_meter_replacement`);
    the command id names it."""
    try:
        return parse_meter_replacement(dict(body), command_id)
    except MessageError as exc:
        raise _malformed(str(exc)) from None


def parse_tariff_publish(body: Mapping[str, Any], command_id: str) -> Tariff:
    """A tariff version: the body is the tariff document (docs/tariffs.md)."""
    body = _object(body, "tariff.publish")
    try:
        return parse_tariff(body, "central tariff")
    except TariffError as exc:
        raise CommandRefused("invalid_tariff", str(exc)) from None


# ---------------------------------------------------------------------------
# Checked by the configuration port


def _confirm_ms(body: Mapping[str, Any]) -> int | None:
    """``confirm_within_s`` (bounded) in ms, or None for the gateway's default."""
    if "confirm_within_s" not in body:
        return None
    v = body["confirm_within_s"]
    if not _int(v) or not MIN_CONFIRM_S <= v <= MAX_CONFIRM_S:
        raise CommandRefused(
            "bad_confirm_window",
            f"confirm_within_s must be an integer {MIN_CONFIRM_S}..{MAX_CONFIRM_S}",
        )
    return v * 1000


@dataclass(frozen=True)
class ConfigPatch:
    """``set``: ``TABLE.KEY`` -> value for keys in :data:`PATCHABLE`;
    ``confirm_ms``: the confirmation window asked for (None: the gateway's)."""

    values: tuple[tuple[str, str, str | int | float | bool], ...]
    confirm_ms: int | None = None


def parse_config_patch(body: Mapping[str, Any], command_id: str = "") -> ConfigPatch:
    body = _object(body, "config.patch")
    confirm_ms = _confirm_ms(body)
    _only(body, "config.patch", {"set", "confirm_within_s"})
    values = body.get("set")
    if not isinstance(values, dict) or not values:
        raise _malformed('config.patch needs "set": {"table.key": value, ...}')
    out: list[tuple[str, str, str | int | float | bool]] = []
    for path, value in values.items():
        table, dot, key = str(path).partition(".")
        if not dot or not key or "." in key:
            raise _malformed(f"{path!r}: expected TABLE.KEY")
        if key not in PATCHABLE.get(table, frozenset()):
            why = _NOT_PATCHABLE_WHY.get(f"{table}.{key}")
            raise CommandRefused(
                "not_patchable",
                f"{path}: not changeable remotely" + (f" ({why})" if why else ""),
            )
        if not isinstance(value, _SCALARS):
            raise _malformed(f"{path}: value must be a string, number or boolean")
        out.append((table, key, value))
    return ConfigPatch(tuple(out), confirm_ms)


@dataclass(frozen=True)
class MeterRoster:
    """``meters``: the whole ``[[meter]]`` list; ``confirm_ms`` as for a patch."""

    meters: tuple[Mapping[str, Any], ...]
    confirm_ms: int | None = None


def parse_meter_roster(body: Mapping[str, Any], command_id: str = "") -> MeterRoster:
    body = _object(body, "meter.roster")
    confirm_ms = _confirm_ms(body)
    _only(body, "meter.roster", {"meters", "confirm_within_s"})
    meters = body.get("meters")
    if not isinstance(meters, list) or not all(isinstance(m, dict) for m in meters):
        raise _malformed('meter.roster needs "meters": [ {meter table}, ... ]')
    return MeterRoster(tuple(meters), confirm_ms)


def parse_config_change(
    change: ConfigChange, body: Mapping[str, Any]
) -> ConfigPatch | MeterRoster:
    """The body of either configuration change."""
    if change is ConfigChange.CONFIG_PATCH:
        return parse_config_patch(body)
    return parse_meter_roster(body)


# ---------------------------------------------------------------------------
# Checked by the software port

MAX_CHUNKS = 512
MIN_CHUNK = 1024
# 512 chunks of at most 512 KiB: a 256 MiB bundle, and every chunk under the shipped
# broker's max_packet_size (1 MiB, examples/mosquitto/mosquitto.conf)
MAX_CHUNK = 512 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Offer:
    version: str
    sha256: str
    size: int
    chunk_size: int
    chunks: tuple[str, ...]
    allow_downgrade: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "chunks": list(self.chunks),
            "allow_downgrade": self.allow_downgrade,
        }

    def chunk_len(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)


def parse_offer(body: Mapping[str, Any], command_id: str = "") -> Offer:
    """A ``software.offer`` body (gateway.update_transfer fetches what it offers)."""
    body = _object(body, "software.offer")
    keys = {"version", "sha256", "size", "chunk_size", "chunks", "allow_downgrade"}
    unknown = sorted(set(body) - keys)
    if unknown:
        raise CommandRefused("unknown_keys", f"software.offer: unknown keys {unknown}")
    try:
        version = Version.parse(body.get("version")).text
    except ValueError as exc:
        raise CommandRefused("bad_version", f"software.offer.version: {exc}") from None
    digest = body.get("sha256")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise CommandRefused("bad_sha256", "software.offer.sha256 must be 64 lowercase hex")
    size, chunk = body.get("size"), body.get("chunk_size")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, chunk)):
        raise CommandRefused("bad_size", "software.offer.size and chunk_size must be integers")
    assert isinstance(size, int) and isinstance(chunk, int)
    if not MIN_CHUNK <= chunk <= MAX_CHUNK:
        raise CommandRefused(
            "bad_size", f"software.offer.chunk_size must be {MIN_CHUNK}..{MAX_CHUNK}"
        )
    if not 1 <= size <= chunk * MAX_CHUNKS:
        raise CommandRefused(
            "bad_size", f"software.offer.size must be 1..{MAX_CHUNKS} chunks of chunk_size"
        )
    chunks = body.get("chunks")
    if (
        not isinstance(chunks, list)
        or len(chunks) != math.ceil(size / chunk)
        or not all(isinstance(c, str) and _SHA256.fullmatch(c) for c in chunks)
    ):
        raise CommandRefused(
            "bad_chunks",
            "software.offer.chunks must list the SHA-256 (hex) of each of the "
            f"{math.ceil(size / chunk)} chunks",
        )
    allow = body.get("allow_downgrade", False)
    if not isinstance(allow, bool):
        raise CommandRefused("bad_body", "software.offer.allow_downgrade must be true or false")
    return Offer(version, digest, size, chunk, tuple(chunks), allow)



def refuse_bundle(body: Mapping[str, Any], command_id: str) -> None:
    """A provisioning bundle arrives on USB and is applied by the provisioning package."""
    raise CommandRefused(
        "not_accepted", f"{CommandType.PROVISIONING_BUNDLE} is not accepted on the command path"
    )


# ---------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class BodyRule:
    """How a type's body is read: its parser, and whether step 1 of verification
    (before the signature) checks it."""

    parse: Callable[[Mapping[str, Any], str], Any]
    before_signature: bool = False


BODIES: Mapping[CommandType, BodyRule] = MappingProxyType(
    {
        CommandType.TOPUP: BodyRule(parse_topup, before_signature=True),
        CommandType.TIME_SYNC: BodyRule(parse_time_sync, before_signature=True),
        CommandType.KEYS_ROTATE: BodyRule(parse_key_rotation, before_signature=True),
        CommandType.RELAY_OPERATE: BodyRule(parse_relay),
        CommandType.UPLINK_RESEND: BodyRule(parse_resend),
        CommandType.BALANCE_SNAPSHOT: BodyRule(parse_balance_snapshot),
        CommandType.METER_REPLACE: BodyRule(parse_meter_replace),
        CommandType.TARIFF_PUBLISH: BodyRule(parse_tariff_publish),
        CommandType.CONFIG_PATCH: BodyRule(parse_config_patch),
        CommandType.METER_ROSTER: BodyRule(parse_meter_roster),
        CommandType.SOFTWARE_OFFER: BodyRule(parse_offer),
        CommandType.PROVISIONING_BUNDLE: BodyRule(refuse_bundle),
    }
)


def problem_before_signature(ctype: CommandType, body: Mapping[str, Any], command_id: str) -> str | None:
    """Step 1 of verification: why the body of a type checked before the signature
    cannot be right, or None (also for the types checked later)."""
    rule = BODIES[ctype]
    if not rule.before_signature:
        return None
    try:
        rule.parse(body, command_id)
    except CommandRefused as exc:
        return exc.message
    return None

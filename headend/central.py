"""Central's commands, payments and reports, with the roles that may ask for them.

One service behind both doors — the ``edgegw central`` commands
(:mod:`headend.central_cli`) and the HTTP API (:mod:`headend.api`) — so both
check the same permissions and write the same rows:

==============  =================================================================
role            may
==============  =================================================================
``billing``     sell a top-up (central assigns the account's next purchase
                counter), publish a tariff, snapshot a balance, register
                accounts; read commands and reports
``operations``  operate a relay, change configuration; read commands
``viewer``      read commands, accounts and reports
``channel``     post payments as its own payment channel (counter, bank,
                mobile_app, agent) and read back its own payments
==============  =================================================================

A command is signed with the key of the role its type belongs to
(:data:`store_forward.command_roles.COMMAND_ROLE`), and the service hands the
signer only the caller's own role's key (:meth:`headend.signing.Signer.only`):
billing cannot trip a relay and operations cannot sell credit, both here and,
independently, at the gateway, which checks the signing key's role.

Each command is queued (:mod:`headend.central_db`) and sent by the
dispatcher (:mod:`headend.dispatch`) until the gateway's result arrives.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.identifiers import NAME_RULE, is_name, is_payment_key
from firmware_bridge.relay_ops import RelayOp
from headend.central_db import CentralDB, CommandRow, NewCommand, PaymentRow, TokenRow
from headend.commands import State
from headend.signing import Signer, SigningError
from headend.sql import Tx
from store_forward.command_envelope import PAYMENT_CHANNELS
from store_forward.command_roles import COMMAND_ROLE, MAX_VALIDITY_MS, CommandType, Role

_DAY_MS = 86_400_000
MICRO = 1_000_000
MAX_AMOUNT_MICRO = 10**12  # the gateway's own ceiling for one top-up

_AMOUNT_RE = re.compile(r"[0-9]{1,7}(\.[0-9]{1,6})?")

# central's words for the relay operations (relay.operate, docs/security.md)
RELAY_OPS = tuple(op.command_word for op in RelayOp)

# How long a command stays valid unless the caller says otherwise (each at most
# the type's limit, MAX_VALIDITY_MS).
DEFAULT_VALIDITY_MS: Mapping[CommandType, int] = {
    CommandType.TOPUP: 30 * _DAY_MS,
    CommandType.TARIFF_PUBLISH: 30 * _DAY_MS,
    CommandType.BALANCE_SNAPSHOT: 2 * _DAY_MS,
    CommandType.RELAY_OPERATE: 6 * 3_600_000,
    CommandType.CONFIG_PATCH: 7 * _DAY_MS,
}


class ApiRole(enum.StrEnum):
    BILLING = "billing"
    OPERATIONS = "operations"
    VIEWER = "viewer"
    CHANNEL = "channel"


class Permission(enum.StrEnum):
    READ = "read"  # commands, accounts
    REPORT = "report"
    ACCOUNTS = "accounts"  # register accounts
    PAY = "pay"  # post payments (as the token's channel)


# Command types each role may ask for (and sign, with its own key).
ROLE_COMMANDS: Mapping[ApiRole, frozenset[CommandType]] = {
    ApiRole.BILLING: frozenset(
        {CommandType.TOPUP, CommandType.TARIFF_PUBLISH, CommandType.BALANCE_SNAPSHOT}
    ),
    ApiRole.OPERATIONS: frozenset({CommandType.RELAY_OPERATE, CommandType.CONFIG_PATCH}),
    ApiRole.VIEWER: frozenset(),
    ApiRole.CHANNEL: frozenset(),
}
ROLE_PERMISSIONS: Mapping[ApiRole, frozenset[Permission]] = {
    ApiRole.BILLING: frozenset({Permission.READ, Permission.REPORT, Permission.ACCOUNTS}),
    ApiRole.OPERATIONS: frozenset({Permission.READ}),
    ApiRole.VIEWER: frozenset({Permission.READ, Permission.REPORT}),
    ApiRole.CHANNEL: frozenset({Permission.PAY}),
}
# The signing role behind each role that asks for commands.
SIGNING_ROLE: Mapping[ApiRole, Role] = {
    ApiRole.BILLING: Role.BILLING,
    ApiRole.OPERATIONS: Role.OPERATIONS,
}


@dataclass(frozen=True)
class Actor:
    """Who asks: an API token's holder, or someone at the command line."""

    name: str
    role: ApiRole
    channel: str | None = None  # the payment channel of a ``channel`` token
    token_id: str | None = None

    @property
    def label(self) -> str:
        return f"{self.role.value}:{self.name}"


class CentralError(EdgeGwError):
    """A request central does not carry out: ``status`` (HTTP), ``code``, message."""

    kind = ErrorKind.INVALID
    status = 400
    code = "invalid"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class Invalid(CentralError):
    status = 400
    code = "invalid"


class Forbidden(CentralError):
    kind = ErrorKind.AUTH
    status = 403
    code = "forbidden"


class NotFound(CentralError):
    kind = ErrorKind.NOT_FOUND
    status = 404
    code = "not_found"


class Conflict(CentralError):
    kind = ErrorKind.CONFLICT
    status = 409
    code = "conflict"


class Unavailable(CentralError):
    kind = ErrorKind.ERROR
    status = 503
    code = "no_signing_key"


# --------------------------------------------------------------------------- values


def parse_id(value: Any, what: str) -> str:
    """A gateway, account, meter or tariff name (firmware_bridge.identifiers)."""
    if not is_name(value):
        raise Invalid(f"{what} must be an identifier ({NAME_RULE}), got {_show(value)}")
    return value


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_amount(value: Any, what: str = "amount") -> int:
    """A money amount in yuan as a decimal string ("50", "50.00", up to 6 decimals),
    as integer micro-yuan; never a float."""
    if not isinstance(value, str) or not _AMOUNT_RE.fullmatch(value):
        raise Invalid(
            f"{what} must be a decimal string of yuan with at most 6 decimals, e.g. \"50.00\""
            f" (got {_show(value)})"
        )
    try:
        micro = int(Decimal(value) * MICRO)
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        raise Invalid(f"{what}: not a number") from None
    return micro


def parse_amount_micro(value: Any, what: str = "amount_micro") -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise Invalid(f"{what} must be an integer (1e-6 yuan), got {_show(value)}")
    return value


def check_topup_amount(micro: int) -> int:
    if not 0 < micro <= MAX_AMOUNT_MICRO:
        raise Invalid(f"a top-up must be above 0 and at most {yuan(MAX_AMOUNT_MICRO)}, got {yuan(micro)}")
    return micro


def yuan(micro: int | None) -> str | None:
    """Micro-yuan as a decimal string with at least two decimals ("50.00", "0.000001")."""
    if micro is None:
        return None
    d = Decimal(micro).scaleb(-6)
    text = format(d.normalize(), "f")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def no_floats(v: Any, where: str, depth: int = 0) -> None:
    if depth > 10:
        raise Invalid(f"{where}: nested too deep")
    if isinstance(v, float):
        raise Invalid(f"{where}: numbers with a fraction travel as decimal strings, not floats")
    if isinstance(v, Mapping):
        for k, x in v.items():
            no_floats(x, f"{where}.{k}", depth + 1)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            no_floats(x, f"{where}[{i}]", depth + 1)


def validity(type: CommandType, valid_for_s: Any) -> int:
    """The validity (ms) asked for, or the type's default; within the type's limit."""
    if valid_for_s is None:
        return DEFAULT_VALIDITY_MS[type]
    if not isinstance(valid_for_s, int) or isinstance(valid_for_s, bool) or valid_for_s < 60:
        raise Invalid(f"valid_for_s must be an integer number of seconds >= 60, got {_show(valid_for_s)}")
    ms = valid_for_s * 1000
    if ms > MAX_VALIDITY_MS[type]:
        raise Invalid(f"{type} may be valid for at most {MAX_VALIDITY_MS[type] // 1000} s")
    return ms


def command_view(row: CommandRow) -> dict[str, Any]:
    """A command as the CLI and the API show it."""
    return {
        "id": row.command_id,
        "gateway": row.gateway_id,
        "type": row.type,
        "state": row.state.value,
        "reason": row.reason,
        "code": row.code,
        "message": row.message,
        "requested_by": row.requested_by,
        "signed_by": row.issuer,
        "role": row.role,
        "created_ms": row.created_ms,
        "expires_ms": row.expires_ms,
        "attempts": row.attempts,
        "first_sent_ms": row.first_sent_ms,
        "last_sent_ms": row.last_sent_ms,
        "next_attempt_ms": row.next_attempt_ms if row.state in (State.QUEUED, State.SENT) else None,
        "final_ms": row.final_ms,
        "results": row.results,
        "last_result_ms": row.last_result_ms,
        "body": row.body,
        "effect": row.effect,
        "account": row.account,
        "meter": row.meter,
        "amount": yuan(row.amount_micro),
        "amount_micro": row.amount_micro,
        "payment_channel": row.payment_channel,
        "purchase_counter": row.purchase_counter,
        "credited": yuan(row.credited_micro),
        "credited_micro": row.credited_micro,
        "credited_ms": row.credited_ms,
    }


def token_text(token_id: str, secret: bytes) -> str:
    return f"egw1.{token_id}.{base64.urlsafe_b64encode(secret).decode('ascii').rstrip('=')}"


def split_token(text: str) -> tuple[str, bytes] | None:
    parts = text.split(".")
    if len(parts) != 3 or parts[0] != "egw1" or not re.fullmatch(r"[0-9a-f]{16}", parts[1]):
        return None
    try:
        secret = base64.urlsafe_b64decode(parts[2] + "=" * (-len(parts[2]) % 4))
    except ValueError:
        return None
    return (parts[1], secret) if len(secret) == 32 else None


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class PaymentAnswer:
    status: int
    body: dict[str, Any]
    replayed: bool


@dataclass
class Central:
    """The service. ``signer`` may be None (a read-only central: no command can be
    asked for); ``clock_ms`` is injectable; ``on_queued`` is called after a command
    was queued (the dispatcher's wake-up)."""

    db: CentralDB
    signer: Signer | None = None
    clock_ms: Callable[[], int] = wall_ms
    on_queued: list[Callable[[], None]] = field(default_factory=list)

    # -- API tokens ---------------------------------------------------------

    async def create_token(self, name: str, role: ApiRole, channel: str | None = None) -> tuple[TokenRow, str]:
        """A new token (the text is returned once and never stored: only its SHA-256)."""
        if not name or len(name) > 64 or not name.isprintable():
            raise Invalid("a token name is 1 to 64 printable characters")
        if (role is ApiRole.CHANNEL) != (channel is not None):
            raise Invalid("a channel token names its payment channel, and only a channel token does")
        if channel is not None and channel not in PAYMENT_CHANNELS:
            raise Invalid(f"channel must be one of {', '.join(sorted(PAYMENT_CHANNELS))}")
        token_id = secrets.token_hex(8)
        secret = secrets.token_bytes(32)
        row = TokenRow(token_id, name, role.value, channel, hashlib.sha256(secret).digest(), self.clock_ms(), None)
        async with self.db.transaction() as tx:
            await self.db.insert_token(tx, row)
        return row, token_text(token_id, secret)

    async def authenticate(self, text: str) -> Actor | None:
        parsed = split_token(text.strip())
        if parsed is None:
            return None
        token_id, secret = parsed
        async with self.db.transaction(readonly=True) as tx:
            row = await self.db.token(tx, token_id)
        if row is None or row.revoked_ms is not None:
            return None
        if not hmac.compare_digest(hashlib.sha256(secret).digest(), row.secret_sha256):
            return None
        return Actor(row.name, ApiRole(row.role), row.channel, row.token_id)

    # -- checks -------------------------------------------------------------

    @staticmethod
    def require(actor: Actor, permission: Permission) -> None:
        if permission not in ROLE_PERMISSIONS[actor.role]:
            raise Forbidden(f"the {actor.role} role may not {permission.value}")

    def _signer_for(self, actor: Actor, type: CommandType) -> Signer:
        if type not in ROLE_COMMANDS[actor.role]:
            role = COMMAND_ROLE[type]
            article = "an" if role.value[0] in "aeiou" else "a"
            raise Forbidden(f"the {actor.role} role may not ask for {type} ({article} {role} command)")
        if self.signer is None:
            raise Unavailable("this central has no signing keys")
        signer = self.signer.only(SIGNING_ROLE[actor.role])
        try:
            signer.key_for(type)
        except SigningError as exc:
            raise Unavailable(str(exc)) from None
        return signer

    # -- commands -----------------------------------------------------------

    async def _queue_in(
        self,
        tx: Tx,
        actor: Actor,
        signer: Signer,
        type: CommandType,
        gateway: str,
        body: Mapping[str, Any],
        valid_ms: int,
        *,
        prefix: str,
        **cols: Any,
    ) -> CommandRow:
        now = self.clock_ms()
        key = signer.key_for(type)
        counter = await self.db.next_counter(tx, key.key_id, now)
        command_id = f"{prefix}-{secrets.token_hex(8)}"
        try:
            envelope = signer.sign(
                type,
                target=gateway,
                command_id=command_id,
                counter=counter,
                issued_ms=now,
                expires_ms=now + valid_ms,
                body=body,
            )
        except SigningError as exc:
            raise Invalid(str(exc)) from None
        await self.db.insert_command(
            tx,
            NewCommand(
                command_id=command_id,
                gateway_id=gateway,
                type=type.value,
                role=key.role.value,
                issuer=key.key_id,
                counter=counter,
                body=body,
                requested_by=actor.label,
                created_ms=now,
                issued_ms=now,
                expires_ms=now + valid_ms,
                envelope=envelope,
                **cols,
            ),
        )
        row = await self.db.command(tx, command_id)
        assert row is not None
        return row

    def _queued(self) -> None:
        for wake in self.on_queued:
            wake()

    async def _account(self, tx: Tx, account: str) -> Any:
        row = await self.db.account(tx, account)
        if row is None:
            raise NotFound(f"no account {account!r} is registered at central (edgegw central account add)")
        return row

    async def sell_topup(
        self,
        actor: Actor,
        *,
        account: str,
        amount_micro: int,
        payment_channel: str,
        valid_for_s: int | None = None,
        gateway: str | None = None,
        request_key: str | None = None,
    ) -> dict[str, Any]:
        """Queue a top-up of ``account`` with its next purchase counter.

        ``gateway``: the gateway the caller believes serves the account (refused
        if central knows another). ``request_key``: the caller's id of this
        request (a console form): asked again, it answers the same command.
        """
        signer = self._signer_for(actor, CommandType.TOPUP)
        parse_id(account, "account")
        check_topup_amount(amount_micro)
        if payment_channel not in PAYMENT_CHANNELS:
            raise Invalid(f"payment_channel must be one of {', '.join(sorted(PAYMENT_CHANNELS))}")
        valid = validity(CommandType.TOPUP, valid_for_s)
        async with self.db.transaction() as tx:
            if request_key is not None:
                known = await self.db.by_request(tx, request_key)
                if known is not None:
                    if (known.type, known.account, known.amount_micro) != ("topup", account, amount_micro):
                        raise Conflict(f"request {request_key!r} already asked for {known.type} {known.command_id}")
                    return command_view(known)
            if gateway is not None:
                acct = await self._account(tx, account)
                if acct.gateway_id != gateway:
                    raise Conflict(f"account {account!r} is served by gateway {acct.gateway_id!r}, not {gateway!r}")
            row = await self._topup_in(
                tx, actor, signer, account, amount_micro, payment_channel, valid, request_key
            )
        self._queued()
        return command_view(row)

    async def _topup_in(
        self,
        tx: Tx,
        actor: Actor,
        signer: Signer,
        account: str,
        amount_micro: int,
        payment_channel: str,
        valid_ms: int,
        request_key: str | None = None,
    ) -> CommandRow:
        acct = await self._account(tx, account)
        pc = await self.db.next_purchase_counter(tx, account)
        assert pc is not None
        body = {
            "account": account,
            "amount_micro": amount_micro,
            "purchase_counter": pc,
            "payment_channel": payment_channel,
        }
        return await self._queue_in(
            tx, actor, signer, CommandType.TOPUP, acct.gateway_id, body, valid_ms,
            prefix="topup", account=account, amount_micro=amount_micro,
            payment_channel=payment_channel, purchase_counter=pc, request_key=request_key,
        )  # fmt: skip

    async def publish_tariff(
        self,
        actor: Actor,
        *,
        gateways: Sequence[str],
        tariff: Mapping[str, Any],
        valid_for_s: int | None = None,
    ) -> list[dict[str, Any]]:
        """Queue one ``tariff.publish`` per gateway (the gateway checks the tariff and
        refuses one no account of its uses)."""
        signer = self._signer_for(actor, CommandType.TARIFF_PUBLISH)
        if not isinstance(tariff, Mapping) or not tariff:
            raise Invalid("tariff must be a JSON object (the tariff document)")
        no_floats(tariff, "tariff")
        parse_id(tariff.get("id"), "tariff.id")
        version = tariff.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise Invalid("tariff.version must be an integer >= 1")
        gws = [parse_id(g, "gateway") for g in gateways]
        if not gws or len(set(gws)) != len(gws):
            raise Invalid("name each gateway once (at least one)")
        valid = validity(CommandType.TARIFF_PUBLISH, valid_for_s)
        rows: list[CommandRow] = []
        async with self.db.transaction() as tx:
            for gw in gws:
                row = await self._queue_in(
                    tx, actor, signer, CommandType.TARIFF_PUBLISH, gw, dict(tariff), valid,
                    prefix="tariff",
                )  # fmt: skip
                rows.append(row)
        self._queued()
        return [command_view(r) for r in rows]

    async def snapshot_balance(
        self,
        actor: Actor,
        *,
        account: str,
        balance_micro: int,
        as_of_seq: int,
        included_ids: Sequence[str] = (),
        purchase_counter: int | None = None,
        tier_period_start_ms: int | None = None,
        tier_cumulative_ckwh: int | None = None,
        valid_for_s: int | None = None,
    ) -> dict[str, Any]:
        """Queue central's balance of ``account`` as of the gateway's ledger entry
        ``as_of_seq`` (docs/billing.md, "Reconciliation"); central numbers its
        snapshots per account."""
        signer = self._signer_for(actor, CommandType.BALANCE_SNAPSHOT)
        parse_id(account, "account")
        parse_amount_micro(balance_micro, "balance_micro")
        if not isinstance(as_of_seq, int) or isinstance(as_of_seq, bool) or as_of_seq < 0:
            raise Invalid("as_of_seq must be an integer >= 0 (a seq of the gateway's ledger)")
        ids = list(included_ids)
        if not all(isinstance(i, str) and i for i in ids):
            raise Invalid("included_ids must be ledger entry ids (topup:<id>, adjust:<id>)")
        valid = validity(CommandType.BALANCE_SNAPSHOT, valid_for_s)
        async with self.db.transaction() as tx:
            acct = await self._account(tx, account)
            seq = await self.db.next_snapshot_seq(tx, account)
            assert seq is not None
            now = self.clock_ms()
            body: dict[str, Any] = {
                "id": f"snap-{account}-{seq}",
                "account": account,
                "central_seq": seq,
                "as_of_seq": as_of_seq,
                "balance_micro": balance_micro,
                "time_ms": now,
            }
            if ids:
                body["included_ids"] = ids
            for k, v in (
                ("purchase_counter", purchase_counter),
                ("tier_period_start_ms", tier_period_start_ms),
                ("tier_cumulative_ckwh", tier_cumulative_ckwh),
            ):
                if v is not None:
                    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                        raise Invalid(f"{k} must be an integer >= 0")
                    body[k] = v
            row = await self._queue_in(
                tx, actor, signer, CommandType.BALANCE_SNAPSHOT, acct.gateway_id, body, valid,
                prefix="snapshot", account=account, amount_micro=balance_micro,
            )  # fmt: skip
        self._queued()
        return command_view(row)

    async def operate_relay(
        self,
        actor: Actor,
        *,
        gateway: str,
        meter: str,
        op: str,
        reason: str | None = None,
        valid_for_s: int | None = None,
        request_key: str | None = None,
    ) -> dict[str, Any]:
        """Queue a relay operation (``request_key`` as for :meth:`sell_topup`)."""
        signer = self._signer_for(actor, CommandType.RELAY_OPERATE)
        parse_id(gateway, "gateway")
        parse_id(meter, "meter")
        try:
            word = RelayOp(op).command_word if isinstance(op, str) else ""
        except ValueError:
            word = ""
        if not word:
            raise Invalid(f"op must be one of {', '.join(RELAY_OPS)}")
        op = word
        body: dict[str, Any] = {"meter": meter, "op": op}
        if reason is not None:
            if not isinstance(reason, str) or not reason.isprintable() or len(reason) > 200:
                raise Invalid("reason is at most 200 printable characters")
            body["reason"] = reason
        valid = validity(CommandType.RELAY_OPERATE, valid_for_s)
        async with self.db.transaction() as tx:
            if request_key is not None:
                known = await self.db.by_request(tx, request_key)
                if known is not None:
                    if (known.type, known.gateway_id, known.meter, known.body.get("op")) != (
                        "relay.operate", gateway, meter, op
                    ):
                        raise Conflict(f"request {request_key!r} already asked for {known.type} {known.command_id}")
                    return command_view(known)
            row = await self._queue_in(
                tx, actor, signer, CommandType.RELAY_OPERATE, gateway, body, valid,
                prefix="relay", meter=meter, request_key=request_key,
            )  # fmt: skip
        self._queued()
        return command_view(row)

    async def change_config(
        self,
        actor: Actor,
        *,
        gateway: str,
        settings: Mapping[str, Any],
        confirm_within_s: int | None = None,
        valid_for_s: int | None = None,
    ) -> dict[str, Any]:
        """Queue a ``config.patch`` (the gateway accepts only what docs/security.md §2
        gives the operations role, and rolls back a change that loses central)."""
        signer = self._signer_for(actor, CommandType.CONFIG_PATCH)
        parse_id(gateway, "gateway")
        if not isinstance(settings, Mapping) or not settings:
            raise Invalid('settings must be a JSON object of "table.key": value')
        for k in settings:
            if not isinstance(k, str) or not re.fullmatch(r"[a-z_]+\.[a-z_0-9]+", k):
                raise Invalid(f'setting names are "table.key", got {_show(k)}')
        no_floats(settings, "settings")
        body: dict[str, Any] = {"set": dict(settings)}
        if confirm_within_s is not None:
            if not isinstance(confirm_within_s, int) or isinstance(confirm_within_s, bool):
                raise Invalid("confirm_within_s must be an integer number of seconds")
            body["confirm_within_s"] = confirm_within_s
        valid = validity(CommandType.CONFIG_PATCH, valid_for_s)
        async with self.db.transaction() as tx:
            row = await self._queue_in(
                tx, actor, signer, CommandType.CONFIG_PATCH, gateway, body, valid, prefix="config"
            )
        self._queued()
        return command_view(row)

    # -- reading ------------------------------------------------------------

    async def command(self, actor: Actor, command_id: str) -> dict[str, Any]:
        self.require(actor, Permission.READ)
        async with self.db.transaction(readonly=True) as tx:
            row = await self.db.command(tx, command_id)
            if row is None:
                raise NotFound(f"no command {command_id!r}")
            log = await self.db.log(tx, command_id)
        return {**command_view(row), "log": log}

    async def commands(
        self,
        actor: Actor,
        *,
        gateway: str | None = None,
        account: str | None = None,
        state: str | None = None,
        type: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        self.require(actor, Permission.READ)
        if state is not None and state not in {s.value for s in State}:
            raise Invalid(f"state must be one of {', '.join(s.value for s in State)}")
        async with self.db.transaction(readonly=True) as tx:
            rows = await self.db.commands(
                tx, gateway_id=gateway, account=account, state=state, type=type, limit=limit
            )
        return [command_view(r) for r in rows]

    async def add_account(
        self, actor: Actor, *, account: str, gateway: str, purchase_counter: int = 0
    ) -> dict[str, Any]:
        """Register which gateway serves ``account`` and the last purchase counter its
        ledger holds (0 for a new account). Registering it again with the same
        gateway changes nothing; with another gateway it is refused."""
        self.require(actor, Permission.ACCOUNTS)
        parse_id(account, "account")
        parse_id(gateway, "gateway")
        if not isinstance(purchase_counter, int) or isinstance(purchase_counter, bool) or purchase_counter < 0:
            raise Invalid("purchase_counter must be an integer >= 0")
        async with self.db.transaction() as tx:
            if not await self.db.add_account(tx, account, gateway, purchase_counter, self.clock_ms()):
                have = await self._account(tx, account)
                if have.gateway_id != gateway:
                    raise Conflict(f"account {account!r} is served by gateway {have.gateway_id!r}")
            row = await self._account(tx, account)
        return _account_view(row)

    async def accounts(self, actor: Actor, gateway: str | None = None) -> list[dict[str, Any]]:
        self.require(actor, Permission.READ)
        async with self.db.transaction(readonly=True) as tx:
            return [_account_view(a) for a in await self.db.accounts(tx, gateway)]

    # -- payments -----------------------------------------------------------

    async def post_payment(self, actor: Actor, request: Any) -> PaymentAnswer:
        """A payment a channel posts: one top-up per (channel, idempotency key).

        The same key with the same request answers what the first answered
        (``replayed``); with another request it is a :class:`Conflict`.
        """
        self.require(actor, Permission.PAY)
        assert actor.channel is not None and actor.token_id is not None
        if not isinstance(request, Mapping):
            raise Invalid("a payment is a JSON object")
        allowed = {"idempotency_key", "account", "amount", "amount_micro", "reference"}
        extra = sorted(set(request) - allowed)
        if extra:
            raise Invalid(f"unknown field(s) {', '.join(extra)} (allowed: {', '.join(sorted(allowed))})")
        key = request.get("idempotency_key")
        if not is_payment_key(key):
            raise Invalid(
                "idempotency_key must be 1 to 128 letters, digits, _ . : - (the channel's own id"
                " of this payment)"
            )
        account = parse_id(request.get("account"), "account")
        if ("amount" in request) == ("amount_micro" in request):
            raise Invalid('give the amount once: "amount" (yuan, decimal string) or "amount_micro"')
        micro = (
            parse_amount(request["amount"])
            if "amount" in request
            else parse_amount_micro(request["amount_micro"])
        )
        check_topup_amount(micro)
        reference = request.get("reference")
        if reference is not None and (
            not isinstance(reference, str) or not reference.isprintable() or len(reference) > 128
        ):
            raise Invalid("reference is at most 128 printable characters")
        canonical = json.dumps(
            {"account": account, "amount_micro": micro, "reference": reference},
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        digest = hashlib.sha256(canonical).digest()
        signer = self._payment_signer()
        channel = actor.channel
        async with self.db.transaction() as tx:
            now = self.clock_ms()
            known = await self.db.payment(tx, channel, key)
            if known is None:
                # Take the key first: a concurrent request with it waits here, then finds it.
                placeholder = PaymentRow(
                    channel, key, digest, actor.token_id, account, micro, reference, now, "", 0, {}
                )
                taken = await self.db.insert_payment(tx, placeholder)
                if not taken:
                    known = await self.db.payment(tx, channel, key)
            if known is not None:
                if known.request_sha256 != digest:
                    raise Conflict(
                        f"idempotency key {key!r} of channel {channel} was used for another payment"
                        f" ({known.account}, {yuan(known.amount_micro)}); a new payment needs a new key",
                        code="idempotency_key_reused",
                    )
                return PaymentAnswer(known.http_status, known.response, True)
            row = await self._topup_in(
                tx,
                Actor(f"{channel}/{actor.name}", ApiRole.CHANNEL, channel, actor.token_id),
                signer,
                account,
                micro,
                channel,
                DEFAULT_VALIDITY_MS[CommandType.TOPUP],
            )
            body = {
                "payment": {
                    "channel": channel,
                    "idempotency_key": key,
                    "account": account,
                    "amount": yuan(micro),
                    "amount_micro": micro,
                    "reference": reference,
                    "received_ms": now,
                },
                "topup": {
                    "command_id": row.command_id,
                    "gateway": row.gateway_id,
                    "purchase_counter": row.purchase_counter,
                    "state": row.state.value,
                },
            }
            await tx.execute(
                "UPDATE central_payments SET command_id = ?, http_status = ?, response = ?"
                " WHERE channel = ? AND idempotency_key = ?",
                (row.command_id, 201, json.dumps(body, sort_keys=True), channel, key),
            )
        self._queued()
        return PaymentAnswer(201, body, False)

    def _payment_signer(self) -> Signer:
        """Payments become top-ups signed with the billing key (the channel's token
        only admits the payment; it holds no key)."""
        if self.signer is None:
            raise Unavailable("this central has no signing keys")
        signer = self.signer.only(Role.BILLING)
        try:
            signer.key_for(CommandType.TOPUP)
        except SigningError as exc:
            raise Unavailable(str(exc)) from None
        return signer

    async def payment(self, actor: Actor, key: str) -> dict[str, Any]:
        """A channel reads back one of its own payments (with its top-up's state now)."""
        self.require(actor, Permission.PAY)
        assert actor.channel is not None
        async with self.db.transaction(readonly=True) as tx:
            p = await self.db.payment(tx, actor.channel, key)
            if p is None or not p.command_id:
                raise NotFound(f"no payment {key!r} of channel {actor.channel}")
            row = await self.db.command(tx, p.command_id)
        out = dict(p.response)
        if row is not None:
            out["topup"] = {**out.get("topup", {}), "state": row.state.value, "reason": row.reason}
        return out

    # -- the daily reconciliation -------------------------------------------

    async def reconciliation(self, actor: Actor, day: dt.date, tz: str = "UTC") -> dict[str, Any]:
        """Per payment channel, the top-ups central created on ``day`` (in time zone
        ``tz``) — how many and how much — against what the gateways confirmed."""
        self.require(actor, Permission.REPORT)
        try:
            zone = ZoneInfo(tz)
        except (ValueError, KeyError) as exc:
            raise Invalid(f"unknown time zone {tz!r}") from exc
        start = dt.datetime.combine(day, dt.time(0), zone)
        end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0), zone)
        start_ms = int(start.timestamp() * 1000)
        end_ms = int(end.timestamp() * 1000)
        async with self.db.transaction(readonly=True) as tx:
            rows = await self.db.topups_between(tx, start_ms, end_ms)
        return reconcile(rows, day=day, tz=tz, start_ms=start_ms, end_ms=end_ms, as_of_ms=self.clock_ms())


def _account_view(a: Any) -> dict[str, Any]:
    return {
        "account": a.account_id,
        "gateway": a.gateway_id,
        "purchase_counter": a.purchase_counter,
        "snapshot_seq": a.snapshot_seq,
        "created_ms": a.created_ms,
    }


REPORT_COLUMNS = ("topups", "via_payments", "applied", "credited", "pending", "refused", "expired", "unconfirmed")


def reconcile(
    rows: Iterable[Sequence[Any]],
    *,
    day: dt.date,
    tz: str,
    start_ms: int,
    end_ms: int,
    as_of_ms: int,
) -> dict[str, Any]:
    """The report from (channel, state, amount, credited amount, via payment API) rows.

    Per channel: ``topups`` every top-up central created that day, of which
    ``via_payments`` came from the payment endpoint; ``applied`` those the
    gateway answered applied; ``credited`` those whose credit the gateway's
    ledger reported (its amount); ``pending`` still queued or sent; ``refused``
    and ``expired``; ``unconfirmed`` = topups − applied. Each as count and
    amount (yuan) and amount_micro.
    """
    acc: dict[str, dict[str, list[int]]] = {}

    def add(channel: str, col: str, micro: int) -> None:
        cols = acc.setdefault(channel, {c: [0, 0] for c in REPORT_COLUMNS})
        cols[col][0] += 1
        cols[col][1] += micro

    for channel, state, amount, credited, via in rows:
        ch = str(channel)
        micro = int(amount or 0)
        add(ch, "topups", micro)
        if via:
            add(ch, "via_payments", micro)
        st = State(str(state))
        if st is State.APPLIED:
            add(ch, "applied", micro)
        else:
            add(ch, "unconfirmed", micro)
        if credited is not None:
            add(ch, "credited", int(credited))
        if st in (State.QUEUED, State.SENT):
            add(ch, "pending", micro)
        elif st is State.REFUSED:
            add(ch, "refused", micro)
        elif st in (State.EXPIRED, State.SUPERSEDED):
            add(ch, "expired", micro)

    def cell(c: list[int]) -> dict[str, Any]:
        return {"count": c[0], "amount": yuan(c[1]), "amount_micro": c[1]}

    channels = [
        {"channel": ch, **{col: cell(v) for col, v in cols.items()}} for ch, cols in sorted(acc.items())
    ]
    totals = {
        col: cell([sum(acc[ch][col][0] for ch in acc), sum(acc[ch][col][1] for ch in acc)])
        for col in REPORT_COLUMNS
    }
    return {
        "day": day.isoformat(),
        "timezone": tz,
        "from_ms": start_ms,
        "to_ms": end_ms,
        "as_of_ms": as_of_ms,
        "channels": channels,
        "totals": totals,
    }

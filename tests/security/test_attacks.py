"""Attack suite: each case asserts the refusal, its reason and message, and that
nothing changed (counter floors, seen command ids, central keys, balances).

Transport-level cases (TLS, broker ACLs) belong to the daemon's tests.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.security.envelope import (
    MAX_ENVELOPE_BYTES,
    SIGN_CONTEXT,
    CommandResult,
    Outcome,
    RejectReason,
    canonical_payload,
    encode_wire,
    sign_payload,
)
from gateway.security.roles import CommandType, Role
from gateway.security.trusted_time import CONFIRM_MS, TimeQuality, TrustedClock
from tests.security.conftest import GATEWAY, HOUR, T0, Central, GatewayDB, topup_body

NOW = T0 + 1000


async def refused(
    gw: GatewayDB, raw: bytes, reason: RejectReason, match: str, now_ms: int = NOW
) -> CommandResult:
    before = await gw.snapshot()
    res = await gw.process(raw, now_ms)
    assert res.outcome is Outcome.REJECTED, res
    assert res.reason is reason, res
    assert re.search(match, res.message), res.message
    assert await gw.snapshot() == before
    return res


def _doc(wire: bytes) -> tuple[dict[str, Any], bytes]:
    outer = orjson.loads(wire)
    return orjson.loads(base64.b64decode(outer["payload"])), base64.b64decode(outer["signature"])


def rewrap(
    wire: bytes,
    mutate: Callable[[dict[str, Any]], None],
    *,
    key: Ed25519PrivateKey | None = None,
    serialise: Callable[[dict[str, Any]], bytes] = lambda d: orjson.dumps(
        d, option=orjson.OPT_SORT_KEYS
    ),
) -> bytes:
    """Change the payload; keep the old signature unless ``key`` re-signs it."""
    doc, sig = _doc(wire)
    mutate(doc)
    payload = serialise(doc)
    return encode_wire(payload, sign_payload(key, payload) if key else sig)


def signed_raw(central: Central, role: Role, payload: bytes) -> bytes:
    """Bypass sign_command's own checks: a real key signs arbitrary bytes."""
    return encode_wire(payload, sign_payload(central.keys[role], payload))


def _payload(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(
        target=GATEWAY,
        command_id="c-x",
        issuer="billing-k1",
        counter=1,
        issued_at_ms=T0,
        expires_at_ms=T0 + HOUR,
        type=CommandType.TOPUP,
        body=topup_body(),
    )
    base.update(kw)
    return base


# -- signatures and keys -------------------------------------------------------


async def test_forged_signature_by_unknown_key(central: Central, gw: GatewayDB) -> None:
    raw = central.cmd(CommandType.TOPUP, key=Ed25519PrivateKey.generate())
    await refused(gw, raw, RejectReason.BAD_SIGNATURE, "does not verify with key 'billing-k1'")


async def test_zeroed_signature(central: Central, gw: GatewayDB) -> None:
    doc, _ = _doc(central.cmd(CommandType.TOPUP))
    raw = encode_wire(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS), bytes(64))
    await refused(gw, raw, RejectReason.BAD_SIGNATURE, "does not verify")


@pytest.mark.parametrize(
    "field, value",
    [
        ("body", topup_body(amount_micro=50_000_000_000)),  # mint money
        ("target", "gw-0002"),
        ("counter", 2),
        ("expires_at", T0 + 2 * HOUR),  # extend the life of a command
        ("issued_at", T0 + 1),
        ("id", "cmd-other"),
        ("type", "balance.snapshot"),
    ],
)
async def test_tampered_field_breaks_signature(
    central: Central, gw: GatewayDB, field: str, value: Any
) -> None:
    raw = rewrap(central.cmd(CommandType.TOPUP), lambda d: d.__setitem__(field, value))
    await refused(gw, raw, RejectReason.BAD_SIGNATURE, "does not verify")


async def test_signature_of_another_role_key_under_billing_name(
    central: Central, gw: GatewayDB
) -> None:
    # the operations key signs, but the envelope claims to come from the billing key
    raw = central.cmd(CommandType.TOPUP, key=central.keys[Role.OPERATIONS], issuer="billing-k1")
    await refused(gw, raw, RejectReason.BAD_SIGNATURE, "does not verify")


async def test_signature_without_context_prefix(central: Central, gw: GatewayDB) -> None:
    # a signature the billing key made over the bare payload (e.g. for another protocol)
    payload = canonical_payload(**_payload())
    raw = encode_wire(payload, central.keys[Role.BILLING].sign(payload))
    await refused(gw, raw, RejectReason.BAD_SIGNATURE, "does not verify")
    assert SIGN_CONTEXT  # the prefix is what separates the two


@pytest.mark.parametrize(
    "ctype, role, body",
    [
        (CommandType.TOPUP, Role.OPERATIONS, topup_body()),  # ops key mints money
        (CommandType.TARIFF_PUBLISH, Role.OPERATIONS, {}),
        (CommandType.RELAY_OPERATE, Role.BILLING, {"meter_id": "m1", "action": "open"}),
        (CommandType.CONFIG_PATCH, Role.PROVISIONING, {}),
        (
            CommandType.KEYS_ROTATE,
            Role.OPERATIONS,  # ops key tries to install a billing key
            {
                "op": "add_key",
                "key_id": "evil",
                "role": "billing",
                "public_key": base64.b64encode(bytes(32)).decode(),
            },
        ),
        (CommandType.PROVISIONING_BUNDLE, Role.BILLING, {}),
    ],
)
async def test_wrong_role_for_type(
    central: Central, gw: GatewayDB, ctype: CommandType, role: Role, body: dict[str, Any]
) -> None:
    raw = central.cmd(ctype, body, role=role, counter=10**6)
    await refused(gw, raw, RejectReason.WRONG_ROLE, f"{re.escape(ctype.value)} needs a")


async def test_unknown_issuer(central: Central, gw: GatewayDB) -> None:
    k = Ed25519PrivateKey.generate()
    raw = central.cmd(CommandType.TOPUP, key=k, issuer="billing-k7")
    await refused(gw, raw, RejectReason.UNKNOWN_ISSUER, "no central key with id 'billing-k7'")


async def test_revoked_key(central: Central, gw: GatewayDB) -> None:
    gw.trust = gw.trust.with_revoked(["billing-k1"])
    raw = central.cmd(CommandType.TOPUP)
    await refused(gw, raw, RejectReason.KEY_REVOKED, "'billing-k1' is revoked")


# -- wrong gateway ---------------------------------------------------------------


async def test_command_for_another_gateway(central: Central, gw: GatewayDB) -> None:
    raw = central.cmd(CommandType.TOPUP, target="gw-0002", counter=10**9)
    await refused(gw, raw, RejectReason.WRONG_TARGET, "for gateway 'gw-0002'")
    # its huge counter did not raise the floor: the next real command still applies
    assert (await gw.process(central.cmd(CommandType.TOPUP, counter=1))).outcome is Outcome.APPLIED


async def test_lookalike_target_is_malformed(central: Central, gw: GatewayDB) -> None:
    raw = signed_raw(central, Role.BILLING, canonical_payload(**_payload(target="gw-０００１")))
    await refused(gw, raw, RejectReason.MALFORMED, "target must be an identifier")


# -- replay and counters -----------------------------------------------------------


async def test_replay_of_applied_envelope(central: Central, gw: GatewayDB) -> None:
    raw = central.cmd(CommandType.TOPUP)
    assert (await gw.process(raw)).outcome is Outcome.APPLIED
    await refused(gw, raw, RejectReason.REPLAY, "already accepted")
    assert await gw.balance() == 50_000_000


async def test_replay_after_reboot(central: Central, gw: GatewayDB) -> None:
    raw = central.cmd(CommandType.TOPUP)
    assert (await gw.process(raw)).outcome is Outcome.APPLIED
    await gw.reboot()
    await refused(gw, raw, RejectReason.REPLAY, "already accepted")
    assert await gw.balance() == 50_000_000


async def test_older_envelope_after_reboot_is_stale(central: Central, gw: GatewayDB) -> None:
    old = central.cmd(CommandType.TOPUP, command_id="a")  # captured, never delivered
    new = central.cmd(CommandType.TOPUP, command_id="b")
    assert (await gw.process(new)).outcome is Outcome.APPLIED
    await gw.reboot()
    await refused(gw, old, RejectReason.COUNTER_STALE, "counter 1 .* is not above 2")


async def test_counter_rollback_with_fresh_command_id(central: Central, gw: GatewayDB) -> None:
    assert (await gw.process(central.cmd(CommandType.TOPUP, counter=50))).outcome is Outcome.APPLIED
    raw = central.cmd(CommandType.TOPUP, counter=49, command_id="new-id")
    await refused(gw, raw, RejectReason.COUNTER_STALE, "not above 50")


async def test_counter_equal_to_floor_with_other_content(central: Central, gw: GatewayDB) -> None:
    assert (await gw.process(central.cmd(CommandType.TOPUP, counter=7))).outcome is Outcome.APPLIED
    raw = central.cmd(CommandType.TOPUP, topup_body(amount_micro=1), counter=7)
    await refused(gw, raw, RejectReason.COUNTER_STALE, "not above 7")


async def test_forged_huge_counter_does_not_lock_out_issuer(
    central: Central, gw: GatewayDB
) -> None:
    forged = central.cmd(CommandType.TOPUP, key=Ed25519PrivateKey.generate(), counter=2**63 - 1)
    await refused(gw, forged, RejectReason.BAD_SIGNATURE, "does not verify")
    assert await gw.floor("billing-k1") is None
    assert (await gw.process(central.cmd(CommandType.TOPUP, counter=1))).outcome is Outcome.APPLIED


async def test_counter_out_of_range(central: Central, gw: GatewayDB) -> None:
    for bad in (0, -1, 2**63, True):
        payload = orjson.dumps(
            {**orjson.loads(canonical_payload(**_payload())), "counter": bad},
            option=orjson.OPT_SORT_KEYS,
        )
        raw = signed_raw(central, Role.BILLING, payload)
        await refused(gw, raw, RejectReason.MALFORMED, "counter must be an integer")


# -- time ------------------------------------------------------------------------


async def test_expired_command(central: Central, gw: GatewayDB) -> None:
    raw = central.cmd(CommandType.TOPUP)
    await refused(gw, raw, RejectReason.EXPIRED, "expired at", now_ms=T0 + HOUR + 1)


async def test_expiry_boundary_is_exclusive(central: Central, gw: GatewayDB) -> None:
    raw = central.cmd(CommandType.TOPUP)
    await refused(gw, raw, RejectReason.EXPIRED, "expired at", now_ms=T0 + HOUR)


async def test_clock_set_back_cannot_revive_expired_command(
    central: Central, gw: GatewayDB
) -> None:
    wall, mono = [T0 + 2 * HOUR], [1_000]
    clock = TrustedClock.restored(
        0, wall=lambda: wall[0], mono=lambda: mono[0], synced=lambda: True
    )
    assert clock.now().time_ms == T0 + 2 * HOUR
    raw = central.cmd(CommandType.TOPUP)  # expired an hour ago
    # the synchronised clock holds: the floor follows it
    wall[0] += CONFIRM_MS
    mono[0] += CONFIRM_MS
    assert clock.now().time_ms == T0 + 2 * HOUR + CONFIRM_MS
    floor = clock.floor_to_persist()
    seen = clock.seen_to_persist()
    assert floor == seen == T0 + 2 * HOUR + CONFIRM_MS
    wall[0] = T0 + 10 * 60_000  # attacker sets the system clock back
    mono[0] += 1_000
    now = clock.now()
    assert now.quality is TimeQuality.FLOOR and now.time_ms > T0 + 2 * HOUR
    await refused(gw, raw, RejectReason.EXPIRED, "expired at", now_ms=now.time_ms)
    # still refused once the set-back clock has "held": an unsynchronised clock set
    # back is never followed, and a synchronised one never below the floor
    for synced in (False, True):
        mono[0] += 2 * CONFIRM_MS
        wall[0] += 2 * CONFIRM_MS
        clock = TrustedClock(
            clock.state, wall=lambda: wall[0], mono=lambda: mono[0], synced=lambda s=synced: s
        )
        await refused(gw, raw, RejectReason.EXPIRED, "expired at", now_ms=clock.now().time_ms)
    # and after a reboot without RTC, from the persisted floor and last time used
    wall[0], mono[0] = T0 + 10 * 60_000, 5
    rebooted = TrustedClock.restored(
        floor, seen_ms=seen, wall=lambda: wall[0], mono=lambda: mono[0], synced=lambda: False
    )
    await gw.reboot()
    await refused(gw, raw, RejectReason.EXPIRED, "expired at", now_ms=rebooted.now().time_ms)


async def test_validity_longer_than_type_allows(central: Central, gw: GatewayDB) -> None:
    payload = canonical_payload(**_payload(expires_at_ms=T0 + 400 * 24 * HOUR))
    raw = signed_raw(central, Role.BILLING, payload)
    await refused(gw, raw, RejectReason.VALIDITY_TOO_LONG, "topup may be valid for at most")


async def test_expired_command_with_fresh_counter_does_not_raise_floor(
    central: Central, gw: GatewayDB
) -> None:
    late = central.cmd(CommandType.TOPUP, counter=100, issued_at=T0 - 2 * HOUR)
    await refused(gw, late, RejectReason.EXPIRED, "expired")
    assert (await gw.process(central.cmd(CommandType.TOPUP, counter=2))).outcome is Outcome.APPLIED


# -- idempotency -----------------------------------------------------------------


async def test_duplicate_command_id_is_reported_not_applied(
    central: Central, gw: GatewayDB
) -> None:
    assert (await gw.process(central.cmd(CommandType.TOPUP, command_id="pay-1"))).ok
    before = await gw.snapshot()
    res = await gw.process(
        central.cmd(CommandType.TOPUP, topup_body(amount_micro=9), command_id="pay-1")
    )
    assert res.outcome is Outcome.DUPLICATE and res.reason is None
    after = await gw.snapshot()
    assert after["test_balance"] == before["test_balance"]
    assert after["sec_seen_command"] == before["sec_seen_command"]
    assert await gw.balance() == 50_000_000


async def test_duplicate_id_under_another_type_has_no_effect(
    central: Central, gw: GatewayDB
) -> None:
    assert (await gw.process(central.cmd(CommandType.TOPUP, command_id="x-1"))).ok
    res = await gw.process(central.cmd(CommandType.TARIFF_PUBLISH, {}, command_id="x-1"))
    assert res.outcome is Outcome.DUPLICATE and "first seen as topup" in res.message


# -- malformed and oversized -----------------------------------------------------------


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "payload and signature only"),
        (b'{"payload": "", "signature": "", "extra": 1}', "payload and signature only"),
        (b'{"payload": 1, "signature": "AA=="}', "base64 strings"),
        (b'{"payload": "!!", "signature": "AA=="}', "not valid base64"),
        (b'{"payload": "e30=", "signature": "AA=="}', "signature must be 64 bytes"),
        (b'{"payload": "e31=", "signature": "AA=="}', "not canonical base64"),  # same bytes as e30=
    ],
)
async def test_malformed_outer(gw: GatewayDB, raw: bytes, match: str) -> None:
    await refused(gw, raw, RejectReason.MALFORMED, match)


async def test_missing_and_unknown_payload_fields(central: Central, gw: GatewayDB) -> None:
    raw = rewrap(central.cmd(CommandType.TOPUP), lambda d: d.pop("expires_at"))
    await refused(gw, raw, RejectReason.MALFORMED, r"missing \['expires_at'\]")
    raw = rewrap(central.cmd(CommandType.TOPUP), lambda d: d.__setitem__("admin", True))
    await refused(gw, raw, RejectReason.MALFORMED, r"unknown \['admin'\]")


async def test_oversized_envelope(central: Central, gw: GatewayDB) -> None:
    payload = canonical_payload(
        **_payload(
            type=CommandType.CONFIG_PATCH,
            issuer="operations-k1",
            body={"blob": "x" * MAX_ENVELOPE_BYTES},
        )
    )
    raw = signed_raw(central, Role.OPERATIONS, payload)
    await refused(gw, raw, RejectReason.OVERSIZED, "limit 65536")


async def test_float_money_is_refused(central: Central, gw: GatewayDB) -> None:
    payload = orjson.dumps(
        {
            **orjson.loads(canonical_payload(**_payload())),
            "body": {**topup_body(), "amount_micro": 50.0},
        },
        option=orjson.OPT_SORT_KEYS,
    )
    raw = signed_raw(central, Role.BILLING, payload)
    await refused(gw, raw, RejectReason.MALFORMED, "floats are not allowed")


async def test_deep_nesting_is_refused(central: Central, gw: GatewayDB) -> None:
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    payload = canonical_payload(
        **_payload(type=CommandType.CONFIG_PATCH, issuer="operations-k1", body={"d": deep})
    )
    raw = signed_raw(central, Role.OPERATIONS, payload)
    await refused(gw, raw, RejectReason.MALFORMED, "nested deeper")


async def test_topup_without_payment_channel(central: Central, gw: GatewayDB) -> None:
    body = {k: v for k, v in topup_body().items() if k != "payment_channel"}
    raw = signed_raw(central, Role.BILLING, canonical_payload(**_payload(body=body)))
    await refused(gw, raw, RejectReason.BAD_BODY, "payment_channel must be one of")


async def test_unknown_command_type(central: Central, gw: GatewayDB) -> None:
    raw = signed_raw(central, Role.OPERATIONS, canonical_payload(**_payload(type="relay.override")))
    await refused(gw, raw, RejectReason.MALFORMED, "unknown command type 'relay.override'")


# -- canonicalisation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "serialise",
    [
        lambda d: json.dumps(d, sort_keys=True).encode(),  # spaces after separators
        lambda d: orjson.dumps(dict(reversed(list(d.items())))),  # unsorted keys
        lambda d: orjson.dumps(d, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2),
        lambda d: (
            json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
            .replace('"acct-17"', '"\\u0061cct-17"')
            .encode()
        ),  # same value, escaped differently
    ],
)
async def test_signature_over_other_canonicalisation(
    central: Central, gw: GatewayDB, serialise: Callable[[dict[str, Any]], bytes]
) -> None:
    raw = rewrap(
        central.cmd(CommandType.TOPUP),
        lambda d: None,
        key=central.keys[Role.BILLING],
        serialise=serialise,
    )
    await refused(gw, raw, RejectReason.NON_CANONICAL, "not in canonical form")


async def test_duplicate_json_keys_parser_differential(central: Central, gw: GatewayDB) -> None:
    # a parser that keeps the first "amount_micro" would credit 1, one that keeps the last 10^12
    good = canonical_payload(**_payload(body=topup_body(amount_micro=1)))
    evil = good.replace(b'"amount_micro":1,', b'"amount_micro":1,"amount_micro":1000000000000,')
    assert evil != good
    raw = signed_raw(central, Role.BILLING, evil)
    await refused(gw, raw, RejectReason.NON_CANONICAL, "duplicate keys")


# -- verification order -------------------------------------------------------------------


async def test_order_signature_before_target_and_expiry(central: Central, gw: GatewayDB) -> None:
    raw = central.cmd(
        CommandType.TOPUP,
        key=Ed25519PrivateKey.generate(),
        target="gw-0002",
        issued_at=T0 - 5 * HOUR,
    )
    await refused(gw, raw, RejectReason.BAD_SIGNATURE, "does not verify")


async def test_order_role_before_target(central: Central, gw: GatewayDB) -> None:
    raw = central.cmd(CommandType.TOPUP, role=Role.OPERATIONS, target="gw-0002")
    await refused(gw, raw, RejectReason.WRONG_ROLE, "needs a billing key")


async def test_order_target_before_counter(central: Central, gw: GatewayDB) -> None:
    assert (await gw.process(central.cmd(CommandType.TOPUP, counter=5))).ok
    raw = central.cmd(CommandType.TOPUP, counter=3, target="gw-0002")
    await refused(gw, raw, RejectReason.WRONG_TARGET, "gw-0002")


async def test_order_counter_before_expiry(central: Central, gw: GatewayDB) -> None:
    assert (await gw.process(central.cmd(CommandType.TOPUP, counter=5))).ok
    raw = central.cmd(CommandType.TOPUP, counter=3, issued_at=T0 - 5 * HOUR)
    await refused(gw, raw, RejectReason.COUNTER_STALE, "not above 5")


async def test_order_expiry_before_idempotency(central: Central, gw: GatewayDB) -> None:
    assert (await gw.process(central.cmd(CommandType.TOPUP, command_id="p"))).ok
    raw = central.cmd(CommandType.TOPUP, command_id="p", issued_at=T0 - 5 * HOUR)
    await refused(gw, raw, RejectReason.EXPIRED, "expired")


async def test_base64_malleability_of_signature(central: Central, gw: GatewayDB) -> None:
    raw = central.cmd(CommandType.TOPUP)
    outer = orjson.loads(raw)
    sig = outer["signature"]
    assert sig.endswith("==")  # 64 bytes: the last data character carries 4 unused bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    c = alphabet.index(sig[-3])
    twin = sig[:-3] + alphabet[c ^ 1] + "=="
    assert base64.b64decode(twin) == base64.b64decode(sig)
    evil = orjson.dumps({"payload": outer["payload"], "signature": twin})
    await refused(gw, evil, RejectReason.MALFORMED, "not canonical base64")
    assert (await gw.process(raw)).outcome is Outcome.APPLIED


async def test_time_sync_outside_its_own_window(central: Central, gw: GatewayDB) -> None:
    payload = canonical_payload(
        **_payload(
            type=CommandType.TIME_SYNC,
            issuer="operations-k1",
            expires_at_ms=T0 + 60_000,
            body={"time_ms": T0 + 10 * HOUR},
        )
    )
    raw = signed_raw(central, Role.OPERATIONS, payload)
    await refused(gw, raw, RejectReason.BAD_BODY, "within issued_at..expires_at")


async def test_floor_reset_recovers_from_poisoned_future_floor(
    central: Central, gw: GatewayDB
) -> None:
    poisoned_now = T0 + 20 * 365 * 24 * HOUR  # floor pushed to ~2046
    sync = central.cmd(CommandType.TIME_SYNC, {"time_ms": T0 + 1000}, expires_at=T0 + 5 * 60_000)
    await refused(gw, sync, RejectReason.EXPIRED, "expired", now_ms=poisoned_now)
    reset = central.cmd(
        CommandType.TIME_SYNC,
        {"time_ms": T0 + 1000, "reset_floor": True},
        expires_at=T0 + 5 * 60_000,
    )
    res = await gw.process(reset, poisoned_now)
    assert res.outcome is Outcome.APPLIED
    # and it cannot be replayed to pull time back again later
    await refused(gw, reset, RejectReason.REPLAY, "already accepted", now_ms=poisoned_now)

"""Envelope format, the acceptance path, roles, trust store and key rotation."""

from __future__ import annotations

import base64
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.security.envelope import (
    SIGN_CONTEXT,
    CommandResult,
    Envelope,
    EnvelopeError,
    Outcome,
    RejectReason,
    apply_key_rotation,
    authenticate,
    parse_envelope,
    prune_seen,
    sign_command,
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
from tests.security.conftest import GATEWAY, HOUR, T0, Central, GatewayDB, raw_public, topup_body


def test_every_command_type_has_exactly_one_role_and_a_validity_limit() -> None:
    assert set(COMMAND_ROLE) == set(CommandType)
    assert set(MAX_VALIDITY_MS) == set(CommandType)
    assert COMMAND_ROLE[CommandType.TOPUP] is Role.BILLING
    assert COMMAND_ROLE[CommandType.RELAY_OPERATE] is Role.OPERATIONS
    assert COMMAND_ROLE[CommandType.KEYS_ROTATE] is Role.KEY_MANAGEMENT
    # no day-to-day role can install keys
    assert [t for t, r in COMMAND_ROLE.items() if r is Role.KEY_MANAGEMENT] == [
        CommandType.KEYS_ROTATE
    ]


def test_wire_format_is_canonical_payload_plus_signature(central: Central) -> None:
    wire = central.cmd(CommandType.TOPUP)
    outer = orjson.loads(wire)
    assert set(outer) == {"payload", "signature"}
    payload = base64.b64decode(outer["payload"])
    doc = orjson.loads(payload)
    assert payload == orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    assert list(doc) == sorted(doc)
    assert doc["v"] == 1 and doc["target"] == GATEWAY and doc["type"] == "topup"
    sig = base64.b64decode(outer["signature"])
    central.keys[Role.BILLING].public_key().verify(sig, SIGN_CONTEXT + payload)


def test_authenticate_returns_typed_envelope(central: Central) -> None:
    wire = central.cmd(CommandType.TOPUP, topup_body(amount_micro=7), command_id="c-1")
    env = authenticate(wire, central.trust())
    assert isinstance(env, Envelope)
    assert env.command_id == "c-1" and env.type is CommandType.TOPUP
    assert env.body["amount_micro"] == 7 and env.body["payment_channel"] == "mobile_app"
    assert env.issued_at_ms == T0 and env.expires_at_ms == T0 + HOUR
    assert len(env.digest) == 32


async def test_apply_then_duplicate_by_command_id(central: Central, gw: GatewayDB) -> None:
    first = await gw.process(central.cmd(CommandType.TOPUP, command_id="top-1"))
    assert first.outcome is Outcome.APPLIED
    assert await gw.balance() == 50_000_000
    # central did not get the answer and re-signs the same command: new counter, same id
    again = await gw.process(central.cmd(CommandType.TOPUP, command_id="top-1"))
    assert again.outcome is Outcome.DUPLICATE and again.ok
    assert await gw.balance() == 50_000_000
    assert await gw.floor("billing-k1") == 2  # the fresh counter still raises the floor
    assert again.to_reply() == {
        "outcome": "duplicate",
        "id": "top-1",
        "message": "command top-1 was applied before",
    }


async def test_counters_are_per_issuer(central: Central, gw: GatewayDB) -> None:
    assert (
        await gw.process(central.cmd(CommandType.TOPUP, counter=100))
    ).outcome is Outcome.APPLIED
    relay = central.cmd(CommandType.RELAY_OPERATE, {"meter_id": "m1", "action": "open"}, counter=1)
    assert (await gw.process(relay)).outcome is Outcome.APPLIED
    assert await gw.floor("billing-k1") == 100
    assert await gw.floor("operations-k1") == 1


async def test_counter_gaps_are_allowed(central: Central, gw: GatewayDB) -> None:
    # commands central issued for this gateway may be lost or refused elsewhere: gaps are fine
    for c in (1, 5, 6, 40):
        assert (
            await gw.process(central.cmd(CommandType.TOPUP, counter=c))
        ).outcome is Outcome.APPLIED
    assert await gw.balance() == 4 * 50_000_000


async def test_all_channels_use_the_same_signed_form(central: Central, gw: GatewayDB) -> None:
    for i, (channel, pay) in enumerate(
        [("mqtt", "bank"), ("usb", "agent"), ("cli", "counter"), ("mqtt", "mobile_app")]
    ):
        raw = central.cmd(CommandType.TOPUP, topup_body(pc=i + 1, channel=pay))
        assert (await gw.process(raw, channel=channel)).outcome is Outcome.APPLIED
    snap = await gw.snapshot()
    assert [r[5] for r in snap["sec_seen_command"]] == ["mqtt", "usb", "cli", "mqtt"]


@pytest.mark.parametrize(
    "body, problem",
    [
        ({**topup_body(), "payment_channel": "cash-in-hand"}, "payment_channel"),
        ({k: v for k, v in topup_body().items() if k != "payment_channel"}, "payment_channel"),
        ({**topup_body(), "amount_micro": 0}, "amount_micro"),
        ({**topup_body(), "amount_micro": "50"}, "amount_micro"),
        ({**topup_body(), "amount_micro": True}, "amount_micro"),
        ({**topup_body(), "purchase_counter": 0}, "purchase_counter"),
        ({**topup_body(), "account": ""}, "account"),
    ],
)
def test_topup_body_rules(body: dict[str, object], problem: str) -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(EnvelopeError, match=problem):
        sign_command(
            key,
            issuer="billing-k1",
            target=GATEWAY,
            command_id="c",
            counter=1,
            issued_at_ms=T0,
            expires_at_ms=T0 + HOUR,
            type=CommandType.TOPUP,
            body=body,
        )


def test_sign_command_refuses_what_the_gateway_would_refuse() -> None:
    key = Ed25519PrivateKey.generate()
    base = dict(
        issuer="ops-k1",
        target=GATEWAY,
        command_id="c",
        counter=1,
        issued_at_ms=T0,
        expires_at_ms=T0 + HOUR,
        type=CommandType.CONFIG_PATCH,
        body={},
    )
    with pytest.raises(EnvelopeError, match="validity_too_long"):
        sign_command(key, **{**base, "type": CommandType.TIME_SYNC, "body": {"time_ms": T0}})  # type: ignore[arg-type]
    with pytest.raises(EnvelopeError, match="floats"):
        sign_command(key, **{**base, "body": {"price": 0.52}})  # type: ignore[arg-type]
    with pytest.raises(EnvelopeError, match="counter"):
        sign_command(key, **{**base, "counter": 0})  # type: ignore[arg-type]
    with pytest.raises(EnvelopeError, match="expires_at must be after"):
        sign_command(key, **{**base, "expires_at_ms": T0})  # type: ignore[arg-type]
    with pytest.raises(EnvelopeError, match="unknown command type"):
        sign_command(key, **{**base, "type": "relay.explode"})  # type: ignore[arg-type]


# -- key rotation ------------------------------------------------------------


async def _rotate(gw: GatewayDB, central: Central, body: dict[str, object]) -> CommandResult:
    res = await gw.process(central.cmd(CommandType.KEYS_ROTATE, body))
    assert res.outcome is Outcome.APPLIED and res.envelope is not None
    assert gw.conn is not None
    await apply_key_rotation(gw.conn, res.envelope, T0)
    await gw.conn.commit()
    return res


async def test_key_rotation_adds_a_billing_key_and_revokes_the_old(
    central: Central, gw: GatewayDB
) -> None:
    from gateway.security.envelope import load_trust

    new_billing = Ed25519PrivateKey.generate()
    await _rotate(
        gw,
        central,
        {
            "op": "add_key",
            "key_id": "billing-k2",
            "role": "billing",
            "public_key": base64.b64encode(raw_public(new_billing)).decode(),
        },
    )
    await _rotate(gw, central, {"op": "revoke_key", "key_id": "billing-k1", "reason": "rollover"})
    assert gw.conn is not None
    gw.trust = await load_trust(gw.conn, central.trust())
    ok = central.cmd(CommandType.TOPUP, issuer="billing-k2", key=new_billing)
    assert (await gw.process(ok)).outcome is Outcome.APPLIED
    old = await gw.process(central.cmd(CommandType.TOPUP))
    assert old.reason is RejectReason.KEY_REVOKED


async def test_revocation_in_db_wins_over_a_stale_trust_store(
    central: Central, gw: GatewayDB
) -> None:
    await _rotate(gw, central, {"op": "revoke_key", "key_id": "billing-k1"})
    # gw.trust is still the provisioned file without the revocation
    res = await gw.process(central.cmd(CommandType.TOPUP))
    assert res.reason is RejectReason.KEY_REVOKED
    await gw.reboot()
    res = await gw.process(central.cmd(CommandType.TOPUP))
    assert res.reason is RejectReason.KEY_REVOKED


async def test_key_id_cannot_be_rebound(central: Central, gw: GatewayDB) -> None:
    k = Ed25519PrivateKey.generate()
    body = {
        "op": "add_key",
        "key_id": "billing-k9",
        "role": "billing",
        "public_key": base64.b64encode(raw_public(k)).decode(),
    }
    await _rotate(gw, central, body)
    other = {
        **body,
        "public_key": base64.b64encode(raw_public(Ed25519PrivateKey.generate())).decode(),
    }
    res = await gw.process(central.cmd(CommandType.KEYS_ROTATE, other))
    assert res.envelope is not None and gw.conn is not None
    with pytest.raises(TrustError, match="already bound"):
        await apply_key_rotation(gw.conn, res.envelope, T0)


async def test_prune_seen_keeps_replays_refused(central: Central, gw: GatewayDB) -> None:
    raw = central.cmd(CommandType.TOPUP, command_id="t-1")
    assert (await gw.process(raw)).outcome is Outcome.APPLIED
    assert gw.conn is not None
    assert await prune_seen(gw.conn, T0 + 2 * HOUR) == 1
    await gw.conn.commit()
    res = await gw.process(raw)
    assert res.reason is RejectReason.COUNTER_STALE  # the floor still holds
    assert await gw.balance() == 50_000_000


# -- trust store file ----------------------------------------------------------


def test_trust_store_file_roundtrip_and_errors(tmp_path: Path, central: Central) -> None:
    trust = central.trust().with_revoked(["old-k0"])
    p = tmp_path / "central_keys.json"
    p.write_bytes(orjson.dumps(trust.to_dict()))
    loaded = TrustStore.load(p)
    assert loaded.to_dict() == trust.to_dict()
    assert loaded.is_revoked("old-k0") and not loaded.is_revoked("billing-k1")
    bad = trust.to_dict()
    bad["keys"][0]["role"] = "superuser"  # type: ignore[index]
    p.write_bytes(orjson.dumps(bad))
    with pytest.raises(TrustError, match=r"keys\[0\]\.role"):
        TrustStore.load(p)
    bad = trust.to_dict()
    bad["keys"][1]["public_key"] = base64.b64encode(b"short").decode()  # type: ignore[index]
    p.write_bytes(orjson.dumps(bad))
    with pytest.raises(TrustError, match="32 bytes"):
        TrustStore.load(p)
    with pytest.raises(TrustError, match="duplicate key id"):
        TrustStore.of([CentralKey("a", Role.BILLING, b"\0" * 32)] * 2)


# -- properties ----------------------------------------------------------------

_CENTRAL = Central()  # key generation once, not per example


@settings(max_examples=150, deadline=None)
@given(pos=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_single_bit_flip_is_rejected(pos: int, bit: int) -> None:
    central = _CENTRAL
    wire = bytearray(central.cmd(CommandType.TOPUP))
    i = pos % len(wire)
    wire[i] ^= 1 << bit
    res = authenticate(bytes(wire), central.trust())
    assert isinstance(res, CommandResult) and res.outcome is Outcome.REJECTED


@settings(max_examples=100, deadline=None)
@given(
    body=st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
            max_leaves=10,
        ),
        max_size=5,
    )
)
def test_any_json_body_roundtrips_canonically(body: dict[str, object]) -> None:
    central = _CENTRAL
    wire = central.cmd(CommandType.CONFIG_PATCH, body)
    env = parse_envelope(wire)
    assert isinstance(env, Envelope)
    assert env.body == body


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=600))
def test_garbage_never_raises_and_is_rejected(raw: bytes) -> None:
    res = authenticate(raw, _CENTRAL.trust())
    assert isinstance(res, CommandResult) and res.reason is not None


@settings(max_examples=150, deadline=None)
@given(
    doc=st.fixed_dictionaries(
        {},
        optional={
            k: _json_values
            for k in ("v", "target", "id", "issuer", "counter", "issued_at", "expires_at", "type")
        }
        | {"body": _json_values},
    )
)
def test_signed_arbitrary_payloads_never_crash(doc: dict[str, object]) -> None:
    central = _CENTRAL
    payload = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    from gateway.security.envelope import encode_wire, sign_payload

    wire = encode_wire(payload, sign_payload(central.keys[Role.BILLING], payload))
    res = authenticate(wire, central.trust())
    assert isinstance(res, (CommandResult, Envelope))


def test_public_keys_for_role_skips_revoked(central: Central) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    extra = Ed25519PrivateKey.generate()
    trust = central.trust().with_keys(
        [CentralKey("provisioning-k2", Role.PROVISIONING, raw_public(extra))]
    )
    raw = [
        k.public_bytes(Encoding.Raw, PublicFormat.Raw)
        for k in trust.public_keys_for(Role.PROVISIONING)
    ]
    assert raw == [raw_public(central.keys[Role.PROVISIONING]), raw_public(extra)]
    revoked = trust.with_revoked(["provisioning-k1"])
    assert len(revoked.public_keys_for(Role.PROVISIONING)) == 1
    assert revoked.public_keys_for(Role.KEY_MANAGEMENT) != []

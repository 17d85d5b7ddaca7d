"""Everything that can go wrong before the signature check is one clean, counted rejection.

Hostile input — bytes that are not JSON, base64 with non-ASCII characters,
fields of the wrong type (lists and objects where names or numbers belong,
an unhashable ``payment_channel``), nesting, oversize — must come out of
:func:`parse_envelope` as a rejection with a specific reason (never an
exception), and through the real command handler on a real SQLite database
as a rejection counted under the flood limits: at most one full audit row
per (reason, hour) and a bounded number of events, whatever the volume.
"""

from __future__ import annotations

import asyncio
import base64
import string
import tempfile
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.database import open_database
from gateway.security.envelope import (
    MAX_ENVELOPE_BYTES,
    CommandResult,
    Envelope,
    Outcome,
    RejectReason,
    authenticate,
    canonical_payload,
    encode_wire,
    parse_envelope,
    sign_payload,
)
from gateway.security.roles import CommandType, Role
from tests.security.conftest import GATEWAY, HOUR, T0, Central, topup_body
from tests.security.test_commands import (
    Billing,
    EventLog,
    FakeTime,
    make_billing,
    make_handler,
    start_billing,
)

_CENTRAL = Central()  # keys made once, not per example
_ROGUE = Ed25519PrivateKey.generate()  # not in the trust store: nothing here can be applied
_BUDGET = 5  # make_handler's event budget per reason and hour
_PARSER_GAP = "envelope could not be parsed"  # the parser's last-resort message

# -- strategies -------------------------------------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=15,
)
# base64-looking text that may hold non-ASCII letters, spaces and bad padding
_b64ish = st.text(
    alphabet=st.sampled_from(string.ascii_letters + string.digits + "+/= \n" + "éß中\u00a0٣"),
    max_size=40,
)


def _field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(valid, _json)


_body = st.one_of(
    _json,
    st.fixed_dictionaries(
        {
            "account": _field(st.just("acct-17")),
            "amount_micro": _field(st.integers(1, 10**9)),
            "purchase_counter": _field(st.integers(1, 9)),
            "payment_channel": _field(st.sampled_from(["bank", "agent"])),
        }
    ),
    st.fixed_dictionaries(
        {
            "op": _field(st.sampled_from(["add_key", "revoke_key", "rotate_purpose"])),
            "key_id": _field(st.just("billing-k9")),
            "role": _field(st.sampled_from([r.value for r in Role])),
            "public_key": _field(_b64ish),
            "purpose": _field(st.just("storage")),
        }
    ),
    st.fixed_dictionaries({"time_ms": _field(st.integers(0, 2**60)), "reset_floor": _json}),
)
_doc = st.fixed_dictionaries(
    {
        "v": _field(st.just(1)),
        "target": _field(st.just(GATEWAY)),
        "id": _field(st.just("cmd-1")),
        "issuer": _field(st.sampled_from(["billing-k1", "operations-k1"])),
        "counter": _field(st.integers(1, 99)),
        "issued_at": _field(st.just(T0)),
        "expires_at": _field(st.just(T0 + HOUR)),
        "type": _field(st.sampled_from([t.value for t in CommandType])),
        "body": _body,
    }
)


@st.composite
def _signed(draw: st.DrawFn) -> bytes:
    """A well-formed wire envelope around a hostile payload, signed by a key nobody trusts."""
    payload = orjson.dumps(draw(_doc), option=orjson.OPT_SORT_KEYS)
    return encode_wire(payload, sign_payload(_ROGUE, payload))


hostile = st.one_of(
    st.binary(max_size=200),
    st.dictionaries(st.sampled_from(["payload", "signature", "x"]), _json, max_size=3).map(
        orjson.dumps
    ),
    st.fixed_dictionaries({"payload": _b64ish, "signature": _b64ish}).map(orjson.dumps),
    _signed(),
)

# -- the pure parser ------------------------------------------------------------------


def _reject_cleanly(raw: bytes) -> CommandResult:
    res = parse_envelope(raw)
    if isinstance(res, Envelope):  # shape passed: the signature step refuses it
        auth = authenticate(raw, _CENTRAL.trust())
        assert isinstance(auth, CommandResult), "an envelope signed by an unknown key passed"
        res = auth
    assert res.outcome is Outcome.REJECTED and res.reason is not None
    assert not res.message.startswith(_PARSER_GAP), f"no rule caught it: {res.message}"
    assert len(res.message) < 400  # hostile values are not echoed at length
    return res


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=hostile)
@example(raw=orjson.dumps({"payload": "é" * 8, "signature": "A" * 88}))
@example(raw=orjson.dumps({"payload": "AAAA", "signature": "\u00e9" + "A" * 87}))
@example(raw=b"{" + b" " * MAX_ENVELOPE_BYTES + b"}")
@example(raw=b"[" * 2000)
def test_no_input_raises_out_of_the_pre_signature_path(raw: bytes) -> None:
    _reject_cleanly(raw)


def _forge(body: dict[str, Any], type: CommandType = CommandType.TOPUP) -> bytes:
    """A payload with ``body`` signed by central's real key for ``type``: the body
    rules run before the signature check, so they must refuse it on their own."""
    role = Role.KEY_MANAGEMENT if type is CommandType.KEYS_ROTATE else Role.BILLING
    payload = canonical_payload(
        target=GATEWAY,
        command_id="cmd-x",
        issuer=f"{role.value}-k1",
        counter=1,
        issued_at_ms=T0,
        expires_at_ms=T0 + HOUR,
        type=type,
        body=body,
    )
    return encode_wire(payload, sign_payload(_CENTRAL.keys[role], payload))


def test_the_cases_that_used_to_raise_are_specific_rejections() -> None:
    cases = {
        "non-ASCII base64": (
            orjson.dumps({"payload": "é" * 8, "signature": "A" * 88}),
            RejectReason.MALFORMED,
            "not valid base64",
        ),
        "unhashable payment_channel": (
            _forge({**topup_body(), "payment_channel": ["bank"]}),
            RejectReason.BAD_BODY,
            "payment_channel",
        ),
        "payment_channel an object": (
            _forge({**topup_body(), "payment_channel": {"bank": 1}}),
            RejectReason.BAD_BODY,
            "payment_channel",
        ),
        "unhashable role": (
            _forge(
                {"op": "add_key", "key_id": "k-2", "role": ["billing"], "public_key": "AAAA"},
                CommandType.KEYS_ROTATE,
            ),
            RejectReason.BAD_BODY,
            "role",
        ),
        "non-ASCII public key": (
            _forge(
                {"op": "add_key", "key_id": "k-2", "role": "billing", "public_key": "é" * 44},
                CommandType.KEYS_ROTATE,
            ),
            RejectReason.BAD_BODY,
            "public_key",
        ),
        "type a list": (
            encode_wire(
                p := orjson.dumps(
                    {
                        "v": 1,
                        "target": GATEWAY,
                        "id": "x",
                        "issuer": "billing-k1",
                        "counter": 1,
                        "issued_at": T0,
                        "expires_at": T0 + 1,
                        "type": ["topup"],
                        "body": {},
                    },
                    option=orjson.OPT_SORT_KEYS,
                ),
                sign_payload(_ROGUE, p),
            ),
            RejectReason.MALFORMED,
            "unknown command type",
        ),
    }
    for name, (raw, reason, words) in cases.items():
        res = _reject_cleanly(raw)
        assert res.reason is reason, (name, res)
        assert words in res.message, (name, res.message)


# -- through the real handler: counted under the flood limits --------------------------


async def _flood(inputs: list[bytes], repeat: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        outbox = await open_database(Path(d) / "gw.db")
        try:
            h = await make_handler(outbox, _CENTRAL.trust(), None, FakeTime(T0 + 1000))
            for _ in range(repeat):
                for raw in inputs:
                    res = await h.handle(raw, channel="mqtt")
                    assert res.outcome is Outcome.REJECTED and res.reason is not None, res
            assert h.stats.failed == 0
            reasons = {k for k, _ in h._tally}
            async with outbox.transaction() as db, db.execute(
                "SELECT action, json_extract(details, '$.reason') FROM audit_log"
            ) as cur:
                rows = [tuple(r) for r in await cur.fetchall()]
            assert all(a == "command.rejected" for a, _ in rows), rows
            assert len(rows) == len(reasons)  # one full row per reason this hour
            events = [e for e in await EventLog(outbox).drain() if e["type"] == "command_result"]
            assert len(events) <= _BUDGET * len(reasons)
            # nothing escapes the count: full rows + summaries add up to every message
            tally = dict(h._tally)
            assert sum(b.count for b in tally.values()) == repeat * len(inputs)
            await h.flush_all_rejections()
            summaries = [
                e for e in await EventLog(outbox).drain() if e["type"] == "command_rejections"
            ]
            assert {e["reason"]: e["count"] for e in summaries} == {
                k: b.count for (k, _), b in tally.items() if b.count > 1
            }
        finally:
            await outbox.close()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=st.lists(hostile, min_size=5, max_size=25))
def test_hostile_input_through_the_handler_is_counted_not_written_per_message(
    inputs: list[bytes],
) -> None:
    asyncio.run(_flood(inputs, repeat=3))


async def test_the_regression_flood_writes_two_rows(tmp_path: Path) -> None:
    """100 non-ASCII envelopes and 100 unhashable channels: 2 audit rows, not 200."""
    bad_b64 = orjson.dumps({"payload": "é" * 8, "signature": "A" * 88})
    unhashable = _forge({**topup_body(), "payment_channel": ["bank"]})
    outbox = await open_database(tmp_path / "gw.db")
    try:
        h = await make_handler(outbox, _CENTRAL.trust(), None, FakeTime(T0 + 1000))
        for _ in range(100):
            assert (await h.handle(bad_b64, channel="mqtt")).reason is RejectReason.MALFORMED
            assert (await h.handle(unhashable, channel="mqtt")).reason is RejectReason.BAD_BODY
        async with outbox.transaction() as db, db.execute(
            "SELECT action, actor FROM audit_log ORDER BY seq"
        ) as cur:
            rows = [tuple(r) for r in await cur.fetchall()]
        assert rows == [("command.rejected", "unauthenticated:mqtt")] * 2
        events = [e for e in await EventLog(outbox).drain() if e["type"] == "command_result"]
        assert len(events) == 2 * _BUDGET
        assert h.stats.failed == 0 and h.stats.by_reason == {"malformed": 100, "bad_body": 100}
    finally:
        await outbox.close()


async def test_failures_are_counted_under_the_same_limits(tmp_path: Path) -> None:
    """A fault that makes every command fail writes one row per hour, not one per command."""
    outbox = await open_database(tmp_path / "gw.db")
    try:
        billing: Billing = make_billing(tmp_path)
        billing.explode = True
        central = Central()
        ft = FakeTime(T0 + 1000)
        await start_billing(billing, outbox, ft.wall)
        h = await make_handler(outbox, central.trust(), None, ft, billing=billing)
        for i in range(30):
            raw = central.cmd(CommandType.TOPUP, topup_body(pc=1), command_id=f"t-{i}")
            res = await h.handle(raw, channel="mqtt")
            assert res.outcome is Outcome.REJECTED and "nothing was kept" in res.message
        async with outbox.transaction() as db, db.execute(
            "SELECT action FROM audit_log ORDER BY seq"
        ) as cur:
            assert [r[0] for r in await cur.fetchall()] == ["command.failed"]
        events = [e for e in await EventLog(outbox).drain() if e["type"] == "command_result"]
        assert [e["outcome"] for e in events] == ["failed"] * _BUDGET
        ft.advance(HOUR)
        assert await h.flush_rejections() == 1
        (summary,) = [
            e for e in await EventLog(outbox).drain() if e["type"] == "command_rejections"
        ]
        assert summary["reason"] == "failed:RuntimeError" and summary["count"] == 30
        assert h.stats.failed == 30
        async with outbox.transaction() as db, db.execute(
            "SELECT count(*) FROM billing_entry WHERE kind = 'credit'"
        ) as cur:
            assert await cur.fetchone() == (0,)  # each failed top-up was rolled back whole
    finally:
        await outbox.close()


def test_base64_strings_are_checked_strictly() -> None:
    good = base64.b64encode(b"x" * 10).decode()
    res = parse_envelope(orjson.dumps({"payload": good + "é", "signature": good}))
    assert isinstance(res, CommandResult) and "not valid base64" in res.message

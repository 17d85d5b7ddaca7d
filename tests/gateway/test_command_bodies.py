"""The registry of command bodies: one parser per command type, used by every reader."""

from __future__ import annotations

from typing import Any

import pytest

from firmware_bridge.relay_ops import RelayOp
from gateway.billing.topup import Channel
from gateway.commands.bodies import (
    BODIES,
    CommandRefused,
    parse_topup,
    problem_before_signature,
)
from gateway.security.roles import CommandType

TOPUP = {"account": "acc", "amount_micro": 50_000_000, "purchase_counter": 3, "payment_channel": "bank"}


def test_every_command_type_has_one_parser() -> None:
    assert set(BODIES) == set(CommandType)
    early = {t for t, rule in BODIES.items() if rule.before_signature}
    assert early == {CommandType.TOPUP, CommandType.TIME_SYNC, CommandType.KEYS_ROTATE}


def test_a_top_up_is_read_with_the_keys_central_sends() -> None:
    t = parse_topup({**TOPUP, "issued_ms": 1}, "s-1")
    assert (t.purchase_counter, t.amount_micro, t.payment_channel, t.issued_ms) == (3, 50_000_000, Channel.BANK, 1)
    assert parse_topup(TOPUP, "s-1").issued_ms is None  # the gateway's time then


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({**TOPUP, "purchase_counter": "3"}, "topup.purchase_counter must be an integer >= 1"),
        ({**TOPUP, "amount_micro": 1.5}, "topup.amount_micro must be a positive integer"),
        ({**TOPUP, "payment_channel": "cash"}, "topup.payment_channel must be one of"),
        ({**TOPUP, "issued_ms": -1}, "topup.issued_ms must be Unix milliseconds"),
        ([], "topup must be a JSON object"),
    ],
)
def test_top_up_problems_name_the_key(body: Any, problem: str) -> None:
    with pytest.raises(CommandRefused) as caught:
        parse_topup(body, "s-1")
    assert caught.value.reason == "malformed" and caught.value.message.startswith(problem)
    if isinstance(body, dict):  # the same words before the signature
        assert (problem_before_signature(CommandType.TOPUP, body, "s-1") or "").startswith(problem)


def test_types_read_after_verification_are_not_checked_before_the_signature() -> None:
    assert problem_before_signature(CommandType.RELAY_OPERATE, {"op": "explode"}, "r-1") is None
    with pytest.raises(CommandRefused) as caught:
        BODIES[CommandType.RELAY_OPERATE].parse({"meter": "m-1", "op": "explode"}, "r-1")
    assert caught.value.reason == "bad_op"


def test_central_relay_words_and_the_gateway_s_name_one_operation() -> None:
    parse = BODIES[CommandType.RELAY_OPERATE].parse
    for word, op in (("protect", RelayOp.PROTECT_ON), ("unprotect", RelayOp.PROTECT_OFF), ("alarm", RelayOp.ALARM_ON)):
        assert parse({"meter": "m-1", "op": word}, "r-1").op is op
        assert parse({"meter": "m-1", "op": op.value}, "r-1").op is op
        assert op.command_word == word


def test_a_bundle_is_refused_on_the_command_path() -> None:
    with pytest.raises(CommandRefused) as caught:
        BODIES[CommandType.PROVISIONING_BUNDLE].parse({}, "b-1")
    assert caught.value.reason == "not_accepted"

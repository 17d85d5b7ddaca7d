from __future__ import annotations

import pytest

from gateway.billing.ledger import Entry, EntryKind
from gateway.billing.messages import MessageError, parse_snapshot, parse_topup
from gateway.billing.topup import Authorization, Channel, Source


def test_topup_roundtrip_and_authorization() -> None:
    auth = Authorization("central", "k1", 5)
    t = parse_topup({"id": "s-1", "account": "acc", "counter": 3, "amount_micro": 50_000_000,
                     "issued_ms": 1, "channel": "bank"}, Source.MQTT, auth)
    assert (t.counter, t.amount_micro, t.channel, t.authorization) == (3, 50_000_000, Channel.BANK, auth)


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"id": "s", "account": "a", "counter": "3", "amount_micro": 1, "issued_ms": 0, "channel": "bank"},
         "topup.counter: must be an integer >= 1, got '3'"),
        ({"id": "s", "account": "a", "counter": 1, "amount_micro": 1.5, "issued_ms": 0, "channel": "bank"},
         "topup.amount_micro: must be an integer >= 1"),
        ({"id": "s", "account": "a", "counter": 1, "amount_micro": 1, "issued_ms": 0, "channel": "cash"},
         "topup.channel: must be one of"),
        ({"id": "s", "account": "a", "counter": 1, "amount_micro": 1, "issued_ms": 0, "channel": "bank",
          "x": 1}, "topup.x: unknown key"),
        ([], "topup: must be a JSON object"),
    ],
)
def test_topup_errors(payload: object, problem: str) -> None:
    with pytest.raises(MessageError) as ei:
        parse_topup(payload, Source.USB)
    assert any(p.startswith(problem) for p in ei.value.problems), ei.value.problems


def test_snapshot_parse() -> None:
    s = parse_snapshot({"id": "x", "account": "acc", "central_seq": 4, "as_of_seq": 10, "balance_micro": -5,
                        "time_ms": 1, "included_ids": ["topup:t9"], "purchase_counter": 9})
    assert s.entry_id == "snapshot:acc:4" and s.included_ids == frozenset({"topup:t9"})
    with pytest.raises(MessageError, match=r"snapshot\.included_ids"):
        parse_snapshot({"id": "x", "account": "acc", "central_seq": 4, "as_of_seq": 10, "balance_micro": 0,
                        "time_ms": 1, "included_ids": "topup:t9"})


def test_entry_json_roundtrip() -> None:
    e = Entry("debit:1", "acc", EntryKind.DEBIT, -5, 7, {"lines": [{"ckwh": 1}]}, 3)
    back = Entry.from_json(e.to_json())
    assert back.same_content(e) and back.seq == e.seq

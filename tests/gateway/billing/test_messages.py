from __future__ import annotations

import pytest

from gateway.billing.ledger import Entry, EntryKind
from gateway.billing.messages import MessageError, parse_snapshot


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

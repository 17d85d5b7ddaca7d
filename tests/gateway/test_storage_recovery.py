"""What the evidence proves (pure): ledgers, and the plan of what to import.

Ledgers are built with the billing core's own in-memory ledger and stored as
rows exactly as ``billing_entry``/``billing_account`` hold them; any single
change to a row — an entry dropped, an amount, the stored balance or counter —
makes the ledger unproved. The plan takes ledgers only from the newest state
of a damaged database, never from the older state SQLite alone would read.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.billing import ledger_store as ls
from gateway.billing.ledger import Entry, EntryKind, Ledger, LedgerView, adjustment_entry, fold
from gateway.billing.topup import Channel, Source, TopUp, credit_entry
from gateway.storage_recovery import plan_recovery, verify_ledger
from store_forward.salvage import Salvage, SalvagedTable

ENTRY_COLS = ("account", "seq", "entry_id", "kind", "amount_micro", "time_ms", "body")
ACCOUNT_COLS = (
    "account",
    "balance_micro",
    "last_seq",
    "purchase_counter",
    "tier_period_start_ms",
    "tier_cumulative_ckwh",
    "opening_tier_start_ms",
    "opening_tier_ckwh",
    "snapshot_seq",
    "fixed_until_ms",
    "cutoff_state",
)


def entry_row(e: Entry, *, plain: bool = False) -> dict[str, Any]:
    """``e`` as ``billing_entry`` holds it: its body deflated, or (``plain``) as the
    plain JSON TEXT of rows written before bodies were deflated."""
    return {
        "account": e.account,
        "seq": e.seq,
        "entry_id": e.entry_id,
        "kind": e.kind.value,
        "amount_micro": e.amount_micro,
        "time_ms": e.time_ms,
        "body": e.body_json().decode() if plain else ls.body_column(e),
    }


def account_row(v: LedgerView) -> dict[str, Any]:
    return {
        "account": v.account,
        "balance_micro": v.balance_micro,
        "last_seq": v.last_seq,
        "purchase_counter": v.purchase_counter,
        "tier_period_start_ms": v.tier.period_start_ms,
        "tier_cumulative_ckwh": v.tier.cumulative_ckwh,
        "opening_tier_start_ms": None,
        "opening_tier_ckwh": 0,
        "snapshot_seq": None if v.snapshot is None else v.snapshot.seq,
        "fixed_until_ms": 1000,
        "cutoff_state": '{"level":"normal"}',
    }


@st.composite
def ledgers(draw: st.DrawFn, account: str = "a1") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    led = Ledger(account)
    counter = 0
    for i in range(draw(st.integers(1, 12))):
        if draw(st.booleans()):
            counter += 1
            topup = TopUp(
                f"t{i}",
                account,
                counter,
                draw(st.integers(1, 10**8)),
                Channel.COUNTER,
                Source.MQTT,
                i,
            )
            led.append(credit_entry(topup, i, 0, False))
        else:
            led.append(
                adjustment_entry(f"x{i}", account, draw(st.integers(-(10**7), 10**7)), i, "r", "c")
            )
    plain = draw(st.lists(st.booleans(), min_size=len(led.entries), max_size=len(led.entries)))
    return [entry_row(e, plain=p) for e, p in zip(led.entries, plain, strict=True)], account_row(led.view)


@settings(max_examples=150, deadline=None)
@given(ledgers(), st.data())
def test_a_ledger_is_proved_only_whole(
    ledger: tuple[list[dict[str, Any]], dict[str, Any]], data: st.DataObject
) -> None:
    entries, acct = ledger
    assert verify_ledger("a1", entries, acct).ok
    change = data.draw(st.sampled_from(["drop", "amount", "balance", "counter", "seq", "row", "body"]))
    entries = [dict(e) for e in entries]
    acct = dict(acct)
    i = data.draw(st.integers(0, len(entries) - 1))
    if change == "drop":
        del entries[i]
    elif change == "amount":
        entries[i]["amount_micro"] += data.draw(st.sampled_from([1, -1, 1 << 20]))
    elif change == "balance":
        acct["balance_micro"] ^= 1 << data.draw(st.integers(0, 40))
    elif change == "counter":
        acct["purchase_counter"] += 1
    elif change == "seq":
        entries[i]["seq"] = len(entries) + 5
    elif change == "body":  # cut short: the deflated body is truncated, the plain one not JSON
        body = entries[i]["body"]
        entries[i]["body"] = body[: len(body) // 2]
        check = verify_ledger("a1", entries, acct)
        assert not check.ok and entries[i]["entry_id"] in check.reason
        return
    else:
        check = verify_ledger("a1", entries, None)
        assert not check.ok and "account row" in check.reason
        return
    assert not verify_ledger("a1", entries, acct).ok


def table(
    name: str, cols: tuple[str, ...], rows: list[dict[str, Any]], complete: bool = True
) -> SalvagedTable:
    return SalvagedTable(name, cols, [tuple(r[c] for c in cols) for r in rows], complete)


def image(
    label: str,
    entries: list[dict[str, Any]],
    accounts: list[dict[str, Any]],
    **extra: SalvagedTable,
) -> Salvage:
    s = Salvage(label, True)
    s.tables["billing_entry"] = table("billing_entry", ENTRY_COLS, entries)
    s.tables["billing_account"] = table("billing_account", ACCOUNT_COLS, accounts)
    s.tables.update(extra)
    return s


def simple_ledger(account: str, amounts: list[int]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    led = Ledger(account)
    for i, a in enumerate(amounts):
        led.append(adjustment_entry(f"{account}-{i}", account, a, i, "r", "c"))
    # every other row as written before bodies were deflated: a ledger spanning the upgrade
    return [entry_row(e, plain=i % 2 == 0) for i, e in enumerate(led.entries)], account_row(led.view)


def test_only_the_newest_state_proves_a_ledger() -> None:
    """With a damaged log, the older state SQLite alone reads is consistent but misses
    the transactions after the damage: it proves nothing."""
    old_e, old_a = simple_ledger("a1", [100, -10])
    new_e, new_a = simple_ledger("a1", [100, -10, 5000])  # a top-up committed after the damage
    new_a = {**new_a, "balance_micro": new_a["balance_micro"] + 1}  # ...on the damaged page
    plan = plan_recovery(
        [image("past-damage", new_e, [new_a]), image("as-sqlite-reads", old_e, [old_a])], ["a1"]
    )
    assert plan.held == ["a1"]
    assert "billing_entry" not in plan.rows
    # the same evidence with the newest state intact: proved from it, top-up included
    new_e, new_a = simple_ledger("a1", [100, -10, 5000])
    plan = plan_recovery(
        [image("past-damage", new_e, [new_a]), image("as-sqlite-reads", old_e, [old_a])], ["a1"]
    )
    assert plan.held == [] and [a.balance_micro for a in plan.accounts] == [5090]
    cols, rows = plan.rows["billing_account"]
    assert rows[0][cols.index("cutoff_state")] is None  # not proved by the fold: initial state


def test_an_image_without_the_damaged_frame_proves_what_refolds() -> None:
    """The image of every frame is unreadable (the damaged page was the schema's):
    the image that left that frame out holds every later transaction and proves the
    ledger that re-folds; one whose pages disagree proves nothing."""
    old_e, old_a = simple_ledger("a1", [100, -10])
    new_e, new_a = simple_ledger("a1", [100, -10, 5000])
    unreadable = Salvage("past-damage", False, error="schema unreadable")
    plan = plan_recovery(
        [unreadable, image("past-damage-intact-frames", new_e, [new_a]), image("as-sqlite-reads", old_e, [old_a])],
        ["a1"],
    )
    assert plan.held == [] and [(a.balance_micro, a.image) for a in plan.accounts] == [
        (5090, "past-damage-intact-frames")
    ]
    # the damaged frame held the newest entries' page: the account row disagrees
    plan = plan_recovery(
        [unreadable, image("past-damage-intact-frames", old_e, [new_a]), image("as-sqlite-reads", old_e, [old_a])],
        ["a1"],
    )
    assert plan.held == ["a1"] and "billing_entry" not in plan.rows
    # never the image SQLite alone reads, even when it is the only readable one
    plan = plan_recovery([unreadable, image("as-sqlite-reads", old_e, [old_a])], ["a1"])
    assert plan.held == ["a1"]


def test_accounts_new_held_or_restored() -> None:
    e1, a1 = simple_ledger("a1", [100])
    e2, a2 = simple_ledger("a2", [200, 3])
    a2 = {**a2, "last_seq": 5}  # entries missing
    plan = plan_recovery([image("x", e1 + e2, [a1, a2])], ["a1", "a2", "a3"])
    outcome = {a.account: a for a in plan.accounts}
    assert outcome["a1"].restored and outcome["a1"].balance_micro == 100
    assert not outcome["a2"].restored and "missing" in outcome["a2"].detail
    assert outcome["a3"].restored and "new account" in outcome["a3"].detail  # table read whole
    assert plan.held == ["a2"]
    # with the account table damaged, an account not found may have been lost: held
    s = image("x", e1, [a1])
    s.tables["billing_account"].complete = False
    assert plan_recovery([s], ["a1", "a3"]).held == ["a3"]
    # nothing readable: every configured account is held
    assert plan_recovery([Salvage("x", False)], ["a1", "a3"]).held == ["a1", "a3"]
    assert plan_recovery([], ["a1"]).held == ["a1"]


def test_replay_state_is_the_union_and_the_highest() -> None:
    floor_cols = ("issuer", "floor", "updated_ms")
    seen_cols = (
        "command_id",
        "issuer",
        "counter",
        "type",
        "digest",
        "channel",
        "accepted_ms",
        "expires_ms",
    )

    def seen(cid: str) -> dict[str, Any]:
        return dict(zip(seen_cols, (cid, "k", 1, "topup", b"d", "mqtt", 1, 2), strict=True))

    a = image(
        "past-damage",
        [],
        [],
        sec_counter_floor=table(
            "sec_counter_floor", floor_cols, [{"issuer": "k", "floor": 7, "updated_ms": 1}]
        ),
        sec_seen_command=table("sec_seen_command", seen_cols, [seen("c1"), seen("c3")]),
    )
    b = image(
        "as-sqlite-reads",
        [],
        [],
        sec_counter_floor=table(
            "sec_counter_floor", floor_cols, [{"issuer": "k", "floor": 9, "updated_ms": 1}]
        ),
        sec_seen_command=table("sec_seen_command", seen_cols, [seen("c1"), seen("c2")]),
    )
    plan = plan_recovery([a, b], [])
    cols, rows = plan.rows["sec_counter_floor"]
    assert [r[cols.index("floor")] for r in rows] == [9]
    cols, rows = plan.rows["sec_seen_command"]
    assert sorted(r[cols.index("command_id")] for r in rows) == ["c1", "c2", "c3"]


@settings(max_examples=100, deadline=None)
@given(ledgers(), st.data())
def test_a_pruned_ledger_is_proved_from_its_fold_base(
    ledger: tuple[list[dict[str, Any]], dict[str, Any]], data: st.DataObject
) -> None:
    """After retention let entries go, the entries after the fold base prove the view
    from the base; a missing entry after the base or a base that does not fit does not."""
    entries, acct = ledger
    cut = data.draw(st.integers(0, len(entries)))
    base = fold("a1", [row_entry(r) for r in entries[:cut]])
    base_row = {
        "account": "a1", "base_seq": cut, "balance_micro": base.balance_micro,
        "purchase_counter": base.purchase_counter, "tier_period_start_ms": base.tier.period_start_ms,
        "tier_cumulative_ckwh": base.tier.cumulative_ckwh, "snapshot_seq": None,
    }  # fmt: skip
    kept = entries[cut:]  # everything below the base was pruned
    assert verify_ledger("a1", kept, acct, base_row).ok
    if cut:
        assert not verify_ledger("a1", kept, acct).ok  # without its base it is incomplete
        assert not verify_ledger("a1", kept, acct, {**base_row, "balance_micro": base.balance_micro + 1}).ok
    if kept:
        assert not verify_ledger("a1", kept[1:], acct, base_row).ok


def row_entry(r: dict[str, Any]) -> Entry:
    return Entry(r["entry_id"], r["account"], EntryKind(r["kind"]), r["amount_micro"], r["time_ms"],
                 ls.body_from_column(r["body"], r["entry_id"]), r["seq"])

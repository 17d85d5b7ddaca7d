"""The degraded-mode helpers: the bounded in-memory backlog and the billing hold."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.storage_guard import Backlog, BillingHold, held_accounts
from store_forward.storage_state import StorageMode, StorageState


@dataclass
class R:
    meter_id: str
    n: int


@dataclass
class C:
    readings: list[R]
    statuses: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)


@dataclass
class T:
    time_ms: int


work = st.lists(
    st.one_of(
        st.builds(T, st.integers(0, 100)),
        st.builds(
            C,
            st.lists(
                st.builds(R, st.sampled_from(["m1", "m2", "m3"]), st.integers(0, 10**6)), max_size=6
            ),
            st.lists(st.just("s"), max_size=2),
            st.lists(st.just("e"), max_size=2),
        ),
    ),
    max_size=60,
)


@settings(max_examples=80, deadline=None)
@given(work, st.integers(1, 20))
def test_backlog_stays_bounded_and_keeps_what_matters(items: list[Any], cap: int) -> None:
    b = Backlog(cap)
    seq = 0
    offered: list[R] = []
    for item in items:
        if isinstance(item, C):
            for r in item.readings:
                seq += 1
                r.n = seq  # arrival order
            offered += item.readings
        b.add(item)
    kept = [r for i in b.items if isinstance(i, C) for r in i.readings]
    # bounded, unless only latest readings are left
    meters = {r.meter_id for r in offered}
    assert len(kept) <= max(cap, len(meters))
    assert b.dropped == len(offered) - len(kept)
    # order kept, every meter's latest reading kept
    assert [r.n for r in kept] == sorted(r.n for r in kept)
    for m in meters:
        assert max(r.n for r in offered if r.meter_id == m) in {r.n for r in kept}
    # statuses and events never dropped; at most one tick, the newest
    assert sum(len(i.statuses) + len(i.events) for i in b.items if isinstance(i, C)) == sum(
        len(i.statuses) + len(i.events) for i in items if isinstance(i, C)
    )
    ticks = [i for i in b.items if isinstance(i, T)]
    all_ticks = [i for i in items if isinstance(i, T)]
    assert len(ticks) == min(1, len(all_ticks))
    if ticks:
        assert ticks[0] is all_ticks[-1]


@dataclass
class _Prepaid:
    accounts: dict[str, Any]
    meter_account: dict[str, str]


def test_hold_follows_the_storage_state() -> None:
    p = _Prepaid({"a": "A", "b": "B"}, {"m1": "a", "m2": "b", "m3": "b"})
    hold = BillingHold(p)
    fault = StorageState(StorageMode.FAULT, since_ms=1)
    hold.sync(fault)
    assert p.accounts == {} and p.meter_account == {} and hold.held == {"a", "b"}
    rec = StorageState(StorageMode.RECOVERING, since_ms=2, held=("b",))
    hold.sync(rec)
    assert p.accounts == {"a": "A"} and p.meter_account == {"m1": "a"}
    assert hold.all_accounts() == ["a", "b"] and hold.account("b") == "B"
    hold.sync(StorageState())
    assert p.accounts == {"a": "A", "b": "B"} and p.meter_account == {
        "m1": "a",
        "m2": "b",
        "m3": "b",
    }
    assert held_accounts(fault, ["x"]) == {"x"} and held_accounts(rec, ["a", "b"]) == {"b"}

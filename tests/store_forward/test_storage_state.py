"""The storage-fault state machine: any story of faults, recoveries and snapshots."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store_forward.storage_state import (
    PER_ACCOUNT,
    SAFE,
    Action,
    StorageMode,
    StorageState,
    describe,
    detect,
    permits,
    recovered,
    settled,
)

ACCOUNTS = ["a1", "a2", "a3", "a4"]

steps = st.lists(
    st.one_of(
        st.tuples(st.just("detect"), st.sampled_from(["wal", "quick_check", "runtime"])),
        st.tuples(
            st.just("recover"), st.frozensets(st.sampled_from(ACCOUNTS)), st.integers(0, 10**6)
        ),
        st.tuples(st.just("settle"), st.sampled_from(ACCOUNTS)),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_any_story_keeps_the_rules(story: list[tuple[object, ...]]) -> None:
    s = StorageState()
    now = 0
    faults = 0
    fence_seen: int | None = None
    for step in story:
        now += 1000
        before = s
        if step[0] == "detect":
            s = detect(s, kind=str(step[1]), reason="x", evidence=f"/e/{now}", now_ms=now)
            faults += 1
            assert s.mode is StorageMode.FAULT and s.since_ms == now
            assert set(before.held) <= set(s.held)  # held accounts carry over
        elif step[0] == "recover":
            held, fence = step[1], step[2]
            assert isinstance(held, frozenset) and isinstance(fence, int)
            if s.mode is not StorageMode.FAULT:
                with pytest.raises(ValueError):
                    recovered(s, held=held, fence_ms=fence, now_ms=now)
                continue
            s = recovered(s, held=held, fence_ms=fence, now_ms=now)
            assert set(s.held) == set(before.held) | set(held)
            assert s.mode is (StorageMode.RECOVERING if s.held else StorageMode.NORMAL)
            fence_seen = max(fence_seen or 0, fence) or None
        else:
            acct = str(step[1])
            s = settled(s, acct, now)
            assert acct not in s.held or before.mode is not StorageMode.RECOVERING
            assert set(s.held) <= set(before.held)
        # invariants of every state
        assert s.recoveries == faults
        assert (s.mode is StorageMode.NORMAL) == (s.mode is not StorageMode.FAULT and not s.held)
        if fence_seen is not None:
            assert s.fence_ms is not None and s.fence_ms >= fence_seen  # the fence never drops
        assert StorageState.from_json(s.to_json()) == s
        assert describe(s)
        for action in Action:
            for who in [None, *ACCOUNTS]:
                v = permits(s, action, who)
                if action in SAFE or s.mode is StorageMode.NORMAL:
                    assert v.allowed
                elif s.mode is StorageMode.FAULT:
                    assert not v.allowed and "stopped" in v.why
                elif action in PER_ACCOUNT and who in s.held:
                    assert not v.allowed and str(who) in v.why and "snapshot" in v.why
                else:
                    assert v.allowed


def test_a_state_that_contradicts_itself_is_refused() -> None:
    with pytest.raises(ValueError):
        StorageState(StorageMode.NORMAL, held=("a",))
    with pytest.raises(ValueError):
        StorageState(StorageMode.FAULT)
    with pytest.raises(ValueError):
        StorageState(StorageMode.RECOVERING, since_ms=1, held=("b", "a"))

"""The command queue's pure core: results, final states, resends, what the dispatcher picks."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from headend.commands import (
    FINAL,
    MAX_RESEND_MS,
    ONLINE_GRACE_MS,
    Action,
    Pending,
    Presence,
    Result,
    State,
    on_result,
    parse_result,
    pick,
    resend_delay_ms,
)

REASONS = [
    "replay", "counter_stale", "issued_before_recovery", "expired", "bad_body", "bad_signature",
    "wrong_role", "wrong_target", "malformed", "unknown_issuer", "key_revoked",
]  # fmt: skip
CODES = [None, "counter_gap", "counter_replay", "hoarding_limit", "unknown_account", "not_patchable"]
TYPES = ["topup", "relay.operate", "config.patch", "tariff.publish", "balance.snapshot"]

results = st.builds(
    Result,
    command_id=st.just("c-1"),
    outcome=st.sampled_from(["applied", "duplicate", "rejected"]),
    reason=st.sampled_from([None, *REASONS]),
    code=st.sampled_from(CODES),
    message=st.text(max_size=20),
)


@given(
    start=st.sampled_from(list(State)),
    seq=st.lists(results, max_size=12),
    type=st.sampled_from(TYPES),
    now=st.integers(0, 10**13),
    expires=st.integers(0, 10**13),
    later=st.booleans(),
)
@settings(max_examples=400, deadline=None)
def test_applied_is_absorbing_and_final_states_change_only_to_applied(
    start: State, seq: list[Result], type: str, now: int, expires: int, later: bool
) -> None:
    state = start
    for r in seq:
        t = on_result(state, r, command_type=type, now_ms=now, expires_ms=expires, later_relay_applied=later)
        new = t.state or state
        if state is State.APPLIED:
            assert t.action is Action.IGNORE and new is State.APPLIED
        if state in FINAL:
            assert new in (state, State.APPLIED)
        if r.is_applied:
            assert new is State.APPLIED
        else:
            assert new is not State.APPLIED or state is State.APPLIED
        if new is State.QUEUED:
            # only refusals that a later delivery can clear keep a command open
            assert r.reason in ("counter_stale", "issued_before_recovery") or r.code == "counter_gap"
            assert t.next_attempt_ms is not None and t.next_attempt_ms >= now
        state = new


def test_each_answer_of_the_gateway_moves_an_open_command_as_documented() -> None:
    def after(outcome: str, reason: str | None = None, code: str | None = None, **kw: Any) -> Any:
        return on_result(
            State.SENT, Result("c", outcome, reason, code), command_type=kw.get("type", "topup"),
            now_ms=1_000, expires_ms=kw.get("expires", 10_000), later_relay_applied=kw.get("later", False),
        )  # fmt: skip

    assert after("applied").state is State.APPLIED
    assert after("duplicate").state is State.APPLIED
    assert after("rejected", "replay").state is State.APPLIED  # the same envelope was accepted
    assert after("rejected", "expired").state is State.EXPIRED
    t = after("rejected", "counter_stale")
    assert (t.action, t.state, t.next_attempt_ms) == (Action.RESIGN, State.QUEUED, 1_000)
    assert after("rejected", "issued_before_recovery").action is Action.RESIGN
    assert after("rejected", "counter_stale", expires=1_000).state is State.EXPIRED
    t = after("rejected", "counter_stale", type="relay.operate", later=True)
    assert t.state is State.SUPERSEDED  # re-signing would undo the later operation
    t = after("rejected", "bad_body", "counter_gap")
    assert (t.action, t.state) == (Action.RETRY, State.QUEUED) and t.next_attempt_ms > 1_000
    t = after("rejected", "bad_body", "hoarding_limit")
    assert (t.state, t.reason, t.code) == (State.REFUSED, "bad_body", "hoarding_limit")
    assert after("rejected", "wrong_role").state is State.REFUSED


def test_results_are_read_only_from_command_results_that_name_a_command() -> None:
    body = {"type": "command_result", "outcome": "applied", "id": "topup-1", "channel": "mqtt",
            "effect": {"status": "applied"}, "at_ms": 5}  # fmt: skip
    r = parse_result(body)
    assert r is not None and r.command_id == "topup-1" and r.effect == {"status": "applied"}
    assert parse_result({**body, "type": "relay.alarm"}) is None
    assert parse_result({"type": "command_result", "outcome": "failed", "channel": "mqtt"}) is None
    assert parse_result({"type": "command_result", "outcome": "rejected", "reason": "malformed"}) is None
    assert parse_result({**body, "id": 7}) is None
    assert parse_result({**body, "outcome": "maybe"}) is None
    assert parse_result("junk") is None


@given(st.integers(0, 200))
@settings(deadline=None)
def test_resend_delays_grow_and_are_bounded(n: int) -> None:
    assert 0 <= resend_delay_ms(n) <= MAX_RESEND_MS
    assert resend_delay_ms(n) <= resend_delay_ms(n + 1)
    if n >= 1:
        assert resend_delay_ms(n) >= 30_000


pendings = st.lists(
    st.builds(
        Pending,
        seq=st.integers(1, 10**6),
        gateway_id=st.sampled_from(["gw-a", "gw-b", "gw-c"]),
        state=st.sampled_from([State.QUEUED, State.SENT]),
        next_attempt_ms=st.integers(0, 2_000),
        expires_ms=st.integers(0, 3_000),
    ),
    max_size=40,
    unique_by=lambda p: p.seq,
)
presences = st.dictionaries(
    st.sampled_from(["gw-a", "gw-b", "gw-c"]),
    st.builds(Presence, online=st.booleans(), since_ms=st.integers(0, 2_000)),
)


@given(
    pending=pendings,
    flight=st.dictionaries(st.sampled_from(["gw-a", "gw-b", "gw-c"]), st.integers(0, 10)),
    presence=presences,
    now=st.integers(0, 2_000),
    window=st.integers(1, 8),
)
@settings(max_examples=300, deadline=None)
def test_the_dispatcher_never_sends_expired_or_early_keeps_the_window_and_the_order(
    pending: list[Pending], flight: dict[str, int], presence: dict[str, Presence], now: int, window: int
) -> None:
    # in_flight counts the commands in state sent (as the store does)
    in_flight = {g: sum(1 for p in pending if p.gateway_id == g and p.state is State.SENT) + n
                 for g, n in flight.items()}  # fmt: skip
    chosen = pick(pending, in_flight, presence, now, window=window)
    by_seq = {p.seq: p for p in pending}
    assert not set(chosen.to_expire) & set(chosen.to_send)
    assert list(chosen.to_send) == sorted(chosen.to_send)
    for s in chosen.to_expire:
        assert now >= by_seq[s].expires_ms and by_seq[s].next_attempt_ms <= now
    for s in chosen.to_send:
        p = by_seq[s]
        assert p.next_attempt_ms <= now < p.expires_ms
        if p.state is State.SENT:
            pr = presence.get(p.gateway_id)
            assert pr is None or (pr.online and now >= pr.since_ms + ONLINE_GRACE_MS)
    for gw in {p.gateway_id for p in pending}:
        first_sends = [s for s in chosen.to_send if by_seq[s].gateway_id == gw and by_seq[s].state is State.QUEUED]
        expired_sent = sum(1 for s in chosen.to_expire if by_seq[s].gateway_id == gw and by_seq[s].state is State.SENT)
        before = in_flight.get(gw, 0) - expired_sent
        assert len(first_sends) <= max(0, window - before)
        # nothing due and sendable is skipped while the window has room
        if before + len(first_sends) < window:
            assert all(
                s in chosen.to_send
                for s, p in by_seq.items()
                if p.gateway_id == gw and p.state is State.QUEUED and p.next_attempt_ms <= now < p.expires_ms
            )


def test_a_gateway_offline_gets_first_sends_but_no_resends_until_it_is_back() -> None:
    pending = [
        Pending(1, "gw", State.SENT, 0, 10**9),
        Pending(2, "gw", State.QUEUED, 0, 10**9),
    ]
    off = {"gw": Presence(False, 0)}
    assert pick(pending, {"gw": 1}, off, 100_000).to_send == (2,)
    back = {"gw": Presence(True, 100_000)}
    assert pick(pending, {"gw": 1}, back, 100_000 + ONLINE_GRACE_MS - 1).to_send == (2,)
    assert pick(pending, {"gw": 1}, back, 100_000 + ONLINE_GRACE_MS).to_send == (1, 2)
    assert pick(pending, {"gw": 1}, {}, 5).to_send == (1, 2)  # presence unknown: resend


report_rows = st.lists(
    st.tuples(
        st.sampled_from(["counter", "bank", "mobile_app", "agent"]),
        st.sampled_from([s.value for s in State]),
        st.integers(1, 10**12),
        st.one_of(st.none(), st.integers(1, 10**12)),
        st.booleans(),
    ),
    max_size=60,
)


@given(report_rows)
@settings(deadline=None)
def test_the_reconciliation_partitions_every_topup_and_adds_up(rows: list[tuple[Any, ...]]) -> None:
    import datetime as dt

    from headend.central import REPORT_COLUMNS, reconcile

    r = reconcile(rows, day=dt.date(2026, 3, 1), tz="UTC", start_ms=0, end_ms=1, as_of_ms=2)
    for row in [*r["channels"], r["totals"]]:
        c = {k: (row[k]["count"], row[k]["amount_micro"]) for k in REPORT_COLUMNS}
        assert c["applied"][0] + c["unconfirmed"][0] == c["topups"][0]
        assert c["applied"][1] + c["unconfirmed"][1] == c["topups"][1]
        assert c["pending"][0] + c["refused"][0] + c["expired"][0] == c["unconfirmed"][0]
        assert c["via_payments"][0] <= c["topups"][0]
    for col in REPORT_COLUMNS:
        assert r["totals"][col]["amount_micro"] == sum(ch[col]["amount_micro"] for ch in r["channels"])
    assert r["totals"]["topups"]["count"] == len(rows)
    assert r["totals"]["credited"]["amount_micro"] == sum(c for _, _, _, c, _ in rows if c is not None)


def test_central_speaks_the_gateways_words_for_channels_and_relay_operations() -> None:
    """Central (which imports no gateway code) offers exactly what the gateway accepts."""
    from firmware_bridge.relay_ops import RelayOp
    from gateway.billing.topup import Channel
    from gateway.commands.bodies import PAYMENT_CHANNELS as GATEWAY_CHANNELS
    from headend.central import RELAY_OPS
    from store_forward.command_envelope import PAYMENT_CHANNELS

    assert PAYMENT_CHANNELS == GATEWAY_CHANNELS == {c.value for c in Channel}
    assert sorted(RELAY_OPS) == sorted({op.command_word for op in RelayOp})
    assert all(RelayOp(word).command_word == word for word in RELAY_OPS)

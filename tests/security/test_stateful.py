"""Stateful property test: any interleaving of fresh, retried, replayed, forged,
stale and expired commands, clock advances and reboots keeps the money right.

Each step opens the real SQLite file, processes one envelope in one
transaction (crediting an APPLIED top-up in the same transaction) and closes
it again, so every step is also a reboot.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import aiosqlite
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gateway.security.envelope import Outcome, create_schema, process_command
from gateway.security.roles import CommandType
from tests.security.conftest import BALANCE_SCHEMA, GATEWAY, HOUR, T0, Central, topup_body

_CENTRAL = Central()
_FORGER = Ed25519PrivateKey.generate()


async def _init(db: Path) -> None:
    async with aiosqlite.connect(db) as conn:
        await create_schema(conn)
        await conn.execute(BALANCE_SCHEMA)
        await conn.commit()


async def _deliver(db: Path, raw: bytes, now_ms: int) -> tuple[Outcome, str | None]:
    async with aiosqlite.connect(db) as conn:
        res = await process_command(
            conn, raw, trust=_CENTRAL.trust(), gateway_id=GATEWAY, now_ms=now_ms, channel="mqtt"
        )
        if res.outcome is Outcome.APPLIED and res.envelope is not None:
            await conn.execute(
                "INSERT INTO test_balance (account, micro) VALUES (?, ?) "
                "ON CONFLICT(account) DO UPDATE SET micro = micro + excluded.micro",
                (res.envelope.body["account"], res.envelope.body["amount_micro"]),
            )
        await conn.commit()
        return res.outcome, res.envelope.command_id if res.envelope else None


async def _state(db: Path) -> tuple[int, int | None]:
    async with aiosqlite.connect(db) as conn:
        async with conn.execute("SELECT coalesce(sum(micro), 0) FROM test_balance") as cur:
            row = await cur.fetchone()
            balance = int(row[0]) if row else 0
        async with conn.execute(
            "SELECT floor FROM sec_counter_floor WHERE issuer = 'billing-k1'"
        ) as cur:
            f = await cur.fetchone()
    return balance, (None if f is None else int(f[0]))


class CommandMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="edgegw-sec-"))
        self.db = self.dir / "gw.db"
        asyncio.run(_init(self.db))
        self.now = T0
        self.counter = 0
        self.sent: list[tuple[bytes, str, int]] = []  # raw, command id, counter
        self.amounts: dict[str, int] = {}  # command ids central has signed
        self.applied: dict[str, int] = {}  # command id -> amount credited
        self.accepted_counters: list[int] = []

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _send(self, raw: bytes, amount: int = 0, *, forged: bool = False) -> Outcome:
        outcome, cid = asyncio.run(_deliver(self.db, raw, self.now))
        if forged:
            assert outcome is Outcome.REJECTED
        if outcome is Outcome.APPLIED:
            assert cid is not None and cid not in self.applied, "a command id applied twice"
            self.applied[cid] = amount
        return outcome

    def _sign(self, cid: str, amount: int, counter: int, issued_at: int) -> bytes:
        raw = _CENTRAL.cmd(
            CommandType.TOPUP,
            topup_body(amount_micro=amount),
            command_id=cid,
            counter=counter,
            issued_at=issued_at,
            expires_at=issued_at + HOUR,
        )
        self.amounts.setdefault(cid, amount)  # ids central has signed
        return raw

    @rule(amount=st.integers(1, 10**9), new_id=st.booleans(), gap=st.integers(1, 3))
    def fresh(self, amount: int, new_id: bool, gap: int) -> None:
        """Central signs a command (new, or a retry of an earlier id) with the next counter."""
        cid = f"c{len(self.amounts)}" if new_id or not self.amounts else sorted(self.amounts)[0]
        self.counter += gap
        raw = self._sign(cid, amount, self.counter, self.now)
        was_applied = cid in self.applied
        out = self._send(raw, amount)
        self.sent.append((raw, cid, self.counter))
        assert out is (Outcome.DUPLICATE if was_applied else Outcome.APPLIED)
        self.accepted_counters.append(self.counter)

    @precondition(lambda self: bool(self.sent))
    @rule(i=st.integers(0, 10**6))
    def replay(self, i: int) -> None:
        raw, _, _ = self.sent[i % len(self.sent)]
        assert self._send(raw, 0) is Outcome.REJECTED

    @rule(amount=st.integers(1, 10**12), counter=st.integers(1, 2**63 - 1))
    def forged(self, amount: int, counter: int) -> None:
        raw = _CENTRAL.cmd(
            CommandType.TOPUP,
            topup_body(amount_micro=amount),
            key=_FORGER,
            issuer="billing-k1",
            counter=counter,
            issued_at=self.now,
        )
        _CENTRAL.counters["billing-k1"] = self.counter  # the forger does not move central
        self._send(raw, amount, forged=True)

    @precondition(lambda self: self.counter > 0)
    @rule(amount=st.integers(1, 10**9))
    def stale(self, amount: int) -> None:
        raw = self._sign(f"s{len(self.amounts)}", amount, self.counter, self.now)
        assert self._send(raw, amount) is Outcome.REJECTED

    @rule(amount=st.integers(1, 10**9))
    def expired(self, amount: int) -> None:
        # a fresh counter, but signed long ago: refused, and must not raise the floor
        raw = self._sign(f"e{len(self.amounts)}", amount, self.counter + 1000, self.now - 2 * HOUR)
        assert self._send(raw, amount) is Outcome.REJECTED

    @rule(ms=st.integers(0, 3 * HOUR))
    def advance(self, ms: int) -> None:
        self.now += ms

    @invariant()
    def money_and_floor(self) -> None:
        if not hasattr(self, "db"):
            return
        balance, floor = asyncio.run(_state(self.db))
        assert balance == sum(self.applied.values())
        assert floor == (max(self.accepted_counters) if self.accepted_counters else None)


def test_command_state_machine() -> None:
    CommandMachine.TestCase.settings = settings(
        max_examples=8, stateful_step_count=12, deadline=None
    )
    CommandMachine.TestCase().runTest()


@pytest.mark.long
def test_command_state_machine_long() -> None:
    CommandMachine.TestCase.settings = settings(
        max_examples=500, stateful_step_count=60, deadline=None
    )
    CommandMachine.TestCase().runTest()

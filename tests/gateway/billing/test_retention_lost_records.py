"""Property: on the real database and shell, retention never lets an entry go whose
charge record central did not acknowledge, whatever records are lost on the way
(set aside as damaged, of any class, in or out of id order; billing evicted under a
full disk) and whenever the gateway restarts; each loss of a billing record keeps
exactly the entries existing when a pass first saw it, and every later entry goes
once acknowledged and old."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_bridge.reading import Measurement, Quantity, Reading
from gateway.billing import ledger_store as ls
from gateway.billing import retention
from gateway.prepaid import Prepaid
from store_forward.outbox import Outbox
from store_forward.records import RecordClass, RecordKind
from store_forward.storage_policy import EvictionPlan
from tests.gateway.billing.test_retention_store import ACC, NOW, story
from tests.gateway.test_prepaid_shell import T0, open_shell, rate

ops = st.lists(
    st.one_of(
        st.tuples(st.just("rate"), st.integers(1, 3)),  # that many debits
        st.tuples(st.just("pass"), st.just(0)),
        st.tuples(st.just("ack_all"), st.just(0)),
        st.tuples(st.just("ack_one"), st.just(0)),  # the next batch sent and acknowledged
        st.tuples(st.just("send"), st.just(0)),  # the next batch numbered and sent, no ack
        st.tuples(
            st.sampled_from(["damage_billing", "damage_event", "damage_telemetry"]),
            st.integers(0, 1),
        ),
        st.tuples(st.just("telemetry"), st.just(0)),
        st.tuples(st.just("event"), st.just(0)),
        st.tuples(st.just("evict"), st.just(0)),
        st.tuples(st.just("restart"), st.just(0)),
    ),
    max_size=24,
)


class Model:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.acked: set[str] = set()  # entry ids whose charge record central acknowledged
        self.present: set[str] = set()
        self.lost = 0  # billing records damaged or evicted so far
        self.unseen = False  # a billing record was lost since the last pass
        self.hold = 0  # what the hold must be
        self.reading = 0  # debits after the story's register of 100.7 kWh
        self.t = T0 + 200_000
        self.sent: list[int] = []

    async def start(self) -> tuple[Prepaid, Outbox]:
        prepaid, outbox = await open_shell(self.tmp)
        self.sent = []  # a restart forgets what was in flight
        return prepaid, outbox

    async def scalar(self, outbox: Outbox, sql: str, args: tuple[object, ...] = ()) -> int:
        async with outbox.transaction() as db, db.execute(sql, args) as cur:
            row = await cur.fetchone()
        return 0 if row is None or row[0] is None else int(row[0])

    async def losses(self, outbox: Outbox) -> None:
        lost = await self.scalar(
            outbox, "SELECT count(*) FROM damaged WHERE cls = ?", (int(RecordClass.BILLING),)
        )
        lost += await self.scalar(outbox, "SELECT value FROM kv WHERE key = 'billing_evicted'")
        if lost != self.lost:
            self.lost, self.unseen = lost, True

    async def check(self, outbox: Outbox) -> None:
        async with (
            outbox.transaction() as db,
            db.execute("SELECT entry_id FROM billing_entry") as cur,
        ):
            now = {str(r[0]) for r in await cur.fetchall()}
        gone = self.present - now
        assert gone <= self.acked, (
            f"entries pruned whose records central lacks: {sorted(gone - self.acked)}"
        )
        self.present = now
        async with outbox.transaction() as db:
            await ls.verify(db, ACC)

    async def send(self, outbox: Outbox, ack: bool) -> bool:
        b = await outbox.next_batch(0, exclude=[] if ack else self.sent, max_records=6)
        if b is None:
            return False
        if ack:
            self.acked |= {str(r.body["id"]) for r in b.records if r.kind == "charge"}
            await outbox.ack(b.seq)
        else:
            self.sent.append(b.seq)
        return True

    async def run_pass(self, outbox: Outbox) -> retention.PassResult:
        top = await self.scalar(outbox, "SELECT max(rowid) FROM billing_entry")
        p = await retention.run_pass(outbox.transaction, 7, NOW)
        if self.unseen:
            self.hold, self.unseen = top, False
        assert p.state.hold_rowid == self.hold
        return p

    async def damage(self, outbox: Outbox, cls: RecordClass, newest: int) -> None:
        order = "DESC" if newest else "ASC"
        async with outbox.transaction() as db:
            await db.execute(
                "UPDATE outbox SET body = zeroblob(40) WHERE id ="
                f" (SELECT id FROM outbox WHERE cls = ? ORDER BY id {order} LIMIT 1)",
                (int(cls),),
            )


async def _run(tmp: Path, stream: list[tuple[str, int]]) -> None:
    m = Model(tmp)
    prepaid, outbox = await m.start()
    try:
        await story(prepaid, outbox, debits=2)
        await m.check(outbox)
        for op, arg in stream:
            if op == "rate":
                for _ in range(arg):
                    m.reading += 1
                    m.t += 1000
                    await rate(prepaid, outbox, f"{101 + m.reading / 10:.1f}", m.t)
            elif op == "pass":
                await m.run_pass(outbox)
            elif op == "ack_all":
                while await m.send(outbox, ack=True):
                    pass
            elif op in ("ack_one", "send"):
                await m.send(outbox, ack=op == "ack_one")
            elif op.startswith("damage_"):
                cls = {"billing": RecordClass.BILLING, "event": RecordClass.EVENT}.get(
                    op.removeprefix("damage_"), RecordClass.TELEMETRY
                )
                await m.damage(outbox, cls, arg)
            elif op == "telemetry":
                m.t += 1000
                volts = Reading("m001", m.t, {Quantity.VOLTAGE: Measurement(Decimal("230.1"))})
                async with outbox.transaction() as db:
                    await outbox.commit_cycle_in(db, m.t, [volts])
            elif op == "event":
                async with outbox.transaction() as db:
                    await outbox.add_in(
                        db, RecordClass.EVENT, RecordKind.EVENT, m.t, {"type": "test"}
                    )
            elif op == "evict":  # the disk below its hard floor: unsent billing records go
                async with outbox.transaction() as db:
                    await outbox._evict(db, NOW, EvictionPlan(0, 600))
            else:
                await outbox.close()
                prepaid, outbox = await m.start()
            await m.losses(outbox)
            await m.check(outbox)
        # everything acknowledged: what came after the last hold goes, but the newest
        while await m.send(outbox, ack=True):
            pass
        await m.losses(outbox)
        await m.run_pass(outbox)
        await m.run_pass(outbox)
        await m.check(outbox)
        async with (
            outbox.transaction() as db,
            db.execute(
                "SELECT count(*) FROM billing_entry WHERE kind IN ('debit', 'fixed') AND rowid > ?"
                " AND rowid < (SELECT max(rowid) FROM billing_entry)",
                (m.hold,),
            ) as cur,
        ):
            assert await cur.fetchone() == (0,)
    finally:
        await outbox.close()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(stream=ops)
def test_no_entry_goes_before_central_acknowledged_its_record(
    tmp_path_factory: pytest.TempPathFactory, stream: list[tuple[str, int]]
) -> None:
    asyncio.run(_run(tmp_path_factory.mktemp("lost"), stream))

"""The prepaid shell on a real outbox: rollbacks, restarts, central tariffs."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from firmware_bridge.reading import Measurement, Quantity, Reading
from gateway.billing import ledger_store as ls
from gateway.billing.cutoff import Contact
from gateway.config import load_config
from gateway.database import open_database
from gateway.prepaid import Prepaid
from store_forward.outbox import Outbox
from tests.gateway.test_prepaid_daemon import config

T0 = 1_790_000_000_000  # 2026-09-21, after the flat tariff's effective_from
# A second version of the account's flat tariff, as central publishes it: 1.0000 a kWh.
FLAT_V2 = {
    "id": "flat-basic",
    "version": 2,
    "effective_from": "2026-09-21T00:00:00+08:00",
    "timezone": "Asia/Shanghai",
    "price": "1.0000",
}


def reading(kwh: str, t: int) -> Reading:
    return Reading("m001", t, {Quantity.ENERGY_IMPORT: Measurement(Decimal(kwh))})


async def open_shell(tmp: Path) -> tuple[Prepaid, Outbox]:
    cfg = load_config(config(tmp, 1))
    prepaid = Prepaid.from_config(cfg)
    assert prepaid is not None
    outbox = await open_database(tmp / "gw.db")
    prepaid.attach(outbox)
    async with outbox.transaction() as db:
        await prepaid.start_in(db, T0)
    return prepaid, outbox


async def rate(prepaid: Prepaid, outbox: Outbox, kwh: str, t: int) -> None:
    async with outbox.transaction() as db:
        ids = await outbox.commit_cycle_in(db, t, [reading(kwh, t)])
        await prepaid.on_readings_in(db, outbox, [(ids[0], reading(kwh, t))], t, Contact(t, T0))


async def balance(outbox: Outbox) -> int:
    async with outbox.transaction() as db:
        return (await ls.verify(db, "acct-001")).balance_micro


async def test_a_rolled_back_cycle_leaves_no_trace_in_the_cached_balance(tmp_path: Path) -> None:
    prepaid, outbox = await open_shell(tmp_path)
    try:
        await rate(prepaid, outbox, "100.0", T0 + 1000)  # baseline
        await rate(prepaid, outbox, "100.1", T0 + 2000)  # 0.1 kWh x 0.56 = 0.056 yuan
        assert await balance(outbox) == 300_000 - 56_000
        with pytest.raises(RuntimeError, match="disk gone"):
            async with outbox.transaction() as db:
                t = T0 + 3000
                ids = await outbox.commit_cycle_in(db, t, [reading("100.2", t)])
                await prepaid.on_readings_in(db, outbox, [(ids[0], reading("100.2", t))], t, Contact(t, T0))
                raise RuntimeError("disk gone")  # the commit fails after rating
        # The debit of the rolled-back cycle is gone from the database and from the cache:
        # the next reading is rated from the last committed baseline, once.
        await rate(prepaid, outbox, "100.3", T0 + 4000)
        assert await balance(outbox) == 300_000 - 56_000 - 2 * 56_000
        async with outbox.transaction() as db:
            assert (await prepaid.ledger.view(db, "acct-001")).balance_micro == await balance_in(db)
    finally:
        await outbox.close()


async def balance_in(db: object) -> int:
    return (await ls.load_view(db, "acct-001")).balance_micro  # type: ignore[arg-type]


async def test_a_tariff_from_central_survives_a_restart(tmp_path: Path) -> None:
    prepaid, outbox = await open_shell(tmp_path)
    doc = FLAT_V2
    try:
        async with outbox.transaction() as db:
            r = await prepaid.install_tariff_in(db, doc, now_ms=T0)
        assert r["status"] == "applied"
    finally:
        await outbox.close()
    restarted, outbox = await open_shell(tmp_path)
    try:
        versions = restarted.accounts["acct-001"].book.versions
        assert [v.version for v in versions] == [1, 2]
        await rate(restarted, outbox, "100.0", T0 + 1000)
        await rate(restarted, outbox, "100.1", T0 + 2000)  # 0.1 kWh at 1.0000
        assert await balance(outbox) == 300_000 - 100_000
    finally:
        await outbox.close()


async def test_a_tariff_whose_transaction_rolls_back_is_not_used(tmp_path: Path) -> None:
    """The book an account rates with changes only when the tariff is stored: a
    transaction that fails after the install (a full disk at COMMIT) leaves the old
    price in force, and the same command applied again afterwards takes effect."""
    prepaid, outbox = await open_shell(tmp_path)
    doc = FLAT_V2
    try:
        with pytest.raises(RuntimeError, match="disk gone"):
            async with outbox.transaction() as db:
                r = await prepaid.install_tariff_in(db, doc, now_ms=T0)
                assert r["status"] == "applied"
                raise RuntimeError("disk gone")
        assert [v.version for v in prepaid.accounts["acct-001"].book.versions] == [1]
        await rate(prepaid, outbox, "100.0", T0 + 1000)
        await rate(prepaid, outbox, "100.1", T0 + 2000)  # 0.1 kWh at the old 0.5600
        assert await balance(outbox) == 300_000 - 56_000
        async with outbox.transaction() as db:
            assert (await prepaid.install_tariff_in(db, doc, now_ms=T0))["status"] == "applied"
        assert [v.version for v in prepaid.accounts["acct-001"].book.versions] == [1, 2]
        await rate(prepaid, outbox, "100.2", T0 + 3000)  # 0.1 kWh at 1.0000
        assert await balance(outbox) == 300_000 - 56_000 - 100_000
    finally:
        await outbox.close()


async def cutoff_events(outbox: Outbox) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    seen: list[int] = []
    while (b := await outbox.next_batch(0, exclude=seen, max_records=10_000)) is not None:
        seen.append(b.seq)
        out += [r.body for r in b.records if str(r.body.get("type", "")).startswith("cutoff.")]
    return out


async def test_the_policy_is_never_held_at_an_instant_the_clock_went_back_from(tmp_path: Path) -> None:
    prepaid, outbox = await open_shell(tmp_path)
    day = 86_400_000
    try:
        async with outbox.transaction() as db:  # evaluated a day ahead (a clock that was wrong)
            await prepaid.tick_in(db, outbox, T0 + day, Contact(T0 + day, T0))
        await rate(prepaid, outbox, "100.0", T0 + 1000)  # the clock is right again
        await rate(prepaid, outbox, "100.2", T0 + 2000)  # 0.112 yuan: balance 0.188 <= alarm 1 (0.20)
        (change,) = [e for e in await cutoff_events(outbox) if e["type"] == "cutoff.state_change"]
        assert change["to"] == "alarm1" and change["time_ms"] == T0 + 2000
        assert change["state"] == "supply on: low balance (alarm 1 at 0.20)"
    finally:
        await outbox.close()

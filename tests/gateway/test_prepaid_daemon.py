"""Prepaid enforcement in the running daemon, with the link down the whole time.

A real Modbus TCP simulator with a supply relay (coil 0) meters a heavy load;
the daemon rates every reading, runs the account into overdraft, trips the
relay through the bus (verified by read-back), then a top-up restores supply.
The ledger balance equals opening balance + top-up − every uploaded charge.
"""

from __future__ import annotations

import asyncio
import sqlite3
from decimal import Decimal
from pathlib import Path

from gateway.config import load_config
from gateway.daemon import Daemon
from gateway.database import open_database
from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import until
from tests.harness.site import gateway_config, meter, prepaid_account

ROOT = Path(__file__).resolve().parents[2]

def config(tmp: Path, modbus_port: int) -> Path:
    acct = prepaid_account(tmp, opening="0.30", alarm1="0.20", alarm2="0.10", close_permit="0.05")
    return gateway_config(
        tmp,
        "gw-prepaid",
        modbus_port=modbus_port,
        gateway={"timezone": "Asia/Shanghai"},
        uplink={"reconnect_min_s": 0.2, "reconnect_max_s": 0.5},  # nobody listens: the link is down
        meters=[meter(account="acct-001")],
        accounts=[acct],
    )



async def outbox_bodies(db: Path, kind: str) -> list[dict[str, object]]:
    """Bodies of the (sealed) outbox records of ``kind``, read through the outbox itself."""

    ob = await open_database(db)
    try:
        seen: list[int] = []
        bodies: list[tuple[int, dict[str, object]]] = []
        while (batch := await ob.next_batch(0, exclude=seen, max_records=10_000)) is not None:
            seen.append(batch.seq)
            bodies += [(r.id, r.body) for r in batch.records if r.kind == kind]
        return [b for _, b in sorted(bodies, key=lambda x: x[0])]
    finally:
        await ob.close()


async def test_trip_when_credit_runs_out_and_restore_after_top_up(tmp_path: Path) -> None:
    async with ModbusSimulator(units=[1], load_kw="150") as sim:  # ~0.023 yuan/s at 0.56/kWh
        cfg = load_config(config(tmp_path, sim.port))
        daemon = Daemon(cfg)
        stop = asyncio.Event()
        run = asyncio.create_task(daemon.run(stop))
        try:
            await asyncio.wait_for(daemon.ready.wait(), 10)
            await until(lambda: sim.meter(1).relay_open, 30, "trip when the credit is gone")
            assert daemon.outbox is not None and daemon.prepaid is not None
            async with daemon.outbox.transaction() as db:
                res = await daemon.prepaid.apply_topup_in(
                    db,
                    {"account": "acct-001", "amount_micro": 5_000_000, "purchase_counter": 1,
                     "payment_channel": "counter"},
                    command_id="sale-0001", channel="cli", now_ms=daemon.clock_ms(),
                    outbox=daemon.outbox,
                )
            assert res["status"] == "applied", res
            await until(lambda: not sim.meter(1).relay_open, 10, "restore after the top-up")
            # the same top-up again is a harmless duplicate
            async with daemon.outbox.transaction() as db:
                again = await daemon.prepaid.apply_topup_in(
                    db,
                    {"account": "acct-001", "amount_micro": 5_000_000, "purchase_counter": 1,
                     "payment_channel": "counter"},
                    command_id="sale-0001", channel="cli", now_ms=daemon.clock_ms(),
                    outbox=daemon.outbox,
                )
            assert again["status"] != "applied", again
        finally:
            stop.set()
            await asyncio.wait_for(run, 30)

    events = await outbox_bodies(tmp_path / "gw.db", "event")
    types = [e["type"] for e in events]
    assert "cutoff.action.trip" in types and "cutoff.action.close" in types, types
    relay_ops = [e for e in events if e["type"] == "relay.operation"]
    assert [e["want_open"] for e in relay_ops][:2] == [True, False]
    assert all(e["ok"] for e in relay_ops[:2]), relay_ops
    levels = [e["to"] for e in events if e["type"] == "cutoff.state_change"]
    assert levels[:2] == ["alarm1", "alarm2"], levels

    # money to the fen: every entry uploaded (the opening balance, the credit, every
    # debit) adds up to the ledger's balance, so central's copy starts where it does
    charges = await outbox_bodies(tmp_path / "gw.db", "charge")
    total = sum(int(c["amount_micro"]) for c in charges)  # type: ignore[call-overload]
    assert any(c["kind"] == "credit" for c in charges)
    opening = [c for c in charges if c["id"] == "adjust:opening:acct-001"]
    assert len(opening) == 1 and opening[0]["amount_micro"] == 300_000, opening
    with sqlite3.connect(tmp_path / "gw.db") as conn:
        (balance,) = conn.execute(
            "SELECT balance_micro FROM billing_account WHERE account = 'acct-001'"
        ).fetchone()
    assert balance == total


async def test_meter_alarm_follows_the_cutoff_policy_on_a_dlt645_meter(tmp_path: Path) -> None:
    """Alarm levels reach the meter itself (DL/T 645 2AH), then the trip (1AH)."""
    from testbed.simulators.dlt645 import Simulator, make_meters

    meters = make_meters(1)
    meters[0].load_kw = Decimal("150")  # ~0.023 yuan/s at 0.56/kWh
    async with Simulator(meters) as sim:
        port = await sim.start_tcp()
        path = config(tmp_path, port)
        text = path.read_text()
        modbus_meter = text[text.index("[[meter]]") : text.index("[[account]]")]
        path.write_text(
            text.replace(
                modbus_meter,
                f"""[[meter]]
id = "m001"
bus = "lan"
protocol = "dlt645"
address = "{meters[0].address}"
password = "{meters[0].password.hex()}"
quantities = ["energy_import_kwh", "relay_open"]
account = "acct-001"
[meter.relay]
kind = "dlt645"
min_interval_s = 0

""",
            )
        )
        cfg = load_config(path)
        daemon = Daemon(cfg)
        stop = asyncio.Event()
        run = asyncio.create_task(daemon.run(stop))
        try:
            await asyncio.wait_for(daemon.ready.wait(), 10)
            await until(lambda: meters[0].alarm, 30, "meter alarm at the first alarm level")
            assert not meters[0].relay_open
            await until(lambda: meters[0].relay_open, 30, "trip when the credit is gone")
        finally:
            stop.set()
            await asyncio.wait_for(run, 30)
    events = await outbox_bodies(tmp_path / "gw.db", "event")
    signals = [e for e in events if e["type"] == "meter.signal"]
    assert signals and signals[0]["signal"] == "alarm_on" and signals[0]["ok"] is True, signals
    assert signals[0]["account"] == "acct-001" and signals[0]["meter"] == "m001"

"""Relays whose state the meter's readings do not carry (a Modbus coil beside an
SDM120) are read back by the daemon, so a relay that differs from the committed
cutoff decision is re-driven: after a crash lost the operation, or after someone
moved the relay by hand."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.config import load_config
from gateway.daemon import Daemon
from gateway.database import open_database
from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import until
from tests.harness.site import gateway_config, meter, prepaid_account

ROOT = Path(__file__).resolve().parents[2]

def config(tmp: Path, modbus_port: int) -> Path:
    acct = prepaid_account(tmp, opening="0.05", alarm1="0.04", alarm2="0.02", close_permit="0.05")
    return gateway_config(
        tmp,
        "gw-readback",
        modbus_port=modbus_port,
        gateway={"timezone": "Asia/Shanghai"},
        meters=[meter(account="acct-001")],
        accounts=[acct],
    )


async def run_until(cfg_path: Path, cond: object, what: str) -> None:
    daemon = Daemon(load_config(cfg_path))
    stop = asyncio.Event()
    run = asyncio.create_task(daemon.run(stop))
    try:
        await asyncio.wait_for(daemon.ready.wait(), 10)
        await until(cond, 20, what)  # type: ignore[arg-type]
    finally:
        stop.set()
        await asyncio.wait_for(run, 30)


async def trip_events(db: Path) -> list[dict[str, object]]:
    ob = await open_database(db)
    try:
        seen: list[int] = []
        out = []
        while (batch := await ob.next_batch(0, exclude=seen, max_records=10_000)) is not None:
            seen.append(batch.seq)
            out += [r.body for r in batch.records if r.kind == "event" and r.body.get("type") == "cutoff.action.trip"]
        return out
    finally:
        await ob.close()


async def test_a_relay_closed_behind_the_policy_is_tripped_again_at_start(tmp_path: Path) -> None:
    async with ModbusSimulator(units=[1], load_kw="600") as sim:
        path = config(tmp_path, sim.port)
        meter = sim.meter(1)
        assert meter.profile.fields and "relay_open" not in {f.quantity for f in meter.profile.fields}
        await run_until(path, lambda: meter.relay_open, "trip when the credit is gone")
        meter.coils[0] = False  # closed by hand (or a close left over from a crash)
        meter.load_kw = meter.load_kw * 0  # nothing more to bill: the balance stays below zero
        await run_until(path, lambda: meter.relay_open, "the committed trip re-driven")
    trips = await trip_events(tmp_path / "gw.db")
    assert len(trips) == 2, trips
    assert "reported closed while the policy holds it open" in str(trips[1]["reason"]), trips

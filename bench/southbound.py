"""Southbound benchmark: how close the bus scheduler gets to the wire's limit.

Runs the real scheduler, transport and pymodbus client against the RTU
simulator on a pseudo-terminal with wire timing at the configured baud, and
against the TCP simulator, then prints one JSON document to stdout:

* ``rtu_healthy``: cycle time of N SDM120 meters vs the arithmetic minimum
  (Σ per request: (8 + 5 + 2N) chars × 11 bits / baud + 2·t3.5 + response delay);
* ``rtu_dead``: the same bus with some meters dead: the cost per cycle while
  they fail and after they are quarantined;
* ``rtu_outage``: every meter silent (supply outage in the area): the cost per
  cycle in silent-bus mode, and the first cycle after the supply returns;
* ``tcp``: reads per second over Modbus TCP (no wire limit; CPU and stack cost).

    python bench/southbound.py [--meters 8] [--baud 9600] [--cycles 5] [--dead 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from firmware_bridge.modbus.decode import plan_reads
from firmware_bridge.modbus.driver import ModbusDriver
from firmware_bridge.modbus.profiles import BUILTIN_PROFILES
from firmware_bridge.modbus.simulator import ModbusSimulator, RtuSimulator
from firmware_bridge.modbus.transport import ModbusTransport
from firmware_bridge.scheduler import (
    BackoffPolicy,
    BusScheduler,
    modbus_rtu_read_time_s,
    rtu_t35_s,
)

SDM120 = BUILTIN_PROFILES["sdm120"]


def wire_minimum_s(baud: int, meters: int, response_delay_s: float) -> float:
    blocks = plan_reads(SDM120.fields, SDM120.max_gap, SDM120.max_count)
    per_meter = sum(modbus_rtu_read_time_s(baud, b.count, response_delay_s) for b in blocks)
    return per_meter * meters


async def rtu_scenario(meters: int, baud: int, cycles: int, dead: int, response_delay_s: float, timeout_s: float) -> dict[str, Any]:
    units = list(range(1, meters + 1))
    async with RtuSimulator(units, baud=baud, wire_timing=True, response_delay_s=response_delay_s) as sim:
        transport = ModbusTransport.serial(sim.path, name="rtu", baud=baud, parity="N", stop_bits=1, timeout_s=timeout_s)
        try:
            drivers = [ModbusDriver(f"m{u}", u, SDM120, transport) for u in units]
            policy = BackoffPolicy(base_ms=0, max_ms=0, quarantine_after=2, reprobe_ms=3_600_000)
            sched = BusScheduler("rtu", drivers, silent_interval_s=rtu_t35_s(baud), timeout_s=timeout_s, retries=1, policy=policy)
            await sched.run_cycle(0)  # connect, warm up
            healthy = []
            for i in range(cycles):
                res = await sched.run_cycle((i + 1) * 1000)
                assert len(res.readings) == meters
                healthy.append(res.duration_s)
            for u in units[:dead]:
                sim.meter(u).dead = True
            failing = []
            for i in range(cycles + 2):
                res = await sched.run_cycle((cycles + i + 2) * 1000)
                failing.append({"duration_s": round(res.duration_s, 4), "readings": len(res.readings), "skipped": len(res.skipped)})
            # area supply outage: every meter silent, then the supply returns
            for u in units:
                sim.meter(u).dead = True
            outage = []
            base = (2 * cycles + 10) * 1000
            for i in range(4):
                res = await sched.run_cycle(base + i * 1000)
                outage.append({"duration_s": round(res.duration_s, 4), "bus_silent": res.bus_silent})
            for u in units:
                sim.meter(u).dead = False
            res = await sched.run_cycle(base + 5000)
            recovered = {"duration_s": round(res.duration_s, 4), "readings": len(res.readings), "bus_silent": res.bus_silent}
            snap = sched.metrics.snapshot(time.monotonic())
        finally:
            transport.close()
    minimum = wire_minimum_s(baud, meters, response_delay_s)
    best = min(healthy)
    return {
        "rtu_healthy": {
            "baud": baud,
            "meters": meters,
            "requests_per_meter": len(plan_reads(SDM120.fields, SDM120.max_gap, SDM120.max_count)),
            "wire_minimum_cycle_s": round(minimum, 4),
            "cycle_s_best": round(best, 4),
            "cycle_s_median": round(sorted(healthy)[len(healthy) // 2], 4),
            "efficiency": round(minimum / best, 3),
            "meter_reads_per_s": round(meters / best, 2),
        },
        "rtu_dead": {
            "dead_meters": dead,
            "timeout_s": timeout_s,
            "cycles_after_failure": failing,
            "metrics": snap,
        },
        "rtu_outage": {
            "cycles_during_outage": outage,
            "first_cycle_after_supply_returns": recovered,
        },
    }


async def tcp_scenario(meters: int, seconds: float) -> dict[str, Any]:
    units = list(range(1, meters + 1))
    async with ModbusSimulator(units) as sim:
        transport = ModbusTransport.tcp("127.0.0.1", sim.port, name="tcp", timeout_s=1.0)
        try:
            sched = BusScheduler("tcp", [ModbusDriver(f"m{u}", u, SDM120, transport) for u in units], timeout_s=1.0)
            reads = 0
            t0 = time.monotonic()
            i = 0
            while time.monotonic() - t0 < seconds:
                res = await sched.run_cycle(i)
                reads += len(res.readings)
                i += 1
            elapsed = time.monotonic() - t0
        finally:
            transport.close()
    return {"tcp": {"meters": meters, "seconds": round(elapsed, 3), "meter_reads_per_s": round(reads / elapsed, 1), "requests_per_s": round(transport.requests / elapsed, 1)}}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "benchmark": "southbound",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "profile": "sdm120",
    }
    out.update(await rtu_scenario(args.meters, args.baud, args.cycles, args.dead, args.response_delay, args.timeout))
    out.update(await tcp_scenario(args.meters, args.tcp_seconds))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--meters", type=int, default=8)
    p.add_argument("--baud", type=int, default=9600)
    p.add_argument("--cycles", type=int, default=5)
    p.add_argument("--dead", type=int, default=2)
    p.add_argument("--response-delay", type=float, default=0.005, help="simulated meter turnaround, seconds")
    p.add_argument("--timeout", type=float, default=0.3)
    p.add_argument("--tcp-seconds", type=float, default=3.0)
    args = p.parse_args()
    if not 0 <= args.dead <= args.meters:
        p.error("--dead must be between 0 and --meters")
    result = asyncio.run(main_async(args))
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fleet scale-out benchmark: N simulated gateways x 100 meters into mosquitto,
K headend processes sharing one subscription into PostgreSQL. Prints JSON.

    python bench/fleet.py                                   # N = 1000, 10000; K = 1, 2, 4
    python bench/fleet.py --gateways 1000 --headends 1 2 --window-s 30   # shorter
    python bench/fleet.py --gateways 1000 --repeat 3        # each K three times, median

Set-up (all real parts): mosquitto (testbed.broker, a plain listener on a free
loopback port); K ``edgegw headend run --dsn DSN --share fleet --key ...
--registry ...`` processes (each its own OS process with one PostgreSQL
connection, as an operator runs them); the PostgreSQL server at --dsn, a
fresh database for every (N, K); the fleet simulator (testbed.fleet_sim) in
this process: N gateways, each enrolled in the headend's registry with its
own key, multiplexed over --connections MQTT connections, at most --window
batches unacknowledged across the fleet.

Per (N, K): the gateways publish their retained births (every headend stores
every one); then the rounds are sent, and the measuring window opens after
--warmup-s (connections, caches, every headend busy) and closes after
--window-s or at the last ack, whichever is first: readings/s = readings
acknowledged in the window / its length (an ack is published only after the
batch's transaction committed). A round is one poll cycle: per gateway an
EVENT batch (its health record, and a command result from 1 in 100
gateways), a BILLING batch (100 meter readings: energy total and four rates)
and a TELEMETRY batch (100 records of instantaneous values), all sealed
before the headends start (encoding 2, the real encoder; in --seal-workers
processes). --rounds defaults to enough rounds for 300,000 readings. At the
end every reading in PostgreSQL is counted: none twice, every acknowledged one
present (all of them when the window ran to the last ack), or the run fails.

CPU: user + system seconds from /proc/PID/stat over the window, for each
headend process, mosquitto, this process (the simulator), the PostgreSQL
backends of the headends' connections and every PostgreSQL process of the
server (its WAL writer and checkpointer work for us too; on a shared machine
the server may also be serving others), and the whole machine from
/proc/stat. Scaling factor = readings/s with K headends / readings/s with one,
within the same run (with --repeat, of the median runs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from headend.registry import generate_headend_key  # noqa: E402
from testbed import fleet_sim  # noqa: E402
from testbed.broker import Mosquitto  # noqa: E402
from testbed.headend_proc import HeadendProcess  # noqa: E402

ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
TICK = os.sysconf("SC_CLK_TCK")
COMMAND_EVERY = 100  # one gateway in this many answers a command per round


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def postgres_cpu() -> dict[int, float]:
    """CPU seconds of every PostgreSQL server process on this machine, by PID."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if (d / "comm").read_text().strip() == "postgres":
                    out[int(d.name)] = cpu_s(int(d.name))
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU used between two snapshots by the processes alive at the second (a
    process that started in between counts whole; one that ended is lost)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def machine_busy_s() -> float:
    """CPU seconds the whole machine was busy (all cores), from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return (sum(f[:8]) - idle) / TICK


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def one(
    conn: psycopg.AsyncConnection[Any], q: str, args: tuple[Any, ...] = ()
) -> tuple[Any, ...]:
    row = await (await conn.execute(q, args)).fetchone()
    assert row is not None
    return tuple(row)


async def send_all(fleet: fleet_sim.Fleet, rounds: list[list[fleet_sim.SealedBatch]]) -> None:
    for r in rounds:
        await fleet.send(r)
    await fleet.drain(3600)


async def run_k(
    work: Path,
    a: argparse.Namespace,
    k: int,
    gateways: list[fleet_sim.SimGateway],
    rounds: list[list[fleet_sim.SealedBatch]],
    key: Path,
    registry: Path,
) -> dict[str, Any]:
    n = len(gateways)
    name = f"edgegw_fleet_{secrets.token_hex(4)}"
    admin = await psycopg.AsyncConnection.connect(a.dsn, autocommit=True)
    await admin.execute(f"CREATE DATABASE {name}")
    dsn = re.sub(r"dbname=\S+", f"dbname={name}", a.dsn)
    broker = Mosquitto.plain(work / f"broker-{n}-{k}")
    broker.start()
    heads: list[HeadendProcess] = []
    try:
        args = ["--broker", f"127.0.0.1:{broker.port}", "--dsn", dsn, "--share", "fleet",
                "--key", str(key), "--registry", str(registry)]  # fmt: skip
        heads = [HeadendProcess(work / f"headend-{n}-{k}-{i}.log", args) for i in range(k)]
        deadline = time.monotonic() + 60
        while not all(h.subscribed() for h in heads):
            if time.monotonic() > deadline or any(h.proc.poll() is not None for h in heads):
                raise RuntimeError(
                    "headends did not subscribe: " + heads[0].log.read_text()[-2000:]
                )
            await asyncio.sleep(0.1)
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async with fleet_sim.Fleet(
            gateways, "127.0.0.1", broker.port, connections=a.connections, window=a.window,
            ack_timeout_s=a.ack_timeout_s,
        ) as fleet:  # fmt: skip
            await fleet.birth()
            deadline = time.monotonic() + 600
            while (await one(conn, "SELECT count(*) FROM fleet_presence"))[0] < n:
                if time.monotonic() > deadline:
                    raise RuntimeError("presence not stored within 600 s")
                await asyncio.sleep(0.5)
            sender = asyncio.create_task(send_all(fleet, rounds))
            # the measuring window opens after --warmup-s (connections, caches, the first
            # batches of every gateway) and closes after --window-s or at the last ack
            await asyncio.wait({sender}, timeout=a.warmup_s)
            backends = [
                r[0]
                for r in await (
                    await conn.execute(
                        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                        (name,),
                    )
                ).fetchall()
            ]
            pids = [h.proc.pid for h in heads]
            assert broker.proc is not None
            load0 = os.getloadavg()

            def snapshot() -> dict[str, Any]:
                assert broker.proc is not None
                return {
                    "headends": [cpu_s(p) for p in pids],
                    "mosquitto": cpu_s(broker.proc.pid),
                    "simulator": self_cpu_s(),
                    "pg_backends": sum(cpu_s(p) for p in backends),
                    "pg_all": postgres_cpu(),
                    "machine": machine_busy_s(),
                    "readings": fleet.stats.readings_acked,
                    "records": fleet.stats.records_acked,
                    "batches": fleet.stats.acked,
                    "stored": [h.metric("edgegw_headend_records_stored_total") for h in heads],
                    "t": time.monotonic(),
                }

            c0 = snapshot()
            if sender.done():
                raise RuntimeError(
                    f"all sent within the warm-up of {a.warmup_s} s: send more rounds"
                )
            await asyncio.wait({sender}, timeout=a.window_s or None)
            c1 = snapshot()
            complete = sender.done()
            if complete:
                sender.result()
            else:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            stats = fleet.stats.as_dict()
        elapsed = c1["t"] - c0["t"]
        readings = c1["readings"] - c0["readings"]
        records = c1["records"] - c0["records"]
        total = n * a.meters * len(rounds)
        stored = await one(
            conn,
            "SELECT count(*), count(DISTINCT (gateway_id, epoch, record_id)),"
            " count(DISTINCT (gateway_id, meter_id, time_ms)) FROM readings",
        )
        await conn.close()
        # exactly once: no reading twice; every acked reading stored (all of them
        # when the window ran to the end; else at most a window of batches more)
        if (
            len(set(stored)) != 1
            or stored[0] < stats["readings_acked"]
            or (complete and stored[0] != total)
        ):
            raise RuntimeError(
                f"not exactly once: readings {stored}, expected {total}; acks {stats}"
            )
        if set(stats["statuses"]) - {"stored"} or stats["bad_acks"]:
            raise RuntimeError(f"acks other than stored: {stats}")
        he_cpu = [round(b - a_, 2) for a_, b in zip(c0["headends"], c1["headends"], strict=True)]
        he_total = sum(he_cpu)
        pg_b = c1["pg_backends"] - c0["pg_backends"]
        return {
            "headends": k,
            "readings": readings,
            "records": records,
            "batches": c1["batches"] - c0["batches"],
            "window_ran_to_last_ack": complete,
            "seconds": round(elapsed, 2),
            "readings_per_s": round(readings / elapsed, 1),
            "records_per_s": round(records / elapsed, 1),
            "headend_cpu_s": he_cpu,
            "headend_cpu_share_of_a_core": [round(c / elapsed, 2) for c in he_cpu],
            "headend_records_stored": [
                int(b - a_) for a_, b in zip(c0["stored"], c1["stored"], strict=True)
            ],
            "readings_per_headend_cpu_s": round(readings / he_total, 1),
            "readings_per_headend_and_pg_backend_cpu_s": round(readings / (he_total + pg_b), 1),
            "postgres_backends_cpu_s": round(pg_b, 2),
            "postgres_all_cpu_s": round(cpu_delta(c0["pg_all"], c1["pg_all"]), 2),
            "mosquitto_cpu_s": round(c1["mosquitto"] - c0["mosquitto"], 2),
            "simulator_cpu_s": round(c1["simulator"] - c0["simulator"], 2),
            "machine_busy_cpu_s": round(c1["machine"] - c0["machine"], 2),
            "machine_cpu_capacity_s": round(elapsed * (os.cpu_count() or 1), 2),
            "loadavg_before": [round(x, 2) for x in load0],
            "retransmits": stats["retransmits"],
            "bad_acks": stats["bad_acks"],
        }
    finally:
        for h in heads:
            h.stop()
        broker.stop()
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def run_n(work: Path, a: argparse.Namespace, n: int) -> dict[str, Any]:
    key = work / f"headend-{n}.pem"
    public = generate_headend_key(key)
    registry = work / f"registry-{n}"
    t = time.monotonic()
    gateways = fleet_sim.provision(n, registry, public, seed=n)
    provision_s = time.monotonic() - t
    spec = fleet_sim.FleetSpec(meters=a.meters, telemetry=not a.no_telemetry, seed=n)
    commands = {g.gateway_id: [f"cmd-{g.index}"] for g in gateways[::COMMAND_EVERY]}
    n_rounds = a.rounds or -(-300_000 // (n * a.meters))
    t = time.monotonic()
    rounds = fleet_sim.seal_rounds(
        gateways, spec, n_rounds, commands=commands, workers=a.seal_workers
    )
    seal_s = time.monotonic() - t
    payload = sum(len(b.payload) for r in rounds for b in r)
    each: dict[int, list[dict[str, Any]]] = {k: [] for k in a.headends}
    for _ in range(a.repeat):  # K interleaved, so that a busy spell of the machine hits them all
        for k in a.headends:
            r = await run_k(work, a, k, gateways, rounds, key, registry)
            each[k].append(r)
            print(f"N={n} K={k}: {r['readings_per_s']} readings/s", file=sys.stderr, flush=True)
    runs = []
    for k in a.headends:
        median = sorted(each[k], key=lambda r: r["readings_per_s"])[len(each[k]) // 2]
        runs.append(
            {**median, "readings_per_s_each_repeat": [r["readings_per_s"] for r in each[k]]}
        )
    base = next((r for r in runs if r["headends"] == 1), None)
    for r in runs:
        r["scaling_factor"] = (
            round(r["readings_per_s"] / base["readings_per_s"], 2) if base else None
        )
    return {
        "gateways": n,
        "meters_per_gateway": a.meters,
        "rounds": n_rounds,
        "warmup_s": a.warmup_s,
        "window_s": a.window_s,
        "repeats": a.repeat,
        "readings_per_round": n * a.meters,
        "provision_s": round(provision_s, 1),
        "seal_s": round(seal_s, 1),
        "payload_bytes_per_reading": round(payload / (n * a.meters * len(rounds)), 1),
        "runs": runs,
    }


async def main(a: argparse.Namespace) -> dict[str, Any]:
    async with await psycopg.AsyncConnection.connect(a.dsn, autocommit=True) as c:
        settings = {
            s: (await one(c, f"SHOW {s}"))[0]
            for s in ("server_version", "synchronous_commit", "fsync", "shared_buffers")
        }
    out: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "note": "mosquitto, PostgreSQL, the simulator and the K headends all share these cores",
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "postgresql": settings,
        "connections": a.connections,
        "window": a.window,
        "telemetry": not a.no_telemetry,
        "fleets": [],
    }
    with tempfile.TemporaryDirectory(prefix="edgegw-bench-fleet-") as tmp:
        for n in a.gateways:
            out["fleets"].append(await run_n(Path(tmp), a, n))
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--gateways", type=int, nargs="+", default=[1000, 10000], metavar="N")
    p.add_argument("--headends", type=int, nargs="+", default=[1, 2, 4], metavar="K")
    p.add_argument("--meters", type=int, default=100, help="meters per gateway")
    p.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="poll rounds sent (default: enough for 300,000 readings)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each K (interleaved); the median run is shown",
    )
    p.add_argument("--warmup-s", type=float, default=15.0, help="before the window opens")
    p.add_argument(
        "--window-s", type=float, default=120.0, help="the measuring window at most (0: to the end)"
    )
    p.add_argument(
        "--no-telemetry", action="store_true", help="registers only, no instantaneous values"
    )
    p.add_argument("--connections", type=int, default=16, help="MQTT connections of the simulator")
    p.add_argument(
        "--window", type=int, default=256, help="unacknowledged batches across the fleet"
    )
    p.add_argument("--ack-timeout-s", type=float, default=120.0)
    p.add_argument("--seal-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--dsn", default=ADMIN_DSN, help="PostgreSQL to create the bench databases in")
    print(json.dumps(asyncio.run(main(p.parse_args())), indent=2))

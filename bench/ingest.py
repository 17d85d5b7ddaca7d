"""Headend ingest benchmark: readings stored per headend CPU-second while a
backlog drains through mosquitto, on SQLite and on PostgreSQL, against a
baseline commit measured in the same run. Prints JSON.

    python bench/ingest.py                        # 1,000,000 readings, both stores
    python bench/ingest.py --readings 100000 --stores sqlite
    python bench/ingest.py --readings 100000 --profile /tmp/prof   # cProfile the headends

Set-up (all real parts, loopback only): the backlog is made once, the way
bench/uplink.py makes it (200 meters polled every 15 minutes, 6 quantities per
reading, each reading a billing and a telemetry record, committed one poll
cycle per transaction into a real outbox) and copied for every run. Each run
starts its own mosquitto (testbed/broker.py), a headend in a child process
(sealed encoding 2 with a gateway registry; a SQLite file, or a fresh
PostgreSQL database at ``--dsn``), and drains the copy with the real uplink in
this process, without a link emulator, until the outbox is empty (every batch
stored and acked). Then it checks that every reading and telemetry record is at
the headend exactly once.

CPU is read from ``/proc/PID/stat`` (user + system) of the headend process,
of mosquitto and (for PostgreSQL) of the headend's server backend, from when
the headend is subscribed until the outbox is empty; the gateway side is this
process (outbox + uplink: sealing, compression, MQTT). The baseline is the
same bench driving the headend code of ``--baseline`` (a commit of this
repository, extracted with ``git archive``): the headend child puts that tree
first on ``sys.path``. Baseline and current runs alternate per store, so both
see the same load.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The headend child runs the code of the tree named here (the baseline's or ours).
CODE = Path(os.environ.get("EDGEGW_BENCH_CODE") or ROOT)
sys.path.insert(0, str(CODE))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

BASELINE = "a719275"  # the headend before batched ingest
DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (threads included, children not), or of
    one of its threads."""
    return sum(user_sys_s(pid, tid))


def user_sys_s(pid: int, tid: int | None = None) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def thread_cpu_s(pid: int) -> dict[int, tuple[str, float]]:
    """Per thread of a process: (name, user + system CPU seconds)."""
    out = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as f:
                name = f.read().strip()
            out[int(task)] = (name, cpu_s(pid, int(task)))
        except (OSError, ValueError):
            continue  # ended meanwhile
    return out


def thread_split(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], main: int) -> dict[str, float]:
    """CPU seconds per thread between two readings: the main thread (event loop:
    MQTT, decoding, rows) and the others by name (aiosqlite's connection thread runs
    SQLite)."""
    out: dict[str, float] = {}
    for tid, (name, c1) in after.items():
        key = "main" if tid == main else name
        out[key] = round(out.get(key, 0.0) + c1 - before.get(tid, (name, 0.0))[1], 2)
    return out


# --------------------------------------------------------------------------- child: the headend


async def headend_child(port: int, target: str, key: str, registry: str, profile: str) -> None:
    from headend.ingest import Headend
    from headend.registry import GatewayRegistry, load_headend_key

    reg = GatewayRegistry.load(load_headend_key(key), registry)
    backend = 0
    hdb: Any
    if target.startswith("postgresql:"):
        from headend.store_pg import PostgresHeadendDB

        hdb = await PostgresHeadendDB.open(target)
        cur = await hdb._conn.execute("SELECT pg_backend_pid()")
        row = await cur.fetchone()
        await hdb._conn.commit()
        backend = int(row[0])
    else:
        from headend.store import HeadendDB

        hdb = await HeadendDB.open(target)
    he = Headend(hdb, host="127.0.0.1", port=port, registry=reg)
    task = asyncio.create_task(he.run())
    await asyncio.wait_for(he.connected.wait(), 30)
    import headend.ingest

    print(
        json.dumps({"backend_pid": backend, "code": str(Path(headend.ingest.__file__).parents[1])}),
        flush=True,
    )
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile(time.thread_time)  # the event loop thread's CPU, not waits
        prof.enable()
    await asyncio.get_running_loop().run_in_executor(
        None, sys.stdin.read
    )  # until the parent closes it
    if prof is not None:
        prof.disable()
        prof.dump_stats(profile)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await hdb.close()


# --------------------------------------------------------------------------- parent


async def fill(path: Path, readings: int) -> dict[str, Any]:
    from bench.uplink import INTERVAL_MS, START_MS, Site
    from store_forward.outbox import Outbox, StoragePolicy

    site = Site()
    # a ceiling that holds all of it (the default would shed telemetry)
    ob = await Outbox.open(path, policy=StoragePolicy(max_bytes=8 << 30, reserve_bytes=64 << 20))
    t0 = time.monotonic()
    cycles = readings // site.meters
    for k in range(cycles):
        await ob.commit_cycle(START_MS + k * INTERVAL_MS, site.cycle(k))
    await ob.close()
    return {"readings": cycles * site.meters, "fill_s": round(time.monotonic() - t0, 1)}


def copy_db(src: Path, dst: Path) -> None:
    """The outbox database and its companions (WAL, key file)."""
    for s in src.parent.glob(src.name + "*"):
        shutil.copy(s, dst.parent / (dst.name + s.name[len(src.name) :]))  # with its mode


async def pg_database(admin_dsn: str, name: str, *, drop: bool) -> str:
    import psycopg

    async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as conn:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        if not drop:
            await conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = admin_dsn.rpartition("/")
    return f"{base}/{name}"


async def count_rows(target: str) -> tuple[int, int]:
    if target.startswith("postgresql:"):
        import psycopg

        async with await psycopg.AsyncConnection.connect(target) as conn:
            cur = await conn.execute(
                "SELECT (SELECT count(*) FROM readings), (SELECT count(*) FROM telemetry)"
            )
            row = await cur.fetchone()
    else:
        import sqlite3

        with contextlib.closing(sqlite3.connect(target)) as db:
            row = db.execute(
                "SELECT (SELECT count(*) FROM readings), (SELECT count(*) FROM telemetry)"
            ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def drain_once(
    work: Path, template: Path, code: Path, store: str, args: argparse.Namespace, tag: str
) -> dict[str, Any]:
    from bench.uplink import GATEWAY
    from store_forward.codec import SealedCodec
    from store_forward.outbox import Outbox, StoragePolicy
    from store_forward.settings import BrokerSettings, UplinkSettings
    from store_forward.uplink import Uplink
    from testbed.broker import Mosquitto

    run = work / tag
    run.mkdir()
    copy_db(template, run / "gw.db")
    if store == "postgres":
        target = await pg_database(args.dsn, f"edgegw_bench_ingest_{os.getpid()}_{tag}", drop=False)
    else:
        target = str(run / "central.db")
    codec_args = json.loads((work / "codec.json").read_text())
    codec = SealedCodec(codec_args["key_id"], bytes.fromhex(codec_args["key"]))
    profile = str(Path(args.profile) / f"{tag}.prof") if args.profile else ""
    async with Mosquitto(run / "broker", extra_conf=f"max_packet_size {4 << 20}\n") as broker:
        assert broker.proc is not None
        child = subprocess.Popen(  # noqa: ASYNC220 - a long-lived process, started once per run
            [sys.executable, __file__, "headend", str(broker.port), target, str(work / "headend.pem"),
             str(work / "registry"), profile],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=code,
            env=os.environ | {"EDGEGW_BENCH_CODE": str(code)},
        )  # fmt: skip
        assert child.stdout is not None and child.stdin is not None
        hello = json.loads(
            await asyncio.get_running_loop().run_in_executor(None, child.stdout.readline)
        )
        if hello["code"] != str(code):
            raise RuntimeError(f"headend ran the code in {hello['code']}, not {code}")
        policy = StoragePolicy(max_bytes=8 << 30, reserve_bytes=64 << 20)
        ob = await Outbox.open(run / "gw.db", policy=policy)
        waiting0, _, _ = await ob.depth()
        settings = UplinkSettings(reconnect_min_s=0.5, reconnect_max_s=5.0)
        up = Uplink(
            ob, gateway_id=GATEWAY, broker=BrokerSettings(port=broker.port, keepalive_s=60),
            settings=settings, codec=codec,
        )  # fmt: skip
        pids = {"headend": child.pid, "broker": broker.proc.pid}
        if hello["backend_pid"]:
            pids["postgres_backend"] = hello["backend_pid"]
        c0 = {k: cpu_s(p) for k, p in pids.items()}
        th0 = thread_cpu_s(child.pid)
        us0 = user_sys_s(child.pid)
        g0, t0 = time.process_time(), time.monotonic()
        task = asyncio.create_task(up.run())
        deadline = t0 + args.timeout_s
        try:
            while True:
                await asyncio.sleep(0.5)
                waiting, _, _ = await ob.depth()
                if waiting == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{tag}: {waiting} records still waiting after {args.timeout_s} s"
                    )
            elapsed = time.monotonic() - t0
            gw_cpu = time.process_time() - g0
            c1 = {k: cpu_s(p) for k, p in pids.items()}
            th1 = thread_cpu_s(child.pid)
            us1 = user_sys_s(child.pid)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await ob.close()
            child.stdin.close()
            await asyncio.get_running_loop().run_in_executor(None, child.wait, 60)
    readings, telemetry = await count_rows(target)
    if store == "postgres":
        await pg_database(args.dsn, f"edgegw_bench_ingest_{os.getpid()}_{tag}", drop=True)
    shutil.rmtree(run, ignore_errors=True)
    expected = waiting0 // 2
    if readings != expected or telemetry != expected:
        raise RuntimeError(
            f"{tag}: headend holds {readings} readings, {telemetry} telemetry; expected {expected}"
        )
    cpu = {k: round(c1[k] - c0[k], 2) for k in pids}
    return {
        "readings": readings,
        "telemetry_records": telemetry,
        "drain_s": round(elapsed, 1),
        "readings_per_s": round(readings / elapsed),
        "headend_cpu_s": cpu["headend"],
        "headend_cpu_share_of_core": round(cpu["headend"] / elapsed, 2),
        "headend_cpu_s_by_thread": thread_split(th0, th1, child.pid),
        "headend_cpu_s_user_system": [round(us1[0] - us0[0], 2), round(us1[1] - us0[1], 2)],
        "readings_per_headend_cpu_s": round(readings / cpu["headend"]) if cpu["headend"] else None,
        "gateway_cpu_s": round(gw_cpu, 2),
        "gateway_cpu_share_of_core": round(gw_cpu / elapsed, 2),
        "broker_cpu_s": cpu["broker"],
        **(
            {"postgres_backend_cpu_s": cpu["postgres_backend"]} if "postgres_backend" in cpu else {}
        ),
        "batches": up.stats.published,
        "retransmits": up.stats.retransmits,
    }


def ratio(best: dict[str, dict[str, Any]], key: str) -> float | None:
    """Current ÷ baseline; None where either is missing (a tiny run may not reach one
    CPU tick)."""
    before, after = best["baseline"][key], best["current"][key]
    return round(after / before, 2) if before and after else None


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": os.cpu_count(), "python": sys.version.split()[0]}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from bench.uplink import make_keys

    out: dict[str, Any] = {"machine": machine(), "load_avg_start": os.getloadavg()}
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgegw-bench-ingest-") as tmp:
        work = Path(tmp)
        codec, _, _ = make_keys(work)
        (work / "codec.json").write_text(
            json.dumps({"key_id": codec.key_id, "key": codec._key.hex()})
        )
        if args.baseline_code:
            base = Path(args.baseline_code)
            out["baseline_commit"] = args.baseline_code
        else:
            base = work / "baseline-code"
            base.mkdir()
            archive = subprocess.run(  # noqa: ASYNC221 - before anything runs
                ["git", "-C", str(ROOT), "archive", args.baseline], capture_output=True, check=True
            )
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)  # noqa: ASYNC221
            out["baseline_commit"] = subprocess.run(  # noqa: ASYNC221
                ["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline],
                capture_output=True, text=True,
            ).stdout.strip()  # fmt: skip
        out["current_commit"] = subprocess.run(  # noqa: ASYNC221
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        template = work / "backlog.db"
        print(f"filling a backlog of {args.readings} readings", file=sys.stderr)
        out["backlog"] = await fill(template, args.readings)
        for store in args.stores.split(","):
            res: dict[str, list[dict[str, Any]]] = {"baseline": [], "current": []}
            for i in range(args.repeat):
                for variant, code in (("baseline", base), ("current", ROOT)):
                    tag = f"{store}-{variant}-{i}"
                    print(f"draining: {tag}", file=sys.stderr)
                    r = await drain_once(work, template, code, store, args, tag)
                    print(json.dumps(r), file=sys.stderr)
                    res[variant].append(r)
            best = {
                v: max(rs, key=lambda r: r["readings_per_headend_cpu_s"] or 0)
                for v, rs in res.items()
            }

            out[store] = {
                "baseline": res["baseline"] if args.repeat > 1 else res["baseline"][0],
                "current": res["current"] if args.repeat > 1 else res["current"][0],
                "ratio_readings_per_headend_cpu_s": ratio(best, "readings_per_headend_cpu_s"),
                "ratio_readings_per_s": ratio(best, "readings_per_s"),
            }
    out["load_avg_end"] = os.getloadavg()
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "headend":
        p, target, key, registry, profile = sys.argv[2:7]
        asyncio.run(headend_child(int(p), target, key, registry, profile))
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--readings", type=int, default=1_000_000, help="backlog size (multiple of 200)"
    )
    ap.add_argument("--stores", default="sqlite,postgres", help="sqlite, postgres or both")
    ap.add_argument("--dsn", default=DSN, help="PostgreSQL server (a database is created per run)")
    ap.add_argument("--baseline", default=BASELINE, help="commit whose headend is the baseline")
    ap.add_argument("--baseline-code", default="", help="a tree to run as the baseline instead")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each variant per store")
    ap.add_argument("--timeout-s", type=float, default=3600.0, help="longest drain allowed")
    ap.add_argument("--profile", default="", help="directory for cProfile output of each headend")
    a = ap.parse_args()
    print(json.dumps(asyncio.run(main(a)), indent=2))

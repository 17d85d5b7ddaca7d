"""Uplink benchmark: wire bytes per reading, backlog drain over a slow link,
disk bytes written per reading, peak RSS with a large buffer. Prints JSON.

    python bench/uplink.py                       # full run (7-day backlog, 1 M readings RSS)
    python bench/uplink.py --days 1 --rss-readings 100000   # quicker

Set-up (all real parts): the gateway side — sealed outbox (SQLite, WAL,
synchronous=FULL) and uplink (sealed encoding 2) — runs in this process; the
reference headend (SQLite, gateway registry) runs in a child process, which
starts the MQTT broker (mosquitto via testbed.broker: a plain listener on a
free loopback port); between them the link emulator
(40 kbit/s each way, 150 ms one way = 300 ms round trip).

Backlog: 200 meters polled every 15 minutes for 7 days = 134,400 readings of
6 quantities (energy, voltage, current, power, power factor, frequency) —
each stored as a BILLING record (energy) and a TELEMETRY record (the rest).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from firmware_bridge.reading import Measurement, Quality, Quantity, Reading  # noqa: E402
from gateway.config import BrokerSection, UplinkSection  # noqa: E402
from headend.registry import generate_headend_key  # noqa: E402
from provisioning.keys import Keystore  # noqa: E402
from store_forward.codec import SealedCodec  # noqa: E402
from store_forward.outbox import Outbox, StoragePolicy  # noqa: E402
from store_forward.records import Record, split_reading  # noqa: E402
from store_forward.uplink_keys import gateway_uplink_key  # noqa: E402

GATEWAY = "gw-bench"
EPOCH = "0be0c4e5a11ba7c4"  # batch epoch of the size measurements
METERS = 200
INTERVAL_MS = 900_000
START_MS = 1_732_400_000_000


def io_written() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


class Site:
    """Readings as a 200-meter poller produces them (see tests/store_forward/test_wire.py)."""

    def __init__(self, meters: int = METERS, seed: int = 7) -> None:
        self.rnd = random.Random(seed)
        self.meters = meters
        self.energy = [self.rnd.randint(100_00, 9_000_00) for _ in range(meters)]
        self.volts = [self.rnd.uniform(222, 238) for _ in range(meters)]
        self.freq = 50.0

    def cycle(self, k: int) -> list[Reading]:
        rnd = self.rnd
        out = []
        base = START_MS + k * INTERVAL_MS
        for i in range(self.meters):
            t = base + i * 1_100 + rnd.randint(0, 400)
            step = rnd.randint(10, 200)
            self.energy[i] += step
            self.volts[i] = min(245.0, max(215.0, self.volts[i] + rnd.gauss(0, 1.5)))
            v = round(self.volts[i], 1)
            p = step * 4 / 100 * rnd.uniform(0.6, 1.4)
            pf = rnd.uniform(0.80, 0.99)
            self.freq = min(50.2, max(49.8, self.freq + rnd.gauss(0, 0.01)))
            vq = Quality.SUSPECT if rnd.random() < 0.01 else Quality.GOOD
            out.append(
                Reading(
                    f"0000{410_000 + i:08d}",
                    t,
                    {
                        Quantity.ENERGY_IMPORT: Measurement(Decimal(self.energy[i]).scaleb(-2)),
                        Quantity.VOLTAGE: Measurement(Decimal(f"{v:.1f}"), vq),
                        Quantity.CURRENT: Measurement(Decimal(f"{p * 1000 / (v * pf):.3f}")),
                        Quantity.POWER: Measurement(Decimal(f"{p:.4f}")),
                        Quantity.POWER_FACTOR: Measurement(Decimal(f"{pf:.3f}")),
                        Quantity.FREQUENCY: Measurement(Decimal(f"{self.freq:.2f}")),
                    },
                )
            )
        return out


def make_keys(work: Path) -> tuple[SealedCodec, Path, Path]:
    ks = Keystore.init(work / "keys", GATEWAY)
    key_path = work / "headend.pem"
    pub = generate_headend_key(key_path)
    reg = work / "registry"
    reg.mkdir()
    (reg / f"{GATEWAY}.json").write_bytes(orjson.dumps(ks.export_public()))
    k = gateway_uplink_key(ks, pub)
    return SealedCodec(k.key_id, k.key), key_path, reg


# --------------------------------------------------------------------------- child: broker + headend


async def headend_child(db: str, key: str, registry: str) -> None:
    from headend.ingest import Headend
    from headend.registry import GatewayRegistry, load_headend_key
    from headend.store import HeadendDB
    from testbed.broker import Mosquitto

    reg = GatewayRegistry.load(load_headend_key(key), registry)
    hdb = await HeadendDB.open(db)
    broker_dir = Path(db).parent / "broker"
    async with Mosquitto(broker_dir, extra_conf=f"max_packet_size {4 << 20}\n") as broker:
        he = Headend(hdb, host="127.0.0.1", port=broker.port, registry=reg)
        task = asyncio.create_task(he.run())
        await he.connected.wait()
        print(broker.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until parent closes
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await hdb.close()


# --------------------------------------------------------------------------- parts


async def fill(ob: Outbox, site: Site, cycles: int) -> dict[str, float]:
    w0, t0 = io_written(), time.monotonic()
    for k in range(cycles):
        await ob.commit_cycle(START_MS + k * INTERVAL_MS, site.cycle(k))
    await ob.close()  # includes the final checkpoint
    readings = cycles * site.meters
    return {
        "readings": readings,
        "disk_bytes_written_per_reading": round((io_written() - w0) / readings, 1),
        "commit_s_per_cycle_of_200": round((time.monotonic() - t0) / cycles, 4),
    }


def live_bytes(codec: SealedCodec) -> dict[str, float]:
    """One poll cycle (200 readings) as it is sent live: a billing and a telemetry batch."""
    site = Site(seed=11)
    site.cycle(0)
    readings = site.cycle(1)
    by_cls: dict[int, list[Record]] = {}
    rid = 1
    for r in readings:
        for cls, body in split_reading(r):
            by_cls.setdefault(int(cls), []).append(Record(rid, cls, "reading", r.time_ms, body))
            rid += 1
    sizes = {c: len(codec.encode(GATEWAY, 10 + c, recs, epoch=EPOCH)) for c, recs in by_cls.items()}
    total = sum(sizes.values())
    return {
        "payload_bytes_per_reading": round(total / len(readings), 2),
        "billing_batch_bytes": sizes.get(1, 0),
        "telemetry_batch_bytes": sizes.get(2, 0),
        # MQTT PUBLISH header (fixed 1 + length 3 + topic 2+20 + packet id 2) per batch
        "mqtt_bytes_per_reading": round((total + 2 * 28) / len(readings), 2),
    }


async def drain(
    work: Path, codec: SealedCodec, key_path: Path, reg: Path, rate_bps: int, latency_s: float
) -> dict[str, Any]:
    from store_forward.uplink import Uplink
    from testbed.linkemu import LinkEmulator

    central = work / "central.db"
    child = subprocess.Popen(  # noqa: ASYNC220 - a long-lived helper, started once
        [sys.executable, __file__, "headend", str(central), str(key_path), str(reg)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    assert child.stdout is not None and child.stdin is not None
    port = int(child.stdout.readline())
    ob = await Outbox.open(work / "gw.db")
    st0 = await ob.stats()
    settings = UplinkSection(
        batch_max_records=5000, batch_max_bytes=64 * 1024, ack_timeout_s=20.0, window=4,
        reconnect_min_s=0.5, reconnect_max_s=5.0,
    )
    events: dict[int, float] = {}
    latencies: list[float] = []
    try:
        async with LinkEmulator("127.0.0.1", port, rate_bps=rate_bps, latency_s=latency_s) as link:
            up = Uplink(
                ob, gateway_id=GATEWAY, broker=BrokerSection(port=link.port, keepalive_s=60),
                settings=settings, codec=codec,
            )
            t0 = time.monotonic()
            task = asyncio.create_task(up.run())
            next_event = t0 + 20.0
            n_event = 0
            while True:
                await asyncio.sleep(0.5)
                now = time.monotonic()
                if now >= next_event and n_event < 8:
                    events[n_event] = now
                    await ob.add_event(int(time.time() * 1000), {"type": "bench_live", "n": n_event})
                    up.notify()
                    n_event += 1
                    next_event = now + 30.0
                if events:
                    with contextlib.closing(sqlite3.connect(f"file:{central}?mode=ro", uri=True)) as db:
                        for (body,) in db.execute("SELECT body FROM events WHERE body LIKE '%bench_live%'"):
                            n = orjson.loads(body)["n"]
                            if n in events:
                                latencies.append(time.monotonic() - events.pop(n))
                st = await ob.stats()
                if st.records == 0 and not events:
                    break
            elapsed = time.monotonic() - t0
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            ls = link.stats
    finally:
        await ob.close()
        child.stdin.close()
        child.wait(30)
    payload = up.stats.bytes_sent
    capacity = rate_bps / 8
    with contextlib.closing(sqlite3.connect(central)) as db:
        (n_read,) = db.execute("SELECT count(*) FROM readings").fetchone()
        (n_tel,) = db.execute("SELECT count(*) FROM telemetry").fetchone()
    readings = st0.readings
    return {
        "readings": readings,
        "headend_readings": n_read,
        "headend_telemetry_records": n_tel,
        "link_rate_bps": rate_bps,
        "round_trip_s": 2 * latency_s,
        "drain_s": round(elapsed, 1),
        "payload_bytes": payload,
        "payload_bytes_per_reading": round(payload / readings, 2),
        "tcp_up_bytes": ls.up_bytes,
        "tcp_up_bytes_per_reading": round(ls.up_bytes / readings, 2),
        "tcp_down_bytes": ls.down_bytes,
        "ratio_to_payload_at_capacity": round(elapsed / (payload / capacity), 3),
        "ratio_to_tcp_at_capacity": round(elapsed / (ls.up_bytes / capacity), 3),
        "batches": up.stats.published,
        "retransmits": up.stats.retransmits,
        "connects": up.stats.connects,
        "final_batch_bytes": up.stats.batch_bytes,
        "final_window": up.stats.window,
        "live_event_latency_s": [round(x, 2) for x in latencies],
    }


async def rss_child(work: Path, readings: int) -> dict[str, Any]:
    site = Site()
    # A ceiling that holds all of it (the default 256 MiB would shed telemetry).
    policy = StoragePolicy(max_bytes=4 << 30, reserve_bytes=64 << 20)
    ob = await Outbox.open(work / "gw.db", policy=policy)
    cycles = readings // site.meters
    for k in range(cycles):
        await ob.commit_cycle(START_MS + k * INTERVAL_MS, site.cycle(k))
    await ob.close()
    fill_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # restart with the buffer full (quick_check, epoch) and make batches as the uplink does
    t0 = time.monotonic()
    ob = await Outbox.open(work / "gw.db", policy=policy)
    open_s = time.monotonic() - t0
    codec_key = os.urandom(32)
    codec = SealedCodec(1, codec_key)
    seen: list[int] = []
    try:
        for _ in range(10):  # as many batches as the buffer holds, ten at most
            b = await ob.next_batch(
                1, exclude=seen, max_records=5000, max_bytes=64 * 1024,
                pack=functools.partial(codec.pack, GATEWAY),
            )
            if b is None:
                break
            seen.append(b.seq)
        st = await ob.stats()
    finally:
        await ob.close()
    return {
        "batches_made": len(seen),
        "buffered_readings": st.readings,
        "db_bytes": (work / "gw.db").stat().st_size,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_mb_while_filling": round(fill_rss / 1024, 1),
        "open_with_quick_check_s": round(open_s, 1),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgegw-bench-") as tmp:
        work = Path(tmp)
        codec, key_path, reg = make_keys(work)
        out["live"] = live_bytes(codec)
        cycles = args.days * 96
        ob = await Outbox.open(work / "gw.db")
        out["disk"] = await fill(ob, Site(), cycles)
        out["backlog_drain"] = await drain(work, codec, key_path, reg, args.rate_bps, args.latency_s)
    if args.rss_readings:
        with tempfile.TemporaryDirectory(prefix="edgegw-bench-rss-") as tmp:
            r = subprocess.run(  # noqa: ASYNC221 - nothing else runs meanwhile
                [sys.executable, __file__, "rss", tmp, str(args.rss_readings)],
                capture_output=True, text=True, cwd=ROOT, check=True,
            )
            out["rss"] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "headend":
        asyncio.run(headend_child(*sys.argv[2:5]))
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "rss":
        print(json.dumps(asyncio.run(rss_child(Path(sys.argv[2]), int(sys.argv[3])))))
        sys.exit(0)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--rate-bps", type=int, default=40_000)
    p.add_argument("--latency-s", type=float, default=0.15, help="one way")
    p.add_argument("--rss-readings", type=int, default=1_000_000)
    a = p.parse_args()
    print(json.dumps(asyncio.run(main(a)), indent=2))

"""Flash wear and CPU of the gateway daemon: disk bytes written and CPU time per reading.

Runs the real daemon (``edgegw run``, a process of its own) against Modbus TCP
simulators (SDM120 maps, child processes, at most 200 unit ids each), with a
prepaid account per meter on a flat tariff (rating, ledger and cutoff policy on
every reading), the sealed uplink (encoding 2) to the reference headend
(``edgegw headend run`` with a gateway registry) through mosquitto: batches are
published and acknowledged as in a deployment. The heartbeat goes to a tmpfs
directory (``RUNTIME_DIRECTORY``, as under the systemd unit).

Measured from the daemon's own process, between the end of a warm-up and the
end of the run:

* ``write_bytes`` of ``/proc/PID/io`` (bytes the daemon caused to be sent to
  the block device: the database, its write-ahead log and shared memory,
  checkpoints), divided by the readings committed meanwhile (the database's
  ``readings_committed`` counter, read through a read-only connection);
* CPU time (utime + stime of ``/proc/PID/stat``, with cutime + cstime: the
  child processes the daemon ran and waited for) per 1,000 readings and as a
  fraction of one core;
* fsyncs are not visible in ``/proc``; the WAL frames written per reading are
  reported instead (``wal_frames``, from the log's size after each checkpoint is
  not observable either): write_bytes is the figure that counts.

Baseline in the same run: a bare pymodbus loop in this process reading the same
blocks (the two the SDM120 driver plans) from the same simulators at the same
rate for the same time; its CPU time per 1,000 readings and per second is the
floor any Modbus TCP gateway pays here. The daemon's figures are reported beside
it, and as the difference (what the gateway adds above the bare loop).

    python bench/storage.py                        # 50 @ 1 s, 1 @ 1 s, 1 @ 60 s, 1,000 @ 60 s (~17 min)
    python bench/storage.py --only 50x1 --seconds 60
    python bench/storage.py --tree /path/to/other/checkout   # run that tree's daemon
    python bench/storage.py --only 50x1 --seconds 600 --windows 5   # writes as the ledger grows
    python bench/storage.py --only 1000x60 --wal-pages   # log frames per reading, by table/index
    python bench/storage.py --only 1000x60 --seconds 900 --windows 3 --wal-pages   # ... in each window
    python bench/storage.py --only 50x1 --profile /tmp/gw.prof   # cProfile of the daemon's event loop
    python bench/storage.py --only 1x60 --db-dir /mnt/gwdev   # + what the block device was asked to write

``--db-dir`` puts the gateway's database on the filesystem holding that directory
and reports, beside ``write_bytes``, the sectors the block device under it was
asked to write in the same time (``device``): data, metadata and the
filesystem's journal, which is what a card under the filesystem receives.
``write_bytes`` counts a page-cache folio at the moment it is dirtied, whatever
part of it changed, and the filesystem's journal not at all; the device figure
is the check on both. It means something only on a filesystem nothing else
writes to, e.g. a loop device made for it (as root)::

    truncate -s 512M /var/tmp/gwdev.img && mkfs.ext4 -q -F /var/tmp/gwdev.img
    mkdir -p /mnt/gwdev && mount "$(losetup -f --show /var/tmp/gwdev.img)" /mnt/gwdev

The page cache's writeback setting counts at small sites: SQLite's shared-memory
index is dirtied by every commit, and the kernel writes it back after
``vm.dirty_expire_centisecs``. The appliance sets ten minutes
(systemd/60-edgegw-writeback.conf); run as the appliance does with
``sysctl -w vm.dirty_expire_centisecs=60000`` (the JSON reports the setting).

``--tree`` runs the daemon of another checkout (for before/after comparisons);
the benchmark itself, the simulators and the headend come from this tree.
Prints one JSON document on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import tomli_w  # noqa: E402
from pymodbus.client import AsyncModbusTcpClient  # noqa: E402

from firmware_bridge.modbus.decode import plan_reads  # noqa: E402
from firmware_bridge.modbus.profiles import BUILTIN_PROFILES  # noqa: E402
from headend.registry import generate_headend_key  # noqa: E402
from provisioning.keys import Keystore  # noqa: E402
from store_forward.storage_policy import page_cache_writeback_s  # noqa: E402
from testbed.broker import Mosquitto  # noqa: E402

GATEWAY = "gw-bench-storage"
UNITS_PER_SIM = 200
TICK = os.sysconf("SC_CLK_TCK")
SDM120 = BUILTIN_PROFILES["sdm120"]


def log(msg: str) -> None:
    print(f"[storage] {msg}", file=sys.stderr, flush=True)


def device_of(path: Path) -> Path:
    """The ``stat`` file of the block device holding ``path`` (``/sys/dev/block/MAJ:MIN``;
    a partition's own counters)."""
    st = os.stat(path)
    return Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat")


def device_bytes_written(stat: Path) -> int:
    """Bytes the device was asked to write since it appeared: the filesystem's
    data, metadata and journal, whole blocks (sectors written, 512 bytes each)."""
    return int(stat.read_text().split()[6]) * 512


def proc_io(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k.strip()] = int(v)
    return out


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime, stime, and cutime, cstime: child processes the daemon ran count as its own
    return sum(int(f) for f in fields[11:15]) / TICK


def query_int(db: Path, sql: str) -> int:
    """One integer from the daemon's database, read through a read-only connection
    (0 while it cannot be read)."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            row = conn.execute(sql).fetchone()
            return int(row[0]) if row and row[0] is not None else 0
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def committed(db: Path) -> int:
    return query_int(db, "SELECT value FROM kv WHERE key = 'readings_committed'")


def acked(db: Path) -> int:
    return query_int(db, "SELECT value FROM kv WHERE key = 'readings_acked'")


def ledger_entries(db: Path) -> int:
    """Entries in the ledger (they are kept: the indexes over them grow with them)."""
    return query_int(db, "SELECT max(rowid) FROM billing_entry")


class WalWatcher:
    """Which tables and indexes the daemon's commits write (``--wal-pages``).

    Reads the frames appended to the write-ahead log since the last look (a
    frame header carries the page number; a commit frame the database size) and
    names each page's b-tree from ``dbstat`` on a copy of the database and its
    log taken right after (a page freed and reused in between is named by its
    new owner; pages on the free list are ``(free)``). Copying costs the
    benchmark's process I/O and CPU, not the daemon's, but it takes a core's
    share: compare figures of runs that both watched, or both did not.
    """

    def __init__(self, db: Path) -> None:
        self.db = db
        self.wal = Path(f"{db}-wal")
        self.salt = b""
        self.offset = 32
        self.page_size = 0
        self.commits = 0
        self.by_btree: dict[str, int] = {}
        self._lock = threading.Lock()

    def counts(self) -> dict[str, int]:
        """The frames counted so far, by b-tree (a copy)."""
        with self._lock:
            return dict(self.by_btree)

    def _owners(self) -> dict[int, str]:
        with tempfile.TemporaryDirectory(prefix="walwatch-") as tmp:
            copy = Path(tmp) / "copy.db"
            shutil.copy(self.db, copy)
            with contextlib.suppress(FileNotFoundError):
                shutil.copy(self.wal, f"{copy}-wal")
            conn = sqlite3.connect(copy)
            try:
                return {int(pg): str(name) for name, pg in conn.execute("SELECT name, pageno FROM dbstat")}
            finally:
                conn.close()

    def look(self) -> None:
        try:
            data = self.wal.read_bytes()
        except FileNotFoundError:
            return
        if len(data) < 32:
            return
        if not self.page_size:
            self.page_size = int.from_bytes(data[8:12], "big")
        salt = data[16:24]
        if salt != self.salt:  # the log was restarted after a checkpoint
            self.salt, self.offset = salt, 32
        frame = 24 + self.page_size
        pages = []
        while self.offset + frame <= len(data) and data[self.offset + 8 : self.offset + 16] == salt:
            pages.append(int.from_bytes(data[self.offset : self.offset + 4], "big"))
            self.commits += data[self.offset + 4 : self.offset + 8] != b"\0\0\0\0"
            self.offset += frame
        if pages:
            owners = self._owners()
            with self._lock:
                for pg in pages:
                    name = owners.get(pg, "(free)")
                    self.by_btree[name] = self.by_btree.get(name, 0) + 1

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.look)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
        await asyncio.to_thread(self.look)

    def report(self, readings: int) -> dict[str, Any]:
        frames = sum(self.by_btree.values())
        return {
            "page_size": self.page_size,
            "commits": self.commits,
            "frames": frames,
            "frames_per_commit": round(frames / max(self.commits, 1), 1),
            "frames_per_reading": round(frames / max(readings, 1), 2),
            "frames_per_reading_by_btree": {
                name: round(n / max(readings, 1), 3)
                for name, n in sorted(self.by_btree.items(), key=lambda kv: -kv[1])
            },
        }


@dataclass(frozen=True)
class Scenario:
    meters: int
    poll_s: float
    seconds: float  # measured time, after the warm-up
    warmup_s: float

    @property
    def name(self) -> str:
        return f"{self.meters}x{self.poll_s:g}"


@contextlib.asynccontextmanager
async def simulators(meters: int, log_dir: Path) -> AsyncIterator[list[tuple[int, list[int]]]]:
    """Simulator processes; yields (port, units) per process."""
    procs: list[subprocess.Popen[bytes]] = []
    out: list[tuple[int, list[int]]] = []
    try:
        left = meters
        while left > 0:
            n = min(UNITS_PER_SIM, left)
            left -= n
            units = list(range(1, n + 1))
            p = subprocess.Popen(  # noqa: ASYNC220 (start-up of the bench, not measured)
                [sys.executable, "-m", "testbed.simulators.modbus", "--tcp", "0", "--units",
                 ",".join(map(str, units)), "--load-kw", "0.5"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
            procs.append(p)
            assert p.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(p.stdout.readline), 30)
            m = re.search(rb"127\.0\.0\.1:(\d+)", line)
            if m is None:
                raise RuntimeError(f"simulator did not start: {line!r}")
            out.append((int(m.group(1)), units))
        yield out
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)


def write_site(
    work: Path, sc: Scenario, sims: list[tuple[int, list[int]]], broker_port: int, db: Path
) -> Path:
    pub = generate_headend_key(work / "headend.pem")
    (work / "registry").mkdir()
    ks = Keystore.init(work / "keys", GATEWAY)
    (work / "registry" / f"{GATEWAY}.json").write_bytes(orjson.dumps(ks.export_public()))
    shutil.copy(ROOT / "examples" / "tariffs" / "flat.toml", work / "flat.toml")
    buses, meters, accounts = [], [], []
    for b, (port, units) in enumerate(sims):
        name = f"lan{b}"
        buses.append(
            {
                "name": name,
                "type": "tcp",
                "host": "127.0.0.1",
                "port": port,
                "timeout_s": 1.0,
                "retries": 0,
            }
        )
        for u in units:
            mid = f"m{b}-{u:03d}"
            acc = f"a{b}-{u:03d}"
            (work / f"{acc}.toml").write_text(
                tomli_w.dumps(
                    {
                        "account": acc,
                        "timezone": "Asia/Shanghai",
                        "opening_balance": "100000.00",
                        "meters": [mid],
                        "protected": False,
                        "limits": {
                            "alarm1": "10.00", "alarm2": "5.00", "overdraft": "0.00", "close_permit": "0.01",
                            "close_mode": "direct", "reconnect_delay_s": 0, "relay_min_interval_s": 0,
                        },
                    }
                )
            )  # fmt: skip
            accounts.append({"id": acc, "settings": f"{acc}.toml", "tariffs": ["flat.toml"]})
            meters.append(
                {"id": mid, "bus": name, "protocol": "modbus", "unit_id": u, "profile": "sdm120", "account": acc,
                 "relay": {"kind": "coil", "address": 0, "min_interval_s": 0}}
            )  # fmt: skip
    doc = {
        "gateway": {"id": GATEWAY, "site": "bench", "poll_interval_s": sc.poll_s},
        "storage": {"path": str(db)},
        "broker": {"host": "127.0.0.1", "port": broker_port, "keepalive_s": 30},
        "uplink": {"headend_public_key": base64.b64encode(pub).decode()},
        "security": {"keystore": str(work / "keys")},
        "bus": buses,
        "meter": meters,
        "account": accounts,
    }
    cfg = work / "gateway.toml"
    cfg.write_text(tomli_w.dumps(doc))
    return cfg


@contextlib.contextmanager
def process(
    args: list[str], logfile: Path, cwd: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with logfile.open("ab") as out:
        p = subprocess.Popen(
            [sys.executable, *args], stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(cwd), **(env or {})},
        )  # fmt: skip
    try:
        yield p
    finally:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


async def bare_loop(
    sims: list[tuple[int, list[int]]], poll_s: float, seconds: float
) -> dict[str, Any]:
    """The floor: pymodbus reads of the same blocks at the same rate, nothing else."""
    blocks = plan_reads(SDM120.fields, SDM120.max_gap, SDM120.max_count)
    clients = []
    for port, _ in sims:
        c = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1.0, retries=0, reconnect_delay=0)
        await c.connect()
        clients.append(c)
    polls = 0

    async def bus(client: AsyncModbusTcpClient, units: list[int], stop: float) -> None:
        nonlocal polls
        nxt = time.monotonic()
        while time.monotonic() < stop:
            for u in units:
                for b in blocks:
                    rr = await client.read_input_registers(b.address, count=b.count, device_id=u)
                    if rr.isError():
                        raise RuntimeError(f"bare read failed: {rr}")
                polls += 1
            nxt += poll_s
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))

    try:
        cpu0, t0 = time.process_time(), time.monotonic()
        stop = t0 + seconds
        await asyncio.gather(*(bus(c, u, stop) for c, (_, u) in zip(clients, sims, strict=True)))
        cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
    finally:
        for c in clients:
            c.close()
    return {
        "polls": polls,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 3),
        "cpu_s_per_1000_readings": round(cpu / max(polls, 1) * 1000, 3),
        "cpu_fraction_of_core": round(cpu / wall, 4),
    }


async def run_scenario(
    sc: Scenario, tree: Path, bare: bool, windows: int = 1, wal_pages: bool = False,
    profile: Path | None = None, db_dir: Path | None = None,
) -> dict[str, Any]:
    log(
        f"{sc.name}: {sc.meters} meter(s), poll every {sc.poll_s:g} s, {sc.warmup_s:g} s warm-up + {sc.seconds:g} s"
    )
    with tempfile.TemporaryDirectory(prefix="edgegw-storage-", dir=ROOT / ".bench-work") as tmp:
        work = Path(tmp)
        runtime = Path(tempfile.mkdtemp(prefix="edgegw-run-", dir="/dev/shm"))
        # the gateway's database (with its log, shared memory and reserve file) in a
        # directory of its own, on a filesystem of its own when --db-dir names one
        db_home = Path(tempfile.mkdtemp(prefix="edgegw-db-", dir=db_dir or work))
        device = device_of(db_home) if db_dir is not None else None
        try:
            async with simulators(sc.meters, work) as sims:
                async with Mosquitto(work, extra_conf=f"max_packet_size {4 << 20}\n") as broker:
                    cfg = write_site(work, sc, sims, broker.port, db_home / "gw.db")
                    headend = [
                        "-m", "gateway.cli", "headend", "run", "--broker", f"127.0.0.1:{broker.port}",
                        "--db", str(work / "central.db"), "--key", str(work / "headend.pem"),
                        "--registry", str(work / "registry"),
                    ]  # fmt: skip
                    with contextlib.ExitStack() as stack:
                        stack.enter_context(process(headend, work / "headend.log", ROOT))
                        # the headend subscribes before the gateway's first batch goes out
                        for _ in range(300):
                            if "subscribed" in (work / "headend.log").read_text(errors="replace"):
                                break
                            await asyncio.sleep(0.1)
                        gw = stack.enter_context(
                            process(["-m", "gateway.cli", "run", "--config", str(cfg)], work / "gateway.log", tree,
                                    {"RUNTIME_DIRECTORY": str(runtime),
                                     **({"EDGEGW_PROFILE": f"{profile}.{sc.name}",
                                         "EDGEGW_PROFILE_AFTER_S": str(sc.warmup_s)} if profile else {})})
                        )  # fmt: skip
                        db = db_home / "gw.db"
                        deadline = time.monotonic() + sc.warmup_s + 60
                        while committed(db) < sc.meters and time.monotonic() < deadline:
                            if gw.poll() is not None:
                                raise RuntimeError(
                                    f"daemon exited: {(work / 'gateway.log').read_text()[-3000:]}"
                                )
                            await asyncio.sleep(0.5)
                        await asyncio.sleep(max(0.0, sc.warmup_s - 0))
                        dev0 = device_bytes_written(device) if device is not None else 0
                        io0, cpu0, n0, a0, t0 = (
                            proc_io(gw.pid),
                            proc_cpu_s(gw.pid),
                            committed(db),
                            acked(db),
                            time.monotonic(),
                        )
                        # (time, write_bytes, readings committed, ledger entries) at each
                        # window's end; the last is the end of the measured time
                        marks = [(t0, io0["write_bytes"], n0, ledger_entries(db))]
                        watcher = WalWatcher(db) if wal_pages else None
                        stop_watch = asyncio.Event()
                        watching = (
                            asyncio.create_task(watcher.watch(stop_watch)) if watcher is not None else None
                        )
                        if watcher is not None:
                            await asyncio.to_thread(watcher.look)  # frames before t0 are not counted
                            watcher.by_btree.clear()
                            watcher.commits = 0
                        frames_at: list[dict[str, int]] = [{}]  # frames by b-tree at each window's end
                        for w in range(1, windows + 1):
                            await asyncio.sleep(max(0.0, t0 + sc.seconds * w / windows - time.monotonic()))
                            io1, cpu1, n1, t1 = proc_io(gw.pid), proc_cpu_s(gw.pid), committed(db), time.monotonic()
                            marks.append((t1, io1["write_bytes"], n1, ledger_entries(db)))
                            if watcher is not None:
                                frames_at.append(await asyncio.to_thread(watcher.counts))
                        dev1 = device_bytes_written(device) if device is not None else 0
                        a1 = acked(db)
                        stop_watch.set()
                        if watching is not None:
                            await watching
                        if gw.poll() is not None:
                            raise RuntimeError(
                                f"daemon exited: {(work / 'gateway.log').read_text()[-3000:]}"
                            )
                    base = await bare_loop(sims, sc.poll_s, min(sc.seconds, 60.0)) if bare else None
        finally:
            shutil.rmtree(runtime, ignore_errors=True)
            shutil.rmtree(db_home, ignore_errors=True)
    readings = n1 - n0
    wall = t1 - t0
    cpu = cpu1 - cpu0
    written = io1["write_bytes"] - io0["write_bytes"]
    out: dict[str, Any] = {
        "meters": sc.meters,
        "poll_interval_s": sc.poll_s,
        "measured_s": round(wall, 1),
        "readings": readings,
        "readings_acked": a1 - a0,
        "daemon": {
            "write_bytes": written,
            "write_bytes_per_reading": round(written / max(readings, 1), 1),
            "write_bytes_per_s": round(written / wall, 1),
            "write_syscalls": io1["syscw"] - io0["syscw"],
            "cpu_s": round(cpu, 3),
            "cpu_s_per_1000_readings": round(cpu / max(readings, 1) * 1000, 3),
            "cpu_fraction_of_core": round(cpu / wall, 4),
        },
    }
    if device is not None:
        out["device"] = {
            "stat": str(device),
            "bytes_written": dev1 - dev0,
            "bytes_written_per_reading": round((dev1 - dev0) / max(readings, 1), 1),
        }
    if watcher is not None:
        out["wal"] = watcher.report(readings)
    if windows > 1:
        # Bytes per reading in successive windows, beside the ledger's size: the
        # ledger's indexes grow with every entry, and an insert into a larger index
        # lands on a page of its own more often.
        out["windows"] = [
            {
                "from_s": round(a[0] - t0, 1),
                "to_s": round(b[0] - t0, 1),
                "readings": b[2] - a[2],
                "write_bytes_per_reading": round((b[1] - a[1]) / max(b[2] - a[2], 1), 1),
                "ledger_entries_at_end": b[3],
            }
            for a, b in itertools.pairwise(marks)
        ]
        if watcher is not None:
            # the log's frames by table and index in each window (a look in progress at a
            # window's end counts in the next one)
            for win, (fa, fb), (a, b) in zip(
                out["windows"], itertools.pairwise(frames_at), itertools.pairwise(marks), strict=True
            ):
                n = max(b[2] - a[2], 1)
                win["frames_per_reading_by_btree"] = {
                    name: round((fb.get(name, 0) - fa.get(name, 0)) / n, 3)
                    for name in sorted(fb, key=lambda k: -(fb[k] - fa.get(k, 0)))
                    if fb[name] != fa.get(name, 0)
                }
    if base is not None:
        out["bare_loop"] = base
        out["daemon_minus_bare"] = {
            "cpu_s_per_1000_readings": round(
                out["daemon"]["cpu_s_per_1000_readings"] - base["cpu_s_per_1000_readings"], 3
            ),
            "cpu_fraction_of_core": round(
                out["daemon"]["cpu_fraction_of_core"] - base["cpu_fraction_of_core"], 4
            ),
        }
        out["daemon_over_bare_cpu_per_reading"] = round(
            out["daemon"]["cpu_s_per_1000_readings"] / max(base["cpu_s_per_1000_readings"], 1e-9), 2
        )
    log(f"{sc.name}: {json.dumps(out)}")
    return out


SCENARIOS = {
    "50x1": Scenario(50, 1.0, 120.0, 20.0),
    "1x1": Scenario(1, 1.0, 120.0, 20.0),
    "1x60": Scenario(1, 60.0, 300.0, 5.0),
    "1000x60": Scenario(1000, 60.0, 240.0, 20.0),
}
QUICK = {
    "50x1": Scenario(5, 1.0, 5.0, 2.0),
}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    (ROOT / ".bench-work").mkdir(exist_ok=True)
    table = QUICK if args.quick else SCENARIOS
    names = args.only or list(table)
    chosen = [table[n] for n in names]
    if args.seconds:
        chosen = [Scenario(s.meters, s.poll_s, args.seconds, s.warmup_s) for s in chosen]
    tree, commit = args.tree, args.commit
    t0 = time.monotonic()
    load0 = os.getloadavg()
    if args.parallel:
        results = await asyncio.gather(*(run_scenario(s, tree, bare=False, windows=args.windows, wal_pages=args.wal_pages,
                                                      profile=args.profile, db_dir=args.db_dir)
            for s in chosen))
    else:
        results = [
            await run_scenario(s, tree, bare=s.poll_s <= 5, windows=args.windows, wal_pages=args.wal_pages,
                               profile=args.profile, db_dir=args.db_dir)
            for s in chosen
        ]
    return {
        "benchmark": "storage",
        "daemon_tree": str(tree),
        "daemon_commit": commit,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            # vm.dirty_expire_centisecs: what the page cache keeps before writing it back
            # (the appliance: 600 s, systemd/60-edgegw-writeback.conf; the kernel: 30 s)
            "page_cache_writeback_s": page_cache_writeback_s(),
        },
        "load_average": {
            "start": [round(x, 2) for x in load0],
            "end": [round(x, 2) for x in os.getloadavg()],
        },
        "wall_s": round(time.monotonic() - t0, 1),
        "scenarios": {s.name: r for s, r in zip(chosen, results, strict=True)},
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="scenario(s) to run")
    p.add_argument(
        "--seconds", type=float, help="measured time per scenario (overrides the defaults)"
    )
    p.add_argument("--tree", help="run the daemon from this checkout")
    p.add_argument(
        "--parallel", action="store_true", help="run the chosen scenarios at once (no bare loop)"
    )
    p.add_argument("--quick", action="store_true", help="a tiny run (smoke test)")
    p.add_argument(
        "--windows", type=int, default=1, help="also report writes per reading in this many successive windows"
    )
    p.add_argument(
        "--wal-pages", action="store_true",
        help="also report which tables and indexes the write-ahead log's frames belong to",
    )  # fmt: skip
    p.add_argument(
        "--profile", type=Path,
        help="write a CPU profile of the daemon's event-loop thread to PROFILE.SCENARIO"
        " (from the warm-up's length after its start on)"
        " (EDGEGW_PROFILE; it slows the daemon: read its shares, not its CPU figures)",
    )  # fmt: skip
    p.add_argument(
        "--db-dir", type=Path,
        help="put the gateway's database in a new directory under DB_DIR and report what the block"
        " device holding DB_DIR was asked to write (sectors written): meaningful on a filesystem"
        " nothing else writes to, e.g. a loop device made for it (see docs/benchmarks.md)",
    )  # fmt: skip
    ns = p.parse_args()
    if ns.windows < 1:
        p.error("--windows must be at least 1")
    ns.tree = Path(ns.tree).resolve() if ns.tree else ROOT
    ns.commit = subprocess.run(
        ["git", "-C", str(ns.tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(json.dumps(asyncio.run(main(ns)), indent=2))

"""A prepaid transformer area for chaos runs: every part real, each in its own process.

* meters: Modbus TCP (pymodbus server) and DL/T 645 on a pseudo-terminal, our
  simulators, each recording every relay operation it receives (with the time);
* the gateway: ``edgegw run`` in its own process, with prepaid accounts (account
  files shaped like examples/accounts, tariffs from examples/tariffs), a
  keystore, a sealed uplink and a trust file for central's billing key;
* mosquitto, killed with SIGKILL and started again;
* the headend: ``edgegw headend run`` (sealed, enrolled gateways only) in its own
  process, killed and started again;
* central: sells top-ups as signed commands on the gateway's command topic, one
  at a time, re-sending each until its result is stored at the headend (as
  central does: a command lost on the way is sent again, never re-signed).

:func:`check` then states the invariants from durable evidence only: the
gateway's database, the headend's database and the simulators' records.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import shutil
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiomqtt
import orjson
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from firmware_bridge.dlt645.messages import ControlCommand, parse_control_request
from firmware_bridge.modbus.profiles import BUILTIN_PROFILES
from firmware_bridge.reading import Measurement, Quality, Quantity, Reading
from firmware_bridge.relay import RelayPolicy
from gateway.billing.account import load_account
from gateway.billing.money import register_ckwh
from gateway.billing.rating import RegisterReading, rate_chain
from gateway.billing.tariff_file import load_book
from gateway.billing.topup import credit_id
from gateway.heartbeat import path_for as heartbeat_path
from gateway.heartbeat import read as read_heartbeat
from gateway.security.envelope import sign_command
from gateway.security.roles import CentralKey, CommandType, Role, TrustStore
from headend.registry import generate_headend_key
from provisioning.keys import Keystore
from store_forward.topics import Topics
from testbed.simulators.dlt645 import SimulatedMeter, Simulator
from testbed.simulators.modbus import ModbusSimulator, SimMeter
from tests.harness.mosquitto import Mosquitto, free_port
from tests.harness.procs import ROOT, Proc, edgegw

EXAMPLES = ROOT / "examples"
GATEWAY = "gw-chaos"
TZ = "Asia/Shanghai"
POLL_S = 0.5


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- meters that remember what they were told to do ------------------------------


@dataclass(frozen=True)
class RelayOp:
    meter: str
    time_ms: int
    open: bool


@dataclass
class RecordingModbusMeter(SimMeter):
    """A Modbus meter that records every write to its relay coil."""

    meter_id: str = ""
    ops: list[RelayOp] = field(default_factory=list)

    def set(self, func_code: int, address: int, values: Any, now_s: float) -> Any:
        res = super().set(func_code, address, values, now_s)
        coil = self.relay_coil
        if res is None and func_code in (5, 15) and coil is not None and address <= coil < address + len(values):
            self.ops.append(RelayOp(self.meter_id, now_ms(), bool(values[coil - address])))
        return res


@dataclass
class RecordingDltMeter(SimulatedMeter):
    """A DL/T 645 meter that records every accepted relay command (1CH trip/close)."""

    meter_id: str = ""
    ops: list[RelayOp] = field(default_factory=list)

    def _control(self, request: Any, now_s: float) -> Any:
        reply = super()._control(request, now_s)
        if not reply.control.error:
            cmd = parse_control_request(request).command
            if cmd in (ControlCommand.TRIP, ControlCommand.CLOSE, ControlCommand.CLOSE_ALLOWED):
                self.ops.append(RelayOp(self.meter_id, now_ms(), cmd is ControlCommand.TRIP))
        return reply


@dataclass(frozen=True)
class MeterPlan:
    meter: str
    account: str
    protocol: str  # modbus | dlt645
    tariffs: tuple[str, ...]  # files in examples/tariffs
    load_kw: Decimal
    opening: str  # yuan


PLAN = (
    MeterPlan("m-01", "acct-01", "modbus", ("flat.toml",), Decimal("300"), "0.20"),
    MeterPlan("m-02", "acct-02", "modbus", ("cn-residential-tou-v1.toml",), Decimal("400"), "0.25"),
    MeterPlan("m-03", "acct-03", "modbus", ("flat.toml",), Decimal("250"), "0.15"),
    # DL/T 645 power is XX.XXXX kW on the wire: below 80 kW
    MeterPlan("d-01", "acct-04", "dlt645", ("cn-residential-tou-v1.toml",), Decimal("79"), "0.10"),
    MeterPlan("d-02", "acct-05", "dlt645", ("flat.toml",), Decimal("70"), "0.08"),
)


def account_file(plan: MeterPlan) -> dict[str, Any]:
    """The example household account, with limits small enough to trip in seconds."""
    doc = tomllib.loads((EXAMPLES / "accounts" / "household.toml").read_text())
    doc["account"] = plan.account
    doc["timezone"] = TZ
    doc["meters"] = [plan.meter]
    doc["opening_balance"] = plan.opening
    doc["limits"].update(
        alarm1="0.20",
        alarm2="0.10",
        overdraft="0.02",
        close_permit="0.02",
        close_mode="direct",
        reconnect_delay_s=0,
        relay_min_interval_s=0,
    )
    doc["topup_policy"] = {"minimum_purchase": "0.10", "hoarding_limit": "2000.00"}
    for key in ("no_disconnect", "topup"):  # no evening window; scripted top-ups are for simulate
        doc.pop(key, None)
    if "tou" not in plan.tariffs[0]:
        doc.pop("tier", None)
    return doc


# -- central ----------------------------------------------------------------------


@dataclass
class Sale:
    command_id: str
    account: str
    amount_micro: int
    counter: int
    envelope: bytes
    first_sent_ms: int
    sends: int = 0
    last_sent: float = 0.0
    outcome: str | None = None


class Central:
    """Central billing: sells top-ups, one command in flight at a time.

    Central's key counter only moves forward, so a command is never re-signed:
    the very same envelope is re-published until its ``command_result`` is in
    the headend's database (a re-delivery of an applied command is refused as
    a replay, the first result already said ``applied``).
    """

    KEY_ID = "billing-chaos-1"

    def __init__(self, headend_db: Path, accounts: list[str], rng: random.Random) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.headend_db = headend_db
        self.accounts = accounts
        self.rng = rng
        self.counter = 0
        self.purchase: dict[str, int] = dict.fromkeys(accounts, 0)
        self.sales: list[Sale] = []
        self.selling = True
        self.port = 0
        self.resend_s = 2.0
        self.sale_every_s = (1.0, 3.0)
        self.unexpected: list[dict[str, Any]] = []
        self.seen_results: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._rr = itertools.cycle(accounts)
        self._result_rowid = 0

    def trust_doc(self) -> dict[str, object]:
        public = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return TrustStore.of([CentralKey(self.KEY_ID, Role.BILLING, public)]).to_dict()

    @property
    def outstanding(self) -> Sale | None:
        return next((s for s in self.sales if s.outcome is None), None)

    def _new_sale(self) -> Sale:
        account = next(self._rr)
        self.counter += 1
        self.purchase[account] += 1
        amount = self.rng.randrange(10, 40) * 10_000  # 0.10 .. 0.39 yuan
        t = now_ms()
        cid = f"sale-{self.counter:05d}"
        env = sign_command(
            self.key,
            issuer=self.KEY_ID,
            target=GATEWAY,
            command_id=cid,
            counter=self.counter,
            issued_at_ms=t,
            expires_at_ms=t + 3_600_000,
            type=CommandType.TOPUP,
            body={
                "account": account,
                "amount_micro": amount,
                "purchase_counter": self.purchase[account],
                "payment_channel": "mobile_app",
            },
        )
        sale = Sale(cid, account, amount, self.purchase[account], env, t)
        self.sales.append(sale)
        return sale

    def refresh(self) -> None:
        """Read new command results from the headend's database."""
        try:
            with contextlib.closing(sqlite3.connect(f"file:{self.headend_db}?mode=ro", uri=True, timeout=5)) as db:
                rows = db.execute(
                    "SELECT rowid, body FROM events WHERE gateway_id = ? AND kind = 'event' AND rowid > ?"
                    " ORDER BY rowid",
                    (GATEWAY, self._result_rowid),
                ).fetchall()
        except sqlite3.Error:  # not created yet, or busy: next time
            return
        by_id = {s.command_id: s for s in self.sales}
        for rowid, body in rows:
            self._result_rowid = max(self._result_rowid, rowid)
            ev = orjson.loads(body)
            if ev.get("type") != "command_result" or "id" not in ev:
                continue
            self.seen_results[ev["id"]].append(ev)
            sale = by_id.get(ev["id"])
            if sale is None:
                continue
            if ev["outcome"] in ("applied", "duplicate"):
                sale.outcome = sale.outcome or ev["outcome"]
            elif ev.get("reason") != "replay":
                self.unexpected.append(ev)
                sale.outcome = sale.outcome or f"rejected:{ev.get('reason')}"

    def all_answered(self) -> bool:
        return all(s.outcome is not None for s in self.sales)

    async def run(self, port: int) -> None:
        """Forever: (re)connect to the broker and sell; never gives up on a dead broker."""
        topic = Topics("edgegw/v1", GATEWAY).cmd
        next_sale = time.monotonic()
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", port, identifier="chaos-central", timeout=3) as client:
                    while True:
                        await asyncio.to_thread(self.refresh)
                        sale = self.outstanding
                        if sale is None and self.selling and time.monotonic() >= next_sale:
                            sale = self._new_sale()
                            next_sale = time.monotonic() + self.rng.uniform(*self.sale_every_s)
                        if sale is not None and time.monotonic() - sale.last_sent >= self.resend_s:
                            await client.publish(topic, sale.envelope, qos=1, timeout=3)
                            sale.sends += 1
                            sale.last_sent = time.monotonic()
                        await asyncio.sleep(0.2)
            except (aiomqtt.MqttError, OSError, TimeoutError):
                await asyncio.sleep(0.3)


# -- the site ----------------------------------------------------------------------


class ChaosSite:
    """Files, meters, broker, headend and central of one chaos run.

    ``state`` is where the gateway keeps its keystore and database (a powerfs
    mount in the power-loss runs); everything else lives under ``root``.
    """

    def __init__(self, root: Path, state: Path, *, seed: int) -> None:
        self.root = root
        self.state = state
        self.rng = random.Random(seed)
        self.db = state / "gateway.db"
        self.keystore = state / "keys"
        self.headend_db = root / "central.db"
        self.config = root / "gateway.toml"
        self.broker = Mosquitto(root, port=free_port())
        self.central = Central(self.headend_db, [p.account for p in PLAN], random.Random(seed + 1))
        self.modbus: dict[str, RecordingModbusMeter] = {}
        self.dlt: dict[str, RecordingDltMeter] = {}
        self.initial_kwh: dict[str, Decimal] = {}
        self.daemon = edgegw("gateway", ["run", "--config", str(self.config)], root / "gateway.log")
        self.headend: Proc | None = None
        self._stack = contextlib.AsyncExitStack()
        self._central_task: asyncio.Task[None] | None = None
        self._last_count: Any = None
        self._last_change = 0.0
        self._settled_since: float | None = None

    # -- set-up ---------------------------------------------------------------------

    async def __aenter__(self) -> ChaosSite:
        await self._stack.__aenter__()
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.daemon.kill()
        if self.headend is not None:
            self.headend.kill()
        await self._stack.aclose()

    async def _start(self) -> None:
        profile = BUILTIN_PROFILES["sdm120"]
        units: dict[int, SimMeter] = {}
        dlts: list[SimulatedMeter] = []
        for i, p in enumerate(PLAN, 1):
            if p.protocol == "modbus":
                m = RecordingModbusMeter(unit_id=i, profile=profile, load_kw=p.load_kw, meter_id=p.meter)
                units[i] = m
                self.modbus[p.meter] = m
                self.initial_kwh[p.meter] = m.values[Quantity.ENERGY_IMPORT]
            else:
                d = RecordingDltMeter(
                    address=f"{i:012d}",
                    load_kw=p.load_kw,
                    registers_kwh=[Decimal(100 * i + r) for r in range(4)],
                    clock_tz=ZoneInfo(TZ),
                    meter_id=p.meter,
                )
                dlts.append(d)
                self.dlt[p.meter] = d
                self.initial_kwh[p.meter] = d._energy()[0]
        sim = await self._stack.enter_async_context(ModbusSimulator(meters=units))
        dlt_sim = await self._stack.enter_async_context(Simulator(dlts))
        tty = await dlt_sim.start_pty()
        self.broker.start()
        self._stack.callback(self.broker.kill)
        self._write_files(sim.port, tty, units)
        self.headend = edgegw(
            "headend",
            [
                "headend", "run", "--broker", f"127.0.0.1:{self.broker.port}", "--db", str(self.headend_db),
                "--key", str(self.root / "headend.pem"), "--registry", str(self.root / "registry"),
            ],
            self.root / "headend.log",
        )

    def _write_files(self, modbus_port: int, tty: str, units: dict[int, SimMeter]) -> None:
        r = self.root
        self.headend_public = generate_headend_key(r / "headend.pem")
        (r / "registry").mkdir(exist_ok=True)
        (r / "trust.json").write_bytes(orjson.dumps(self.central.trust_doc()))
        for name in {t for p in PLAN for t in p.tariffs}:
            shutil.copy(EXAMPLES / "tariffs" / name, r / name)
        meters, accounts = [], []
        for i, p in enumerate(PLAN, 1):
            (r / f"{p.account}.toml").write_text(tomli_w.dumps(account_file(p)))
            accounts.append({"id": p.account, "settings": f"{p.account}.toml", "tariffs": list(p.tariffs)})
            if p.protocol == "modbus":
                meters.append(
                    {"id": p.meter, "bus": "lan", "protocol": "modbus", "unit_id": i, "profile": "sdm120",
                     "account": p.account, "relay": {"kind": "coil", "address": 0, "min_interval_s": 0}}
                )
            else:
                d = self.dlt[p.meter]
                meters.append(
                    {"id": p.meter, "bus": "rs485", "protocol": "dlt645", "address": d.address,
                     "password": d.password.hex(), "account": p.account,
                     "relay": {"kind": "dlt645", "min_interval_s": 0}}
                )
        import base64

        doc = {
            "gateway": {"id": GATEWAY, "site": "chaos", "timezone": TZ, "poll_interval_s": POLL_S},
            "storage": {"path": str(self.db)},
            "broker": {"host": "127.0.0.1", "port": self.broker.port, "keepalive_s": 5},
            "uplink": {
                "batch_max_records": 100, "ack_timeout_s": 2.0, "window": 4,
                "reconnect_min_s": 0.1, "reconnect_max_s": 1.0,
                "headend_public_key": base64.b64encode(self.headend_public).decode(),
            },
            "security": {"trust_file": "trust.json", "keystore": str(self.keystore)},
            "bus": [
                {"name": "lan", "type": "tcp", "host": "127.0.0.1", "port": modbus_port,
                 "timeout_s": 0.5, "retries": 0},
                {"name": "rs485", "type": "serial", "device": tty, "baud": 9600, "parity": "N",
                 "timeout_s": 0.5, "retries": 0},
            ],
            "meter": meters,
            "account": accounts,
        }
        self.config.write_text(tomli_w.dumps(doc))

    def provision(self) -> None:
        """``edgegw keys init`` on the gateway, and central enrols its public keys."""
        ks = Keystore.init(self.keystore, GATEWAY)
        (self.root / "registry" / f"{GATEWAY}.json").write_bytes(orjson.dumps(ks.export_public()))

    def start_central(self) -> None:
        self._central_task = asyncio.create_task(self.central.run(self.broker.port))

        async def stop() -> None:
            assert self._central_task is not None
            self._central_task.cancel()
            await asyncio.gather(self._central_task, return_exceptions=True)

        self._stack.push_async_callback(stop)

    # -- chaos -----------------------------------------------------------------------

    def start_headend(self) -> None:
        assert self.headend is not None
        self.headend.start()

    async def kill_broker(self, down_s: float) -> None:
        self.broker.kill()
        await asyncio.sleep(down_s)
        await asyncio.to_thread(self.broker.start)

    async def kill_headend(self, down_s: float) -> None:
        assert self.headend is not None
        await asyncio.to_thread(self.headend.kill)
        await asyncio.sleep(down_s)
        self.headend.start()

    async def daemon_past_imports(self, timeout_s: float = 60.0) -> None:
        """Wait until this start of the daemon has written its first heartbeat
        (``starting``: it opens the database and keys next). Before that the process
        only imports Python, which on a loaded machine can take longer than a window."""
        path = heartbeat_path(None, self.db, {})

        def ours() -> bool:
            proc = self.daemon.proc
            try:
                hb = read_heartbeat(path)
            except ValueError:  # a heartbeat whose content a power cut dropped
                return False
            return proc is not None and hb is not None and hb.pid == proc.pid

        await until(ours, timeout_s, "the gateway's first heartbeat", self)

    async def chaos_window(self, seconds: float) -> None:
        """Let the gateway run ``seconds``; meanwhile maybe SIGKILL the broker or the headend."""
        jobs = []
        if self.rng.random() < 0.2:
            jobs.append(self._later(self.rng.uniform(0, seconds), self.kill_broker(self.rng.uniform(0.1, 1.0))))
        if self.rng.random() < 0.2:
            jobs.append(self._later(self.rng.uniform(0, seconds), self.kill_headend(self.rng.uniform(0.1, 1.0))))
        await asyncio.gather(asyncio.sleep(seconds), *jobs)

    @staticmethod
    async def _later(delay: float, job: Any) -> None:
        await asyncio.sleep(delay)
        await job

    def all_meters(self) -> dict[str, SimMeter | SimulatedMeter]:
        return {**self.modbus, **self.dlt}

    def relay_open(self, meter: str) -> bool:
        m = self.all_meters()[meter]
        return bool(m.relay_open)

    def loads_off(self) -> None:
        for m in self.all_meters().values():
            m.load_kw = Decimal(0)

    def meters_silent(self) -> None:
        for m in self.modbus.values():
            m.dead = True
        for d in self.dlt.values():
            d.faults.no_reply = True

    def meter_kwh(self, meter: str) -> Decimal:
        m = self.all_meters()[meter]
        if isinstance(m, SimMeter):
            m.advance(time.monotonic())
            return m.values[Quantity.ENERGY_IMPORT]
        m.advance(time.time())
        return m._energy()[0]

    # -- the end of a run --------------------------------------------------------------

    async def settle_and_drain(self) -> None:
        """Central's last sales answered, relays where the policy wants them, every
        record delivered; then the gateway stops cleanly (SIGTERM)."""
        self.central.selling = False
        if not self.broker.proc:
            await asyncio.to_thread(self.broker.start)
        assert self.headend is not None
        if not self.headend.running():
            self.headend.start()
        self.daemon.start()
        await until(self.central.all_answered, 90, "central's top-ups answered", self)
        self.loads_off()
        # every meter read twice more: the energy used before the loads went off is billed
        base = self._committed()
        await until(lambda: self._committed() >= base + 2 * len(PLAN), 30, "readings after the loads went off", self)
        await until(self._relays_settled_for_2s, 60, "relays as the cutoff policy holds them", self, self._relay_report)
        self.meters_silent()
        await until(self._no_new_readings, 30, "the last poll cycles committed", self)
        await until(lambda: self._backlog() == 0, 90, "backlog delivered", self)
        rc = await asyncio.to_thread(self.daemon.stop)
        assert rc == 0, self.daemon.tail()

    def _gateway_rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)) as db:
            return db.execute(sql, args).fetchall()

    def _backlog(self) -> int:
        try:
            return int(self._gateway_rows("SELECT count(*) FROM outbox")[0][0])
        except sqlite3.Error:
            return -1

    def _committed(self) -> int:
        try:
            rows = self._gateway_rows("SELECT value FROM kv WHERE key = 'readings_committed'")
        except sqlite3.Error:
            return 0
        return int(rows[0][0]) if rows else 0

    def _relays_settled_for_2s(self) -> bool:
        now = time.monotonic()
        if not self._relays_settled():
            self._settled_since = None
            return False
        if self._settled_since is None:
            self._settled_since = now
        return now - self._settled_since >= 2.0

    def _no_new_readings(self) -> bool:
        """True once the committed-readings counter has not moved for 2 s."""
        try:
            n = self._gateway_rows("SELECT value FROM kv WHERE key = 'readings_committed'")
        except sqlite3.Error:
            return False
        now = time.monotonic()
        if n != self._last_count:
            self._last_count, self._last_change = n, now
        return now - self._last_change >= 2.0

    def _cutoff_open(self) -> dict[str, bool]:
        rows = self._gateway_rows("SELECT account, cutoff_state FROM billing_account")
        return {a: bool(orjson.loads(s)["relay_open"]) if s else False for a, s in rows}

    def _relay_report(self) -> str:
        rows = self._gateway_rows("SELECT account, balance_micro, cutoff_state FROM billing_account")
        by = {a: (b, c) for a, b, c in rows}
        return "\n".join(
            f"{p.meter} relay_open={self.relay_open(p.meter)} ops={self.all_meters()[p.meter].ops[-3:]}"  # type: ignore[union-attr]
            f" {p.account} balance={by.get(p.account, ('?', '?'))[0]} cutoff={by.get(p.account, ('?', '?'))[1]}"
            for p in PLAN
        )

    def _relays_settled(self) -> bool:
        try:
            want = self._cutoff_open()
        except sqlite3.Error:
            return False
        return all(self.relay_open(p.meter) == want.get(p.account, False) for p in PLAN)


async def until(
    cond: Any, timeout_s: float, what: str, site: ChaosSite | None = None, detail: Any = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            tail = f"\n--- gateway log tail:\n{site.daemon.tail()}" if site is not None else ""
            more = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout_s}s: {what}{more}{tail}")
        await asyncio.sleep(0.2)


# -- the invariants ----------------------------------------------------------------


@dataclass
class Findings:
    readings: int = 0
    records: int = 0
    debits: int = 0
    credits: int = 0
    relay_ops: int = 0
    decisions: int = 0
    problems: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.problems.append(what)


def _reading_of(meter: str, time_ms: int, quantities: str, quality: str | None) -> Reading:
    q = orjson.loads(quality) if quality else {}
    values = {
        Quantity(name): Measurement(Decimal(v), Quality(q.get(name, "good")))
        for name, v in orjson.loads(quantities).items()
    }
    return Reading(meter, time_ms, values)


def check(site: ChaosSite, *, gateway_db: Path | None = None, headend_db: Path | None = None) -> Findings:
    """Every invariant of a run, from the databases and the meters (after a clean stop).

    ``gateway_db``/``headend_db``: check copies instead (to show that a tampered
    copy fails)."""
    f = Findings()
    gw = sqlite3.connect(f"file:{gateway_db or site.db}?mode=ro", uri=True)
    he = sqlite3.connect(f"file:{headend_db or site.headend_db}?mode=ro", uri=True)
    try:
        _check_records(gw, he, f)
        _check_money(site, gw, he, f)
        _check_relays(site, gw, he, f)
    finally:
        gw.close()
        he.close()
    r = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "audit", "verify", "--db", str(gateway_db or site.db),
         "--keystore", str(site.keystore)],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )
    if r.returncode != 0:
        f.fail(f"audit chain does not verify: {r.stdout}{r.stderr}")
    return f


def _check_records(gw: sqlite3.Connection, he: sqlite3.Connection, f: Findings) -> None:
    (last,) = gw.execute("SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0)").fetchone()
    left = dict(gw.execute("SELECT id, kind FROM outbox").fetchall())
    (damaged,) = gw.execute("SELECT count(*) FROM damaged").fetchone()
    kv = dict(gw.execute("SELECT key, value FROM kv").fetchall())
    ids: dict[str, list[int]] = {
        t: [r[0] for r in he.execute(f"SELECT record_id FROM {t} WHERE gateway_id = ?", (GATEWAY,))]
        for t in ("readings", "telemetry", "events")
    }
    delivered = Counter(i for v in ids.values() for i in v)
    twice = [i for i, n in delivered.items() if n > 1]
    if twice:
        f.fail(f"record ids stored in two tables at the headend: {twice[:10]}")
    # A record can be at the headend and still in the outbox when the ack of its
    # batch was lost (a stop, a kill, a cut between the headend's commit and the
    # gateway's): the batch goes again and is answered "duplicate". That is only
    # safe when the headend holds that very batch (same epoch and number).
    both = set(delivered) & set(left)
    stored_batches = set(
        he.execute("SELECT epoch, seq FROM batches WHERE gateway_id = ?", (GATEWAY,)).fetchall()
    )
    unsafe = []
    for rid in sorted(both):
        row = gw.execute(
            "SELECT b.epoch, b.seq FROM outbox o JOIN batches b ON b.seq = o.batch_seq WHERE o.id = ?",
            (rid,),
        ).fetchone()
        if row is None or tuple(row) not in stored_batches:
            unsafe.append(rid)
    if unsafe:
        f.fail(f"records delivered and still in the outbox outside a batch the headend holds: {unsafe[:10]}")
    missing = set(range(1, last + 1)) - set(delivered) - set(left)
    if missing:
        f.fail(f"{len(missing)} committed record(s) neither delivered nor in the outbox: {sorted(missing)[:20]}")
    extra = set(delivered) - set(range(1, last + 1))
    if extra:
        f.fail(f"the headend has record ids the gateway never numbered: {sorted(extra)[:10]}")
    if damaged:
        f.fail(f"{damaged} record(s) could not be unsealed (table damaged)")
    if any(k != "event" for k in left.values()):
        f.fail(f"readings or charges left undelivered after the drain: {left}")
    rows = he.execute("SELECT meter_id, time_ms FROM readings WHERE gateway_id = ?", (GATEWAY,)).fetchall()
    dups = [k for k, n in Counter(rows).items() if n > 1]
    if dups:
        f.fail(f"the same meter reading stored twice (meter, time): {dups[:10]}")
    if len(rows) != int(kv.get("readings_committed", 0)):
        f.fail(f"{kv.get('readings_committed')} readings committed, {len(rows)} at the headend")
    f.readings, f.records = len(rows), last


def _check_money(site: ChaosSite, gw: sqlite3.Connection, he: sqlite3.Connection, f: Findings) -> None:
    charges = [
        (orjson.loads(b), c)
        for b, c in he.execute(
            "SELECT body, created_ms FROM events WHERE gateway_id = ? AND kind = 'charge' ORDER BY record_id",
            (GATEWAY,),
        )
    ]
    ids = Counter(c["id"] for c, _ in charges)
    twice = [i for i, n in ids.items() if n > 1]
    if twice:
        f.fail(f"ledger entries uploaded twice: {twice[:10]}")
    sales = {credit_id(s.command_id): s for s in site.central.sales}
    unexpected = [s for s in site.central.sales if s.outcome not in ("applied", "duplicate")]
    if unexpected or site.central.unexpected:
        f.fail(f"top-ups not applied: {[(s.command_id, s.outcome) for s in unexpected]} {site.central.unexpected}")
    for s in site.central.sales:
        applied = [r for r in site.central.seen_results.get(s.command_id, []) if r["outcome"] == "applied"]
        if len(applied) != 1:
            f.fail(f"top-up {s.command_id} reported applied {len(applied)} times")
    gw_credits = Counter(
        e for (e,) in gw.execute("SELECT entry_id FROM billing_entry WHERE kind = 'credit'")
    )
    if gw_credits != Counter(list(sales)):
        f.fail(f"credits in the ledger {dict(gw_credits)} are not central's sales {sorted(sales)}")
    he_credits = {c["id"]: c["amount_micro"] for c, _ in charges if c["kind"] == "credit"}
    if he_credits != {k: s.amount_micro for k, s in sales.items()}:
        f.fail("credits at the headend differ from central's sales")
    f.credits = len(he_credits)
    tz = TZ
    balances = dict(gw.execute("SELECT account, balance_micro FROM billing_account").fetchall())
    folded = dict(gw.execute("SELECT account, sum(amount_micro) FROM billing_entry GROUP BY account").fetchall())
    for p in PLAN:
        settings = load_account(site.root / f"{p.account}.toml", tz)
        book = load_book([site.root / t for t in p.tariffs], tz)
        rows = he.execute(
            "SELECT record_id, time_ms, quantities, quality FROM readings WHERE gateway_id = ? AND meter_id = ?"
            " ORDER BY record_id",
            (GATEWAY, p.meter),
        ).fetchall()
        regs = []
        for rid, t, q, ql in rows:
            rr = RegisterReading.from_reading(_reading_of(p.meter, t, q, ql), str(rid))
            if rr is not None:
                regs.append(rr)
        if not regs:
            f.fail(f"no register reading of {p.meter} at the headend")
            continue
        times = [r.time_ms for r in regs]
        if times != sorted(set(times)):
            f.fail(f"{p.meter}: readings not in time order by record id")
        kwh = [r.import_kwh for r in regs]
        if kwh != sorted(kwh):
            f.fail(f"{p.meter}: import register went backwards at the headend")
        # (float32 registers of the Modbus meters round to the nearest 0.01 kWh on the way)
        if kwh[0] < site.initial_kwh[p.meter] - Decimal("0.01") or kwh[-1] > site.meter_kwh(p.meter) + Decimal("0.01"):
            f.fail(f"{p.meter}: readings {kwh[0]}..{kwh[-1]} outside the meter's {site.initial_kwh[p.meter]}..now")
        results, _ = rate_chain(regs, book, settings.opening_tier)
        rated = {r.charge.charge_id: r.charge for r in results if r.charge is not None and r.charge.ckwh > 0}
        if sum(c.ckwh for c in rated.values()) != register_ckwh(kwh[-1]) - register_ckwh(kwh[0]):
            f.fail(f"{p.meter}: billed energy is not last - first register")
        uploaded = {
            c["id"]: c["amount_micro"] for c, _ in charges if c["kind"] == "debit" and c["account"] == p.account
        }
        expected = {cid: -c.amount_micro for cid, c in rated.items()}
        if uploaded != expected:
            only_up = sorted(set(uploaded) - set(expected))[:5]
            only_re = sorted(set(expected) - set(uploaded))[:5]
            diff = [k for k in set(uploaded) & set(expected) if uploaded[k] != expected[k]][:5]
            f.fail(f"{p.account}: debits differ from re-rating: uploaded only {only_up}, re-rated only {only_re}, amounts {diff}")
        f.debits += len(rated)
        fixed = sum(c["amount_micro"] for c, _ in charges if c["kind"] == "fixed" and c["account"] == p.account)
        topups = sum(s.amount_micro for s in site.central.sales if s.account == p.account)
        want = settings.opening_balance_micro + topups + sum(expected.values()) + fixed
        if balances.get(p.account) != want:
            f.fail(
                f"{p.account}: balance {balances.get(p.account)} != opening {settings.opening_balance_micro}"
                f" + top-ups {topups} - re-rated debits {-sum(expected.values())} + fixed {fixed} = {want}"
            )
        if folded.get(p.account) != balances.get(p.account):
            f.fail(f"{p.account}: ledger entries sum to {folded.get(p.account)}, stored balance {balances.get(p.account)}")


def _check_relays(site: ChaosSite, gw: sqlite3.Connection, he: sqlite3.Connection, f: Findings) -> None:
    decisions: dict[tuple[str, bool], list[int]] = defaultdict(list)
    for body, created in he.execute(
        "SELECT body, created_ms FROM events WHERE gateway_id = ? AND kind = 'event'", (GATEWAY,)
    ):
        ev = orjson.loads(body)
        t = ev.get("type", "")
        if t in ("cutoff.action.trip", "cutoff.action.close", "cutoff.action.close_allowed"):
            decisions[(ev["meter"], t == "cutoff.action.trip")].append(created)
            f.decisions += 1
    per_decision = RelayPolicy().max_drives
    for meter, m in site.all_meters().items():
        ops: list[RelayOp] = m.ops  # type: ignore[union-attr]
        f.relay_ops += len(ops)
        for op in ops:
            before = [t for t in decisions.get((meter, op.open), []) if t <= op.time_ms]
            if not before:
                f.fail(f"{meter}: relay {'opened' if op.open else 'closed'} at {op.time_ms} with no committed decision before it")
        for want in (True, False):
            n_ops = sum(op.open is want for op in ops)
            n_dec = len(decisions.get((meter, want), []))
            if n_ops > per_decision * n_dec:
                f.fail(f"{meter}: {n_ops} relay {'trips' if want else 'closes'} for {n_dec} decisions")
    want_open = {
        a: bool(orjson.loads(s)["relay_open"]) if s else False
        for a, s in gw.execute("SELECT account, cutoff_state FROM billing_account")
    }
    for p in PLAN:
        if site.relay_open(p.meter) != want_open.get(p.account, False):
            f.fail(f"{p.meter}: relay open={site.relay_open(p.meter)} but the policy holds open={want_open.get(p.account)}")

"""``tariff simulate`` and the running daemon take the same decisions at the same instants.

Every example tariff (and the two-version book) bills one copy of every example
account, all on one gateway: the real daemon with a controlled clock, a Modbus
TCP simulator whose meters show the example readings (total and T1..T4
registers) and drive a supply relay, mosquitto and the reference headend
(central, whose acknowledgements keep the gateway in contact). The clock moves
from instant to instant of the story — every reading, every scripted top-up,
every instant simulate says a decision falls on — and the daemon does the rest
on its own: its one-second tick, its catch-up of window ends and reconnect
delays, its relays.

Afterwards the readings and the events that reached central are the evidence:
the readings the daemon took go through ``tariff simulate`` with the account
file, and its cutoff timeline (state changes, deferred cuts and restores,
every relay and alarm action, with their instants, reasons and state labels)
must equal the daemon's exactly.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
import tomllib
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from firmware_bridge.modbus.profiles import parse_profile
from firmware_bridge.reading import Quantity
from gateway.billing.account import AccountSettings, load_account
from gateway.billing.cli import Readings, read_readings_csv, simulate_run
from gateway.billing.cutoff import describe
from gateway.billing.rating import RegisterReading, iso_local
from gateway.billing.tariff import TariffBook
from gateway.billing.tariff_file import load_book
from gateway.config import load_config
from gateway.daemon import Cycle, Daemon
from headend.ingest import Headend
from headend.store import HeadendDB
from testbed.simulators.modbus import ModbusSimulator
from tests.harness.mosquitto import Mosquitto
from tests.harness.site import DEV_UPLINK, bus, gateway_config, meter

ROOT = Path(__file__).resolve().parents[2]
EX = ROOT / "examples"
TZ = "Asia/Shanghai"
RATES = (Quantity.ENERGY_IMPORT_T1, Quantity.ENERGY_IMPORT_T2, Quantity.ENERGY_IMPORT_T3,
         Quantity.ENERGY_IMPORT_T4)

# every example tariff under examples/, alone; the two versions of cn-residential also as a book
BOOKS: dict[str, list[Path]] = {
    p.stem: [p] for p in [*sorted((EX / "tariffs").glob("*.toml")), EX / "bundle" / "tariffs" / "residential.toml"]
}
BOOKS["cn-residential-v1+v2"] = [EX / "tariffs" / "cn-residential-tou-v1.toml",
                                 EX / "tariffs" / "cn-residential-tou-v2.toml"]
ACCOUNTS = sorted((EX / "accounts").glob("*.toml"))
# The example story (examples/tariffs/readings.csv and the account's top-up) moved 120 days
# on, Tuesday 30 June 06:00 to Wednesday 1 July 12:00: across version 2's effective_from
# and the summer season, so that every version is used.
SHIFT_MS = 120 * 86_400_000

# Integer registers (Wh) so that what the meter shows is exactly what the CSV says.
PROFILE = {
    "function_code": 4,
    "fields": {
        "energy_import_kwh": {"address": 0, "type": "uint32", "unit": "Wh"},
        **{q.value: {"address": 2 + 2 * i, "type": "uint32", "unit": "Wh"} for i, q in enumerate(RATES)},
    },
}


@dataclass(frozen=True)
class Case:
    name: str
    unit: int
    meter: str
    account: str
    account_file: Path
    tariffs: list[Path]


def cases(tmp: Path) -> list[Case]:
    out = []
    unit = 0
    for book_name, tariffs in BOOKS.items():
        for acc_file in ACCOUNTS:
            unit += 1
            raw = tomllib.loads(acc_file.read_text(encoding="utf-8"))
            acc = f"acc-{unit:02d}"
            meter = f"m{unit:02d}"
            text = acc_file.read_text(encoding="utf-8")
            text = text.replace(f'account = "{raw["account"]}"', f'account = "{acc}"')
            text = text.replace(f"meters = {orjson.dumps(raw['meters']).decode().replace(',', ', ')}",
                                f'meters = ["{meter}"]')
            for tu in raw.get("topup", []):
                moved = datetime.fromtimestamp(tu["time"].timestamp() + SHIFT_MS / 1000, tu["time"].tzinfo)
                text = text.replace(f"time = {tu['time'].isoformat()}", f"time = {moved.isoformat()}")
            assert f'"{acc}"' in text and f'["{meter}"]' in text, "account file layout changed"
            f = tmp / f"{acc}.toml"
            f.write_text(text, encoding="utf-8")
            copies = []
            for t in tariffs:
                dst = tmp / f"{unit:02d}-{t.name}"
                shutil.copy(t, dst)
                copies.append(dst)
            out.append(Case(f"{book_name} x {acc_file.stem}", unit, meter, acc, f, copies))
    return out


def site(tmp: Path, cs: list[Case], modbus_port: int, broker_port: int) -> Path:
    fields = {q: {"address": f["address"], "type": "uint32", "unit": "Wh"} for q, f in PROFILE["fields"].items()}  # type: ignore[attr-defined]
    return gateway_config(
        tmp,
        "gw-sim",
        gateway={"timezone": TZ},
        broker={"host": "127.0.0.1", "port": broker_port, "keepalive_s": 5},
        uplink={**DEV_UPLINK, "batch_max_records": 200},
        buses=[bus(modbus_port, retries=1)],
        profiles={"tou": {"function_code": 4, "fields": fields}},
        meters=[{**meter(c.meter, unit=c.unit, account=c.account), "profile": "tou"} for c in cs],
        accounts=[
            {"id": c.account, "settings": c.account_file.name, "tariffs": [t.name for t in c.tariffs]} for c in cs
        ],
    )


class Clock:
    """The gateway's time, moved by the test (the daemon's only clock)."""

    def __init__(self, t_ms: int) -> None:
        self.t = t_ms

    def __call__(self) -> int:
        return self.t


async def until(pred: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s: {what}")


def story() -> list[RegisterReading]:
    rd = read_readings_csv(EX / "tariffs" / "readings.csv", ZoneInfo(TZ))
    (meter,) = rd.items
    return [replace(x, time_ms=x.time_ms + SHIFT_MS) for x in rd.items[meter] if isinstance(x, RegisterReading)]


def daemon_timeline(central: Path, account: str, cfg_tz: str, until_ms: int) -> list[tuple[Any, ...]]:
    with sqlite3.connect(central) as db:
        bodies = [orjson.loads(b) for (b,) in db.execute(
            "SELECT body FROM events WHERE kind = 'event' ORDER BY record_id")]
    out = []
    for e in bodies:
        t = str(e.get("type", ""))
        if not t.startswith("cutoff.") or e.get("account") != account or int(e["time_ms"]) > until_ms:
            continue
        if t.startswith("cutoff.action."):
            out.append((int(e["time_ms"]), t, e["meter"], e["reason"]))
        else:
            out.append((int(e["time_ms"]), t, e["from"], e["to"], e["reason"], e["state"], e["balance_micro"]))
    return out


def simulate_timeline(book: TariffBook, acc: AccountSettings, readings: Readings, start_ms: int,
                      until_ms: int) -> list[tuple[Any, ...]]:
    run = simulate_run(book, readings, acc, start_ms=start_ms)
    out: list[tuple[Any, ...]] = []
    for d in run.decisions:
        if d.time_ms > until_ms:
            continue
        label = describe(d.state, d.balance_micro, d.time_ms, run.contact, acc.cutoff)
        for e in d.events:
            out.append((e.time_ms, f"cutoff.{e.type}", e.from_level.value, e.to_level.value, e.reason, label,
                        e.balance_micro))
        for a in d.actions:
            out.append((d.time_ms, f"cutoff.action.{a.kind.value}", a.meter, a.reason))
    return out


def central_readings(central: Path, meter: str) -> list[RegisterReading]:
    with sqlite3.connect(central) as db:
        rows = list(db.execute("SELECT record_id, time_ms, quantities FROM readings WHERE meter_id = ?"
                               " ORDER BY record_id", (meter,)))
    out = []
    for rid, t, q in rows:
        v = orjson.loads(q)
        rates = {f"T{i + 1}": Decimal(v[r.value]) for i, r in enumerate(RATES) if r.value in v}
        out.append(RegisterReading(str(rid), meter, int(t), Decimal(v[Quantity.ENERGY_IMPORT.value]), rates))
    return out


async def test_simulate_and_the_daemon_decide_the_same_at_the_same_instants(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    cs = cases(tmp_path)
    books = {c.account: load_book(c.tariffs, TZ) for c in cs}
    accts = {c.account: load_account(c.account_file, TZ) for c in cs}
    rows = story()
    # the instants of the story: readings, top-ups, and every decision simulate expects
    steps = {r.time_ms for r in rows}
    for c in cs:
        steps |= {t.issued_ms for t in accts[c.account].topups}
        run = simulate_run(books[c.account], Readings({c.meter: list(rows)}), accts[c.account])
        steps |= {d.time_ms for d in run.decisions}
    t0 = rows[0].time_ms
    clock = Clock(t0)
    profile = parse_profile("tou", PROFILE)
    committed: dict[str, int] = {}

    def on_cycle(cycle: Cycle) -> None:
        for r in cycle.readings:
            committed[r.meter_id] = max(committed.get(r.meter_id, 0), r.time_ms)

    def caught_up(daemon: Daemon, t: int) -> bool:
        """Every meter read at ``t`` or later and committed (its debits and the policy
        evaluated up to then), every relay operation done, and central in contact."""
        assert daemon.uplink is not None
        return (all(committed.get(c.meter, 0) >= t for c in cs) and daemon.relays_idle()
                and (daemon.uplink.last_contact_ms or 0) >= t)

    async with ModbusSimulator(units=[c.unit for c in cs], profile=profile, load_kw=0) as sim:

        def show(r: RegisterReading) -> None:
            for c in cs:
                m = sim.meter(c.unit)
                m.values[Quantity.ENERGY_IMPORT] = r.import_kwh
                for i, q in enumerate(RATES):
                    m.values[q] = r.rate_kwh.get(f"T{i + 1}", Decimal(0))

        show(rows[0])
        cfg = load_config(site(tmp_path, cs, sim.port, mosquitto.port))
        hdb = await HeadendDB.open(tmp_path / "central.db")
        headend = asyncio.create_task(Headend(hdb, host="127.0.0.1", port=mosquitto.port).run())
        daemon = Daemon(cfg, clock_ms=clock, on_cycle=on_cycle)
        stop = asyncio.Event()
        run_task = asyncio.create_task(daemon.run(stop))
        try:
            await asyncio.wait_for(daemon.ready.wait(), 20)
            assert daemon.prepaid is not None and daemon.outbox is not None and daemon.uplink is not None
            started = daemon.started_ms
            assert started == t0
            by_time = {r.time_ms: r for r in rows}
            for t in sorted(steps):
                clock.t = t
                for c in cs:  # a scripted sale reaches the gateway at its time
                    for tu in accts[c.account].topups:
                        if tu.issued_ms == t:
                            async with daemon.outbox.transaction() as db:
                                res = await daemon.prepaid.apply_topup_in(
                                    db,
                                    {"account": c.account, "amount_micro": tu.amount_micro,
                                     "purchase_counter": tu.counter, "payment_channel": tu.channel.value},
                                    command_id=f"{tu.topup_id}-{c.account}", channel="cli", now_ms=clock(),
                                )
                            assert res["status"] == "applied", res
                if t in by_time:
                    show(by_time[t])
                await until(lambda t=t: caught_up(daemon, t), 20, f"the gateway at {iso_local(ZoneInfo(TZ), t)}")
            end = clock.t
            with sqlite3.connect(tmp_path / "gw.db") as gw:
                # Every record committed by now acknowledged (deleted): the daemon deletes
                # acknowledged records with its next poll cycle's commit, which adds that
                # cycle's records, so the outbox is not empty while the meters are polled.
                (last,) = gw.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()
                await until(lambda: gw.execute("SELECT count(*) FROM outbox WHERE id <= ?", (last,)).fetchone()[0] == 0,
                            20, "everything delivered to central")
        finally:
            stop.set()
            await asyncio.wait_for(run_task, 30)
            headend.cancel()
            await asyncio.gather(headend, return_exceptions=True)
            await hdb.close()

    central = tmp_path / "central.db"
    trips = 0
    for c in cs:
        taken = central_readings(central, c.meter)
        assert [r.import_kwh for r in taken if r.time_ms >= t0][:1] == [rows[0].import_kwh]
        # The daemon stamps a reading with its own clock at the read, and that clock
        # only ever stands at the story's instants: however long a poll cycle took in
        # real time (a loaded machine), every reading is taken at one of them.
        assert {r.time_ms for r in taken} <= steps, (c.name, sorted({r.time_ms for r in taken} - steps))
        daemon_side = daemon_timeline(central, c.account, TZ, end)
        sim_side = simulate_timeline(books[c.account], accts[c.account], Readings({c.meter: list(taken)}),
                                     started, end)
        assert daemon_side == sim_side, c.name
        assert sim_side, f"{c.name}: nothing decided"
        local = [(iso_local(ZoneInfo(TZ), e[0])[11:19], e[1]) for e in sim_side]
        if ("08:00:00", "cutoff.action.trip") in local:
            # cut deferred by the 18:00-08:00 window: at its end, not at the next reading (09:00);
            # topped up at 10:30, restored after the 60 s reconnect delay
            trips += 1
            assert ("10:31:00", "cutoff.action.close_allowed") in local, c.name
    # the story is one worth comparing: several tariffs run the household into a deferred cut
    assert trips >= 3

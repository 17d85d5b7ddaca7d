"""A headend database with a fleet in it, for the console's tests.

* ``demo-gw-01``: what ``edgegw demo`` leaves in its headend database — a real
  gateway daemon polling simulated meters, its prepaid story (alarms, a
  deferred cutoff, the supply cut, a top-up from central restoring it) sent
  sealed over MQTT and stored by the real headend;
* ``village-02``: three meters read every 15 minutes for six hours, one of
  them offline since two hours ago (the gateway's own ``meter.offline``
  event), and revenue-protection findings of the gateway's own checks
  (a register that ran backwards, a meter clock that drifted);
* ``village-03``: a gateway last heard from three days ago.

``village-02`` and ``village-03`` are batches as the gateway's uplink encodes
them (encoding 1), decoded and stored by the headend store itself.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

from firmware_bridge.reading import Measurement, Quantity, Reading, TimeSource
from gateway.billing.cutoff import CutoffEvent, Level
from gateway.billing.ledger import Entry, EntryKind, adjustment_entry
from gateway.billing.rating import RegisterReading
from gateway.billing.risk import check_clock_drift, check_register_backwards
from gateway.billing.topup import Channel, Source, TopUp, credit_entry
from gateway.meter_health import Change, Known, State
from gateway.prepaid import _cutoff_event
from headend.store import HeadendStore
from store_forward import codec, wire_json
from store_forward.records import Record, RecordClass, RecordKind, split_reading

REPO = Path(__file__).resolve().parents[3]
DEMO_DURATION_S = 20
MIN = 60_000
HOUR = 60 * MIN

CANDIDATE_DSNS = [
    d
    for d in (
        os.environ.get("EDGEGW_TEST_PG"),
        "host=127.0.0.1 port=5432 user=postgres dbname=postgres",
        "host=/var/run/postgresql dbname=postgres",
    )
    if d
]


def run_demo(workdir: Path) -> Path:
    """Run ``edgegw demo`` from the checkout; its headend database."""
    r = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--duration", str(DEMO_DURATION_S), "--workdir", str(workdir)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return workdir / "central.db"


def _reading(meter: str, t: int, kwh: Decimal, **extra: Decimal) -> Reading:
    values = {Quantity.ENERGY_IMPORT: Measurement(kwh), **{Quantity(k): Measurement(v) for k, v in extra.items()}}
    return Reading(meter, t, values, TimeSource.SYSTEM_SYNCED)


class _Gateway:
    def __init__(self, store: HeadendStore, gateway: str) -> None:
        self.store, self.gateway = store, gateway
        self.seq = 0
        self.record_id = 0
        self.pending: list[Record] = []

    def reading(self, r: Reading) -> None:
        for cls, body in split_reading(r):
            self.record_id += 1
            self.pending.append(Record(self.record_id, cls, RecordKind.READING, r.time_ms, body))

    def event(self, body: dict[str, Any], created_ms: int) -> None:
        self.record_id += 1
        self.pending.append(Record(self.record_id, RecordClass.EVENT, RecordKind.EVENT, created_ms, body))

    def event_record(self, cls: RecordClass, kind: str, body: dict[str, Any], created_ms: int) -> None:
        self.record_id += 1
        self.pending.append(Record(self.record_id, cls, kind, created_ms, body))

    async def send(self, received_ms: int) -> None:
        self.seq += 1
        payload = wire_json.encode(self.gateway, self.seq, self.pending, epoch="0f3c9a00d2e1b457")
        result = await self.store.store(codec.decode(payload, None, allow_plain=True), received_ms)
        assert result.status == "stored", result
        self.pending = []


async def add_villages(store: HeadendStore, now_ms: int) -> None:
    v2 = _Gateway(store, "village-02")
    start = now_ms - 6 * HOUR
    rates = {"m-01": Decimal("0.21"), "m-02": Decimal("0.08"), "m-03": Decimal("0.35")}
    registers = {"m-01": Decimal("812.40"), "m-02": Decimal("2301.05"), "m-03": Decimal("57.90")}
    offline_at = now_ms - 2 * HOUR
    for step in range(6 * 4 + 1):
        t = start + step * 15 * MIN
        for meter, rate in rates.items():
            if meter == "m-03" and t >= offline_at:
                continue
            registers[meter] += rate
            v2.reading(_reading(meter, t, registers[meter], voltage_v=Decimal("228.4") + step % 3))
        if step % 4 == 3:
            await v2.send(t + 20_000)
    _account(v2, "hh-0201", start, now_ms)
    # m-03 stops answering: the gateway's meter-health change
    change = Change("m-03", "rs485-1", Known(State.ONLINE, start), State.OFFLINE, offline_at + 5 * MIN,
                    "timeout: no answer within 500 ms", 5, offline_at - 15 * MIN)  # fmt: skip
    v2.event(change.event(), offline_at + 5 * MIN)
    # m-02's register runs backwards, and its clock is 20 minutes off
    prev = RegisterReading("r1", "m-02", now_ms - 30 * MIN, registers["m-02"], {})
    cur = RegisterReading("r2", "m-02", now_ms - 15 * MIN, registers["m-02"] - Decimal("3.50"), {})
    drift = _reading("m-02", now_ms - 15 * MIN, registers["m-02"], meter_clock_s=Decimal((now_ms - 35 * MIN) // 1000))
    for found in (check_register_backwards(prev, cur), check_clock_drift(drift)):
        assert found is not None
        v2.event({"type": f"risk.{found.kind.value}", "meter": found.meter_id, "time_ms": found.time_ms,
                  "evidence": dict(found.evidence)}, found.time_ms)  # fmt: skip
    await v2.send(now_ms - 10 * MIN)

    v3 = _Gateway(store, "village-03")
    old = now_ms - 3 * 24 * HOUR
    for step in range(8):
        v3.reading(_reading("hh-7", old - (8 - step) * 15 * MIN, Decimal("40.00") + Decimal(step) / 10))
    await v3.send(old)


def _account(gw: _Gateway, account: str, start: int, now_ms: int) -> None:
    """A prepaid account on meter m-01: its ledger entries as the gateway uploads them
    (charge records), a top-up, and its cutoff state changes."""
    opening = adjustment_entry(f"opening:{account}", account, 3_000_000, start, "opening balance from the account file", "provisioning")
    entries: list[Entry] = [dataclasses.replace(opening, seq=1)]
    balance = opening.amount_micro
    t = start
    for i in range(24):
        t = start + (i + 1) * 15 * MIN
        amount = 117_600 + 5_600 * (i % 3)  # 0.21-0.23 kWh at 0.56 yuan
        entries.append(Entry(f"debit:{account}:{i}", account, EntryKind.DEBIT, -amount, t,
                             {"meter": "m-01", "ckwh": amount // 5_600, "apportioning": "none"}, len(entries) + 1))  # fmt: skip
        balance -= amount
        if i == 7:
            gw.event(_cutoff_event(CutoffEvent("state_change", account, t, Level.NORMAL, Level.ALARM1, balance,
                                               f"balance {balance / 1e6:.2f} <= alarm 1 level 2.10"),
                                   "supply on: low balance (alarm 1 at 2.10)"), t)  # fmt: skip
        if i == 15:
            sale = TopUp("counter-20261204-0042", account, 1, 20_000_000, Channel.COUNTER, Source.MQTT, t - 60_000)
            credit = credit_entry(sale, t + 1, 0, False)
            entries.append(dataclasses.replace(credit, seq=len(entries) + 1))
            balance += credit.amount_micro
            gw.event(_cutoff_event(CutoffEvent("state_change", account, t + 1, Level.ALARM1, Level.NORMAL, balance,
                                               f"balance {balance / 1e6:.2f} > alarm 1 level 2.10"), "supply on"), t + 1)  # fmt: skip
    for e in entries:
        gw.event_record(RecordClass.BILLING, RecordKind.CHARGE, e.to_json(), e.time_ms)


def admin_connection() -> tuple[Any, str]:
    import psycopg

    errors = []
    for dsn in CANDIDATE_DSNS:
        try:
            return psycopg.connect(dsn, autocommit=True, connect_timeout=5), dsn
        except psycopg.OperationalError as exc:
            errors.append(f"{dsn!r}: {exc}".strip())
    raise RuntimeError("no PostgreSQL server for the tests: " + "; ".join(errors))


@contextmanager
def pg_database() -> Iterator[str]:
    """A new PostgreSQL database for one test module; dropped afterwards."""
    name = f"edgegw_console_{secrets.token_hex(4)}"
    admin, dsn = admin_connection()
    with admin:
        admin.execute(f"CREATE DATABASE {name}")
        try:
            yield dsn.replace("dbname=postgres", f"dbname={name}")
        finally:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def copy_to_postgres(sqlite_path: Path, dsn: str) -> None:
    """The ingest's tables of a SQLite headend database, row by row into PostgreSQL
    (whose headend schema must exist: PostgresHeadendDB.open makes it)."""
    import orjson
    import psycopg

    src = sqlite3.connect(sqlite_path)
    with psycopg.connect(dsn) as dst:
        for table, json_cols in (("batches", ()), ("readings", ("quantities", "quality")),
                                 ("telemetry", ("quantities", "quality")), ("events", ("body",))):  # fmt: skip
            cur = src.execute(f"SELECT * FROM {table}")
            cols = [d[0] for d in cur.description]
            rows = []
            for row in cur:
                rows.append(tuple(
                    psycopg.types.json.Jsonb(orjson.loads(v)) if c in json_cols and v is not None else v
                    for c, v in zip(cols, row, strict=True)
                ))  # fmt: skip
            with dst.cursor() as c:
                c.executemany(
                    f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})", rows
                )
    src.close()


def fresh_copy(db: Path, to: Path) -> Path:
    """A copy of a SQLite database (with its WAL) that tests may write to."""
    con = sqlite3.connect(db)
    out = sqlite3.connect(to)
    con.backup(out)
    out.close()
    con.close()
    return to

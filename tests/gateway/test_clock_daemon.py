"""Billing, cutoff and commands on the trusted clock, in the running daemon.

The real daemon polls a Modbus simulator with a supply relay, bills a prepaid
account with a daily fixed charge into real SQLite, and takes signed commands
through its command handler. The test drives the system clock (real time plus
an offset, and jumps that end by themselves at a monotonic deadline, so a
loaded machine cannot stretch them) separately from the monotonic clock and
from the NTP state.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from gateway.config import load_config
from gateway.daemon import Cycle, Daemon, wall_ms
from gateway.security import audit
from gateway.security.envelope import CommandResult, Outcome, RejectReason
from gateway.security.roles import CommandType
from gateway.security.trusted_time import ClockPolicy, SyncProbe, boot_ms
from headend.ingest import Headend
from headend.store import HeadendDB
from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import daemon_running, rows, until
from tests.gateway.test_prepaid_daemon import outbox_bodies
from tests.harness.mosquitto import Mosquitto, free_port
from tests.harness.site import DEV_UPLINK, gateway_config, meter, prepaid_account
from tests.security.conftest import GATEWAY, Central

DAY = 86_400_000
YEAR = 365 * DAY
TZ = ZoneInfo("Asia/Shanghai")
STANDING_MICRO = 5_000_000  # 5.00 a day against an opening balance of 10.00

TARIFF = """
id = "daily"
version = 1
effective_from = "2026-01-01T00:00:00+08:00"
timezone = "Asia/Shanghai"
price = "0.0100"

[[fixed]]
name = "standing"
period = "daily"
amount = "5.0000"
"""

class Clocks:
    """The system clock the daemon sees: real time + ``offset_ms``, plus a jump that
    ends by itself at a monotonic deadline."""

    def __init__(self) -> None:
        self.offset_ms = 0
        self.synced = True
        self._jump: tuple[int, int] | None = None  # (offset, until boot ms)

    def wall(self) -> int:
        w = wall_ms() + self.offset_ms
        if self._jump is not None and boot_ms() < self._jump[1]:
            w += self._jump[0]
        return w

    def jump_for(self, offset_ms: int, seconds: float) -> float:
        """Jump the clock by ``offset_ms`` for ``seconds``; returns when it ends (monotonic s)."""
        self._jump = (offset_ms, boot_ms() + int(seconds * 1000))
        return asyncio.get_running_loop().time() + seconds


def site(tmp: Path, modbus_port: int, central: Central, broker_port: int | None = None) -> Path:
    acct = prepaid_account(
        tmp, opening="10.00", alarm1="2.00", alarm2="1.00", close_permit="0.50",
        tariff_text=TARIFF, tariff_name="daily.toml",
    )
    (tmp / "trust.json").write_text(json.dumps(central.trust().to_dict()))
    return gateway_config(
        tmp,
        GATEWAY,
        modbus_port=modbus_port,
        gateway={"timezone": "Asia/Shanghai"},
        broker={"host": "127.0.0.1", "port": broker_port or free_port(), "keepalive_s": 5},
        uplink={**DEV_UPLINK, "batch_max_records": 50},
        security={"trust_file": "trust.json"},
        meters=[meter(account="acct-001")],
        accounts=[acct],
    )


@asynccontextmanager
async def running(
    path: Path,
    clocks: Clocks,
    *,
    synced: Callable[[], bool] | None = None,
    policy: ClockPolicy | None = None,
) -> AsyncIterator[Daemon]:
    daemon = Daemon(
        load_config(path),
        clock_ms=clocks.wall,
        mono_ms=boot_ms,
        clock_synced=synced or (lambda: clocks.synced),
        clock_policy=policy,
    )
    async with daemon_running(daemon):
        yield daemon


def fixed_entries(db: Path) -> list[tuple[str, int]]:
    return [
        (str(i), int(t))
        for i, t in rows(db, "SELECT entry_id, time_ms FROM billing_entry WHERE kind = 'fixed'")
    ]


def audit_actions(db: Path) -> list[str]:
    return [str(a) for (a,) in rows(db, "SELECT action FROM audit_log ORDER BY seq")]


def midnights(from_ms: int, to_ms: int) -> int:
    """Local midnights in (from, to]: the daily charges that fall in that stretch."""
    d = datetime.fromtimestamp(from_ms / 1000, TZ).date()
    n = 0
    while True:
        d += timedelta(days=1)
        t = int(datetime(d.year, d.month, d.day, tzinfo=TZ).timestamp() * 1000)
        if t > to_ms:
            return n
        n += from_ms < t


async def ticks(daemon: Daemon, n: int = 3) -> None:
    """Wait until the writer has committed ``n`` more cycles (billing ticks run beside)."""
    start = daemon.stats.cycles
    await until(lambda: daemon.stats.cycles >= start + n, 15, f"{n} more poll cycles")
    await asyncio.sleep(1.2)  # at least one billing tick


async def test_clock_a_year_ahead_for_six_seconds_charges_nothing_and_is_reported(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    clocks = Clocks()
    db = tmp_path / "gw.db"
    hdb = await HeadendDB.open(tmp_path / "central.db")
    headend = asyncio.create_task(Headend(hdb, host="127.0.0.1", port=mosquitto.port).run())
    try:
        async with ModbusSimulator(units=[1], load_kw="0.5") as sim:
            path = site(tmp_path, sim.port, Central(), mosquitto.port)
            async with running(path, clocks) as daemon:
                await ticks(daemon)
                ends = clocks.jump_for(YEAR, 6.0)  # NTP reports the clock synchronised throughout
                while asyncio.get_running_loop().time() < ends + 1.5:
                    await asyncio.sleep(0.5)
                await ticks(daemon)
                assert not sim.meter(1).relay_open
                await until(
                    lambda: any(
                        json.loads(b).get("type") == "time.clock_jump_backward"
                        for (b,) in rows(tmp_path / "central.db", "SELECT body FROM events")
                    ),
                    20,
                    "the jump's events at central",
                )
    finally:
        headend.cancel()
        await asyncio.gather(headend, return_exceptions=True)
        await hdb.close()
    now = wall_ms()
    # no fixed charge for the year the clock pretended (a real midnight may pass during the test)
    assert [e for e in fixed_entries(db) if e[1] > now] == []
    events = await outbox_bodies(db, "event")
    types = [e["type"] for e in events]
    assert not [t for t in types if t.startswith(("cutoff.action.trip", "billing.fixed_held"))], types
    (balance,) = rows(db, "SELECT balance_micro FROM billing_account WHERE account = 'acct-001'")[0]
    assert balance > 9_000_000  # energy only: a few fen
    # readings were stamped with trusted time, never a year ahead
    assert max(t for (t,) in rows(tmp_path / "central.db", "SELECT time_ms FROM readings")) <= now
    # the jump there and back: audited (hash chain intact) and sent to central
    actions = audit_actions(db)
    assert "time.clock_jump_forward" in actions and "time.clock_jump_backward" in actions
    assert audit.verify(db).ok
    central = [json.loads(b) for (b,) in rows(tmp_path / "central.db", "SELECT body FROM events")]
    jump = [e for e in central if e.get("type") == "time.clock_jump_forward"]
    assert len(jump) == 1 and abs(jump[0]["delta_ms"] - YEAR) < 5_000
    # and the stored floor and last time used are today's
    (floor, seen) = rows(db, "SELECT floor_ms, seen_ms FROM sec_time_floor")[0]
    assert floor <= now + 10 and now - 60_000 < seen <= now + 10  # (ms rounding)


async def test_clock_set_back_three_days_cannot_revive_an_expired_top_up(tmp_path: Path) -> None:
    """Synchronisation is recognised from timesyncd's file alone (no adjtimex in the
    sandbox); the clock set back three days is not followed, before or after a restart."""
    clocks = Clocks()
    central = Central()
    db = tmp_path / "gw.db"
    flag = tmp_path / "timesync" / "synchronized"
    probe = SyncProbe(timesyncd_file=flag, chrony_tracking_log=None, kernel=False, wall_ms=clocks.wall, cache_s=0)
    sources: list[str] = []
    async with ModbusSimulator(units=[1], load_kw="0.5") as sim:
        path = site(tmp_path, sim.port, central)
        async with running(path, clocks, synced=probe) as daemon:
            daemon.on_cycle = lambda c: sources.extend(r.time_source.value for r in c.readings)
            await ticks(daemon, 2)
            assert set(sources) == {"system"}  # no NTP yet
            flag.parent.mkdir()
            flag.touch()  # timesyncd synchronised
            sources.clear()
            await ticks(daemon, 2)
            assert sources and set(sources[-2:]) == {"system_synced"}
            now = wall_ms()
            expired = central.cmd(
                CommandType.TOPUP,
                {"account": "acct-001", "amount_micro": 20_000_000, "purchase_counter": 1,
                 "payment_channel": "counter"},
                issued_at=now - 2 * DAY, expires_at=now - DAY,
            )  # fmt: skip
            clocks.offset_ms = -3 * DAY  # the system clock set back three days
            await ticks(daemon, 2)
            assert daemon.commands is not None
            res: CommandResult = await daemon.commands.handle(expired, channel="mqtt")
            assert res.outcome is Outcome.REJECTED and res.reason is RejectReason.EXPIRED, res
        # restarted with the clock still three days behind: still refused
        async with running(path, clocks, synced=probe) as daemon:
            assert daemon.commands is not None
            again = await daemon.commands.handle(expired, channel="mqtt")
            assert again.outcome is Outcome.REJECTED and again.reason is RejectReason.EXPIRED, again
    (balance,) = rows(db, "SELECT balance_micro FROM billing_account WHERE account = 'acct-001'")[0]
    assert balance <= 10_000_000
    assert [t for t in audit_actions(db) if t.startswith("time.")].count("time.clock_jump_backward") == 1


async def test_synced_clock_blip_a_year_ahead_does_not_poison_the_floor(tmp_path: Path) -> None:
    """The floor follows a synchronised clock that holds (3 s here), never a 2-s blip:
    later commands are accepted, also after a restart."""
    clocks = Clocks()
    central = Central()
    db = tmp_path / "gw.db"
    policy = ClockPolicy(confirm_ms=3_000)
    async with ModbusSimulator(units=[1], load_kw="0.5") as sim:
        path = site(tmp_path, sim.port, central)
        async with running(path, clocks, policy=policy) as daemon:
            assert daemon.clock is not None
            await until(lambda: daemon.clock is not None and daemon.clock.state.floor_at(boot_ms()) > wall_ms() - 2_000,
                        10, "the floor follows the synchronised clock")  # fmt: skip
            ends = clocks.jump_for(YEAR, 2.0)
            while asyncio.get_running_loop().time() < ends + 1.0:
                await asyncio.sleep(0.25)
            assert daemon.clock.state.floor_at(boot_ms()) <= wall_ms() + 10  # (ms rounding)
        (floor,) = rows(db, "SELECT floor_ms FROM sec_time_floor")[0]
        assert wall_ms() - 60_000 < floor <= wall_ms() + 10
        async with running(path, clocks, policy=policy) as daemon:
            assert daemon.commands is not None
            now = wall_ms()
            res = await daemon.commands.handle(
                central.cmd(CommandType.TIME_SYNC, {"time_ms": now + 1}, issued_at=now, expires_at=now + 60_000),
                channel="mqtt",
            )
            assert res.outcome is Outcome.APPLIED, res
    assert "time.clock_jump_forward" in audit_actions(db)


async def test_long_power_off_holds_fixed_charges_reported_once_and_not_again_after_restart(
    tmp_path: Path,
) -> None:
    clocks = Clocks()
    central = Central()
    db = tmp_path / "gw.db"
    async with ModbusSimulator(units=[1], load_kw="0.5") as sim:
        path = site(tmp_path, sim.port, central)
        async with running(path, clocks) as daemon:
            await ticks(daemon, 2)
        assert rows(db, "SELECT fixed_until_ms FROM billing_account")[0][0] is not None
        clocks.offset_ms = 3 * DAY  # off for three days (the RTC kept time)
        for _ in range(2):  # the first start after it holds them; the next changes nothing
            async with running(path, clocks) as daemon:
                await ticks(daemon, 2)
                assert not sim.meter(1).relay_open
        # central bills one of them: a balance snapshot that counts it and lists its id
        held_ids = [str(c) for (c,) in rows(db, "SELECT charge_id FROM billing_fixed_held ORDER BY 1")]
        async with running(path, clocks) as daemon:
            assert daemon.commands is not None and daemon.outbox is not None
            async with daemon.outbox.transaction() as conn:
                async with conn.execute(
                    "SELECT last_seq, balance_micro FROM billing_account WHERE account = 'acct-001'"
                ) as cur:
                    last_seq, before = await cur.fetchone()  # type: ignore[misc]
            now = clocks.wall()
            snapshot = {
                "id": "snap-1", "account": "acct-001", "central_seq": 1, "as_of_seq": last_seq,
                "balance_micro": before - STANDING_MICRO, "time_ms": now,
                "included_ids": held_ids[:1],
            }  # fmt: skip
            res = await daemon.commands.handle(
                central.cmd(CommandType.BALANCE_SNAPSHOT, snapshot, issued_at=now, expires_at=now + 60_000),
                channel="mqtt",
            )
            assert res.outcome is Outcome.APPLIED, res
            await ticks(daemon, 2)
    assert rows(db, "SELECT state FROM billing_fixed_held ORDER BY charge_id") == [
        ("settled",), *[("held",)] * (len(held_ids) - 1)
    ]
    held_events = [e for e in await outbox_bodies(db, "event") if e["type"] == "billing.fixed_held"]
    assert len(held_events) == 1, held_events
    ev = held_events[0]
    n = midnights(int(ev["from_ms"]), int(ev["to_ms"]))  # type: ignore[call-overload]
    assert n >= 3 and ev["count"] == n and ev["amount_micro"] == n * STANDING_MICRO
    assert ev["cause"] == "off_time" and ev["account"] == "acct-001"
    held = rows(db, "SELECT charge_id, state FROM billing_fixed_held")
    assert len(held) == n
    assert sorted(ev["charges"]) == sorted(c for c, _ in held)  # type: ignore[type-var]
    # nothing debited for the days the gateway was off: no trip either
    assert [e for e in fixed_entries(db) if e[1] > int(ev["from_ms"])] == []  # type: ignore[call-overload]
    (balance,) = rows(db, "SELECT balance_micro FROM billing_account WHERE account = 'acct-001'")[0]
    assert 9_000_000 - STANDING_MICRO < balance <= 10_000_000 - STANDING_MICRO
    types = [e["type"] for e in await outbox_bodies(db, "event")]
    assert "cutoff.action.trip" not in types
    assert audit_actions(db).count("time.time_gap_at_start") >= 1


class SiteClock:
    """A clock the test moves: the daemon's only clock (system and monotonic)."""

    def __init__(self, t_ms: int) -> None:
        self.t = t_ms

    def __call__(self) -> int:
        return self.t


async def test_a_reading_carries_the_daemons_time_of_its_read_not_real_time_spent_in_the_cycle(
    tmp_path: Path,
) -> None:
    """Each reading is stamped with the daemon's trusted time when the bus became its
    read's, and with nothing else: here the daemon runs on a site clock that stands
    still while three meters take 30 ms each to answer, so every reading carries
    exactly the site clock's time, at every instant the clock is moved to.

    A reading is stamped from one clock, the one its debit, its cutoff decision
    and the billing tick beside it are decided on. The scheduler used to add the
    real (``time.monotonic``) time spent in the cycle to the cycle's start: a
    loaded machine then stamped a meter's reading a few ms later in one cycle
    than in the next at the same instant, the later reading was refused as not
    after the first, and the daemon decided at other instants than ``tariff
    simulate`` on the same readings (tests/gateway/test_simulate_matches_daemon.py).
    """
    t0 = int(datetime(2026, 6, 30, 6, 0, tzinfo=TZ).timestamp() * 1000)
    instants = [t0, t0 + 60_000, t0 + 3_600_000]
    clock = SiteClock(t0)
    taken: list[tuple[str, int]] = []
    meters = ("m001", "m002", "m003")

    def on_cycle(cycle: Cycle) -> None:
        taken.extend((r.meter_id, r.time_ms) for r in cycle.readings)

    async with ModbusSimulator(units=[1, 2, 3], load_kw="0.5") as sim:
        for u in (1, 2, 3):
            sim.meter(u).delay_s = 0.03
        path = gateway_config(
            tmp_path, "gw-site-clock", modbus_port=sim.port,
            meters=[meter(f"m00{u}", unit=u) for u in (1, 2, 3)],
        )  # fmt: skip
        async with daemon_running(Daemon(load_config(path), clock_ms=clock, on_cycle=on_cycle)):
            for t in instants:
                clock.t = t
                # every meter read twice at (or after) this instant
                await until(
                    lambda t=t: all(sum(1 for mid, x in taken if mid == m and x >= t) >= 2 for m in meters),
                    15, f"two readings of every meter at {t}",
                )  # fmt: skip
    assert {x for _, x in taken} == set(instants), sorted({x - t0 for _, x in taken})
    for m in meters:
        times = [x for mid, x in taken if mid == m]
        assert times == sorted(times) and set(times) == set(instants), (m, times)

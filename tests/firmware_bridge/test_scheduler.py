from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.driver import MeterTimeout
from firmware_bridge.modbus.driver import ModbusDriver
from firmware_bridge.modbus.profiles import BUILTIN_PROFILES
from firmware_bridge.modbus.transport import ModbusTransport
from firmware_bridge.reading import Quantity, Reading
from firmware_bridge.scheduler import (
    BackoffPolicy,
    BusScheduler,
    MeterHealth,
    attempts_for,
    backoff_ms,
    bus_went_silent,
    dlt645_gap_s,
    is_due,
    modbus_rtu_read_time_s,
    on_failure,
    on_success,
    rtu_t35_s,
    silent_interval_s,
)
from testbed.simulators.modbus import ModbusSimulator, RtuSimulator
from tests.harness.loops import BOTH_LOOPS

# --------------------------------------------------------------------------- pure parts


def test_t35() -> None:
    assert rtu_t35_s(9600) == pytest.approx(0.0040104, rel=1e-4)
    assert rtu_t35_s(2400) == pytest.approx(0.0160417, rel=1e-4)
    assert rtu_t35_s(19200) == pytest.approx(3.5 * 11 / 19200)
    assert rtu_t35_s(38400) == rtu_t35_s(115200) == 0.00175
    with pytest.raises(ValueError):
        rtu_t35_s(0)
    assert silent_interval_s("modbus", "tcp", 9600) == 0.0
    assert silent_interval_s("dlt645", "serial", 2400) == dlt645_gap_s(2400) >= 0.02


def test_guide_transaction_times() -> None:
    # GUIDE: N=10 registers at 9600 ≈ 46 ms, at 2400 ≈ 183 ms (without response delay)
    assert modbus_rtu_read_time_s(9600, 10) == pytest.approx(0.046, abs=0.002)
    assert modbus_rtu_read_time_s(2400, 10) == pytest.approx(0.183, abs=0.003)


@given(st.sampled_from([1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200]))
def test_t35_monotone_and_bounded(baud: int) -> None:
    assert 0.00175 <= rtu_t35_s(baud) <= 3.5 * 11 / 1200


policies = st.builds(
    BackoffPolicy,
    base_ms=st.integers(0, 10_000),
    factor=st.integers(1, 4),
    max_ms=st.integers(10_000, 1_000_000),
    quarantine_after=st.integers(1, 10),
    reprobe_ms=st.integers(0, 3_600_000),
)


@given(policies, st.integers(1, 200))
def test_backoff_monotone_bounded(policy: BackoffPolicy, n: int) -> None:
    d = backoff_ms(policy, n)
    if n >= policy.quarantine_after:
        assert d == policy.reprobe_ms
    else:
        assert policy.base_ms <= d <= policy.max_ms or d == policy.base_ms
        if n + 1 < policy.quarantine_after:
            assert backoff_ms(policy, n + 1) >= d


@given(policies, st.lists(st.booleans(), max_size=60), st.integers(0, 10**12))
def test_health_transitions(policy: BackoffPolicy, outcomes: list[bool], t0: int) -> None:
    h = MeterHealth("m")
    now = t0
    failures = successes = streak = 0
    for ok in outcomes:
        now += 1000
        prev = h
        h = on_success(h, now) if ok else on_failure(h, now, "timeout", "x", policy)
        if ok:
            successes += 1
            streak = 0
            assert h.online and not h.quarantined and h.last_good_ms == now and is_due(h, now)
        else:
            failures += 1
            streak += 1
            assert not h.online
            assert h.next_attempt_ms == now + backoff_ms(policy, streak)
            assert h.quarantined == (streak >= policy.quarantine_after)
            assert h.last_good_ms == prev.last_good_ms
            assert h.last_error is not None and h.last_error.at_ms == now
        assert h.consecutive_failures == streak
        assert h.total_failures == failures and h.total_successes == successes
        # a failing meter gets one attempt per cycle; retries only for an online meter
        assert attempts_for(h, 3) == (4 if h.online else 1)


# --------------------------------------------------------------------------- against the simulator

SDM120 = BUILTIN_PROFILES["sdm120"]


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSimulator]:
    async with ModbusSimulator([1, 2, 3, 4], load_kw="1.0") as s:
        yield s


@pytest.fixture
async def transport(sim: ModbusSimulator) -> AsyncIterator[ModbusTransport]:
    t = ModbusTransport.tcp("127.0.0.1", sim.port, name="bus", timeout_s=0.2)
    yield t
    t.close()


def make_sched(transport: ModbusTransport, retries: int = 2, policy: BackoffPolicy | None = None) -> BusScheduler:
    drivers = [ModbusDriver(f"m{u}", u, SDM120, transport) for u in (1, 2, 3, 4)]
    return BusScheduler("bus", drivers, timeout_s=0.2, retries=retries, policy=policy)


async def test_cycle_reads_all(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    s = make_sched(transport)
    res = await s.run_cycle(1000)
    assert [r.meter_id for r in res.readings] == ["m1", "m2", "m3", "m4"]
    assert all(h.online and h.state == "online" for h in res.health.values())
    assert s.metrics.successes == 4 and s.metrics.errors == {}


async def test_cycle_stamps_with_the_callers_clock_when_given(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    """Given the caller's clock (the daemon's trusted clock), a read is stamped with it
    when the bus became the read's and a failure's back-off counts from it; the
    scheduler's own clock (real time spent in the cycle) adds nothing."""
    s = make_sched(transport, retries=0, policy=BackoffPolicy(base_ms=250))
    for u in (1, 2):
        sim.meter(u).delay_s = 0.02
    sim.meter(3).dead = True
    asked: list[int] = []

    def clock_ms() -> int:
        asked.append(7_000 + len(asked))
        return asked[-1]

    res = await s.run_cycle(5_000, clock_ms=clock_ms)
    # each meter: the clock when its read begins, then when it ends (health)
    assert [(r.meter_id, r.time_ms) for r in res.readings] == [("m1", 7_000), ("m2", 7_002), ("m4", 7_006)]
    assert s.health["m1"].last_good_ms == 7_001
    err = s.health["m3"].last_error
    assert err is not None and err.at_ms == 7_005 and s.health["m3"].next_attempt_ms == 7_005 + 250


async def test_dead_meter_costs_one_timeout_per_cycle_then_quarantine(
    sim: ModbusSimulator, transport: ModbusTransport
) -> None:
    policy = BackoffPolicy(base_ms=0, max_ms=0, quarantine_after=3, reprobe_ms=60_000)
    s = make_sched(transport, retries=2, policy=policy)
    await s.run_cycle(0)
    sim.meter(3).dead = True
    now = 0
    durations = []
    for i in range(1, 6):
        now = i * 1000
        t0 = time.monotonic()
        res = await s.run_cycle(now)
        durations.append(time.monotonic() - t0)
        assert {r.meter_id for r in res.readings} == {"m1", "m2", "m4"}
    h = s.health["m3"]
    assert not h.online and h.quarantined and h.state == "quarantined"
    assert h.last_error is not None and h.last_error.kind == "timeout"
    # first failing cycle: 1 + retries timeouts (it was online); then one per cycle; then none
    assert s.metrics.errors["timeout"] == 3 + 1 + 1
    assert durations[0] < 3 * 0.2 + 0.5
    assert durations[1] < 0.2 + 0.4 and durations[2] < 0.2 + 0.4
    assert durations[3] < 0.15 and durations[4] < 0.15  # quarantined: skipped
    # re-probe after reprobe_ms, and recovery resets health
    sim.meter(3).dead = False
    # quarantined by the third failure, counted from that attempt (after the cycle's
    # start at t=3000 and at least one 0.2 s timeout into it), not from the cycle's start
    assert h.last_error is not None and h.next_attempt_ms == h.last_error.at_ms + 60_000
    assert 3000 + 200 <= h.last_error.at_ms <= 3000 + 2000
    res = await s.run_cycle(h.next_attempt_ms - 1)
    assert "m3" in res.skipped
    res = await s.run_cycle(h.next_attempt_ms)
    assert "m3" in {r.meter_id for r in res.readings}
    assert s.health["m3"].online and s.health["m3"].consecutive_failures == 0


async def test_back_off_counts_from_the_failed_attempt_not_the_cycle_start(
    sim: ModbusSimulator, transport: ModbusTransport
) -> None:
    """A cycle longer than the first back-off step does not re-probe the dead meter
    in the very next cycle (it would cost a timeout in every cycle)."""
    s = make_sched(transport, retries=0, policy=BackoffPolicy(base_ms=250, quarantine_after=10))
    await s.run_cycle(0)
    # Slow meters before the dead one, answering well inside the 0.2 s timeout (a
    # reply later than the timeout would arrive while m3's request is outstanding).
    for u in (1, 2):
        sim.meter(u).delay_s = 0.1
    sim.meter(3).dead = True
    t0 = time.monotonic()
    await s.run_cycle(1000)  # m3 fails about 0.4 s into the cycle
    spent_ms = (time.monotonic() - t0) * 1000
    h = s.health["m3"]
    assert h.consecutive_failures == 1 and h.last_error is not None
    assert h.next_attempt_ms == h.last_error.at_ms + 250 > 1000 + 250
    next_start = 1000 + round(spent_ms)  # back to back, as a saturated bus runs
    res = await s.run_cycle(next_start)
    assert "m3" in res.skipped, (h, next_start)


async def test_one_transaction_at_a_time_with_relay_interleaved(
    sim: ModbusSimulator, transport: ModbusTransport
) -> None:
    s = make_sched(transport)
    active = 0
    peak = 0

    async def relay_op() -> bool:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await transport.write_coil("m2", 2, 0, True)
            return await transport.read_coil("m2", 2, 0)
        finally:
            active -= 1

    class Probe:
        def __init__(self, inner: ModbusDriver) -> None:
            self.inner = inner

        @property
        def meter_id(self) -> str:
            return self.inner.meter_id

        async def read(self, now_ms: int):  # type: ignore[no-untyped-def]
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            try:
                return await self.inner.read(now_ms)
            finally:
                active -= 1

    s.drivers = {k: Probe(v) for k, v in s.drivers.items()}  # type: ignore[misc]
    cycle = asyncio.create_task(s.run_cycle(0))
    await asyncio.sleep(0)
    relay = asyncio.create_task(s.run_exclusive("m2", relay_op))
    res, state = await asyncio.gather(cycle, relay)
    assert state is True and sim.meter(2).relay_open
    assert len(res.readings) == 4
    assert peak == 1
    # the relay cut the load: the next read of m2 shows zero power
    r = await s.read_meter("m2", 1)
    assert r is not None and r.get(Quantity.POWER) == Decimal("0.0000")


async def test_run_exclusive_propagates_errors_without_touching_poll_health(
    sim: ModbusSimulator, transport: ModbusTransport
) -> None:
    s = make_sched(transport)
    sim.meter(4).dead = True
    with pytest.raises(MeterTimeout):
        await s.run_exclusive("m4", lambda: transport.write_coil("m4", 4, 0, True))
    assert s.metrics.errors["timeout"] == 1
    assert s.health["m4"].total_failures == 0


async def test_silent_interval_is_kept(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    drivers = [ModbusDriver("m1", 1, SDM120, transport)]
    s = BusScheduler("bus", drivers, silent_interval_s=0.05, timeout_s=0.2)
    t0 = time.monotonic()
    for i in range(4):
        assert await s.read_meter("m1", i, force=True) is not None
    assert time.monotonic() - t0 >= 3 * 0.05
    snap = s.metrics.snapshot(time.monotonic())
    assert snap["successes"] == 4 and 0 < float(str(snap["utilisation"])) <= 1


async def test_driver_bug_does_not_stop_the_bus(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    class Broken:
        meter_id = "bad"

        async def read(self, now_ms: int):  # type: ignore[no-untyped-def]
            raise ZeroDivisionError("oops")

    s = BusScheduler("bus", [Broken(), ModbusDriver("m1", 1, SDM120, transport)], timeout_s=0.2)
    res = await s.run_cycle(0)
    assert [r.meter_id for r in res.readings] == ["m1"]
    assert res.health["bad"].last_error is not None and "ZeroDivisionError" in res.health["bad"].last_error.text


def test_duplicate_meter_ids_rejected() -> None:
    class D:
        meter_id = "x"

        async def read(self, now_ms: int):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    with pytest.raises(ValueError, match="duplicate"):
        BusScheduler("b", [D(), D()])


def test_transport_errors_do_not_advance_backoff() -> None:
    policy = BackoffPolicy(quarantine_after=2)
    h = MeterHealth("m")
    for i in range(10):
        h = on_failure(h, i, "transport", "refused", policy)
    assert not h.online and h.consecutive_failures == 0 and not h.quarantined and is_due(h, 10)
    assert h.total_failures == 10 and h.last_error is not None and h.last_error.kind == "transport"


@given(st.integers(0, 20), st.integers(0, 20), st.lists(st.sampled_from(["timeout", "transport", "frame", "refused"]), max_size=5))
def test_bus_went_silent(attempted: int, answered: int, kinds: list[str]) -> None:
    silent = bus_went_silent(attempted, answered, kinds)
    assert silent == (attempted >= 2 and answered == 0 and set(kinds) <= {"timeout", "transport"})


async def test_area_outage_and_return(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    policy = BackoffPolicy(base_ms=0, max_ms=0, quarantine_after=2, reprobe_ms=3_600_000)
    s = make_sched(transport, retries=0, policy=policy)
    assert len((await s.run_cycle(0)).readings) == 4
    for u in (1, 2, 3, 4):
        sim.meter(u).dead = True  # supply outage: every meter goes quiet
    res = await s.run_cycle(1000)
    assert res.bus_silent and res.readings == []
    for i in range(2, 6):
        attempts = s.metrics.attempts
        res = await s.run_cycle(i * 1000)
        assert res.bus_silent and s.metrics.attempts == attempts + 1  # one sentinel per cycle
        assert len(res.skipped) == 3
    for u in (1, 2, 3, 4):
        sim.meter(u).dead = False  # supply back
    res = await s.run_cycle(6000)
    assert not res.bus_silent
    assert sorted(r.meter_id for r in res.readings) == ["m1", "m2", "m3", "m4"]
    assert all(h.online and not h.quarantined for h in res.health.values())


async def test_one_dead_meter_never_makes_the_bus_silent(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    s = make_sched(transport, retries=0, policy=BackoffPolicy(base_ms=0, max_ms=0, quarantine_after=2))
    sim.meter(2).dead = True
    for i in range(4):
        res = await s.run_cycle(i * 1000)
        assert not res.bus_silent and len(res.readings) == 3


# --------------------------------------------------------------------------- chaos


async def _chaos(cycles: int, seed: int) -> None:
    import random

    from firmware_bridge.relay import ModbusCoilActuator, RelayController, RelayPolicy

    rng = random.Random(seed)
    units = [1, 2, 3, 4, 5, 6]
    timeout = 0.05
    async with ModbusSimulator(units, load_kw="360") as sim:
        t = ModbusTransport.tcp("127.0.0.1", sim.port, name="chaos", timeout_s=timeout)
        try:
            policy = BackoffPolicy(base_ms=2000, factor=2, max_ms=8000, quarantine_after=3, reprobe_ms=20_000)
            s = BusScheduler("chaos", [ModbusDriver(f"m{u}", u, SDM120, t) for u in units], timeout_s=timeout, retries=1, policy=policy)
            relays = RelayController(
                {f"m{u}": ModbusCoilActuator(t, f"m{u}", u, 0) for u in units},
                policy=RelayPolicy(min_interval_s=0, settle_s=0.0, max_drives=2, redrive_delays_s=(0.0,)),
                run=s.run_exclusive,
            )
            last_energy: dict[str, Decimal] = {}
            now = 0
            for _ in range(cycles):
                now += 1000
                for u in units:
                    m = sim.meter(u)
                    if rng.random() < 0.15:
                        m.dead = not m.dead
                    m.refuse = 4 if rng.random() < 0.05 else None
                    m.relay_stuck = rng.random() < 0.2
                answering = {f"m{u}" for u in units if not sim.meter(u).dead and sim.meter(u).refuse is None}
                before = s.health
                was_silent = s.bus_silent
                target = rng.choice(units)
                want_open = rng.random() < 0.5
                t0 = time.monotonic()
                res, rel = await asyncio.gather(s.run_cycle(now), relays.set_open(f"m{target}", want_open))
                elapsed = time.monotonic() - t0

                got = {r.meter_id for r in res.readings}
                assert got <= answering
                due = {mid for mid, h in before.items() if is_due(h, now)}
                for mid, h in res.health.items():
                    assert h.quarantined == (h.consecutive_failures >= policy.quarantine_after)
                    assert h.online == (mid in got) or mid in res.skipped
                if was_silent:
                    # one sentinel probed; if it answered, everybody was woken and asked
                    assert len(set(before) - set(res.skipped)) == (1 if res.bus_silent else len(before))
                    if not res.bus_silent:
                        assert got == answering
                else:
                    assert set(res.skipped) == set(before) - due
                    for mid in due - got:
                        assert res.health[mid].consecutive_failures == before[mid].consecutive_failures + 1
                    if res.bus_silent:
                        assert not got and len(due) >= 2
                for r in res.readings:
                    e = r.get(Quantity.ENERGY_IMPORT)
                    assert e is not None
                    assert e >= last_energy.get(r.meter_id, Decimal(0))  # never decoded backwards
                    last_energy[r.meter_id] = e
                # bounded cost: at most (1 + retries) timeouts per due meter, plus the relay's
                # pre-read + 2 × (drive + read-back), plus slack for the answering ones
                assert elapsed <= (2 * len(before) + 5) * (timeout + 0.05) + 0.5
                m = sim.meter(target)
                if f"m{target}" in answering and not m.relay_stuck:
                    assert rel.ok and m.relay_open == want_open
                if rel.ok and rel.attempts:
                    assert rel.final_open == want_open
                if not rel.ok:
                    assert rel.alarm and 1 <= len(rel.attempts) <= 2
            assert sim.max_in_flight == 1
        finally:
            t.close()


async def test_chaos_short() -> None:
    await _chaos(cycles=8, seed=1)


@pytest.mark.long
@pytest.mark.parametrize("seed", range(3))
async def test_chaos_long(seed: int) -> None:
    await _chaos(cycles=300, seed=seed)


async def test_exception_reply_is_not_retried(sim: ModbusSimulator, transport: ModbusTransport) -> None:
    s = make_sched(transport, retries=3)
    sim.meter(2).refuse = 2
    res = await s.run_cycle(0)
    assert "m2" not in {r.meter_id for r in res.readings}
    assert s.metrics.errors == {"refused": 1}
    assert res.health["m2"].last_error is not None and res.health["m2"].last_error.kind == "refused"


async def test_readings_are_stamped_when_read() -> None:
    async with RtuSimulator([1, 2, 3], baud=9600, wire_timing=True) as rtu:
        t = ModbusTransport.serial(rtu.path, name="rtu", baud=9600, parity="N", stop_bits=1, timeout_s=0.5)
        try:
            s = BusScheduler("rtu", [ModbusDriver(f"m{u}", u, SDM120, t) for u in (1, 2, 3)], timeout_s=0.5)
            res = await s.run_cycle(1_000_000)
        finally:
            t.close()
    times = [r.time_ms for r in res.readings]
    assert times == sorted(times) and times[0] >= 1_000_000
    assert times[-1] - times[0] >= 2 * 80  # two SDM120 reads of ~85 ms each lie between them
    assert times[-1] <= 1_000_000 + res.duration_s * 1000 + 1


async def test_read_deadline_comes_from_the_drivers_own_budget() -> None:
    """A driver whose read legitimately takes longer than 4 x timeout + 1 s (a slow meter
    at a low baud rate) is not cut off: its budget sets the backstop."""

    class Slow:
        meter_id = "slow"

        def read_budget_s(self) -> float:
            return 1.5

        def operation_budget_s(self) -> float:
            return 0.2

        async def read(self, now_ms: int) -> Reading:
            await asyncio.sleep(1.2)
            return Reading("slow", now_ms, {})

    sched = BusScheduler("b", [Slow()], timeout_s=0.01)  # type: ignore[list-item]
    assert sched.deadline_s("slow") == pytest.approx(2.5)
    assert sched.operation_deadline_s("slow") == pytest.approx(1.2)
    assert await sched.read_meter("slow", 0) is not None


class _Hung:
    """A driver whose read never ends unless ``release`` is set; its budget sets the deadline."""

    def __init__(self, meter_id: str, budget_s: float) -> None:
        self.meter_id = meter_id
        self.budget_s = budget_s
        self.hang = True
        self.cancelled = 0

    def read_budget_s(self) -> float:
        return self.budget_s

    async def read(self, now_ms: int) -> Reading:
        try:
            while self.hang:
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return Reading(self.meter_id, now_ms, {})


async def test_a_hung_read_is_cut_off_at_its_deadline_and_the_bus_goes_on() -> None:
    long, hung, fine = _Hung("long", 2.0), _Hung("hung", 0.1), _Hung("fine", 0.1)
    long.hang = fine.hang = False
    sched = BusScheduler("b", [long, hung, fine], timeout_s=0.05, retries=0)  # type: ignore[list-item]
    for _ in range(2):  # a shorter deadline after a longer one still holds, cycle after cycle
        start = time.monotonic()
        res = await sched.run_cycle(0)
        took = time.monotonic() - start
        assert 1.1 <= took < 1.6  # the hung read's budget + 1 s, not the long one's
        assert [r.meter_id for r in res.readings] == ["long", "fine"]
        err = res.health["hung"].last_error
        assert err is not None and err.kind == "timeout" and err.text == "read exceeded its deadline"
        sched._health["hung"] = MeterHealth("hung")  # due again
    assert hung.cancelled == 2 and long.cancelled == fine.cancelled == 0
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_cancelling_a_cycle_is_not_taken_for_a_deadline() -> None:
    hung = _Hung("hung", 5.0)
    sched = BusScheduler("b", [hung], timeout_s=0.05)  # type: ignore[list-item]
    task = asyncio.create_task(sched.run_cycle(0))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert hung.cancelled == 1 and sched.health["hung"].last_error is None
    hung.hang = False
    assert await sched.read_meter("hung", 0) is not None  # the bus is free again


@BOTH_LOOPS
async def test_the_read_deadline_holds_in_a_cycle_and_alone_on_both_loops() -> None:
    hung, fine = _Hung("hung", 0.1), _Hung("fine", 0.1)
    fine.hang = False
    sched = BusScheduler("b", [hung, fine], timeout_s=0.05, retries=0)  # type: ignore[list-item]
    res = await sched.run_cycle(0)  # the cycle's reads: the cycle's loop and task
    assert [r.meter_id for r in res.readings] == ["fine"]
    err = res.health["hung"].last_error
    assert err is not None and err.kind == "timeout" and err.text == "read exceeded its deadline"
    assert await sched.read_meter("hung", 0, force=True) is None  # a read on its own
    err = sched.health["hung"].last_error
    assert err is not None and err.text == "read exceeded its deadline" and hung.cancelled == 2
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]

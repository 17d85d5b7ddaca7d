"""The driver against meters that behave like the field, over a real pseudo-terminal.

Response delays, local-time clocks, missing block reads, bad dates, replies
from the wrong address, meters silent to anything but their own address,
slow starts after power returns, discovery of several meters on one line and
relay commands whose deadline the meter judges by its own clock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from firmware_bridge.dlt645 import ControlCommand, Dlt645Driver, discover, search
from firmware_bridge.dlt645.codec import BadFrame, Frame, FrameParser
from firmware_bridge.dlt645.driver import narrow, probe_each
from firmware_bridge.dlt645.messages import read_address_request
from firmware_bridge.dlt645.transport import Dlt645Transport, Heard, open_transport
from firmware_bridge.driver import MeterFrameError, MeterRefused, MeterTimeout, MeterWrongAddress
from firmware_bridge.reading import Quality
from firmware_bridge.reading import Quantity as Q
from firmware_bridge.relay import controller_for
from firmware_bridge.scheduler import BusScheduler
from firmware_bridge.settings import BusSettings
from testbed.simulators.dlt645 import DateFault, SimulatedMeter, Simulator, make_meters

from .conftest import PASSWORD, FakeClock, pty_parity

SHANGHAI = ZoneInfo("Asia/Shanghai")
A1, A2 = "000000000001", "000000000002"


@dataclass
class Line:
    sim: Simulator
    transport: Dlt645Transport
    section: BusSettings


@contextlib.asynccontextmanager
async def line(
    meters: Sequence[SimulatedMeter],
    *,
    baud: int = 19200,
    response_time_s: float | None = 0.1,
    clock: FakeClock | None = None,
    gap_s: float | None = None,
) -> AsyncIterator[Line]:
    """Meters on a pseudo-terminal, wire time spent at ``baud``; the bus declares
    the meters' response time (the simulators answer within 0.1 s unless told)."""
    sim = Simulator(meters, baud=baud, clock=clock or time.time)
    async with sim:
        path = await sim.start_pty()
        section = BusSettings(
            "field", "serial", device=path, baud=baud, parity=pty_parity(),
            response_time_s=response_time_s,
        )
        async with open_transport(section, gap_s=gap_s) as transport:
            yield Line(sim, transport, section)


def driver(ln: Line, address: str = A1, **kw: object) -> Dlt645Driver:
    return Dlt645Driver(f"m{address[-1]}", address, ln.transport, password=PASSWORD, **kw)  # type: ignore[arg-type]


async def test_reply_beyond_the_window_is_a_timeout_inside_it_is_read() -> None:
    meter = SimulatedMeter(A1, response_delay_s=0.45)
    async with line([meter], response_time_s=None) as ln:  # the standard's 500 ms window
        d = driver(ln, quantities=[Q.ENERGY_IMPORT])
        assert (await d.read(0)).get(Q.ENERGY_IMPORT) == Decimal("0.00")
        meter.response_delay_s = 0.75  # beyond the window (and the margin)
        with pytest.raises(MeterTimeout, match=r"no reply within 0\.6 s"):
            await d.read(0)


async def test_values_read_before_a_silent_transaction_are_kept() -> None:
    meter = make_meters(1)[0]
    meter.faults.ignore = {0x02010100}  # the meter never answers the voltage read
    async with line([meter]) as ln:
        sched = BusScheduler("field", [driver(ln)], retries=1)
        r = await sched.read_meter("m1", 0)
    assert r is not None and r.get(Q.ENERGY_IMPORT) == Decimal("406.00")
    assert r.get(Q.ENERGY_IMPORT_T4) == Decimal("103.00")
    assert r.meta["incomplete"].startswith("timeout: no reply within")
    assert r.meta["missing"].split(",")[:2] == ["voltage_v", "current_a"]
    assert sched.health["m1"].online


async def test_nothing_read_is_still_a_failure() -> None:
    meter = make_meters(1)[0]
    meter.faults.ignore = {0x0001FF00}
    async with line([meter]) as ln:
        with pytest.raises(MeterTimeout):
            await driver(ln).read(0)


@pytest.mark.parametrize(
    ("fault", "cause", "clock_kept"),
    [
        (DateFault.WEEKDAY, "clock.weekday", True),
        (DateFault.UNSET, "clock.unset", False),
        (DateFault.INVALID, "clock.invalid_date", False),
        (DateFault.NOT_BCD, "clock.not_bcd", False),
    ],
)
async def test_a_bad_date_keeps_the_energy_and_is_evidence(
    fault: str, cause: str, clock_kept: bool
) -> None:
    meter = make_meters(1)[0]
    meter.faults.date = fault
    async with line([meter]) as ln:
        r = await driver(ln).read(0)
    assert r.get(Q.ENERGY_IMPORT) == Decimal("406.00") and r.get(Q.VOLTAGE) == Decimal("230.0")
    assert [f.cause for f in r.faults] == [cause]
    assert r.faults[0].raw.startswith("04000101: ")
    assert "incomplete" not in r.meta
    if clock_kept:
        assert r.values[Q.METER_CLOCK].quality is Quality.SUSPECT
    else:
        assert Q.METER_CLOCK not in r.values


async def test_meter_without_block_reads_is_read_item_by_item() -> None:
    meter = make_meters(1, block_reads=False)[0]
    async with line([meter]) as ln:
        d = driver(ln)
        r = await d.read(0)
        again = ln.sim.requests
        await d.read(0)
    assert r.get(Q.ENERGY_IMPORT_T3) == Decimal("102.00")
    assert ln.sim.requests - again == 13  # the refused block is not asked again
    assert d.read_budget_s() == pytest.approx(sum(d._tx_s(q) for q in d.planned_requests()))


async def test_a_reply_from_the_wrong_address_is_named() -> None:
    meter = make_meters(1)[0]
    meter.faults.reply_address = "000000000099"
    async with line([meter]) as ln:
        with pytest.raises(MeterWrongAddress, match="reply from address 000000000099, expected 000000000001"):
            await driver(ln, quantities=[Q.ENERGY_IMPORT]).read(0)
        statuses = await probe_each(ln.transport, [A1, A2])
    assert statuses == {
        A1: "reply from address 000000000099, expected 000000000001",
        A2: "no reply",
    }


async def test_meters_are_silent_to_every_other_address() -> None:
    async with line(make_meters(2)) as ln:
        assert await discover(ln.transport, "AAAAAAAAAA02") == [A2]
        assert await discover(ln.transport, "AAAAAAAAAA07") == []
        # AA in a low byte under digits is no address in DL/T 645: nobody answers
        heard = await ln.transport.listen(read_address_request("000000AA0001"))
        assert heard.silent
        with pytest.raises(MeterTimeout):
            await driver(ln, "000000000009", quantities=[Q.ENERGY_IMPORT]).read(0)


async def test_slow_start_after_power_returns() -> None:
    clock = FakeClock()
    meter = make_meters(1)[0]
    async with line([meter], clock=clock) as ln:
        d = driver(ln, quantities=[Q.ENERGY_IMPORT])
        meter.power_off(clock())
        with pytest.raises(MeterTimeout):
            await d.read(0)
        meter.power_on(clock(), boot_s=5.0, slow_s=0.3, slow_for_s=10.0)
        with pytest.raises(MeterTimeout):
            await d.read(0)  # still starting
        clock.advance(6.0)
        with pytest.raises(MeterTimeout):
            await d.read(0)  # answering, but 0.3 s late: beyond the declared 0.1 s
        clock.advance(10.0)
        assert (await d.read(0)).get(Q.ENERGY_IMPORT) == Decimal("406.00")


async def test_collisions_on_the_line_are_heard_as_such() -> None:
    async with line(make_meters(3)) as ln:
        both = await ln.transport.listen(read_address_request())
        assert not both.silent and both.single is None
        with pytest.raises(MeterFrameError, match=r"collision: several meters answered AAAAAAAAAAAA"):
            await discover(ln.transport)
        one = await ln.transport.listen(read_address_request("AAAAAAAAAA02"))
        assert one.single is not None and one.single.address == A2


@pytest.mark.long
async def test_search_finds_several_meters_on_one_line() -> None:
    # 103 requests, most of them unanswered
    async with line(make_meters(2), baud=115200, gap_s=0.002) as ln:
        steps: list[str] = []
        result = await search(
            ln.transport, timeout_s=0.1, on_step=lambda s: steps.append(s.outcome)
        )
    assert sorted(result.found) == [A1, A2] and result.unresolved == []
    assert steps[0] == "collision" and steps.count("found") == 2
    assert result.asked == 1 + 100 + 2  # root, its 100 narrowings, two confirmations


class ModelLine:
    """The simulator's reply model as a line without timing (the search logic is under test)."""

    def __init__(self, meters: Sequence[SimulatedMeter]) -> None:
        self.sim = Simulator(meters)
        self.asked: list[str] = []

    async def listen(self, request: Frame, *, timeout_s: float | None = None) -> Heard:
        self.asked.append(request.address)
        raw, _ = self.sim.reply_bytes(request)
        events = FrameParser().feed(raw)
        frames = [e for e in events if isinstance(e, Frame)]
        bad = [e for e in events if isinstance(e, BadFrame)]
        framed = sum(len(f.encode(0)) for f in frames)
        return Heard(tuple(frames), tuple(bad), max(0, len(raw.replace(b"\xfe", b"")) - framed))


async def test_search_narrows_until_every_collision_is_resolved() -> None:
    addresses = ["000000000001", "000000000101", "000000000002", "123456789012"]
    model = ModelLine([SimulatedMeter(a) for a in addresses])
    result = await search(model)  # type: ignore[arg-type]
    assert sorted(result.found) == sorted(addresses) and result.unresolved == []
    assert "AAAAAAAA0101" in model.asked and "AAAAAAAA0001" in model.asked
    # garbled answers even when every digit is fixed (noise, or two meters with one
    # address answering at different moments): reported, not guessed
    noisy = SimulatedMeter("000000000777")
    noisy.faults.bad_checksum = True
    result = await search(ModelLine([noisy]), "AAAAAAAA0777")  # type: ignore[arg-type]
    assert result.found == [] and result.unresolved == ["000000000777"]
    assert narrow("AAAAAAAAAA25")[:2] == ["AAAAAAAA0025", "AAAAAAAA0125"]
    assert narrow("000000000001") == []
    with pytest.raises(ValueError):
        narrow("00AA00000001")


async def test_relay_deadline_is_judged_by_the_meters_own_clock() -> None:
    """A meter keeping Asia/Shanghai time, and a gateway that (wrongly) thinks the
    meters keep UTC: the deadline comes from the meter's clock, so it is accepted;
    a deadline from UTC wall time would be eight hours in the meter's past."""
    meter = make_meters(1, clock_tz=SHANGHAI)[0]
    async with line([meter]) as ln:
        d = driver(ln, clock_tz=dt.UTC)
        utc_deadline = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(minutes=5)
        with pytest.raises(MeterRefused) as info:
            await d.control(ControlCommand.TRIP, utc_deadline)
        text = info.value.detail
        assert "other error" in text and "deadline already past by the meter's own clock" in text
        assert f"deadline sent {utc_deadline:%Y-%m-%d %H:%M:%S} meter time" in text
        assert meter.relay_open is False
        deadline, basis = await d.command_deadline()
        assert basis == "from the meter's clock"
        meter_now = dt.datetime.now(SHANGHAI).replace(tzinfo=None)
        assert abs((deadline - meter_now).total_seconds() - 300) < 5
        await d.control(ControlCommand.TRIP)
        assert meter.relay_open is True


async def test_relay_deadline_without_a_readable_clock_uses_local_time_and_margin() -> None:
    meter = make_meters(1, clock_tz=SHANGHAI)[0]
    meter.faults.date = DateFault.UNSET
    async with line([meter]) as ln:
        d = driver(ln, clock_tz=SHANGHAI)
        deadline, basis = await d.command_deadline()
        assert basis.startswith("from local time + 30 min margin")
        local = dt.datetime.now(SHANGHAI).replace(tzinfo=None)
        assert abs((deadline - local).total_seconds() - (300 + 1800)) < 5
        await d.control(ControlCommand.TRIP)
    assert meter.relay_open is True


async def test_a_refused_relay_command_is_not_resent() -> None:
    meter = make_meters(1)[0]
    async with line([meter]) as ln:
        d = Dlt645Driver("m1", A1, ln.transport, password=bytes.fromhex("02999999"))
        sched = BusScheduler("field", [d])
        from firmware_bridge.relay import Dlt645RelayActuator

        sched.relays["m1"] = Dlt645RelayActuator(d)
        sched.relay_min_interval_s["m1"] = 0
        before = ln.sim.requests
        started = time.monotonic()
        result = await controller_for(sched).set_open("m1", True)
    assert not result.ok and result.alarm and result.refused and len(result.attempts) == 1
    assert "meter refused the trip command, not resent" in result.reason
    assert "did not accept the password" in result.reason and "error byte 04" in result.reason
    assert time.monotonic() - started < 3  # no settle, no re-drive schedule
    assert ln.sim.requests - before == 4  # state, clock (date, time), the command
    assert meter.relay_open is False

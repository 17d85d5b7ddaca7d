"""Timing from the standards: pure arithmetic, against worked numbers and properties."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.timing import (
    DLT645_RESPONSE_S,
    MODBUS_RESPONSE_S,
    SERIAL_MARGIN_S,
    TCP_MARGIN_S,
    LineTiming,
    backstop_s,
    bits_per_char,
    char_time_s,
    line_timing,
    rtu_t35_s,
    timeout_problem,
)

BAUDS = st.sampled_from([1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200])


@dataclass(frozen=True)
class Bus:
    type: str = "serial"
    baud: int = 2400
    parity: str = "E"
    stop_bits: int = 1
    framing: str = "socket"
    response_time_s: float | None = None
    timeout_s: float | None = None


@dataclass(frozen=True)
class Meter:
    response_time_s: float | None = None
    timeout_s: float | None = None


def test_character_and_frame_times() -> None:
    assert bits_per_char("E", 1) == 11 and bits_per_char("N", 1) == 10 and bits_per_char("E", 2) == 12
    assert char_time_s(2400, "E") == pytest.approx(11 / 2400)  # 4.58 ms
    # GUIDE: one energy read at 2400 bps is about 180 ms on the wire: a 20-byte
    # request (4 FE + 16) and a 20-byte reply without preamble
    line = LineTiming(baud=2400)
    assert line.wire_s(20 + 20) == pytest.approx(0.183, abs=0.001)
    with pytest.raises(ValueError):
        char_time_s(0)
    with pytest.raises(ValueError):
        bits_per_char("X")


def test_t35_from_the_modbus_serial_line_rule() -> None:
    assert rtu_t35_s(9600, "E") == pytest.approx(3.5 * 11 / 9600)  # 4.0 ms
    assert rtu_t35_s(9600, "N") == pytest.approx(3.5 * 10 / 9600)
    assert rtu_t35_s(38400) == 0.00175


def test_default_timeout_is_the_response_window_plus_margin() -> None:
    dlt = line_timing("dlt645", Bus())
    assert dlt.timeout_s == pytest.approx(DLT645_RESPONSE_S + SERIAL_MARGIN_S)
    assert dlt.wire and dlt.char_s == pytest.approx(11 / 2400)
    modbus_tcp = line_timing("modbus", Bus(type="tcp"))
    assert modbus_tcp.timeout_s == pytest.approx(MODBUS_RESPONSE_S + TCP_MARGIN_S)
    assert not modbus_tcp.wire and modbus_tcp.gap_s == 0
    # RTU frames through a serial server, and DL/T 645 over TCP, still cross a line
    assert line_timing("modbus", Bus(type="tcp", framing="rtu")).wire
    assert line_timing("dlt645", Bus(type="tcp")).wire


def test_meter_overrides_win_over_the_bus_and_the_bus_over_the_protocol() -> None:
    bus = Bus(response_time_s=0.2, timeout_s=None)
    assert line_timing("dlt645", bus).response_s == 0.2
    assert line_timing("dlt645", bus, Meter(response_time_s=0.45)).response_s == 0.45
    assert line_timing("dlt645", bus, Meter()).response_s == 0.2
    fixed = Bus(timeout_s=0.8)
    assert line_timing("dlt645", fixed).timeout_s == 0.8
    assert line_timing("dlt645", fixed, Meter(timeout_s=1.5)).timeout_s == 1.5


def test_slow_conformant_meter_fits_the_read_budget_the_old_deadline_did_not() -> None:
    """The field case: 2400 8E1, a meter answering 450 ms after each request, 14
    transactions without block reads. Each answered; the old 4 x timeout + 1 s cut it off."""
    line = line_timing("dlt645", Bus())
    plan = [(20, 24)] * 14  # single DI reads: 4 FE + 16 bytes out, 4 FE + 20 back
    actual = sum(line.gap_s + line.wire_s(req) + 0.45 + line.wire_s(rep) for req, rep in plan)
    assert actual > 4 * 1.0 + 1.0
    assert line.plan_s(plan) > actual
    assert backstop_s(line.plan_s(plan)) > line.plan_s(plan)


@given(
    baud=BAUDS,
    parity=st.sampled_from(["N", "E", "O"]),
    response=st.floats(0.02, 2.0),
    delay_fraction=st.floats(0.0, 1.0),
    plan=st.lists(st.tuples(st.integers(12, 60), st.integers(12, 220)), min_size=1, max_size=20),
)
def test_any_reply_within_the_window_fits_the_budget(
    baud: int, parity: str, response: float, delay_fraction: float, plan: list[tuple[int, int]]
) -> None:
    line = LineTiming(baud=baud, parity=parity, response_s=response)
    delay = response * delay_fraction  # a conformant meter: somewhere inside its window
    actual = sum(line.gap_s + line.wire_s(q) + delay + line.wire_s(r) for q, r in plan)
    assert actual <= line.plan_s(plan)
    for q, r in plan:  # and each transaction within its own limit
        assert line.wire_s(q) + delay + line.wire_s(r) <= line.transaction_s(q, r)


@given(baud=BAUDS, more=st.integers(1, 5), response=st.floats(0.02, 1.0))
def test_budget_grows_with_transactions_and_lower_baud(baud: int, more: int, response: float) -> None:
    line = LineTiming(baud=baud, response_s=response)
    slower = LineTiming(baud=max(1200, baud // 2), response_s=response)
    plan = [(20, 24)] * 3
    assert line.plan_s(plan + [(20, 24)] * more) > line.plan_s(plan)
    assert slower.plan_s(plan) >= line.plan_s(plan)


def test_a_timeout_below_the_window_is_a_problem_with_a_way_out() -> None:
    assert timeout_problem(None, 0.5, "dlt645") is None
    assert timeout_problem(0.6, 0.5, "dlt645") is None
    text = timeout_problem(0.3, 0.5, "dlt645")
    assert text is not None and "DL/T 645 response window" in text and "response_time_s" in text
    with pytest.raises(ValueError):
        LineTiming(response_s=0)

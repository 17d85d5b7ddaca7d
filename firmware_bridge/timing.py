"""Bus timing from the standards: per-transaction timeouts and whole-read deadlines.

Pure arithmetic, no I/O. Every number here follows from what the protocol
allows a conformant meter to do, never from how fast a simulator answers:

* **Response window** ``response_s``: the longest a meter may wait after the
  end of a request before the first byte of its reply. DL/T 645-2007 allows
  20-500 ms (:data:`DLT645_RESPONSE_S`). Modbus sets no bound; the meter's
  manual documents its own, and :data:`MODBUS_RESPONSE_S` is the common
  master default (1 s) for meters that do not say.
* **Wire time**: one character is start + 8 data + parity + stop bits
  (11 bits at 8E1, 10 at 8N1), so a frame of ``n`` bytes takes
  ``n × bits / baud`` on an RS-485 line (also behind a serial server).
* **Margin** ``margin_s``: what the host adds between the line and the
  program: USB-serial adapters deliver bytes in latency-timer chunks (16 ms
  by default on FTDI chips), the kernel and the event loop add a little, a
  serial server adds a network round trip.

From those:

    timeout      = response_s + margin_s                       (wait for the first byte,
                                                                counted from the request's end)
    transaction  = gap + wire(request) + timeout + wire(reply)
    read         = Σ transaction over the read plan             (one attempt of one meter)

The per-transaction ``timeout`` can be overridden (``timeout_s`` in the
configuration) but never below the response window without saying so: see
:func:`timeout_problem`. Retries multiply the read: a meter that was online
gets ``1 + retries`` attempts in the cycle it stops answering
(docs/dlt645.md and docs/modbus.md, "Timing").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from firmware_bridge.settings import BusSettings, MeterSettings

# DL/T 645-2007: a meter answers 20 ms ≤ Td ≤ 500 ms after the end of the request.
DLT645_RESPONSE_MIN_S = 0.020
DLT645_RESPONSE_S = 0.500
# Modbus (serial line and TCP) leaves the response time to the device; 1 s is the
# usual master default and what meters that document nothing are read with.
MODBUS_RESPONSE_S = 1.0
# Host side: USB-serial latency timer, kernel, event loop.
SERIAL_MARGIN_S = 0.1
# A serial server or Modbus TCP gateway: network round trip and its buffering.
TCP_MARGIN_S = 0.3
# Slack of the scheduler's backstop over a read's own budget (event loop, follow-up
# frames, a block reply longer than planned).
BACKSTOP_SLACK_S = 1.0


def bits_per_char(parity: str = "E", stop_bits: int = 1) -> int:
    """Start + 8 data + parity (none for ``N``) + stop bits."""
    if parity not in ("N", "E", "O"):
        raise ValueError(f"parity must be N, E or O, got {parity!r}")
    if stop_bits not in (1, 2):
        raise ValueError(f"stop bits must be 1 or 2, got {stop_bits}")
    return 1 + 8 + (0 if parity == "N" else 1) + stop_bits


def char_time_s(baud: int, parity: str = "E", stop_bits: int = 1) -> float:
    """Seconds one byte takes on the wire."""
    if baud <= 0:
        raise ValueError(f"baud must be > 0, got {baud}")
    return bits_per_char(parity, stop_bits) / baud


def rtu_t35_s(baud: int, parity: str = "E", stop_bits: int = 1) -> float:
    """Modbus RTU silent interval: 3.5 characters; fixed 1.75 ms above 19200 baud."""
    if baud <= 0:
        raise ValueError(f"baud must be > 0, got {baud}")
    return 0.00175 if baud > 19200 else 3.5 * char_time_s(baud, parity, stop_bits)


def dlt645_gap_s(baud: int, parity: str = "E", stop_bits: int = 1) -> float:
    """Silence kept before a DL/T 645 request: max(20 ms, 4 characters)."""
    return max(DLT645_RESPONSE_MIN_S, 4 * char_time_s(baud, parity, stop_bits))


@dataclass(frozen=True, slots=True)
class LineTiming:
    """Timing of one meter on its line; see the module documentation for the formula.

    ``wire`` is False where frames take no line time of ours (Modbus TCP with
    MBAP framing); a serial line and a serial server (DL/T 645 or RTU frames
    over TCP) take their baud rate's time. ``timeout_override_s`` is an explicit
    per-transaction timeout from the configuration.
    """

    baud: int = 2400
    parity: str = "E"
    stop_bits: int = 1
    wire: bool = True
    response_s: float = DLT645_RESPONSE_S
    margin_s: float = SERIAL_MARGIN_S
    gap_s: float = DLT645_RESPONSE_MIN_S
    timeout_override_s: float | None = None

    def __post_init__(self) -> None:
        char_time_s(self.baud, self.parity, self.stop_bits)  # validates
        if self.response_s <= 0 or self.margin_s < 0 or self.gap_s < 0:
            raise ValueError("need response_s > 0, margin_s >= 0 and gap_s >= 0")
        if self.timeout_override_s is not None and self.timeout_override_s <= 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout_override_s}")

    @property
    def char_s(self) -> float:
        return char_time_s(self.baud, self.parity, self.stop_bits)

    def wire_s(self, n_bytes: int) -> float:
        """Time ``n_bytes`` take on the line (0 without a line of ours)."""
        return n_bytes * self.char_s if self.wire else 0.0

    @property
    def timeout_s(self) -> float:
        """Wait for the first byte of a reply, counted from the end of the request."""
        if self.timeout_override_s is not None:
            return self.timeout_override_s
        return self.response_s + self.margin_s

    def transaction_s(self, request_bytes: int, reply_bytes: int) -> float:
        """Longest a transaction may take: gap, request, wait, reply."""
        return self.gap_s + self.wire_s(request_bytes) + self.timeout_s + self.wire_s(reply_bytes)

    def plan_s(self, transactions: Iterable[tuple[int, int]]) -> float:
        """Longest one read may take: the sum over its (request, reply) byte counts."""
        return sum(self.transaction_s(req, rep) for req, rep in transactions)


def backstop_s(budget_s: float, longest_frame_s: float = 0.0) -> float:
    """The scheduler's hard deadline around an operation whose own budget is ``budget_s``.

    It only catches a driver that does not keep its own timeouts: one longest
    frame and :data:`BACKSTOP_SLACK_S` over the budget.
    """
    return budget_s + longest_frame_s + BACKSTOP_SLACK_S


def timeout_problem(timeout_s: float | None, response_s: float, protocol: str) -> str | None:
    """Why an explicit per-transaction timeout cannot read a conformant meter, or None."""
    if timeout_s is None or timeout_s >= response_s:
        return None
    return (
        f"{timeout_s:g} s is shorter than the meters' response time ({response_s:g} s"
        + (", the DL/T 645 response window" if protocol == "dlt645" else "")
        + "): a meter answering within its allowed time would never be read;"
        " remove timeout_s, or set response_time_s to the meters' documented response time"
    )


def default_response_s(protocol: str) -> float:
    if protocol == "dlt645":
        return DLT645_RESPONSE_S
    if protocol == "modbus":
        return MODBUS_RESPONSE_S
    raise ValueError(f"unknown protocol {protocol!r}")


def standard_response_s(protocol: str) -> float | None:
    """The response window the protocol's standard fixes (DL/T 645), else None."""
    return DLT645_RESPONSE_S if protocol == "dlt645" else None


def line_timing(protocol: str, bus: BusSettings, meter: MeterSettings | None = None) -> LineTiming:
    """The timing of ``meter`` (or of the bus's meters in general) on ``bus``.

    The meter's ``response_time_s``/``timeout_s`` win over the bus's, which win
    over the protocol's response window. A DL/T 645 bus, or RTU frames through
    a serial server, spend wire time at the bus's baud rate even over TCP.
    """
    response = None if meter is None else meter.response_time_s
    if response is None:
        response = bus.response_time_s
    if response is None:
        response = default_response_s(protocol)
    timeout = None if meter is None else meter.timeout_s
    if timeout is None:
        timeout = bus.timeout_s
    serial = bus.type == "serial"
    if protocol == "dlt645":
        wire = True
        gap = dlt645_gap_s(bus.baud, bus.parity, bus.stop_bits)
    else:
        wire = serial or bus.framing == "rtu"
        gap = rtu_t35_s(bus.baud, bus.parity, bus.stop_bits) if wire else 0.0
    return LineTiming(
        baud=bus.baud,
        parity=bus.parity,
        stop_bits=bus.stop_bits,
        wire=wire,
        response_s=response,
        margin_s=SERIAL_MARGIN_S if serial else TCP_MARGIN_S,
        gap_s=gap,
        timeout_override_s=timeout,
    )

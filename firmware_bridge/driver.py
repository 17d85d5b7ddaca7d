"""The contract between the bus scheduler and protocol drivers.

A driver talks to one meter through a transport shared by every meter on the
same bus. The scheduler guarantees one transaction at a time per bus; a driver
never opens its own connection behind the scheduler's back.

Errors are typed so that the scheduler can count them by kind and so that
"meter online" can mean "the meter answered correctly".
"""

from __future__ import annotations

from typing import Protocol

from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.reading import Reading


class MeterError(EdgeGwError):
    """Base class for everything a meter (or the path to it) can do wrong."""

    kind = ErrorKind.ERROR

    def __init__(self, meter_id: str, detail: str) -> None:
        super().__init__(f"meter {meter_id}: {detail}")
        self.meter_id = meter_id
        self.detail = detail


class MeterTimeout(MeterError):
    """No (complete) answer within the meter's timeout."""

    kind = ErrorKind.TIMEOUT


class MeterFrameError(MeterError):
    """An answer arrived but was malformed (checksum/CRC, length, framing)."""

    kind = ErrorKind.FRAME


class MeterWrongAddress(MeterFrameError):
    """A valid reply came from another address than the one asked (a meter with a
    misconfigured address, or two meters sharing one)."""

    kind = ErrorKind.ADDRESS

    def __init__(self, meter_id: str, expected: str, got: str, what: str = "address") -> None:
        super().__init__(meter_id, f"reply from {what} {got}, expected {expected}")
        self.expected = expected
        self.got = got


class MeterRefused(MeterError):
    """The meter answered with an error/exception reply."""

    kind = ErrorKind.REFUSED


class TransportError(MeterError):
    """The bus itself is unusable (port vanished, TCP connection refused)."""

    kind = ErrorKind.TRANSPORT


class BusUnavailable(TransportError):
    """A bus cannot be opened at all (adapter missing, permission denied, line in
    use); the message names the bus, not a meter: ``bus rs485-1: ...``."""

    def __init__(self, bus: str, detail: str) -> None:
        Exception.__init__(self, f"bus {bus}: {detail}")
        self.meter_id = bus
        self.bus = bus
        self.detail = detail


class MeterDriver(Protocol):
    """One meter on one bus."""

    @property
    def meter_id(self) -> str: ...

    async def read(self, now_ms: int) -> Reading:
        """Read the meter's configured quantities; raise a MeterError on failure.

        A failure after some values were read ends the read with those values
        (``meta["incomplete"]`` says why, ``meta["missing"]`` what is missing).
        """
        ...


class TimedDriver(MeterDriver, Protocol):
    """A driver that knows its own time budget (see firmware_bridge/timing.py)."""

    def read_budget_s(self) -> float:
        """Longest one read may take when every transaction uses its full timeout."""
        ...

    def operation_budget_s(self) -> float:
        """Longest one other operation (relay command, read-back) may take."""
        ...

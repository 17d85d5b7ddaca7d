"""DL/T 645 transport: one request, one reply, on a serial line or a TCP stream.

A :class:`Dlt645Transport` owns one bus (an RS-485 serial port, or a TCP
connection to a serial server or the simulator) and runs one transaction at a
time:

1. wait until the line has been silent for the inter-frame gap;
2. discard stale input (late replies, echoes, noise) so it cannot be taken for
   the answer;
3. write the request (with the ``FE`` preamble);
4. feed everything received into a :class:`~firmware_bridge.dlt645.codec.FrameParser`
   until a reply from the addressed meter to the same function arrives, or the
   timeout expires.

Timing follows :mod:`firmware_bridge.timing`: the reply must begin within the
timeout (the meters' response window plus a margin) after the request's wire
time; over TCP (a serial server packs the reply before sending it) the
expected reply's wire time is added. A reply still arriving at the deadline
may finish.

Frames that are not the answer (our own echo on two-wire adapters, another
meter's late reply) are ignored. Failures map to the driver contract's errors:
:class:`~firmware_bridge.driver.MeterTimeout` (nothing, or an incomplete frame),
:class:`~firmware_bridge.driver.MeterWrongAddress` (only a reply from another
address), :class:`~firmware_bridge.driver.MeterFrameError` (a frame with a bad
checksum or structure and nothing valid after it) and
:class:`~firmware_bridge.driver.TransportError` (port or connection unusable;
:class:`~firmware_bridge.driver.BusUnavailable` when it cannot be opened).
Error replies are returned like any reply; the driver decides what they mean.
"""

from __future__ import annotations

import asyncio
import contextlib
import termios
from dataclasses import dataclass, field
from types import TracebackType
from typing import cast

import serial
import serial_asyncio_fast

from firmware_bridge.dlt645.codec import (
    BROADCAST,
    MAX_FRAME,
    OVERHEAD,
    BadFrame,
    Frame,
    FrameParser,
    Function,
    address_matches,
)
from firmware_bridge.dlt645.dataids import MAX_READ_DATA, di_from_wire, payload_bytes
from firmware_bridge.driver import (
    BusUnavailable,
    MeterFrameError,
    MeterTimeout,
    MeterWrongAddress,
    TransportError,
)
from firmware_bridge.serial_line import open_problem
from firmware_bridge.settings import BusSettings
from firmware_bridge.timing import LineTiming, line_timing
from firmware_bridge.timing import char_time_s as _char_time_s

DEFAULT_PREAMBLE = 4
MIN_GAP_S = 0.020  # meters want some silence between frames; 20 ms is the common floor
CONNECT_TIMEOUT_S = 5.0
# A reply that has begun may pause this long between bytes (USB adapters deliver
# in latency-timer chunks) before it counts as cut short.
MIN_TRAILING_S = 0.1


def char_time_s(baud: int, parity: str = "E", stop_bits: int = 1) -> float:
    """Seconds one byte takes on the wire (start + 8 data + parity + stop bits)."""
    return _char_time_s(baud, parity, stop_bits)


def frame_time_s(n_bytes: int, baud: int, parity: str = "E", stop_bits: int = 1) -> float:
    return n_bytes * char_time_s(baud, parity, stop_bits)


def request_bytes(request: Frame, preamble: int = DEFAULT_PREAMBLE) -> int:
    """Bytes ``request`` takes on the wire."""
    return preamble + OVERHEAD + len(request.data)


def reply_bytes(request: Frame) -> int:
    """Expected bytes of the reply to ``request`` (a meter may send 4 FE first)."""
    fn = request.control.function
    if fn == Function.READ and len(request.data) >= 4:
        data = 4 + payload_bytes(di_from_wire(request.data[:4]))
    elif fn == Function.READ_ADDRESS:
        data = 6
    elif fn == Function.CONTROL:
        data = 1
    else:
        data = MAX_READ_DATA
    return DEFAULT_PREAMBLE + OVERHEAD + data


@dataclass
class TransportStats:
    """Counters for operations and benchmarks (never reset by the transport)."""

    transactions: int = 0
    broadcasts: int = 0
    timeouts: int = 0
    bad_frames: int = 0
    ignored_frames: int = 0  # valid frames that were not the awaited reply
    stale_bytes: int = 0  # discarded before a request
    noise_bytes: int = 0  # skipped by the parser, FE preambles included
    reconnects: int = 0
    last_error: str = ""
    by_kind: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Heard:
    """Everything that answered one request within its whole window (discovery)."""

    replies: tuple[Frame, ...]  # valid frames answering the request (function, address pattern)
    bad: tuple[BadFrame, ...]  # garbled frames
    stray_bytes: int  # received bytes that belong to no valid frame (FE preambles excluded)

    @property
    def silent(self) -> bool:
        return not self.replies and not self.bad and self.stray_bytes == 0

    @property
    def single(self) -> Frame | None:
        """The one clean reply, if exactly one meter answered cleanly."""
        if len(self.replies) == 1 and not self.bad and self.stray_bytes == 0:
            return self.replies[0]
        return None


class _Receiver(asyncio.Protocol):
    """Collects received bytes; wakes the waiting transaction."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.ready = asyncio.Event()
        self.lost: BaseException | None = None
        self.closed = False
        self.last_rx = 0.0

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.last_rx = asyncio.get_running_loop().time()
        self.ready.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = exc
        self.ready.set()

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        self.ready.clear()
        return data


class Dlt645Transport:
    """One DL/T 645 bus; see the module docstring. Use as an async context manager
    or call :meth:`open` / :meth:`close`. A lost connection is reopened on the
    next transaction."""

    def __init__(
        self,
        bus: BusSettings,
        *,
        gap_s: float | None = None,
        preamble: int = DEFAULT_PREAMBLE,
        timing: LineTiming | None = None,
    ) -> None:
        if bus.type == "serial" and not bus.device:
            raise ValueError(f"bus {bus.name}: a serial bus needs a device")
        if bus.type == "tcp" and not bus.host:
            raise ValueError(f"bus {bus.name}: a tcp bus needs a host")
        self.bus = bus
        self.timing = timing or line_timing("dlt645", bus)
        self.timeout_s = self.timing.timeout_s  # default per-transaction timeout
        self.char_s = self.timing.char_s
        self.gap_s = gap_s if gap_s is not None else max(MIN_GAP_S, 4 * self.char_s)
        self.preamble = preamble
        self.stats = TransportStats()
        self._transport: asyncio.WriteTransport | None = None
        self._rx: _Receiver | None = None
        self._lock = asyncio.Lock()
        self._parser = FrameParser()
        self._idle_since = 0.0
        self._ever_opened = False

    # -- lifecycle ---------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._rx is not None and not self._rx.closed

    @property
    def is_serial(self) -> bool:
        return self.bus.type == "serial"

    async def open(self) -> None:
        """Open the port or connection; :class:`BusUnavailable` (one line naming the
        device and what to do) when it cannot be opened."""
        if self.is_open:
            return
        loop = asyncio.get_running_loop()
        rx = _Receiver()
        transport: asyncio.BaseTransport
        try:
            if self.is_serial:
                assert self.bus.device is not None
                transport, _ = await serial_asyncio_fast.create_serial_connection(
                    loop,
                    lambda: rx,
                    self.bus.device,
                    baudrate=self.bus.baud,
                    bytesize=serial.EIGHTBITS,
                    parity=self.bus.parity,
                    stopbits=self.bus.stop_bits,
                )
            else:
                assert self.bus.host is not None
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    transport, _ = await loop.create_connection(
                        lambda: rx, self.bus.host, self.bus.port
                    )
        except termios.error as exc:
            # pyserial applies the line settings with tcsetattr; some devices (e.g.
            # pseudo-terminals on some kernels) refuse parity
            raise BusUnavailable(
                self.bus.name, f"{self._where()} refused the line settings: {exc}"
            ) from exc
        except (OSError, serial.SerialException, ValueError) as exc:
            if self.is_serial:
                assert self.bus.device is not None
                raise BusUnavailable(self.bus.name, open_problem(self.bus.device, exc)) from exc
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise BusUnavailable(self.bus.name, f"cannot open {self._where()}: {reason}") from exc
        except TimeoutError as exc:
            raise BusUnavailable(
                self.bus.name, f"cannot open {self._where()}: no answer within {CONNECT_TIMEOUT_S:g} s"
            ) from exc
        # A stream transport (TCP or serial) that writes; not an isinstance check:
        # uvloop's transports have the methods without deriving from asyncio's classes.
        self._transport, self._rx = cast(asyncio.WriteTransport, transport), rx
        self._ever_opened = True
        self._idle_since = loop.time()

    async def close(self) -> None:
        transport, self._transport, self._rx = self._transport, None, None
        if transport is not None:
            transport.close()
            await asyncio.sleep(0)  # let the loop run connection_lost

    async def __aenter__(self) -> Dlt645Transport:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _where(self) -> str:
        if self.is_serial:
            return f"{self.bus.device} ({self.bus.baud} 8{self.bus.parity}{self.bus.stop_bits})"
        return f"{self.bus.host}:{self.bus.port}"

    # -- transactions ------------------------------------------------------

    async def transact(
        self, request: Frame, *, meter_id: str | None = None, timeout_s: float | None = None
    ) -> Frame:
        """Send ``request``; return the reply from the addressed meter (any reply
        from a meter matching a wildcard address). ``timeout_s`` is the wait for
        the reply's first byte after the request is on the wire (default: the
        bus's)."""
        who = meter_id or request.address
        if request.address == BROADCAST:
            raise ValueError("broadcast frames get no reply: use broadcast()")
        async with self._lock:
            self.stats.transactions += 1
            try:
                return await self._transact(request, who, timeout_s or self.timeout_s)
            except (MeterTimeout, MeterFrameError, TransportError) as exc:
                self.stats.last_error = str(exc)
                self.stats.by_kind[exc.kind] = self.stats.by_kind.get(exc.kind, 0) + 1
                raise

    async def listen(self, request: Frame, *, timeout_s: float | None = None) -> Heard:
        """Send ``request`` and collect every answer within its whole window.

        For discovery, where several meters may answer one wildcard: nothing is
        returned early, so a second, later reply is seen too.
        """
        if request.address == BROADCAST:
            raise ValueError("broadcast frames get no reply: use broadcast()")
        async with self._lock:
            self.stats.transactions += 1
            return await self._listen(request, request.address, timeout_s or self.timeout_s)

    async def broadcast(self, request: Frame) -> None:
        """Send a frame that gets no reply (99x6 address), then keep the line quiet."""
        async with self._lock:
            self.stats.broadcasts += 1
            rx = await self._send(request, self.bus.name)
            loop = asyncio.get_running_loop()
            await asyncio.sleep(self._wire_s(request) + self.gap_s)
            self._idle_since = max(loop.time(), rx.last_rx)

    def _wire_s(self, frame: Frame) -> float:
        if not self.is_serial:
            return 0.0
        return self.timing.wire_s(request_bytes(frame, self.preamble))

    def _first_byte_s(self, request: Frame, timeout_s: float) -> float:
        """From the write until the reply must have begun."""
        if self.is_serial:
            return self._wire_s(request) + timeout_s
        # A serial server sends the request on at the line's baud rate and the reply
        # back once it has it whole.
        return (
            self.timing.wire_s(request_bytes(request, self.preamble))
            + timeout_s
            + self.timing.wire_s(reply_bytes(request))
        )

    async def _send(self, request: Frame, who: str) -> _Receiver:
        if not self.is_open:
            if self._ever_opened:
                self.stats.reconnects += 1
            await self.close()
            try:
                await self.open()
            except TransportError as exc:
                raise TransportError(who, exc.detail) from exc
        rx, transport = self._rx, self._transport
        assert rx is not None and transport is not None
        loop = asyncio.get_running_loop()
        wait = self._idle_since + self.gap_s - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        # stale input: whatever arrived since the last transaction is not our answer
        stale = len(rx.take()) + self._parser.pending
        self._parser.reset()
        self.stats.stale_bytes += stale
        try:
            transport.write(request.encode(self.preamble))
        except (OSError, serial.SerialException) as exc:
            await self.close()
            raise TransportError(who, f"write to {self._where()} failed: {exc}") from exc
        return rx

    @property
    def _trailing_s(self) -> float:
        return max(3 * self.char_s + MIN_GAP_S, MIN_TRAILING_S)

    async def _drained(self, rx: _Receiver) -> bool:
        """Let bytes that are already waiting in the kernel reach ``rx`` (two loop
        passes: one polls the descriptor, one runs its callback); True if some did."""
        for _ in range(2):
            await asyncio.sleep(0)
        return bool(rx.buffer)

    async def _wait_for_more(
        self, rx: _Receiver, who: str, deadline: float, hard_deadline: float, received: bool
    ) -> bool:
        """Wait for more of a reply; False once the wait is over: past ``deadline``
        (once bytes came, the line quiet for the trailing time, up to
        ``hard_deadline``) with nothing left to drain. A lost connection is a
        :class:`TransportError`."""
        if rx.closed:
            await self.close()
            raise TransportError(who, f"connection to {self._where()} lost: {rx.lost}")
        now = asyncio.get_running_loop().time()
        limit = deadline
        if received:
            limit = min(hard_deadline, max(deadline, rx.last_rx + self._trailing_s))
        if now >= limit:
            return now < hard_deadline and await self._drained(rx)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit - now):
                await rx.ready.wait()
        return True

    async def _transact(self, request: Frame, who: str, timeout_s: float) -> Frame:
        rx = await self._send(request, who)
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        deadline = sent_at + self._first_byte_s(request, timeout_s)
        hard_deadline = deadline + MAX_FRAME * self.char_s
        bad: BadFrame | None = None
        other: Frame | None = None  # a valid reply, but from another address
        received = 0
        noise_before = self._parser.noise_bytes
        trailing_s = self._trailing_s
        try:
            while True:
                if rx.buffer:
                    data = rx.take()
                    received += len(data)
                    for event in self._parser.feed(data):
                        if isinstance(event, BadFrame):
                            bad = event
                            self.stats.bad_frames += 1
                            # nothing good follows a garbled reply on a half-duplex
                            # bus: stop waiting once the line has gone quiet
                            deadline = min(deadline, loop.time() + self.gap_s + trailing_s)
                        elif self._answers(request, event):
                            self._idle_since = loop.time()
                            return event
                        else:
                            self.stats.ignored_frames += 1
                            if self._answers_but_for_address(request, event):
                                other = event
                    continue
                if not await self._wait_for_more(rx, who, deadline, hard_deadline, bool(received)):
                    break
        finally:
            self.stats.noise_bytes += self._parser.noise_bytes - noise_before
            self._idle_since = max(self._idle_since, rx.last_rx, sent_at)
        if other is not None:
            raise MeterWrongAddress(who, request.address, other.address)
        if bad is not None:
            raise MeterFrameError(who, f"garbled reply: {bad.error} ({bad.raw.hex(' ')})")
        self.stats.timeouts += 1
        if received:
            raise MeterTimeout(
                who, f"no complete reply within {timeout_s:g} s ({received} bytes received)"
            )
        raise MeterTimeout(who, f"no reply within {timeout_s:g} s")

    async def _listen(self, request: Frame, who: str, timeout_s: float) -> Heard:
        rx = await self._send(request, who)
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        deadline = sent_at + self._first_byte_s(request, timeout_s)
        hard_deadline = deadline + MAX_FRAME * self.char_s
        replies: list[Frame] = []
        bad: list[BadFrame] = []
        raw = bytearray()
        try:
            while True:
                if rx.buffer:
                    data = rx.take()
                    raw += data
                    for event in self._parser.feed(data):
                        if isinstance(event, BadFrame):
                            bad.append(event)
                            self.stats.bad_frames += 1
                        elif self._answers(request, event):
                            replies.append(event)
                        else:
                            self.stats.ignored_frames += 1
                    continue
                if not await self._wait_for_more(rx, who, deadline, hard_deadline, bool(raw)):
                    break
        finally:
            self._idle_since = max(self._idle_since, rx.last_rx, sent_at, loop.time())
        # what is left over once valid frames (ours echoed included) and FE preambles are taken out
        framed = sum(len(f.encode(0)) for f in _frames_in(raw))
        stray = len(raw.replace(b"\xfe", b"")) - framed
        self._parser.reset()
        return Heard(tuple(replies), tuple(bad), max(0, stray))

    @staticmethod
    def _answers(request: Frame, reply: Frame) -> bool:
        """Same function, addressed meter; a normal read reply also repeats the DI
        (so a late answer to an earlier read is not taken for this one)."""
        c = reply.control
        if not (
            c.reply
            and c.function == request.control.function
            and address_matches(request.address, reply.address)
        ):
            return False
        if c.function in (Function.READ, Function.READ_FOLLOW_UP) and not c.error:
            return reply.data[:4] == request.data[:4]
        return True

    @staticmethod
    def _answers_but_for_address(request: Frame, reply: Frame) -> bool:
        """A reply to this very request that came from an address it did not select."""
        c = reply.control
        if not (c.reply and c.function == request.control.function):
            return False
        if c.function in (Function.READ, Function.READ_FOLLOW_UP) and not c.error:
            return reply.data[:4] == request.data[:4]
        return True


def _frames_in(raw: bytes | bytearray) -> list[Frame]:
    return [e for e in FrameParser().feed(bytes(raw)) if isinstance(e, Frame)]


def open_transport(
    bus: BusSettings,
    *,
    gap_s: float | None = None,
    preamble: int = DEFAULT_PREAMBLE,
    timing: LineTiming | None = None,
) -> Dlt645Transport:
    """A transport for ``bus``, not yet open: ``async with open_transport(bus) as t:``."""
    return Dlt645Transport(bus, gap_s=gap_s, preamble=preamble, timing=timing)

"""DL/T 645-2007 meter driver: canonical readings, relay control, discovery.

:class:`Dlt645Driver` implements :class:`firmware_bridge.driver.MeterDriver`
for one meter on a shared :class:`~firmware_bridge.dlt645.transport.Dlt645Transport`.
Which DIs are read for which :class:`~firmware_bridge.reading.Quantity` is the
table :data:`READ_PLAN` (energy first: it is what bills); blocks (``0001FF00``
etc.) are used when two or more of their members are wanted, with a fallback
to single DIs when the meter refuses the block (remembered, so the refused
block costs one transaction only once).

Errors: a timeout, garbled frame, reply from another address or transport
failure before anything was read aborts the read (the meter did not answer
correctly); after some values were read it ends the read with those values
(``meta["incomplete"]`` says why, ``meta["missing"]`` lists what is missing).
A quantity the meter refuses (error reply, e.g. "no data requested") is left
out of the reading and listed in ``meta["unsupported"]``; a read where
everything was refused raises :class:`~firmware_bridge.driver.MeterRefused`.
A date or time that does not decode is a :class:`~firmware_bridge.reading.MeterFault`
in ``reading.faults`` (with the raw bytes), never a lost reading.

Time: per-transaction timeouts and the read's budget come from
:class:`~firmware_bridge.timing.LineTiming`. Relay-command deadlines are
computed from the meter's own clock where it was read (:meth:`Dlt645Driver.command_deadline`).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from firmware_bridge.dlt645.clock import DI_DATE, DI_TIME, ClockRead, decode_clock
from firmware_bridge.dlt645.codec import BROADCAST, WILDCARD, Frame
from firmware_bridge.dlt645.dataids import StatusWord3, Value, decode_values, item
from firmware_bridge.dlt645.errors import Dlt645Error
from firmware_bridge.dlt645.messages import (
    ControlCommand,
    Refused,
    SecurityModule,
    control_plaintext,
    control_refusal_hint,
    control_request,
    parse_control_reply,
    parse_read_address_reply,
    parse_read_reply,
    read_address_request,
    read_follow_up_request,
    read_request,
    sealed_control_request,
    time_sync_request,
)
from firmware_bridge.dlt645.transport import Dlt645Transport, Heard, reply_bytes, request_bytes
from firmware_bridge.driver import (
    MeterError,
    MeterFrameError,
    MeterRefused,
    MeterTimeout,
    MeterWrongAddress,
)
from firmware_bridge.reading import Measurement, MeterFault, Quality, Quantity, Reading
from firmware_bridge.timing import LineTiming

MAX_FOLLOW_UPS = 32
DI_ADDRESS = 0x04000401
DI_STATUS3 = 0x04000503


@dataclass(frozen=True, slots=True)
class ReadGroup:
    """Quantities served by one block DI; each member also has its own DI."""

    block: int | None
    members: Mapping[Quantity, tuple[int, int]]  # quantity -> (single DI, index in block)


Q = Quantity
READ_PLAN: tuple[ReadGroup, ...] = (
    ReadGroup(
        0x0001FF00,
        {
            Q.ENERGY_IMPORT: (0x00010000, 0),
            Q.ENERGY_IMPORT_T1: (0x00010100, 1),
            Q.ENERGY_IMPORT_T2: (0x00010200, 2),
            Q.ENERGY_IMPORT_T3: (0x00010300, 3),
            Q.ENERGY_IMPORT_T4: (0x00010400, 4),
        },
    ),
    ReadGroup(None, {Q.ENERGY_EXPORT: (0x00020000, 0)}),
    ReadGroup(
        0x0201FF00,
        {Q.VOLTAGE: (0x02010100, 0), Q.VOLTAGE_B: (0x02010200, 1), Q.VOLTAGE_C: (0x02010300, 2)},
    ),
    ReadGroup(
        0x0202FF00,
        {Q.CURRENT: (0x02020100, 0), Q.CURRENT_B: (0x02020200, 1), Q.CURRENT_C: (0x02020300, 2)},
    ),
    ReadGroup(0x0203FF00, {Q.POWER: (0x02030000, 0)}),
    ReadGroup(0x0206FF00, {Q.POWER_FACTOR: (0x02060000, 0)}),
    ReadGroup(None, {Q.FREQUENCY: (0x02800002, 0)}),
)
SPECIAL = (Q.RELAY_OPEN, Q.METER_CLOCK)  # status word 3, date + time

DEFAULT_QUANTITIES: tuple[Quantity, ...] = (
    Q.ENERGY_IMPORT,
    Q.ENERGY_IMPORT_T1,
    Q.ENERGY_IMPORT_T2,
    Q.ENERGY_IMPORT_T3,
    Q.ENERGY_IMPORT_T4,
    Q.VOLTAGE,
    Q.CURRENT,
    Q.POWER,
    Q.POWER_FACTOR,
    Q.FREQUENCY,
    Q.RELAY_OPEN,
    Q.METER_CLOCK,
)
SUPPORTED: frozenset[Quantity] = frozenset(
    [q for g in READ_PLAN for q in g.members] + list(SPECIAL)
)

# A relay command is valid this long after it is sent (N3..N8, in the meter's time).
COMMAND_VALIDITY_S = 300.0
# A clock read this recently gives the meter's time for a command's deadline.
CLOCK_FRESH_S = 3600.0
# Without the meter's clock the deadline is local time plus validity plus this
# margin, so that a meter whose clock runs up to this much ahead of the site's
# zone still takes the command.
UNREAD_CLOCK_MARGIN_S = 1800.0


def _codec_error(meter_id: str, exc: Dlt645Error) -> MeterError:
    if isinstance(exc, Refused):
        return MeterRefused(meter_id, str(exc))
    return MeterFrameError(meter_id, str(exc))


@dataclass(frozen=True, slots=True)
class _ClockSeen:
    local: dt.datetime  # the meter's clock (naive, meter time)...
    wall_s: float  # ...when the wall clock said this


class Dlt645Driver:
    """One DL/T 645-2007 meter. See the module docstring for the error policy.

    ``password`` is ``PA P0 P1 P2`` as sent (level 02 or 04 for plaintext
    control); ``security`` seals control commands for encrypted levels (98).
    ``clock_tz`` is the time zone the meter's clock runs in (meters keep local
    time: the site's zone); deadlines and time sync are converted to it.
    ``timing`` is this meter's (default: the transport's); ``wall`` the clock
    that meter-clock readings are paired with (seconds).
    """

    def __init__(
        self,
        meter_id: str,
        address: str,
        transport: Dlt645Transport,
        *,
        quantities: Iterable[Quantity] = DEFAULT_QUANTITIES,
        password: bytes | None = None,
        operator: bytes = b"\0\0\0\0",
        security: SecurityModule | None = None,
        clock_tz: dt.tzinfo = dt.UTC,
        timing: LineTiming | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        wanted = tuple(dict.fromkeys(quantities))
        unknown = [q for q in wanted if q not in SUPPORTED]
        if unknown:
            raise ValueError(f"meter {meter_id}: DL/T 645 cannot read {unknown}")
        if len(address) != 12 or not address.isdigit():
            raise ValueError(f"meter {meter_id}: address must be 12 digits, got {address!r}")
        if address == BROADCAST:
            raise ValueError(f"meter {meter_id}: {address} is the broadcast address, not a meter's (no meter answers it)")
        if password is not None and len(password) != 4:
            raise ValueError(f"meter {meter_id}: password must be 4 bytes (level + 3)")
        if len(operator) != 4:
            raise ValueError(f"meter {meter_id}: operator code must be 4 bytes")
        self._meter_id = meter_id
        self.address = address
        self.transport = transport
        self.quantities = wanted
        self.password = password
        self.operator = operator
        self.security = security
        self.clock_tz = clock_tz
        self.timing = timing
        self._wall = wall
        self._refused_blocks: set[int] = set()
        self._clock_seen: _ClockSeen | None = None

    @property
    def meter_id(self) -> str:
        return self._meter_id

    @property
    def line(self) -> LineTiming:
        return self.timing or self.transport.timing

    @property
    def timeout_s(self) -> float:
        """Per-transaction timeout: wait for a reply's first byte after the request."""
        return self.line.timeout_s

    # -- time budget -------------------------------------------------------

    def _tx_s(self, request: Frame) -> float:
        return self.line.transaction_s(
            request_bytes(request, self.transport.preamble), reply_bytes(request)
        )

    def planned_requests(self) -> list[Frame]:
        """Every request one read may send, worst case (a block not yet known to be
        refused, then its members one by one; the date read twice around midnight)."""
        wanted = set(self.quantities)
        out: list[Frame] = []
        for group in READ_PLAN:
            members = [q for q in group.members if q in wanted]
            if not members:
                continue
            if group.block is not None and len(members) > 1 and group.block not in self._refused_blocks:
                out.append(read_request(self.address, group.block))
            out += [read_request(self.address, group.members[q][0]) for q in members]
        if Q.RELAY_OPEN in wanted:
            out.append(read_request(self.address, DI_STATUS3))
        if Q.METER_CLOCK in wanted:
            out += [read_request(self.address, di) for di in (DI_DATE, DI_TIME, DI_DATE)]
        return out

    def read_budget_s(self) -> float:
        """Longest one read may take when every transaction uses its full timeout."""
        return sum(self._tx_s(r) for r in self.planned_requests())

    def operation_budget_s(self) -> float:
        """Longest a relay operation may take: a clock read (date, time, date) and the command."""
        probe = control_request(
            self.address, ControlCommand.TRIP, dt.datetime(2000, 1, 1), password=b"\x02\0\0\0"
        )
        return 3 * self._tx_s(read_request(self.address, DI_DATE)) + self._tx_s(probe)

    # -- low level ---------------------------------------------------------

    async def _transact(self, request: Frame) -> Frame:
        return await self.transport.transact(
            request, meter_id=self._meter_id, timeout_s=self.timeout_s
        )

    async def read_raw(self, di: int) -> bytes:
        """The payload for ``di``, following up (12H) while the meter says more follows."""
        try:
            reply = parse_read_reply(await self._transact(read_request(self.address, di)), di)
            payload = reply.payload
            seq = 0
            while reply.more:
                seq += 1
                if seq > MAX_FOLLOW_UPS:
                    raise MeterFrameError(
                        self._meter_id, f"{di:08X}: more than {MAX_FOLLOW_UPS} follow-up frames"
                    )
                reply = parse_read_reply(
                    await self._transact(read_follow_up_request(self.address, di, seq)), di
                )
                if reply.seq != seq:
                    raise MeterFrameError(
                        self._meter_id, f"{di:08X}: follow-up {seq} answered as {reply.seq}"
                    )
                payload += reply.payload
        except Dlt645Error as exc:
            raise _codec_error(self._meter_id, exc) from exc
        return payload

    async def read_values(self, di: int) -> tuple[Value, ...]:
        payload = await self.read_raw(di)
        try:
            return decode_values(item(di), payload)
        except Dlt645Error as exc:
            raise _codec_error(self._meter_id, exc) from exc

    async def _read_one(self, di: int) -> Value:
        return (await self.read_values(di))[0]

    # -- readings ----------------------------------------------------------

    async def read(self, now_ms: int) -> Reading:
        values: dict[Quantity, Measurement] = {}
        unsupported: list[str] = []
        faults: list[MeterFault] = []
        wanted = set(self.quantities)
        incomplete: MeterError | None = None
        try:
            for group in READ_PLAN:
                members = [q for q in group.members if q in wanted]
                if members:
                    await self._read_group(group, members, values, unsupported)
            if Q.RELAY_OPEN in wanted:
                try:
                    relay = await self.read_relay_open()
                except MeterRefused:
                    unsupported.append(Q.RELAY_OPEN.value)
                else:
                    values[Q.RELAY_OPEN] = Measurement(Decimal(int(relay)))
            if Q.METER_CLOCK in wanted:
                try:
                    clock = await self._read_clock()
                except MeterRefused:
                    unsupported.append(Q.METER_CLOCK.value)
                else:
                    if clock.fault is not None:
                        faults.append(clock.fault)
                    if clock.local is not None:
                        stamp = int(clock.local.replace(tzinfo=self.clock_tz).timestamp())
                        quality = Quality.GOOD if clock.fault is None else Quality.SUSPECT
                        values[Q.METER_CLOCK] = Measurement(Decimal(stamp), quality)
        except MeterError as exc:
            # values already read count: energy is first in the plan, and it bills
            if not values:
                raise
            incomplete = exc
        if not values:
            raise MeterRefused(
                self._meter_id, f"every quantity was refused: {', '.join(unsupported)}"
            )
        meta = {"protocol": "dlt645", "address": self.address}
        if unsupported:
            meta["unsupported"] = ",".join(unsupported)
        if incomplete is not None:
            meta["incomplete"] = f"{incomplete.kind}: {incomplete.detail}"
            faulted = {Q.METER_CLOCK} if faults else set()
            meta["missing"] = ",".join(
                q.value
                for q in self.quantities
                if q not in values and q.value not in unsupported and q not in faulted
            )
        return Reading(self._meter_id, now_ms, values, meta=meta, faults=tuple(faults))

    async def _read_group(
        self,
        group: ReadGroup,
        members: list[Quantity],
        values: dict[Quantity, Measurement],
        unsupported: list[str],
    ) -> None:
        """Read ``members`` of ``group`` into ``values`` as they come (so a later
        failure keeps the earlier ones)."""
        if group.block is not None and len(members) > 1 and group.block not in self._refused_blocks:
            try:
                block = await self.read_values(group.block)
            except MeterRefused:
                self._refused_blocks.add(group.block)
            else:
                for q in members:
                    index = group.members[q][1]
                    if index < len(block):
                        values[q] = Measurement(_decimal(self._meter_id, block[index]))
        for q in members:
            if q in values:
                continue
            try:
                value = await self._read_one(group.members[q][0])
            except MeterRefused:
                unsupported.append(q.value)
            else:
                values[q] = Measurement(_decimal(self._meter_id, value))

    async def read_status3(self) -> StatusWord3:
        raw = await self._read_one(DI_STATUS3)
        assert isinstance(raw, int)
        return StatusWord3(raw)

    async def read_relay_open(self) -> bool:
        """True if the load relay is open (supply cut), from status word 3 bit 4."""
        return (await self.read_status3()).relay_open

    async def _read_clock(self) -> ClockRead:
        """The meter's date and time, decoded without raising on a bad date; a usable
        clock is remembered for command deadlines."""
        date_raw = await self.read_raw(DI_DATE)
        time_raw = await self.read_raw(DI_TIME)
        seen_s = self._wall()
        if time_raw[2:3] == b"\x00" and time_raw[1:2] == b"\x00" and time_raw[:1] < b"\x05":
            date_raw = await self.read_raw(DI_DATE)  # the date may have rolled over in between
        clock = decode_clock(date_raw, time_raw)
        if clock.local is not None:
            self._clock_seen = _ClockSeen(clock.local, seen_s)
        return clock

    async def read_clock(self) -> dt.datetime:
        """The meter's clock as an aware datetime (meter time zone ``clock_tz``);
        :class:`MeterFrameError` when its date or time does not decode."""
        clock = await self._read_clock()
        if clock.local is None or (clock.fault is not None and clock.fault.cause != "clock.weekday"):
            assert clock.fault is not None
            raise MeterFrameError(self._meter_id, f"{clock.fault.detail} ({clock.fault.raw})")
        return clock.local.replace(tzinfo=self.clock_tz)

    # -- control -----------------------------------------------------------

    def _meter_local(self, when: dt.datetime) -> dt.datetime:
        if when.tzinfo is None:
            return when
        return when.astimezone(self.clock_tz).replace(tzinfo=None)

    async def command_deadline(
        self, validity_s: float = COMMAND_VALIDITY_S
    ) -> tuple[dt.datetime, str]:
        """The validity deadline for a command sent now, in the meter's own time (naive),
        and what it was computed from.

        From the meter's clock when it was read within :data:`CLOCK_FRESH_S` (read
        now if not: two transactions); else from the site's local time plus
        :data:`UNREAD_CLOCK_MARGIN_S`, so a meter whose clock runs ahead still
        takes it.
        """
        now = self._wall()
        seen = self._clock_seen
        if seen is None or not 0 <= now - seen.wall_s <= CLOCK_FRESH_S:
            try:
                await self._read_clock()
            except MeterError:
                pass
            now, seen = self._wall(), self._clock_seen
        if seen is not None and 0 <= now - seen.wall_s <= CLOCK_FRESH_S:
            meter_now = seen.local + dt.timedelta(seconds=now - seen.wall_s)
            return meter_now + dt.timedelta(seconds=validity_s), "from the meter's clock"
        local = dt.datetime.fromtimestamp(now, self.clock_tz).replace(tzinfo=None)
        deadline = local + dt.timedelta(seconds=validity_s + UNREAD_CLOCK_MARGIN_S)
        return deadline, (
            f"from local time + {UNREAD_CLOCK_MARGIN_S / 60:g} min margin"
            " (the meter's clock could not be read)"
        )

    async def control(self, op: ControlCommand, deadline: dt.datetime | None = None) -> None:
        """Send a 1CH command (trip, close, alarm, protect...) valid until ``deadline``
        (aware, or naive meaning meter time; default :meth:`command_deadline`).

        Returns when the meter acknowledged (9CH). The acknowledgement says the
        meter accepted the command, not that the relay moved: read back with
        :meth:`read_relay_open`. Raises :class:`MeterRefused` on a DCH reply, with
        the error byte decoded, why the meter may have refused and the deadline sent.
        """
        if deadline is None:
            local_deadline, basis = await self.command_deadline()
        else:
            local_deadline, basis = self._meter_local(deadline), "as given"
        try:
            if self.security is not None:
                password = self.password or bytes([self.security.level, 0, 0, 0])
                sealed = await self.security.seal_control(
                    self.address, control_plaintext(op, local_deadline)
                )
                request = sealed_control_request(
                    self.address, password=password, operator=self.operator, sealed=sealed
                )
            elif self.password is not None:
                request = control_request(
                    self.address, op, local_deadline, password=self.password, operator=self.operator
                )
            else:
                raise MeterError(
                    self._meter_id, "no control password or security module configured"
                )
            parse_control_reply(await self._transact(request))
        except Refused as exc:
            raise MeterRefused(
                self._meter_id,
                f"the meter refused {op.name} ({exc}): {control_refusal_hint(exc.reply)};"
                f" deadline sent {local_deadline:%Y-%m-%d %H:%M:%S} meter time, {basis}",
            ) from exc
        except Dlt645Error as exc:
            raise _codec_error(self._meter_id, exc) from exc


# ---------------------------------------------------------------------------
# Bus-wide operations


def _decimal(meter_id: str, value: Value) -> Decimal:
    if not isinstance(value, Decimal):
        raise MeterFrameError(meter_id, f"expected a number, got {value!r}")
    return value


def _collision(pattern: str, heard: Heard) -> str:
    parts = []
    if len(heard.replies) > 1:
        parts.append(f"{len(heard.replies)} replies")
    if heard.bad:
        parts.append(f"{len(heard.bad)} garbled frame(s)")
    if heard.stray_bytes:
        parts.append(f"{heard.stray_bytes} stray byte(s)")
    return f"collision: several meters answered {pattern} ({', '.join(parts)})"


async def discover(
    transport: Dlt645Transport, pattern: str = WILDCARD, *, timeout_s: float | None = None
) -> list[str]:
    """Addresses answering a 13H read-address to ``pattern``.

    With the full wildcard this works with ONE meter on the bus: several meters
    answer at once and collide (:class:`~firmware_bridge.driver.MeterFrameError`
    saying "collision"). A partial wildcard (``AA`` in the high bytes, e.g.
    ``AAAAAA000123``) narrows the answerers to meters whose low digits match;
    :func:`search` narrows on its own. Returns ``[]`` when nothing answered.
    """
    heard = await transport.listen(read_address_request(pattern), timeout_s=timeout_s)
    if heard.silent:
        return []
    single = heard.single
    if single is None:
        raise MeterFrameError(pattern, _collision(pattern, heard))
    try:
        return [parse_read_address_reply(single)]
    except Dlt645Error as exc:
        raise _codec_error(pattern, exc) from exc


def narrow(pattern: str) -> list[str]:
    """The 100 patterns that fix the lowest wildcard byte of ``pattern`` (``[]`` when
    no byte is left to fix). Wildcards are ``AA`` bytes padding the high end."""
    k = wildcard_bytes(pattern)
    if k == 0:
        return []
    return [f"{'AA' * (k - 1)}{d:02d}{pattern[2 * k :]}" for d in range(100)]


def wildcard_bytes(pattern: str) -> int:
    """How many high bytes of ``pattern`` are ``AA``; ValueError unless the rest are digits."""
    if len(pattern) != 12:
        raise ValueError(f"address pattern must be 12 characters, got {pattern!r}")
    k = 0
    while k < 6 and pattern[2 * k : 2 * k + 2].upper() == "AA":
        k += 1
    rest = pattern[2 * k :]
    if rest and not (rest.isascii() and rest.isdigit()):
        raise ValueError(
            f"address pattern {pattern!r}: AA only as padding of the high bytes, then digits"
        )
    return k


@dataclass(frozen=True, slots=True)
class SearchStep:
    """One request of :func:`search`, for progress reports."""

    pattern: str
    outcome: str  # "silent", "found", "collision", "unresolved"
    address: str | None  # the meter found
    asked: int  # requests sent so far
    pending: int  # patterns still to ask (grows when a collision is narrowed)
    detail: str = ""


@dataclass(frozen=True, slots=True)
class SearchResult:
    found: list[str]
    unresolved: list[str]  # full addresses where replies still collided (duplicates, noise)
    asked: int


async def search(
    transport: Dlt645Transport,
    root: str = WILDCARD,
    *,
    timeout_s: float | None = None,
    on_step: Callable[[SearchStep], Awaitable[None] | None] | None = None,
) -> SearchResult:
    """Find every meter under ``root`` by narrowing partial wildcards.

    Each pattern is asked with 13H and its whole window listened to. Silence:
    nobody there. One clean reply: a meter, confirmed by reading its address
    with that address. Anything else (several replies, garbled or overlapping
    frames): a collision, and the next byte is fixed (``AA..AA00xx`` ..
    ``AA..AA99xx``) and each asked in turn. A collision on a full address
    (two meters with one address, or noise) is reported as unresolved.
    ``on_step`` hears about every request (for progress lines).
    """
    wildcard_bytes(root)
    stack = [root]
    found: list[str] = []
    unresolved: list[str] = []
    asked = 0

    async def report(step: SearchStep) -> None:
        if on_step is not None:
            result = on_step(step)
            if result is not None:
                await result

    while stack:
        pattern = stack.pop(0)
        heard = await transport.listen(read_address_request(pattern), timeout_s=timeout_s)
        asked += 1
        if heard.silent:
            await report(SearchStep(pattern, "silent", None, asked, len(stack)))
            continue
        address = _clean_address(heard)
        if address is not None:
            confirm = await transport.listen(read_request(address, DI_ADDRESS), timeout_s=timeout_s)
            asked += 1
            if confirm.single is not None and confirm.single.address == address:
                found.append(address)
                await report(SearchStep(pattern, "found", address, asked, len(stack)))
                continue
            heard = confirm
        children = narrow(pattern)
        if not children:
            unresolved.append(pattern)
            await report(
                SearchStep(pattern, "unresolved", None, asked, len(stack), _collision(pattern, heard))
            )
            continue
        stack = children + stack
        await report(
            SearchStep(pattern, "collision", None, asked, len(stack), _collision(pattern, heard))
        )
    return SearchResult(found, unresolved, asked)


def _clean_address(heard: Heard) -> str | None:
    single = heard.single
    if single is None:
        return None
    try:
        return parse_read_address_reply(single)
    except Dlt645Error:
        return None


async def probe(
    transport: Dlt645Transport, candidates: Iterable[str], *, timeout_s: float | None = None
) -> list[str]:
    """Which of ``candidates`` (known or printed addresses) answer on this bus.

    Each candidate is asked for its communication address (``04000401``); a
    meter that answers, even with an error reply, is present. One timeout per
    absent candidate, so keep the list short on slow buses.
    """
    return [a for a, status in (await probe_each(transport, candidates, timeout_s=timeout_s)).items() if status == "answered"]


async def probe_each(
    transport: Dlt645Transport, candidates: Iterable[str], *, timeout_s: float | None = None
) -> dict[str, str]:
    """What each candidate address did: ``answered``, ``no reply``, or what came
    instead (``reply from address X, expected Y``, a garbled reply)."""
    out: dict[str, str] = {}
    for address in candidates:
        try:
            reply = await transport.transact(
                read_request(address, DI_ADDRESS), meter_id=address, timeout_s=timeout_s
            )
        except MeterTimeout as exc:
            out[address] = "no reply" if "no reply" in exc.detail else exc.detail
            continue
        except MeterWrongAddress as exc:
            out[address] = exc.detail
            continue
        except MeterFrameError as exc:
            out[address] = exc.detail
            continue
        out[address] = "answered" if reply.address == address else f"reply from address {reply.address}, expected {address}"
    return out


async def broadcast_time(
    transport: Dlt645Transport, when: dt.datetime, clock_tz: dt.tzinfo = dt.UTC
) -> None:
    """Broadcast time sync (08H to 99x6); meters do not answer.

    ``when`` (aware, or naive meaning meter local time) is sent in ``clock_tz``.
    Meters usually accept a broadcast correction only within a few minutes and
    once a day; large steps need a per-meter authenticated write.
    """
    if when.tzinfo is not None:
        when = when.astimezone(clock_tz).replace(tzinfo=None)
    try:
        await transport.broadcast(time_sync_request(when))
    except Dlt645Error as exc:
        raise _codec_error("broadcast", exc) from exc

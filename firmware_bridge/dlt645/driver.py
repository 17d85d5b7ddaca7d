"""DL/T 645-2007 meter driver: canonical readings, relay control, discovery.

:class:`Dlt645Driver` implements :class:`firmware_bridge.driver.MeterDriver`
for one meter on a shared :class:`~firmware_bridge.dlt645.transport.Dlt645Transport`.
Which DIs are read for which :class:`~firmware_bridge.reading.Quantity` is the
table :data:`READ_PLAN`; blocks (``0001FF00`` etc.) are used when two or more of
their members are wanted, with a fallback to single DIs when the meter refuses
the block (remembered, so the refused block costs one transaction only once).

Errors: a timeout, garbled frame or transport failure aborts the read (the
meter did not answer correctly); a quantity the meter refuses (error reply,
e.g. "no data requested") is left out of the reading and listed in
``meta["unsupported"]``; a read where everything was refused raises
:class:`~firmware_bridge.driver.MeterRefused`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from firmware_bridge.dlt645.codec import WILDCARD, Frame
from firmware_bridge.dlt645.dataids import StatusWord3, Value, decode_values, item
from firmware_bridge.dlt645.errors import Dlt645Error
from firmware_bridge.dlt645.messages import (
    ControlCommand,
    Refused,
    SecurityModule,
    control_plaintext,
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
from firmware_bridge.dlt645.transport import Dlt645Transport
from firmware_bridge.driver import MeterError, MeterFrameError, MeterRefused, MeterTimeout
from firmware_bridge.reading import Measurement, Quantity, Reading

MAX_FOLLOW_UPS = 32
DI_DATE = 0x04000101
DI_TIME = 0x04000102
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


def _codec_error(meter_id: str, exc: Dlt645Error) -> MeterError:
    if isinstance(exc, Refused):
        return MeterRefused(meter_id, str(exc))
    return MeterFrameError(meter_id, str(exc))


class Dlt645Driver:
    """One DL/T 645-2007 meter. See the module docstring for the error policy.

    ``password`` is ``PA P0 P1 P2`` as sent (level 02 or 04 for plaintext
    control); ``security`` seals control commands for encrypted levels (98).
    ``clock_tz`` is the time zone the meter's clock runs in (meters keep local
    time); deadlines and time sync are converted to it.
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
    ) -> None:
        wanted = tuple(dict.fromkeys(quantities))
        unknown = [q for q in wanted if q not in SUPPORTED]
        if unknown:
            raise ValueError(f"meter {meter_id}: DL/T 645 cannot read {unknown}")
        if len(address) != 12 or not address.isdigit():
            raise ValueError(f"meter {meter_id}: address must be 12 digits, got {address!r}")
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
        self._refused_blocks: set[int] = set()

    @property
    def meter_id(self) -> str:
        return self._meter_id

    # -- low level ---------------------------------------------------------

    async def _transact(self, request: Frame) -> Frame:
        return await self.transport.transact(request, meter_id=self._meter_id)

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
        wanted = set(self.quantities)
        for group in READ_PLAN:
            members = [q for q in group.members if q in wanted]
            if members:
                got, refused = await self._read_group(group, members)
                values.update({q: Measurement(v) for q, v in got.items()})
                unsupported += refused
        if Q.RELAY_OPEN in wanted:
            try:
                values[Q.RELAY_OPEN] = Measurement(Decimal(int(await self.read_relay_open())))
            except MeterRefused:
                unsupported.append(Q.RELAY_OPEN.value)
        if Q.METER_CLOCK in wanted:
            try:
                clock = await self.read_clock()
                values[Q.METER_CLOCK] = Measurement(Decimal(int(clock.timestamp())))
            except MeterRefused:
                unsupported.append(Q.METER_CLOCK.value)
        if not values:
            raise MeterRefused(
                self._meter_id, f"every quantity was refused: {', '.join(unsupported)}"
            )
        meta = {"protocol": "dlt645", "address": self.address}
        if unsupported:
            meta["unsupported"] = ",".join(unsupported)
        return Reading(self._meter_id, now_ms, values, meta=meta)

    async def _read_group(
        self, group: ReadGroup, members: list[Quantity]
    ) -> tuple[dict[Quantity, Decimal], list[str]]:
        got: dict[Quantity, Decimal] = {}
        if group.block is not None and len(members) > 1 and group.block not in self._refused_blocks:
            try:
                block = await self.read_values(group.block)
            except MeterRefused:
                self._refused_blocks.add(group.block)
            else:
                for q in members:
                    index = group.members[q][1]
                    if index < len(block):
                        got[q] = _decimal(self._meter_id, block[index])
        refused = []
        for q in members:
            if q in got:
                continue
            try:
                got[q] = _decimal(self._meter_id, await self._read_one(group.members[q][0]))
            except MeterRefused:
                refused.append(q.value)
        return got, refused

    async def read_status3(self) -> StatusWord3:
        raw = await self._read_one(DI_STATUS3)
        assert isinstance(raw, int)
        return StatusWord3(raw)

    async def read_relay_open(self) -> bool:
        """True if the load relay is open (supply cut), from status word 3 bit 4."""
        return (await self.read_status3()).relay_open

    async def read_clock(self) -> dt.datetime:
        """The meter's clock as an aware datetime (meter time zone ``clock_tz``)."""
        date = await self._read_one(DI_DATE)
        time = await self._read_one(DI_TIME)
        if isinstance(time, dt.time) and time.hour == 0 and time.minute == 0 and time.second < 5:
            date = await self._read_one(DI_DATE)  # the date may have rolled over in between
        assert isinstance(date, dt.date) and isinstance(time, dt.time)
        return dt.datetime.combine(date, time, tzinfo=self.clock_tz)

    # -- control -----------------------------------------------------------

    def _meter_local(self, when: dt.datetime) -> dt.datetime:
        if when.tzinfo is None:
            return when
        return when.astimezone(self.clock_tz).replace(tzinfo=None)

    async def control(self, op: ControlCommand, deadline: dt.datetime) -> None:
        """Send a 1CH command (trip, close, alarm, protect...) valid until ``deadline``.

        Returns when the meter acknowledged (9CH). The acknowledgement says the
        meter accepted the command, not that the relay moved: read back with
        :meth:`read_relay_open`. Raises :class:`MeterRefused` on a DCH reply.
        """
        local_deadline = self._meter_local(deadline)
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
        except Dlt645Error as exc:
            raise _codec_error(self._meter_id, exc) from exc


# ---------------------------------------------------------------------------
# Bus-wide operations


def _decimal(meter_id: str, value: Value) -> Decimal:
    if not isinstance(value, Decimal):
        raise MeterFrameError(meter_id, f"expected a number, got {value!r}")
    return value


async def discover(transport: Dlt645Transport, pattern: str = WILDCARD) -> list[str]:
    """Addresses answering a 13H read-address to ``pattern``.

    With the full wildcard this works only with ONE meter on the bus: every
    meter answers at once and the replies collide (a garbled frame, reported as
    :class:`~firmware_bridge.driver.MeterFrameError`). A partial wildcard
    (``AA`` in the high bytes, e.g. ``AAAAAA000123``) narrows the answerers to
    meters whose low digits match; for several meters use :func:`probe`.
    Returns ``[]`` when nothing answered.
    """
    try:
        reply = await transport.transact(read_address_request(pattern), meter_id=pattern)
        return [parse_read_address_reply(reply)]
    except MeterTimeout:
        return []
    except Dlt645Error as exc:
        raise _codec_error(pattern, exc) from exc


async def probe(transport: Dlt645Transport, candidates: Iterable[str]) -> list[str]:
    """Which of ``candidates`` (known or printed addresses) answer on this bus.

    Each candidate is asked for its communication address (``04000401``); a
    meter that answers, even with an error reply, is present. One timeout per
    absent candidate, so keep the list short on slow buses.
    """
    found = []
    for address in candidates:
        try:
            reply = await transport.transact(read_request(address, DI_ADDRESS), meter_id=address)
        except MeterTimeout:
            continue
        if reply.address == address:
            found.append(address)
    return found


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

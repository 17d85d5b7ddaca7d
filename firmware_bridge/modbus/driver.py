"""Modbus meter driver: a profile, a unit id and the bus's shared transport."""

from __future__ import annotations

from firmware_bridge.driver import MeterError
from firmware_bridge.modbus.decode import BlockDecoder, ReadBlock, has_gaps, plan_reads, split_block
from firmware_bridge.modbus.profiles import Profile
from firmware_bridge.modbus.transport import (
    ILLEGAL_DATA_ADDRESS,
    MbapTransport,
    ModbusExceptionReply,
    ModbusTransport,
)
from firmware_bridge.reading import Measurement, Quantity, Reading, TimeSource, new_reading
from firmware_bridge.timing import MODBUS_RESPONSE_S, TCP_MARGIN_S, LineTiming

RTU_REQUEST_BYTES = 8  # unit, FC, address, count, CRC
RTU_WRITE_BYTES = 8  # FC05/FC06 request and echo reply


def rtu_reply_bytes(registers: int) -> int:
    """unit, FC, byte count, 2 per register, CRC."""
    return 5 + 2 * registers


def energy_first(blocks: list[ReadBlock]) -> list[ReadBlock]:
    """The plan with the blocks that carry billing registers first (stable otherwise):
    if the meter stops answering part-way, what bills has been read."""
    return sorted(blocks, key=lambda b: not any(f.quantity.is_register for f in b.fields))


class ModbusDriver:
    """Implements :class:`firmware_bridge.driver.MeterDriver` for one Modbus meter.

    One :meth:`read` issues one request per coalesced register block (see
    :func:`~firmware_bridge.modbus.decode.plan_reads`), energy blocks first. A
    failure of the first block fails the read with a typed
    :class:`~firmware_bridge.driver.MeterError`; a failure of a later block ends
    the read with the values already decoded (``meta["incomplete"]`` says why,
    ``meta["missing"]`` what is missing).

    A meter that refuses a coalesced request spanning unused registers
    ("illegal data address") is asked again field-run by field-run, and that
    finer plan is kept for the meter.

    ``timing`` gives each request its timeout: the request's and the reply's
    wire time plus the meter's response time and a margin (docs/modbus.md,
    "Timing"); without it, the transport's timeout applies.
    """

    def __init__(
        self,
        meter_id: str,
        unit_id: int,
        profile: Profile,
        transport: ModbusTransport,
        *,
        timeout_s: float | None = None,
        timing: LineTiming | None = None,
    ) -> None:
        if not 1 <= unit_id <= 247:
            raise ValueError(f"meter {meter_id}: unit id must be 1..247, got {unit_id}")
        self._meter_id = meter_id
        self.unit_id = unit_id
        self.profile = profile
        self.transport = transport
        self.timeout_s = timeout_s
        self.timing = timing
        self.blocks: tuple[ReadBlock, ...] = tuple(
            energy_first(plan_reads(profile.fields, profile.max_gap, profile.max_count))
        )
        self.splits = 0  # coalesced requests the meter refused and that were split
        self._budget: tuple[tuple[LineTiming, tuple[ReadBlock, ...]], float] | None = None
        # id(block) -> (block, its decoder); the block kept here keeps its id from being reused
        self._decoders: dict[int, tuple[ReadBlock, BlockDecoder]] = {}
        # the line built from the transport without timing, and the request limits of a
        # line by register count: worked out once, asked every request
        self._default_line: tuple[tuple[float, float, float | None], LineTiming] | None = None
        self._limits: tuple[LineTiming, dict[int, float]] | None = None

    @property
    def meter_id(self) -> str:
        return self._meter_id

    def _line(self) -> LineTiming:
        if self.timing is not None:
            return self.timing
        # no timing given: the transport's timeout, no wire of ours
        key = (self.transport.timeout_s, self.transport.silent_interval_s, self.timeout_s)
        cached = self._default_line
        if cached is not None and cached[0] == key:
            return cached[1]
        line = LineTiming(
            wire=False,
            response_s=self.transport.timeout_s or MODBUS_RESPONSE_S,
            margin_s=0.0,
            gap_s=self.transport.silent_interval_s,
            timeout_override_s=self.timeout_s or self.transport.timeout_s,
        )
        self._default_line = (key, line)
        return line

    def request_timeout_s(self, registers: int) -> float:
        """Limit of one register read, from sending the request to the end of the reply."""
        line = self._line()
        cached = self._limits
        if cached is None or (cached[0] is not line and cached[0] != line):
            cached = self._limits = (line, {})
        limit = cached[1].get(registers)
        if limit is None:
            limit = line.wire_s(RTU_REQUEST_BYTES) + line.timeout_s + line.wire_s(rtu_reply_bytes(registers))
            cached[1][registers] = limit
        return limit

    def write_timeout_s(self) -> float:
        line = self._line()
        return line.wire_s(RTU_REQUEST_BYTES) + line.timeout_s + line.wire_s(RTU_WRITE_BYTES)

    def read_budget_s(self) -> float:
        """Longest one read may take, worst case (a block with gaps refused, then its runs)."""
        line = self._line()
        key = (line, self.blocks)
        cached = self._budget
        if cached is not None and cached[0] == key:
            return cached[1]  # the same line and plan: the same budget (asked every poll)
        total = self._read_budget_s(line)
        self._budget = (key, total)
        return total

    def _read_budget_s(self, line: LineTiming) -> float:
        total = 0.0
        for block in self.blocks:
            total += line.transaction_s(RTU_REQUEST_BYTES, rtu_reply_bytes(block.count))
            if has_gaps(block):
                total += sum(
                    line.transaction_s(RTU_REQUEST_BYTES, rtu_reply_bytes(b.count))
                    for b in split_block(block)
                )
        return total

    def operation_budget_s(self) -> float:
        """A relay write or read-back: one transaction (plus a reconnect over TCP)."""
        line = self._line()
        return line.transaction_s(RTU_REQUEST_BYTES, RTU_WRITE_BYTES) + TCP_MARGIN_S

    def _decoder(self, block: ReadBlock) -> BlockDecoder:
        entry = self._decoders.get(id(block))
        if entry is None or entry[0] is not block:
            entry = self._decoders[id(block)] = (block, BlockDecoder(block, self.profile.word_order))
        return entry[1]

    async def read(self, now_ms: int) -> Reading:
        values: dict[Quantity, Measurement] = {}
        plan = list(self.blocks)
        incomplete: MeterError | None = None
        transport, meter_id, unit, fc = self.transport, self._meter_id, self.unit_id, self.profile.function_code
        # Modbus TCP: the registers are decoded from the reply's bytes as received
        mbap_transport = transport if isinstance(transport, MbapTransport) else None
        i = 0
        while i < len(plan):
            block = plan[i]
            try:
                if mbap_transport is not None:
                    pdu = await mbap_transport.read_register_pdu(
                        meter_id, unit, fc, block.address, block.count, timeout_s=self.request_timeout_s(block.count)
                    )
                else:
                    regs = await transport.read_registers(
                        meter_id, unit, fc, block.address, block.count, timeout_s=self.request_timeout_s(block.count)
                    )
            except ModbusExceptionReply as exc:
                # Some meters refuse a request that spans unused registers. Read the
                # fields without the gaps instead, and keep that plan for this meter.
                if exc.code == ILLEGAL_DATA_ADDRESS and has_gaps(block):
                    plan[i : i + 1] = split_block(block)
                    self.blocks = tuple(plan)
                    self.splits += 1
                    continue
                if not values:
                    raise
                incomplete = exc
                break
            except MeterError as exc:
                if not values:
                    raise
                incomplete = exc  # values already read count (energy is read first)
                break
            if mbap_transport is not None:
                self._decoder(block).decode_pdu_into(pdu, values)
            else:
                self._decoder(block).decode_into(regs, values)
            i += 1
        meta = {"protocol": "modbus", "profile": self.profile.name, "unit_id": str(self.unit_id)}
        if not self.profile.verified:
            meta["profile_verified"] = "false"
        if incomplete is not None:
            meta["incomplete"] = f"{incomplete.kind}: {incomplete.detail}"
            meta["missing"] = ",".join(
                f.quantity.value for b in plan[i:] for f in b.fields if f.quantity not in values
            )
        return new_reading(self._meter_id, now_ms, values, TimeSource.SYSTEM, meta)

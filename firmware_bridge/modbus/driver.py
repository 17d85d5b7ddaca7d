"""Modbus meter driver: a profile, a unit id and the bus's shared transport."""

from __future__ import annotations

from firmware_bridge.modbus.decode import ReadBlock, decode_field, has_gaps, plan_reads, split_block
from firmware_bridge.modbus.profiles import Profile
from firmware_bridge.modbus.transport import (
    ILLEGAL_DATA_ADDRESS,
    ModbusExceptionReply,
    ModbusTransport,
)
from firmware_bridge.reading import Measurement, Quantity, Reading, TimeSource


class ModbusDriver:
    """Implements :class:`firmware_bridge.driver.MeterDriver` for one Modbus meter.

    One :meth:`read` issues one request per coalesced register block (see
    :func:`~firmware_bridge.modbus.decode.plan_reads`); a failure of any
    block fails the whole read with a typed :class:`~firmware_bridge.driver.MeterError`
    (a partial reading would let billing see energy without the rest).

    A meter that refuses a coalesced request spanning unused registers
    ("illegal data address") is asked again field-run by field-run, and that
    finer plan is kept for the meter.
    """

    def __init__(
        self,
        meter_id: str,
        unit_id: int,
        profile: Profile,
        transport: ModbusTransport,
        *,
        timeout_s: float | None = None,
    ) -> None:
        if not 1 <= unit_id <= 247:
            raise ValueError(f"meter {meter_id}: unit id must be 1..247, got {unit_id}")
        self._meter_id = meter_id
        self.unit_id = unit_id
        self.profile = profile
        self.transport = transport
        self.timeout_s = timeout_s
        self.blocks: tuple[ReadBlock, ...] = tuple(plan_reads(profile.fields, profile.max_gap, profile.max_count))
        self.splits = 0  # coalesced requests the meter refused and that were split

    @property
    def meter_id(self) -> str:
        return self._meter_id

    async def _read_block(self, block: ReadBlock) -> list[int]:
        return await self.transport.read_registers(
            self._meter_id,
            self.unit_id,
            self.profile.function_code,
            block.address,
            block.count,
            timeout_s=self.timeout_s,
        )

    async def read(self, now_ms: int) -> Reading:
        values: dict[Quantity, Measurement] = {}
        plan = list(self.blocks)
        i = 0
        while i < len(plan):
            block = plan[i]
            try:
                regs = await self._read_block(block)
            except ModbusExceptionReply as exc:
                # Some meters refuse a request that spans unused registers. Read the
                # fields without the gaps instead, and keep that plan for this meter.
                if exc.code != ILLEGAL_DATA_ADDRESS or not has_gaps(block):
                    raise
                plan[i : i + 1] = split_block(block)
                self.blocks = tuple(plan)
                self.splits += 1
                continue
            for f in block.fields:
                values[f.quantity] = decode_field(regs, block.address, f, self.profile.word_order)
            i += 1
        meta = {"protocol": "modbus", "profile": self.profile.name, "unit_id": str(self.unit_id)}
        if not self.profile.verified:
            meta["profile_verified"] = "false"
        return Reading(self._meter_id, now_ms, values, TimeSource.SYSTEM, meta)

"""Modbus meter driver: a profile, a unit id and the bus's shared transport."""

from __future__ import annotations

from firmware_bridge.modbus.decode import ReadBlock, decode_field, plan_reads
from firmware_bridge.modbus.profiles import Profile
from firmware_bridge.modbus.transport import ModbusTransport
from firmware_bridge.reading import Measurement, Quantity, Reading, TimeSource


class ModbusDriver:
    """Implements :class:`firmware_bridge.driver.MeterDriver` for one Modbus meter.

    One :meth:`read` issues one request per coalesced register block (see
    :func:`~firmware_bridge.modbus.decode.plan_reads`); a failure of any
    block fails the whole read with a typed :class:`~firmware_bridge.driver.MeterError`
    (a partial reading would let billing see energy without the rest).
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

    @property
    def meter_id(self) -> str:
        return self._meter_id

    async def read(self, now_ms: int) -> Reading:
        values: dict[Quantity, Measurement] = {}
        for block in self.blocks:
            regs = await self.transport.read_registers(
                self._meter_id,
                self.unit_id,
                self.profile.function_code,
                block.address,
                block.count,
                timeout_s=self.timeout_s,
            )
            for f in block.fields:
                values[f.quantity] = decode_field(regs, block.address, f, self.profile.word_order)
        meta = {"protocol": "modbus", "profile": self.profile.name, "unit_id": str(self.unit_id)}
        if not self.profile.verified:
            meta["profile_verified"] = "false"
        return Reading(self._meter_id, now_ms, values, TimeSource.SYSTEM, meta)

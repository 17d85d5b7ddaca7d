"""DL/T 645-2007 for firmware_bridge: sans-I/O codec, transport, driver, discovery.

Integration surface for the bus scheduler::

    async with open_transport(bus_section) as transport:
        meter = Dlt645Driver("m1", "000102030425", transport, password=b"\\x02\\0\\0\\0")
        reading = await meter.read(now_ms)
        await meter.control(ControlCommand.TRIP, deadline)
        assert await meter.read_relay_open()

The codec lives in :mod:`.codec` (frames, stream parser), :mod:`.dataids`
(data identifiers and value formats) and :mod:`.messages` (requests, replies,
error replies, control, the security-module interface).
"""

from firmware_bridge.dlt645.clock import ClockRead, decode_clock
from firmware_bridge.dlt645.codec import BROADCAST, WILDCARD, Control, Frame, FrameParser, Function
from firmware_bridge.dlt645.dataids import StatusWord3
from firmware_bridge.dlt645.driver import (
    DEFAULT_QUANTITIES,
    Dlt645Driver,
    SearchResult,
    SearchStep,
    broadcast_time,
    discover,
    narrow,
    probe,
    probe_each,
    search,
)
from firmware_bridge.dlt645.errors import (
    ChecksumError,
    DataError,
    Dlt645Error,
    EncodeError,
    FrameError,
    ProtocolError,
)
from firmware_bridge.dlt645.messages import ControlCommand, ErrorFlags, Refused, SecurityModule
from firmware_bridge.dlt645.transport import Dlt645Transport, Heard, open_transport

__all__ = [
    "BROADCAST",
    "DEFAULT_QUANTITIES",
    "WILDCARD",
    "ChecksumError",
    "ClockRead",
    "Control",
    "ControlCommand",
    "DataError",
    "Dlt645Driver",
    "Dlt645Error",
    "Dlt645Transport",
    "EncodeError",
    "ErrorFlags",
    "Frame",
    "FrameError",
    "FrameParser",
    "Function",
    "Heard",
    "ProtocolError",
    "Refused",
    "SearchResult",
    "SearchStep",
    "SecurityModule",
    "StatusWord3",
    "broadcast_time",
    "decode_clock",
    "discover",
    "narrow",
    "open_transport",
    "probe",
    "probe_each",
    "search",
]

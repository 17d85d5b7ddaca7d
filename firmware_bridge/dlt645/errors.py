"""The codec's own exception types.

Everything in :mod:`firmware_bridge.dlt645` that parses or builds bytes raises
only these (and never a bare ``IndexError``/``ValueError`` from deep inside).
The transport and driver translate them into :mod:`firmware_bridge.driver`
errors.
"""

from __future__ import annotations

from firmware_bridge.errors import EdgeGwError, ErrorKind


class Dlt645Error(EdgeGwError):
    """Base class of every DL/T 645 codec error."""

    kind = ErrorKind.FRAME


class FrameError(Dlt645Error):
    """Bytes that do not form a valid frame (structure, length, end byte, address)."""


class ChecksumError(FrameError):
    """A structurally complete frame whose checksum byte does not match."""

    def __init__(self, expected: int, got: int) -> None:
        super().__init__(f"checksum mismatch: computed {expected:02X}, frame says {got:02X}")
        self.expected = expected
        self.got = got


class EncodeError(Dlt645Error, ValueError):
    """A request or value cannot be encoded (bad address, out-of-range value...)."""

    kind = ErrorKind.INVALID


class DataError(Dlt645Error):
    """A frame's data field does not decode (bad BCD, wrong length, unknown DI)."""


class ProtocolError(Dlt645Error):
    """A valid frame that is not the answer to the request (wrong function, DI, meter)."""

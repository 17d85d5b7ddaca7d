"""Hypothesis strategies shared by the DL/T 645 tests."""

from __future__ import annotations

from hypothesis import strategies as st

from firmware_bridge.dlt645.codec import MAX_DATA, Control, Frame

bcd_byte = st.integers(0, 99).map(lambda n: f"{n:02d}")
address_byte = st.one_of(bcd_byte, st.just("AA"))
meter_addresses = st.lists(bcd_byte, min_size=6, max_size=6).map("".join)
addresses = st.lists(address_byte, min_size=6, max_size=6).map("".join)
controls = st.builds(
    Control,
    function=st.integers(0, 0x1F),
    reply=st.booleans(),
    error=st.booleans(),
    more=st.booleans(),
)
frames = st.builds(Frame, address=addresses, control=controls, data=st.binary(max_size=MAX_DATA))
small_frames = st.builds(Frame, address=addresses, control=controls, data=st.binary(max_size=40))

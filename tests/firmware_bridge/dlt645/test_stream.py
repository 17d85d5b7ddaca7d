"""The incremental stream parser: noise, splits, concatenation, bad frames, bounds."""

from __future__ import annotations

import itertools
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge.dlt645.codec import (
    MAX_FRAME,
    BadFrame,
    ChecksumError,
    Control,
    Frame,
    FrameParser,
    Function,
)

from .strategies import small_frames

GOOD = Frame("000102030425", Control(Function.READ, reply=True), bytes.fromhex("0000010042061200"))
GOOD_RAW = GOOD.encode()


def feed_all(parser: FrameParser, chunks: list[bytes]) -> list[Frame | BadFrame]:
    events: list[Frame | BadFrame] = []
    for chunk in chunks:
        events += parser.feed(chunk)
        assert parser.pending <= MAX_FRAME
    return events


def frames_of(events: list[Frame | BadFrame]) -> list[Frame]:
    return [e for e in events if isinstance(e, Frame)]


def is_subsequence(needles: list[Frame], haystack: list[Frame]) -> bool:
    it = iter(haystack)
    return all(any(n == h for h in it) for n in needles)


def test_noise_and_preamble_are_skipped() -> None:
    p = FrameParser()
    assert p.feed(b"\x00\xff\x16garbage" + GOOD_RAW) == [GOOD]
    assert p.noise_bytes == 10 + 4  # the noise and the FE preamble
    assert p.pending == 0


def test_byte_by_byte() -> None:
    p = FrameParser()
    events = feed_all(p, [bytes([b]) for b in GOOD_RAW * 3])
    assert events == [GOOD, GOOD, GOOD]


def test_concatenated_frames_in_one_chunk() -> None:
    other = Frame("999999999999", Control(Function.BROADCAST_TIME), bytes(6))
    assert FrameParser().feed(GOOD_RAW + other.encode(0) + GOOD_RAW) == [GOOD, other, GOOD]


def test_bad_checksum_is_reported_then_skipped() -> None:
    bad = bytearray(GOOD.encode(0))
    bad[-2] ^= 0x01
    events = FrameParser().feed(bytes(bad) + GOOD_RAW)
    assert isinstance(events[0], BadFrame)
    assert isinstance(events[0].error, ChecksumError)
    assert events[0].raw == bytes(bad)
    assert events[1:] == [GOOD]


def test_good_frame_inside_a_bad_candidate_is_found() -> None:
    # A fake header claiming 30 data bytes, whose "data" is a real frame.
    fake = bytes.fromhex("68 000000000000 68 91 1E")
    events = FrameParser().feed(fake + GOOD.encode(0) + bytes(30))
    assert GOOD in frames_of(events)


def test_long_fake_header_does_not_hide_a_following_reply() -> None:
    # L = FF would make the parser wait for 255 bytes that never come on a
    # half-duplex bus; the complete good frame behind it must come out now.
    p = FrameParser()
    events = p.feed(bytes.fromhex("68 000000000000 68 91 FF 01 02") + GOOD_RAW)
    assert events == [GOOD]


def test_reset_drops_pending_bytes() -> None:
    p = FrameParser()
    p.feed(GOOD_RAW[:10])
    assert p.pending > 0
    p.reset()
    assert p.feed(GOOD_RAW[10:]) == []
    assert p.feed(GOOD_RAW) == [GOOD]


def test_buffer_stays_bounded_under_endless_headers() -> None:
    p = FrameParser()
    header = bytes.fromhex("68 000000000000 68 91 FF")
    for _ in range(2000):
        p.feed(header)
        assert p.pending <= MAX_FRAME


# ---------------------------------------------------------------------------
# Fuzz: valid frames among garbage, split at random points


def _check_stream(frames: list[Frame], garbage: list[bytes], cuts: list[int]) -> None:
    stream = bytearray()
    for i, f in enumerate(frames):
        stream += garbage[i % len(garbage)] if garbage else b""
        stream += f.encode(i % 5)
    stream += garbage[-1] if garbage else b""
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    chunks = [bytes(stream[a:b]) for a, b in itertools.pairwise(points)]
    p = FrameParser()
    events = feed_all(p, chunks)  # only codec types come back; anything raised fails the test
    assert all(isinstance(e, Frame | BadFrame) for e in events)
    assert is_subsequence(frames, frames_of(events)), (frames, events)


garbage_bytes = st.one_of(
    st.binary(max_size=40),
    # garbage rich in the bytes the parser cares about
    st.lists(st.sampled_from([0x68, 0x16, 0xFE, 0x00, 0xFF, 0x91]), max_size=30).map(bytes),
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(small_frames, max_size=5),
    st.lists(garbage_bytes, max_size=6),
    st.lists(st.integers(0, 10_000), max_size=20),
)
def test_fuzz_frames_among_garbage(
    frames: list[Frame], garbage: list[bytes], cuts: list[int]
) -> None:
    _check_stream(frames, garbage, cuts)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=10))
def test_fuzz_arbitrary_chunks_terminate_and_stay_bounded(chunks: list[bytes]) -> None:
    feed_all(FrameParser(), chunks)


@pytest.mark.long
def test_long_fuzz_a_million_streams() -> None:
    """At least 1,000,000 random streams, seeded; bounded in count and time."""
    rng = random.Random(0x645)
    interesting = bytes([0x68, 0x16, 0xFE, 0x33, 0x00, 0xFF, 0x91, 0xAA, 0x99])
    n_streams = 1_000_000
    started = time.monotonic()
    for n in range(n_streams):
        frames = [
            Frame(
                "".join(f"{rng.randrange(100):02d}" for _ in range(6)),
                Control.from_byte(rng.randrange(256)),
                rng.randbytes(rng.randrange(24)),
            )
            for _ in range(rng.randrange(3))
        ]
        garbage = [
            rng.randbytes(rng.randrange(12))
            if rng.random() < 0.5
            else bytes(rng.choice(interesting) for _ in range(rng.randrange(14)))
            for _ in range(rng.randrange(1, 4))
        ]
        cuts = [rng.randrange(200) for _ in range(rng.randrange(6))]
        _check_stream(frames, garbage, cuts)
        if n % 10_000 == 0:
            assert time.monotonic() - started < 3600, f"too slow at stream {n}"

"""The WAL check: SQLite's reading of the log, and what it would drop.

Property tests build logs with :func:`encode_wal` (as SQLite writes them) and
damage them: a log as written is never called corrupt, and one flipped bit
anywhere before the last commit frame — header, frame header, page, the
last commit frame itself — always is. Real logs written by SQLite are checked
the same way, and SQLite itself is shown dropping the committed rows the check
reports.
"""

from __future__ import annotations

import shutil
import sqlite3
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store_forward.walcheck import (
    FRAME_HEADER_BYTES,
    WAL_HEADER_BYTES,
    WalVerdict,
    check_wal,
    encode_wal,
    pages_to_apply,
    parse_header,
    single_bit_damage,
    wal_checksum,
)

SIZES = st.sampled_from([512, 1024])


@st.composite
def logs(draw: st.DrawFn, min_frames: int = 1) -> tuple[bytes, list[tuple[int, bytes, int]], int]:
    page_size = draw(SIZES)
    n = draw(st.integers(min_frames, 6))
    frames = []
    top = 0
    for _ in range(n):
        pgno = draw(st.integers(1, 20))
        top = max(top, pgno)
        page = draw(st.binary(min_size=page_size, max_size=page_size))
        commit = draw(st.booleans())
        # a commit frame carries the database size: every page written is in it
        frames.append((pgno, page, draw(st.integers(top, 50)) if commit else 0))
    salts = (draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)))
    data = encode_wal(
        frames,
        page_size=page_size,
        salts=salts,
        checkpoint_seq=draw(st.integers(0, 5)),
        big_endian=draw(st.booleans()),
    )
    return data, frames, page_size


def last_commit(frames: list[tuple[int, bytes, int]]) -> int | None:
    idx = [i for i, f in enumerate(frames) if f[2]]
    return idx[-1] if idx else None


@settings(max_examples=100, deadline=None)
@given(logs())
def test_a_log_as_written_reads_whole(log: tuple[bytes, list[tuple[int, bytes, int]], int]) -> None:
    data, frames, _ = log
    r = check_wal(data)
    lc = last_commit(frames)
    assert r.verdict is (WalVerdict.EMPTY if lc is None else WalVerdict.OK), r.reason
    assert r.sqlite_frames == (0 if lc is None else lc + 1)
    assert all(f.in_chain and f.locally_valid for f in r.frames)
    assert r.lost_commits == () and r.tail_bytes == 0


@settings(max_examples=100, deadline=None)
@given(logs(), st.integers(1, 4000))
def test_a_torn_end_is_not_corruption(
    log: tuple[bytes, list[tuple[int, bytes, int]], int], cut: int
) -> None:
    """A kill or power cut while the last frame was written: SQLite's own reading."""
    data, _, _ = log
    torn = data[: max(WAL_HEADER_BYTES, len(data) - cut)]
    assert check_wal(torn).verdict is not WalVerdict.CORRUPT


def _flip_and_check(
    log: tuple[bytes, list[tuple[int, bytes, int]], int], data_: st.DataObject
) -> None:
    data, frames, page_size = log
    lc = last_commit(frames)
    size = FRAME_HEADER_BYTES + page_size
    frame = data_.draw(st.integers(0, len(frames) - 1), label="frame")
    byte = data_.draw(st.integers(0, size - 1), label="byte")
    bit = data_.draw(st.integers(0, 7), label="bit")
    damaged = bytearray(data)
    damaged[WAL_HEADER_BYTES + frame * size + byte] ^= 1 << bit
    before = check_wal(data, db_pages=50)
    r = check_wal(bytes(damaged), db_pages=50)
    if lc is not None and frame <= lc:
        # a committed transaction ends at or after the damaged frame: SQLite drops it
        assert r.verdict is WalVerdict.CORRUPT, (frame, byte, bit, r.reason)
        assert r.lost_commits and r.lost_commits[-1] == lc
        assert r.sqlite_frames <= frame
    else:
        # the frame belongs to a transaction that never committed
        assert r.verdict is before.verdict and r.sqlite_frames == before.sqlite_frames


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs(), st.data())
def test_one_flipped_bit_before_a_commit_is_always_seen(
    log: tuple[bytes, list[tuple[int, bytes, int]], int], data_: st.DataObject
) -> None:
    _flip_and_check(log, data_)


@pytest.mark.long
@settings(max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs(), st.data())
def test_one_flipped_bit_fuzz(
    log: tuple[bytes, list[tuple[int, bytes, int]], int], data_: st.DataObject
) -> None:
    _flip_and_check(log, data_)


@settings(max_examples=200, deadline=None)
@given(logs(), st.integers(0, WAL_HEADER_BYTES * 8 - 1))
def test_one_flipped_bit_in_the_header_hides_no_commit(
    log: tuple[bytes, list[tuple[int, bytes, int]], int], bit: int
) -> None:
    """SQLite ignores a log with a damaged header: all its commits would be lost."""
    data, frames, _ = log
    damaged = bytearray(data)
    damaged[bit // 8] ^= 1 << (bit % 8)
    r = check_wal(bytes(damaged))
    if last_commit(frames) is None:
        assert r.verdict is not WalVerdict.CORRUPT
    else:
        assert r.verdict is WalVerdict.CORRUPT, (bit, r.reason)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000))
def test_garbage_never_raises(blob: bytes) -> None:
    r = check_wal(blob)
    assert r.verdict in WalVerdict
    pages, _ = pages_to_apply(blob, r, past_damage=True)
    assert all(pgno >= 1 for pgno, _ in pages)


@settings(max_examples=60, deadline=None)
@given(SIZES, st.data())
def test_single_bit_damage_names_the_word(page_size: int, data_: st.DataObject) -> None:
    content = data_.draw(st.binary(min_size=8 + page_size, max_size=8 + page_size))
    seed = (data_.draw(st.integers(0, 2**32 - 1)), data_.draw(st.integers(0, 2**32 - 1)))
    be = data_.draw(st.booleans())
    stored = wal_checksum(content, seed, be)
    assert single_bit_damage(content, seed, stored, be) == []
    pos = data_.draw(st.integers(0, len(content) * 8 - 1))
    flipped = bytearray(content)
    flipped[pos // 8] ^= 1 << (pos % 8)
    hits = single_bit_damage(bytes(flipped), seed, stored, be)
    assert (pos // 8) // 4 in [w for w, _ in hits]


def test_several_flipped_bits_are_not_taken_for_one() -> None:
    content = bytes(range(256)) * 2 + b"\x00" * 8
    seed = (1, 2)
    stored = wal_checksum(content, seed, False)
    torn = content[:200] + b"\x00" * (len(content) - 200)
    assert single_bit_damage(torn, seed, stored, False) == []


# --------------------------------------------------------------------------- real SQLite logs


def _sqlite_log(tmp: Path, rows: int) -> tuple[Path, bytes]:
    """A database and a copy of its WAL after ``rows`` committed one-row transactions."""
    db = tmp / "a.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t (x)")
    for i in range(rows):
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t VALUES (?)", (f"row {i} " + "x" * 1500,))
        conn.execute("COMMIT")
    shutil.copy(db, tmp / "base.db")  # the main file before any checkpoint
    wal = (tmp / "a.db-wal").read_bytes()
    conn.close()
    return tmp / "base.db", wal


def _rows_sqlite_sees(tmp: Path, base: Path, wal: bytes) -> int:
    d = tmp / "view"
    d.mkdir(exist_ok=True)
    shutil.copy(base, d / "v.db")
    (d / "v.db-wal").write_bytes(wal)
    with sqlite3.connect(d / "v.db") as conn:
        (n,) = conn.execute("SELECT count(*) FROM t").fetchone()
        (ok,) = conn.execute("PRAGMA quick_check").fetchone()
    shutil.rmtree(d)
    assert ok == "ok"  # SQLite's own check sees nothing wrong
    return int(n)


def test_real_log_reads_whole_and_a_flipped_bit_would_drop_commits(tmp_path: Path) -> None:
    base, wal = _sqlite_log(tmp_path, 6)
    r = check_wal(wal)
    assert r.verdict is WalVerdict.OK and r.lost_commits == ()
    hdr = parse_header(wal)
    assert hdr is not None and hdr.valid
    commits = [f.index for f in r.frames if f.commit]
    assert len(commits) == 7  # CREATE TABLE and six inserts
    victim = r.frames[commits[2]]  # the commit frame of the second insert
    damaged = bytearray(wal)
    damaged[victim.offset + FRAME_HEADER_BYTES + 700] ^= 0x04
    rep = check_wal(bytes(damaged))
    assert rep.verdict is WalVerdict.CORRUPT, rep.reason
    # every later commit is reported (the damaged commit frame itself is among the
    # damaged frames)
    assert rep.lost_commits == tuple(commits[3:]) and victim.index in rep.damaged
    # What the check says is what SQLite does: only the first insert survives.
    assert _rows_sqlite_sees(tmp_path, base, bytes(damaged)) == 1
    assert _rows_sqlite_sees(tmp_path, base, wal) == 6


def test_real_log_last_commit_frame_flipped(tmp_path: Path) -> None:
    base, wal = _sqlite_log(tmp_path, 3)
    r = check_wal(wal)
    last = r.frames[-1]
    assert last.commit
    damaged = bytearray(wal)
    damaged[last.offset + FRAME_HEADER_BYTES + 2048] ^= 0x80
    rep = check_wal(bytes(damaged))
    assert rep.verdict is WalVerdict.CORRUPT and "last commit frame" in rep.reason
    assert _rows_sqlite_sees(tmp_path, base, bytes(damaged)) == 2


def test_pages_past_damage_rebuild_the_dropped_transactions(tmp_path: Path) -> None:
    """Applying the frames past the damage (the recovery's image) brings the dropped
    rows back; a flipped bit in row data stays in that row only."""
    base, wal = _sqlite_log(tmp_path, 4)
    r = check_wal(wal)
    commits = [f.index for f in r.frames if f.commit]
    victim = r.frames[commits[1]]
    damaged = bytearray(wal)
    damaged[victim.offset + FRAME_HEADER_BYTES + page_size_of(wal) - 10] ^= 0x01
    rep = check_wal(bytes(damaged))
    pages, size = pages_to_apply(bytes(damaged), rep, past_damage=True)
    image = bytearray(base.read_bytes())
    ps = page_size_of(wal)
    assert size is not None
    image = image.ljust(size * ps, b"\x00")[: size * ps]
    for pgno, page in pages:
        image[(pgno - 1) * ps : pgno * ps] = page
    (tmp_path / "img.db").write_bytes(bytes(image))
    with sqlite3.connect(f"file:{tmp_path / 'img.db'}?immutable=1", uri=True) as conn:
        rows = [r[0] for r in conn.execute("SELECT x FROM t ORDER BY rowid")]
    assert len(rows) == 4
    assert sum(not r.startswith(f"row {i} ") or r[len(f"row {i} "):] != "x" * 1500 for i, r in enumerate(rows)) <= 1
    sqlite_pages, _ = pages_to_apply(bytes(damaged), rep, past_damage=False)
    assert len(sqlite_pages) < len(pages)


def page_size_of(wal: bytes) -> int:
    return int(struct.unpack_from(">I", wal, 8)[0])


@pytest.mark.parametrize("size", [0, 10, 31])
def test_short_files(size: int) -> None:
    assert check_wal(b"\x01" * size).verdict is WalVerdict.EMPTY

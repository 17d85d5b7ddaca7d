"""A check of SQLite's write-ahead log before SQLite opens it (pure).

SQLite treats the first WAL frame whose checksum or salts do not match as the
end of the log: every frame after it is ignored, including frames of
transactions that were committed (``synchronous=FULL`` returned, the debit or
the top-up was reported done). One flipped bit in a frame near the start of
the log thus makes later committed transactions disappear without an error.
This module reads the log the way SQLite does and then keeps reading, so that
such a loss is seen *before* SQLite opens the database and truncates it.

Format (sqlite.org/fileformat.html, "The WAL file format"), all integers
big-endian:

* header, 32 bytes: magic ``0x377f0682`` (checksum words little-endian) or
  ``0x377f0683`` (big-endian), format version 3007000, page size, checkpoint
  sequence, salt-1, salt-2, checksum-1, checksum-2 (over the first 24 bytes);
* frames: a 24-byte header — page number, database size in pages for a commit
  frame (0 otherwise), salt-1, salt-2, checksum-1, checksum-2 — then one page.
  The checksum is cumulative: it runs over the frame header's first 8 bytes
  and the page, starting from the previous frame's checksum (the header's
  for the first frame).

A frame is *in the chain* (SQLite uses it) if every frame before it is, its
salts equal the header's, its page number is not 0 and its checksum matches
the running checksum. SQLite keeps the frames up to the last commit frame in
the chain. A frame after the chain's end is *locally valid* if its salts
match and its checksum matches when started from the checksum stored in the
frame before it: it was written whole, in this generation of the log, right
after that frame. A locally valid commit frame after the chain's end is a
committed transaction SQLite would drop: :func:`check_wal` reports it as
corruption.

What cannot be told apart: a power cut that persisted a multi-frame
transaction's commit frame but not an earlier frame of the same transaction
(the write was still being synced, so the transaction never committed) looks
like a damaged committed transaction; it is reported as corruption too, and
the recovery treats the files as evidence. A kill of the process (SIGKILL)
keeps every written frame, so it never looks like this.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

WAL_HEADER_BYTES = 32
FRAME_HEADER_BYTES = 24
MAGIC_LE = 0x377F0682  # checksum words read little-endian
MAGIC_BE = 0x377F0683  # checksum words read big-endian
WAL_VERSION = 3007000
PAGE_SIZES = tuple(1 << k for k in range(9, 17))  # 512 .. 65536

_HDR = struct.Struct(">8I")
_FRAME = struct.Struct(">6I")
_M32 = 0xFFFFFFFF


def wal_checksum(
    data: bytes | memoryview, seed: tuple[int, int], big_endian: bool
) -> tuple[int, int]:
    """SQLite's WAL checksum of ``data`` (a multiple of 8 bytes), starting from ``seed``."""
    n = len(data)
    if n % 8:
        raise ValueError("WAL checksum input must be a multiple of 8 bytes")
    words = struct.unpack(f"{'>' if big_endian else '<'}{n // 4}I", data)
    s1, s2 = seed
    it = iter(words)
    for a, b in zip(it, it, strict=True):
        s1 = (s1 + a + s2) & _M32
        s2 = (s2 + b + s1) & _M32
    return s1, s2


@dataclass(frozen=True)
class WalHeader:
    magic: int
    version: int
    page_size: int
    checkpoint_seq: int
    salt1: int
    salt2: int
    cksum1: int
    cksum2: int
    checksum_ok: bool

    @property
    def big_endian(self) -> bool:
        return self.magic == MAGIC_BE

    @property
    def plausible(self) -> bool:
        """Magic, version and page size are ones SQLite writes."""
        return (
            self.magic in (MAGIC_LE, MAGIC_BE)
            and self.version == WAL_VERSION
            and (self.page_size in PAGE_SIZES)
        )

    @property
    def valid(self) -> bool:
        """SQLite would use this log."""
        return self.plausible and self.checksum_ok


def parse_header(data: bytes | memoryview) -> WalHeader | None:
    """The WAL header, or None if ``data`` is shorter than one."""
    if len(data) < WAL_HEADER_BYTES:
        return None
    magic, version, page_size, ckpt, salt1, salt2, c1, c2 = _HDR.unpack_from(data, 0)
    ok = False
    if magic in (MAGIC_LE, MAGIC_BE):
        ok = wal_checksum(data[:24], (0, 0), magic == MAGIC_BE) == (c1, c2)
    return WalHeader(magic, version, page_size, ckpt, salt1, salt2, c1, c2, ok)


@dataclass(frozen=True)
class WalFrame:
    index: int  # 0-based position in the file
    offset: int  # of the frame header
    page_no: int
    db_size: int  # pages after this commit; 0 for a frame that is not a commit frame
    salt1: int
    salt2: int
    cksum1: int
    cksum2: int
    in_chain: bool  # SQLite reads it (everything before it was valid too)
    locally_valid: bool  # whole and of this log generation, judged from the frame before it

    @property
    def commit(self) -> bool:
        return self.db_size != 0


class WalVerdict(enum.StrEnum):
    EMPTY = "empty"  # no log, or nothing SQLite (or anyone) could apply
    OK = "ok"  # SQLite reads every committed transaction in the log
    CORRUPT = "corrupt"  # committed transactions after a damaged frame: SQLite would drop them


@dataclass(frozen=True)
class WalReport:
    verdict: WalVerdict
    reason: str
    header: WalHeader | None
    frames: tuple[WalFrame, ...]
    page_size: int | None
    sqlite_frames: int  # frames SQLite applies (up to the last commit in the chain)
    lost_commits: tuple[int, ...]  # indexes of committed frames SQLite would drop
    damaged: tuple[int, ...]  # indexes of frames after the chain's end that are not whole
    tail_bytes: int  # bytes after the last whole frame

    @property
    def corrupt(self) -> bool:
        return self.verdict is WalVerdict.CORRUPT


def _frames(data: bytes | memoryview, page_size: int) -> list[tuple[int, tuple[int, ...]]]:
    size = FRAME_HEADER_BYTES + page_size
    out = []
    off = WAL_HEADER_BYTES
    while off + size <= len(data):
        out.append((off, _FRAME.unpack_from(data, off)))
        off += size
    return out


def _scan(
    data: bytes | memoryview,
    page_size: int,
    big_endian: bool,
    header: WalHeader,
    *,
    chain: bool,
    peer_salts: bool,
) -> list[WalFrame]:
    """Classify every whole frame.

    ``chain``: follow SQLite's running checksum from the header. ``peer_salts``:
    judge each frame's salts by the frame before it (the first frame's by the
    header's, one flipped bit allowed) instead of by the header's: for a header
    that may itself be damaged. A frame is judged locally from the checksum
    stored in the frame before it, or from that frame's checksum recomputed from
    its content (so that damage to one stored checksum does not hide the frame
    after it); the first frame from the header's stored or recomputed checksum.
    """
    hsalts = (header.salt1, header.salt2)
    out: list[WalFrame] = []
    running: tuple[int, int] | None = (header.cksum1, header.cksum2) if chain else None
    prev_stored = (header.cksum1, header.cksum2)
    prev_recomputed: tuple[int, int] | None = wal_checksum(data[:24], (0, 0), big_endian)
    prev_salts = hsalts
    for i, (off, (pgno, dbsize, s1, s2, c1, c2)) in enumerate(_frames(data, page_size)):
        start = off + FRAME_HEADER_BYTES
        content = data[off : off + 8], data[start : start + page_size]
        if not peer_salts:
            salts_ok = (s1, s2) == hsalts
        elif i == 0:
            salts_ok = (s1, s2) == hsalts or _one_bit(
                (s1 << 32) | s2, (hsalts[0] << 32) | hsalts[1]
            )
        else:
            salts_ok = (s1, s2) == prev_salts
        salts_ok = salts_ok and pgno != 0
        from_stored = _frame_checksum(content, prev_stored, big_endian)
        local = salts_ok and (
            from_stored == (c1, c2)
            or (
                prev_recomputed is not None
                and _frame_checksum(content, prev_recomputed, big_endian) == (c1, c2)
            )
        )
        in_chain = False
        if running is not None:
            if salts_ok:
                running = _frame_checksum(content, running, big_endian)
                in_chain = running == (c1, c2)
            if not in_chain:
                running = None
        out.append(WalFrame(i, off, pgno, dbsize, s1, s2, c1, c2, in_chain, local))
        prev_recomputed = from_stored
        prev_stored = (c1, c2)
        prev_salts = (s1, s2)
    return out


def _frame_checksum(
    content: tuple[bytes | memoryview, bytes | memoryview], seed: tuple[int, int], big_endian: bool
) -> tuple[int, int]:
    head, page = content
    return wal_checksum(page, wal_checksum(head, seed, big_endian), big_endian)


def _one_bit(a: int, b: int) -> bool:
    x = a ^ b
    return x != 0 and x & (x - 1) == 0


def single_bit_damage(
    content: bytes | memoryview,
    seed: tuple[int, int],
    stored: tuple[int, int],
    big_endian: bool,
) -> list[tuple[int, int]]:
    """Every way ``content`` (a frame header's first 8 bytes and its page) can differ in
    exactly one bit from content whose checksum from ``seed`` is ``stored``:
    (index of the 32-bit word holding that bit, the bit), word -1 for a bit of the
    stored checksum itself. Empty if the checksum matches or no single bit explains
    the difference.

    The checksum is a sum of the words with coefficients that depend only on their
    position, so the change one flipped bit makes to it is known for every position
    at once. A torn write is not matched (a chance match needs 64 bits to agree);
    where the flipped bit is can be ambiguous (high bits keep only the low bits of
    their coefficients), hence a list.
    """
    got = wal_checksum(content, seed, big_endian)
    if got == stored:
        return []
    out: list[tuple[int, int]] = []
    if (got[0] == stored[0] and _one_bit(got[1], stored[1])) or (
        got[1] == stored[1] and _one_bit(got[0], stored[0])
    ):
        out.append((-1, ((got[0] ^ stored[0]) | (got[1] ^ stored[1])).bit_length() - 1))
    n = len(content) // 4
    words = struct.unpack(f"{'>' if big_endian else '<'}{n}I", content)
    pairs = n // 2
    # Effect on the final (s1, s2) of adding 1 to the first or second word of the
    # pair k pairs before the end: M^k (1, 1) and M^k (0, 1), M = [[1, 1], [1, 2]].
    eff_a: list[tuple[int, int]] = []
    eff_b: list[tuple[int, int]] = []
    pa, pb = (1, 1), (0, 1)
    for _ in range(pairs):
        eff_a.append(pa)
        eff_b.append(pb)
        pa = ((pa[0] + pa[1]) & _M32, (pa[0] + 2 * pa[1]) & _M32)
        pb = ((pb[0] + pb[1]) & _M32, (pb[0] + 2 * pb[1]) & _M32)
    need = ((got[0] - stored[0]) & _M32, (got[1] - stored[1]) & _M32)
    for w, value in enumerate(words):
        k = pairs - 1 - w // 2
        e = eff_a[k] if w % 2 == 0 else eff_b[k]
        for bit in range(32):
            delta = (1 << bit) if value >> bit & 1 else (-(1 << bit)) & _M32
            if (e[0] * delta) & _M32 == need[0] and (e[1] * delta) & _M32 == need[1]:
                out.append((w, bit))
    return out


def _report(
    header: WalHeader | None,
    frames: list[WalFrame],
    page_size: int | None,
    data: bytes | memoryview,
    what: str,
    db_pages: int | None = None,
) -> WalReport:
    size = FRAME_HEADER_BYTES + (page_size or 0)
    tail = (
        (len(data) - WAL_HEADER_BYTES) % size
        if page_size is not None and len(data) > WAL_HEADER_BYTES
        else 0
    )
    chain_end = next((f.index for f in frames if not f.in_chain), len(frames))
    sqlite_frames = 0
    for f in frames[:chain_end]:
        if f.commit:
            sqlite_frames = f.index + 1
    after = frames[chain_end:]
    lost = tuple(f.index for f in after if f.commit and f.locally_valid)
    note = ""
    if not lost and after and header is not None and header.valid and page_size is not None:
        # The frame that ends the chain may be the commit frame of the last
        # transaction with one bit flipped: no frame follows to tell, but a single
        # flipped bit is damage, not a torn write.
        f = after[0]
        flip = _flipped_commit(data, f, header, page_size, frames, db_pages)
        if flip is not None:
            lost = (f.index,)
            note = f" ({flip})"
    if lost:
        damaged = tuple(f.index for f in after if not f.locally_valid and f.index <= lost[-1])
        first = after[0]
        shown = ", ".join(map(str, lost[:5])) + (", …" if len(lost) > 5 else "")
        reason = (
            f"{what}: frame {first.index} (page {first.page_no}) breaks the checksum chain{note},"
            f" but {len(lost)} committed transaction(s) end at or after it (commit frames"
            f" {shown}); SQLite would drop them"
        )
        return WalReport(
            WalVerdict.CORRUPT,
            reason,
            header,
            tuple(frames),
            page_size,
            sqlite_frames,
            lost,
            damaged,
            tail,
        )
    if sqlite_frames == 0:
        return WalReport(
            WalVerdict.EMPTY,
            f"{what}: no committed frames",
            header,
            tuple(frames),
            page_size,
            0,
            (),
            (),
            tail,
        )
    return WalReport(
        WalVerdict.OK,
        f"{what}: {sqlite_frames} frame(s) up to the last commit, checksums and salts in order",
        header,
        tuple(frames),
        page_size,
        sqlite_frames,
        (),
        (),
        tail,
    )


def _flipped_commit(
    data: bytes | memoryview,
    f: WalFrame,
    header: WalHeader,
    page_size: int,
    frames: Sequence[WalFrame],
    db_pages: int | None,
) -> str | None:
    """A description if frame ``f`` (the first outside the chain) is a commit frame
    with exactly one flipped bit; None otherwise.

    A flipped bit may sit in the frame's database-size field, which says whether it
    is a commit frame; each explanation of the damage gives an original size, and a
    size is believed only if it is plausible: no smaller than the page written and
    no larger than the database could be (its known size, every earlier commit's
    and page number, plus the frames since). If some plausible explanation makes
    it a frame of an uncommitted transaction, SQLite's reading stands.
    """
    salts = (header.salt1, header.salt2)
    salt_flip = (f.salt1, f.salt2) != salts
    if salt_flip and not _one_bit((f.salt1 << 32) | f.salt2, (salts[0] << 32) | salts[1]):
        return None  # another generation of the log
    seed = (
        (header.cksum1, header.cksum2)
        if f.index == 0
        else (frames[f.index - 1].cksum1, frames[f.index - 1].cksum2)
    )
    content = bytes(data[f.offset : f.offset + 8]) + bytes(
        data[f.offset + FRAME_HEADER_BYTES : f.offset + FRAME_HEADER_BYTES + page_size]
    )
    if salt_flip:
        if wal_checksum(content, seed, header.big_endian) != (f.cksum1, f.cksum2):
            return None  # a flipped salt and more: not a single bit
        explanations = [(-2, 0)]
    else:
        explanations = single_bit_damage(content, seed, (f.cksum1, f.cksum2), header.big_endian)
        if not explanations:
            return None
    before = frames[: f.index]
    last_commit = max((g.index for g in before if g.commit), default=-1)
    bound = max([db_pages or 0, *(g.db_size for g in before), *(g.page_no for g in before)]) + (
        f.index - last_commit
    )
    sizes = []
    for word, bit in explanations:
        # the bit is numbered in the checksum's reading of the word; the header
        # fields are big-endian
        field_bit = bit if header.big_endian else (3 - bit // 8) * 8 + bit % 8
        size = f.db_size ^ (1 << field_bit) if word == 1 else f.db_size
        pgno = f.page_no ^ (1 << field_bit) if word == 0 else f.page_no
        if size == 0 or pgno <= size <= max(bound, pgno):
            sizes.append(size)
    if not sizes or 0 in sizes:
        return None  # (plausibly) a frame of a transaction that never committed
    word = explanations[0][0]
    where = {-2: "a salt", -1: "its checksum", 0: "its page number", 1: "its database size"}.get(
        word, f"the word at byte {(word - 2) * 4} of its page"
    )
    if len(explanations) > 1:
        where = f"one of {len(explanations)} possible places (e.g. {where})"
    return f"one bit flipped in {where} of the last commit frame"


def check_wal(data: bytes | memoryview, *, db_pages: int | None = None) -> WalReport:
    """Read a WAL file's bytes as SQLite would, then look past where SQLite stops.

    ``db_pages``: the size of the database file in pages, if known (it makes the
    judgement of a damaged last commit frame sharper)."""
    header = parse_header(data)
    if header is None:
        return WalReport(
            WalVerdict.EMPTY,
            f"WAL of {len(data)} bytes has no header",
            None,
            (),
            None,
            0,
            (),
            (),
            len(data),
        )
    if header.valid:
        frames = _scan(
            data, header.page_size, header.big_endian, header, chain=True, peer_salts=False
        )
        return _report(header, frames, header.page_size, data, "WAL", db_pages)
    # SQLite ignores a log whose header is damaged, committed frames and all. Look
    # for committed frames under the header's page size (every size if that field is
    # damaged too) and both byte orders, frames judged by the header and by each other.
    what = (
        "WAL header checksum is wrong (SQLite ignores the whole log)"
        if header.plausible
        else "WAL header is unreadable (SQLite ignores the whole log)"
    )
    sizes = (header.page_size,) if header.page_size in PAGE_SIZES else PAGE_SIZES
    for page_size in sizes:
        for big_endian in (header.big_endian, not header.big_endian):
            by_header = _scan(data, page_size, big_endian, header, chain=False, peer_salts=False)
            by_peers = _scan(data, page_size, big_endian, header, chain=False, peer_salts=True)
            frames = [f if f.locally_valid else p for f, p in zip(by_header, by_peers, strict=True)]
            if any(f.commit and f.locally_valid for f in frames):
                return _report(header, frames, page_size, data, what, db_pages)
    return WalReport(
        WalVerdict.EMPTY,
        f"{what}; no committed frame follows it",
        header,
        (),
        None,
        0,
        (),
        (),
        len(data) - WAL_HEADER_BYTES,
    )


# --------------------------------------------------------------------------- replay


def pages_to_apply(
    data: bytes | memoryview, report: WalReport, *, past_damage: bool, damaged_frames: bool = True
) -> tuple[list[tuple[int, bytes]], int | None]:
    """The pages a reader should write into a copy of the database, in order, and the
    database size in pages after the last transaction applied (None: no commit).

    ``past_damage`` False gives what SQLite itself applies (the chain up to its last
    commit). True goes on to the last committed transaction SQLite would drop, using
    every frame of this log generation on the way, damaged ones included (their pages
    are what the recovery has; what they hold is judged by whoever reads them).
    ``damaged_frames`` False leaves out the frames that are not whole
    (:attr:`WalFrame.locally_valid`): each such page stays as the frames before it,
    or the database file, left it (its newest intact copy), so that a damaged page
    the whole file depends on (the schema's) does not make every table unreadable.
    """
    if report.page_size is None:
        return [], None
    ps = report.page_size
    last = report.sqlite_frames
    if past_damage and report.lost_commits:
        last = report.lost_commits[-1] + 1
    chosen = report.frames[:last]
    size = next((f.db_size for f in reversed(chosen) if f.commit), None)
    hdr = report.header
    salts = (hdr.salt1, hdr.salt2) if hdr is not None and hdr.plausible else None
    out: list[tuple[int, bytes]] = []
    for f in chosen:
        if f.page_no == 0 or (size is not None and f.page_no > size):
            continue  # a damaged header field: there is no such page
        if salts is not None and (f.salt1, f.salt2) != salts:
            continue  # not written in this generation of the log: nothing to apply
        if not damaged_frames and not f.locally_valid:
            continue  # the page keeps its newest intact copy
        start = f.offset + FRAME_HEADER_BYTES
        out.append((f.page_no, bytes(data[start : start + ps])))
    return out, size


# --------------------------------------------------------------------------- writing (tests, tools)


def encode_wal(
    frames: Sequence[tuple[int, bytes, int]],
    *,
    page_size: int,
    salts: tuple[int, int],
    checkpoint_seq: int = 0,
    big_endian: bool = False,
) -> bytes:
    """A WAL file with ``frames`` = (page number, page bytes, db size or 0), written
    as SQLite writes one. Used by the tests to build logs to damage."""
    if page_size not in PAGE_SIZES:
        raise ValueError(f"page size {page_size} is not one SQLite uses")
    magic = MAGIC_BE if big_endian else MAGIC_LE
    head = struct.pack(">6I", magic, WAL_VERSION, page_size, checkpoint_seq, *salts)
    c = wal_checksum(head, (0, 0), big_endian)
    out = bytearray(head + struct.pack(">2I", *c))
    for pgno, page, dbsize in frames:
        if len(page) != page_size or pgno < 1:
            raise ValueError("each frame needs a page number >= 1 and exactly one page")
        fh = struct.pack(">4I", pgno, dbsize, *salts)
        c = wal_checksum(page, wal_checksum(fh[:8], c, big_endian), big_endian)
        out += fh + struct.pack(">2I", *c) + page
    return bytes(out)

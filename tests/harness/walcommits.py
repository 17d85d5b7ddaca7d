"""A database's commits, read from its write-ahead log: what the flash is asked to write.

Every transaction that changed a page appends its pages to the log, the last one
a *commit frame* (with ``synchronous=FULL``, one fsync each); a transaction that
changed nothing appends nothing. The log is read as SQLite reads it
(:func:`store_forward.walcheck.check_wal`: frames in the checksum chain up to the
last commit frame).

* :func:`log_mark` and :func:`commits_since` count the transactions committed in
  between (the log must not have been restarted by a checkpoint meanwhile:
  that is an assertion, never a silent miscount).
* :func:`states` runs a query on the database as it stood after each commit the
  log holds: a copy of the file with the log cut after that commit frame, opened
  by SQLite. Consecutive states tell which rows each transaction wrote.
"""

from __future__ import annotations

import sqlite3
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from store_forward.walcheck import FRAME_HEADER_BYTES, WAL_HEADER_BYTES, WalReport, check_wal


@dataclass(frozen=True)
class LogMark:
    salt: tuple[int, int] | None  # the log's generation (None: no log yet)
    commits: int  # commit frames SQLite applies


def _report(db: Path) -> tuple[bytes, WalReport] | None:
    try:
        data = Path(f"{db}-wal").read_bytes()
    except FileNotFoundError:
        return None
    rep = check_wal(data)
    return None if rep.header is None else (data, rep)


def log_mark(db: Path) -> LogMark:
    got = _report(db)
    if got is None:
        return LogMark(None, 0)
    _, rep = got
    assert rep.header is not None
    return LogMark((rep.header.salt1, rep.header.salt2), sum(f.commit for f in rep.frames[: rep.sqlite_frames]))


def commits_since(db: Path, mark: LogMark) -> int:
    """Transactions committed to ``db`` since ``mark`` was taken."""
    now = log_mark(db)
    if mark.salt is None:
        return now.commits
    assert now.salt == mark.salt, f"{db}: the log was restarted since the mark; its commits cannot be counted"
    return now.commits - mark.commits


def _backfilled(db: Path) -> int:
    """Frames a checkpoint already copied into the database file (``nBackfill`` of the
    shared-memory index, sqlite.org/walformat.html; native byte order)."""
    try:
        shm = Path(f"{db}-shm").read_bytes()
    except FileNotFoundError:
        return 0
    return struct.unpack_from("=I", shm, 96)[0] if len(shm) >= 100 else 0


def states(db: Path, sql: str, scratch: Path) -> list[list[tuple[Any, ...]]]:
    """``sql``'s rows on ``db`` after each commit in its log, oldest first (``scratch``:
    an empty directory for the copies). Read while nothing writes ``db`` (the test
    holds the writer still, or it has stopped with another connection open, so its
    log was kept). Commits whose frames a checkpoint already copied into the file
    are left out: the file holds later pages than theirs."""
    got = _report(db)
    assert got is not None, f"{db}: no write-ahead log"
    data, rep = got
    main = db.read_bytes()
    backfilled = _backfilled(db)
    frame = FRAME_HEADER_BYTES + (rep.page_size or 0)
    ends = [
        WAL_HEADER_BYTES + (f.index + 1) * frame
        for f in rep.frames[: rep.sqlite_frames]
        if f.commit and f.index + 1 >= backfilled
    ]
    out = []
    for k, end in enumerate(ends):
        copy = scratch / f"commit-{k}.db"
        copy.write_bytes(main)
        Path(f"{copy}-wal").write_bytes(data[:end])
        conn = sqlite3.connect(copy)
        try:
            out.append([tuple(r) for r in conn.execute(sql)])
        finally:
            conn.close()
    return out

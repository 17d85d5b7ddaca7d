"""The outbox database's integrity at start, and what is kept when it fails.

:func:`check_database` runs before SQLite opens the file for writing:

1. the write-ahead log is read by :mod:`store_forward.walcheck` (SQLite would
   silently drop committed transactions after a damaged frame; opening the
   database for writing would then checkpoint and truncate the log);
2. ``PRAGMA quick_check`` on a read-only connection (a read-write connection
   to a file that is not a database deletes its ``-wal`` on close);
3. a missing database whose lineage marker says one existed.

Before 2, a *hot* rollback journal (``<db>-journal``) is rolled back
(:func:`roll_back_hot_journal`): SQLite must do that before anything can read
the file, and a read-only connection cannot, so without it the check fails
with "attempt to write a readonly database" and the daemon never starts. See
that function for when it is done and when the journal is a fault instead.

Any of them failing is a storage fault. :func:`secure_evidence` then moves the
database and its ``-wal``/``-shm`` byte for byte into
``<db>.evidence/<time>-<tag>/`` with a ``manifest.json`` (why, when, sizes and
SHA-256 of each file): the files are never deleted, rewritten or opened for
writing again. Recovery reads them through copies (:mod:`store_forward.salvage`).

The lineage marker ``<db>.lineage`` (JSON, written atomically) records the
generation of the database in use, so a database that is lost altogether
still does not let a new one reuse its numbering: see :func:`next_generation`.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import secrets
import sqlite3
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from firmware_bridge.durable import fsync_dir, write_atomic
from store_forward.walcheck import WalReport, check_wal

log = logging.getLogger(__name__)

SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26
MANIFEST = "manifest.json"
SUCCESSOR = "successor.json"  # the generation of the database that replaced this one


class FaultKind(enum.StrEnum):
    WAL = "wal"  # committed transactions after a damaged WAL frame
    CHECK = "quick_check"  # PRAGMA quick_check found damage
    OPEN = "open"  # SQLite refused the file (corrupt, not a database)
    MISSING = "missing"  # the lineage marker says a database was here
    RUNTIME = "runtime"  # damage found while the daemon was running
    LEDGER = "ledger"  # the stored ledger does not match its entries
    JOURNAL = "journal"  # a hot rollback journal that cannot be rolled back safely


@dataclass(frozen=True)
class Integrity:
    ok: bool
    kind: FaultKind | None = None
    reason: str = ""
    wal: WalReport | None = None
    rolled_back: JournalRollback | None = None  # a hot journal rolled back before the check


@dataclass(frozen=True)
class JournalRollback:
    """A hot rollback journal that :func:`check_database` rolled back."""

    journal_bytes: int
    pages_before: int  # the database's size in pages before the unfinished transaction
    db_bytes: int  # the database file's size when it was found (before the rollback)
    db_bytes_after: int
    wal_mode: bool  # the file's header said WAL (bytes 18-19 == 2) when it was found

    def describe(self) -> str:
        return (
            f"a {'first-start' if self.pages_before == 0 else 'rollback-journal'} transaction"
            f" that did not complete was rolled back ({self.journal_bytes}-byte journal; the"
            f" database went from {self.db_bytes} to {self.db_bytes_after} bytes, its size"
            f" before that transaction: {self.pages_before} pages;"
            f" header said {'WAL' if self.wal_mode else 'rollback journal'})"
        )


# The rollback journal's header (SQLite's file format, "The Rollback Journal"):
# magic, record count, checksum nonce, the database's page count before the
# transaction, sector size, page size.
JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")
JOURNAL_HEADER = struct.Struct(">8sIIIII")


def journal_path(path: Path) -> Path:
    return path.with_name(path.name + "-journal")


def db_header_mode(path: Path) -> int | None:
    """Bytes 18-19 of the database header: 1 rollback journal, 2 WAL (None: no header)."""
    try:
        with path.open("rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or not head.startswith(b"SQLite format 3\x00"):
        return None
    return head[18] if head[18] == head[19] else None


def roll_back_hot_journal(path: Path, report: WalReport | None) -> JournalRollback | Integrity | None:
    """Roll back a hot rollback journal beside the database at ``path``.

    The caller holds the database's exclusive owner lock
    (``store_forward.database._OwnerLock``): no other process has the file open,
    so a journal is no live transaction's, and a read-write connection opened
    here is the only one.

    *Hot* as SQLite decides it: the journal exists, is not empty, its first byte
    is not zero, and the database is not empty. A journal whose header is zeroed
    (a transaction that finished in ``PERSIST``/``TRUNCATE`` style) or beside an
    empty database is not hot: SQLite ignores it on a read-only connection, so it
    is left alone (returns None).

    A hot journal means the last transaction made in rollback-journal mode did
    not complete; rolling it back restores the database to what it was before
    that transaction, which is all that was ever committed. The gateway writes
    in WAL mode, and the only rollback-journal transaction it makes is the one
    that switches a database to WAL (``PRAGMA journal_mode=WAL`` rewrites header
    bytes 18-19 from 1 to 2) — on a new database its first write, and the state
    before it is an empty file. The journal is deleted only after the database
    file was written and synced, and the unlink of the journal is not synced
    (SQLite syncs the directory on a delete only with ``synchronous=EXTRA``), so
    a power cut before the directory is next synced (the first WAL commit
    creates the log and syncs it) leaves a header that already says WAL (2)
    *and* a hot journal. The header's mode therefore does not decide: a header
    of 2 with a hot journal is exactly the interrupted switch. What decides is
    the write-ahead log: a read-write connection rolls the journal back before
    it looks at the log, and when that leaves the database empty it deletes the
    log. So the rollback is done only when the log holds no frames (absent,
    empty, or a header only): there is then nothing in it to checkpoint,
    truncate or lose, and the check of a database with a log stays read-only.

    Returns a :class:`Integrity` fault (kind ``journal``, nothing touched) for
    a hot journal whose header SQLite cannot read (too short, wrong magic):
    SQLite would delete it and restore nothing, leaving whatever the unfinished
    transaction had written; and for a hot journal beside a log with frames
    (no sequence of the gateway's writes leaves both). Either is kept as
    evidence with the database (:func:`secure_evidence` moves the journal too).
    Raises :class:`OSError` or :class:`sqlite3.Error` when the rollback itself
    fails (not damage: a locked or unwritable file).
    """
    journal = journal_path(path)
    try:
        with journal.open("rb") as f:
            head = f.read(JOURNAL_HEADER.size)
            journal_bytes = os.fstat(f.fileno()).st_size
        db_bytes = path.stat().st_size
    except FileNotFoundError:
        return None
    if journal_bytes == 0 or head[:1] == b"\x00" or db_bytes == 0:
        return None  # not hot: SQLite reads the database without it
    if len(head) < JOURNAL_HEADER.size or not head.startswith(JOURNAL_MAGIC):
        return Integrity(
            False,
            FaultKind.JOURNAL,
            f"{journal.name} ({journal_bytes} bytes) is hot but its header is not a rollback"
            " journal's: the unfinished transaction cannot be rolled back",
            report,
        )
    _magic, _records, _nonce, pages_before, _sector, _page = JOURNAL_HEADER.unpack(head)
    if report is not None and report.frames:
        return Integrity(
            False,
            FaultKind.JOURNAL,
            f"{journal.name} is hot beside a write-ahead log with {len(report.frames)} frames:"
            " rolling it back would discard the log",
            report,
        )
    mode = db_header_mode(path)
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        try:
            conn.execute("PRAGMA schema_version").fetchone()  # a read: SQLite rolls back first
        finally:
            conn.close()
    except sqlite3.Error as exc:
        if is_corruption(exc):
            return Integrity(
                False, FaultKind.OPEN, f"SQLite refuses the file with its hot journal: {exc}", report
            )
        raise
    still = journal.exists() and journal.stat().st_size > 0 and journal.read_bytes()[:1] != b"\x00"
    if still:
        raise OSError(f"{journal} is still hot after opening {path} for writing")
    fsync_dir(path.parent)  # the journal's removal, so the next start does not roll back again
    done = JournalRollback(journal_bytes, pages_before, db_bytes, path.stat().st_size, mode == 2)
    log.warning("outbox %s: %s", path, done.describe())
    return done


SQLITE_READONLY_ROLLBACK = 776  # a read-only connection met a hot journal


def is_hot_journal_refusal(exc: BaseException) -> bool:
    """A read-only connection refused the file because a hot journal must be rolled
    back first (the database is not damaged: the daemon does that at its start)."""
    return isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == SQLITE_READONLY_ROLLBACK


def is_corruption(exc: BaseException) -> bool:
    """An SQLite error that means the file's content is damaged."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB)
    text = str(exc).lower()
    return type(exc) is sqlite3.DatabaseError and (
        "malformed" in text or "not a database" in text or "corrupt" in text
    )


def db_page_count(path: Path) -> int | None:
    """Pages in the main file, from its size and the page size in its header."""
    try:
        with path.open("rb") as f:
            head = f.read(100)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return None
    if len(head) < 100 or not head.startswith(b"SQLite format 3\x00"):
        return None
    (ps,) = struct.unpack_from(">H", head, 16)
    page_size = 65536 if ps == 1 else ps
    return size // page_size if page_size >= 512 else None


def lineage_path(path: Path) -> Path:
    return path.with_name(path.name + ".lineage")


def evidence_root(path: Path) -> Path:
    return path.with_name(path.name + ".evidence")


def check_database(path: Path) -> Integrity:
    """The checks above; a missing file without a marker is fine (a new gateway).

    The caller holds the exclusive owner lock: a hot journal is rolled back here
    (:func:`roll_back_hot_journal`), the only write this check ever makes.

    Raises :class:`OSError` or :class:`sqlite3.Error` for what is not damage (a
    locked or unreadable file): the caller must not treat those as corruption.
    """
    wal = path.with_name(path.name + "-wal")
    if not path.exists():
        if lineage_path(path).exists() or wal.exists():
            return Integrity(
                False,
                FaultKind.MISSING,
                f"{path} is missing but {lineage_path(path).name if lineage_path(path).exists() else wal.name}"
                " shows a database was in use here",
            )
        return Integrity(True)
    report: WalReport | None = None
    if wal.exists() and wal.stat().st_size > 0:
        report = check_wal(wal.read_bytes(), db_pages=db_page_count(path))
        if report.corrupt:
            return Integrity(False, FaultKind.WAL, report.reason, report)
    hot = roll_back_hot_journal(path, report)
    if isinstance(hot, Integrity):
        return hot
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=5.0)
        try:
            row = conn.execute("PRAGMA quick_check").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        if is_corruption(exc):
            return Integrity(False, FaultKind.OPEN, f"SQLite refuses the file: {exc}", report)
        raise
    if row is None or row[0] != "ok":
        return Integrity(
            False, FaultKind.CHECK, f"quick_check: {row[0] if row else 'no result'}", report, hot
        )
    return Integrity(True, wal=report, rolled_back=hot)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_durably(path: Path, doc: dict[str, Any]) -> None:
    """Write a small JSON document atomically (old or new file after a power cut)."""
    write_atomic(path, orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))


def secure_evidence(
    path: Path, kind: FaultKind, reason: str, now_ms: int, wal: WalReport | None = None
) -> Path:
    """Move the database and its -wal/-shm/-journal into a new evidence directory; return it.

    The journal goes with the database: left behind, a hot journal would be
    rolled back into the new database made at the same path.

    Renames only (same directory tree, so no copy and no extra space), then the
    manifest; nothing is deleted. A missing database leaves an evidence
    directory with the manifest and whatever of the set was there.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now_ms / 1000))
    root = evidence_root(path)
    root.mkdir(mode=0o700, exist_ok=True)
    target = root / f"{stamp}-{secrets.token_hex(3)}"
    target.mkdir(mode=0o700)
    files: dict[str, Any] = {}
    for suffix in ("", "-wal", "-shm", "-journal"):
        src = path.with_name(path.name + suffix)
        if src.exists():
            dst = target / src.name
            os.replace(src, dst)
            files[src.name] = {"bytes": dst.stat().st_size, "sha256": _sha256(dst)}
    marker = lineage_path(path)
    lineage = read_lineage(path)
    manifest: dict[str, Any] = {
        "database": path.name,
        "kind": kind.value,
        "reason": reason,
        "detected_ms": now_ms,
        "files": files,
        "lineage": lineage,
    }
    if wal is not None:
        manifest["wal"] = {
            "verdict": wal.verdict.value,
            "frames": len(wal.frames),
            "sqlite_frames": wal.sqlite_frames,
            "lost_commit_frames": list(wal.lost_commits),
            "damaged_frames": list(wal.damaged),
        }
    write_json_durably(target / MANIFEST, manifest)
    fsync_dir(root)
    fsync_dir(path.parent)
    log.critical(
        "storage fault (%s): %s; %s kept as evidence in %s (%s)",
        kind.value,
        reason,
        ", ".join(files) or "no file",
        target,
        "lineage marker " + ("present" if marker.exists() else "absent"),
    )
    return target


def read_manifest(evidence: Path) -> dict[str, Any]:
    try:
        doc = orjson.loads((evidence / MANIFEST).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def read_lineage(path: Path) -> dict[str, Any]:
    """The lineage marker of the database at ``path`` ({} if missing or unreadable)."""
    try:
        doc = orjson.loads(lineage_path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def write_lineage(path: Path, generation: int, created_ms: int) -> None:
    write_json_durably(
        lineage_path(path),
        {"database": path.name, "generation": generation, "created_ms": created_ms},
    )


def record_successor(evidence: Path, generation: int, now_ms: int) -> None:
    """Note in the evidence directory which generation the new database is (so it is
    known even if that database and the lineage marker are both lost)."""
    write_json_durably(evidence / SUCCESSOR, {"generation": generation, "created_ms": now_ms})


def known_generations(path: Path) -> list[int]:
    """Every generation this database path is known to have had: the marker's, and
    those recorded with earlier evidence (the damaged database's, its successor's)."""
    out = []
    e = read_lineage(path).get("generation")
    if isinstance(e, int):
        out.append(e)
    root = evidence_root(path)
    if root.is_dir():
        for d in root.iterdir():
            m = read_manifest(d)
            le = (
                m.get("lineage", {}).get("generation")
                if isinstance(m.get("lineage"), dict)
                else None
            )
            if isinstance(le, int):
                out.append(le)
            try:
                succ = orjson.loads((d / SUCCESSOR).read_bytes())
            except (OSError, orjson.JSONDecodeError):
                succ = None
            if isinstance(succ, dict) and isinstance(succ.get("generation"), int):
                out.append(succ["generation"])
    return out


def next_generation(path: Path, salvaged: int | None) -> int:
    """The generation of a database that replaces one that failed: above every one
    known from the evidence, the marker and the salvaged database (a database made
    before generations were recorded counts as generation 1)."""
    return max([1, *known_generations(path), *([salvaged] if salvaged is not None else [])]) + 1

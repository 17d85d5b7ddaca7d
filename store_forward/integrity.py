"""The outbox database's integrity at start, and what is kept when it fails.

:func:`check_database` runs before SQLite opens the file for writing:

1. the write-ahead log is read by :mod:`store_forward.walcheck` (SQLite would
   silently drop committed transactions after a damaged frame; opening the
   database for writing would then checkpoint and truncate the log);
2. ``PRAGMA quick_check`` on a read-only connection (a read-write connection
   to a file that is not a database deletes its ``-wal`` on close);
3. a missing database whose lineage marker says one existed.

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


@dataclass(frozen=True)
class Integrity:
    ok: bool
    kind: FaultKind | None = None
    reason: str = ""
    wal: WalReport | None = None


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
            False, FaultKind.CHECK, f"quick_check: {row[0] if row else 'no result'}", report
        )
    return Integrity(True, wal=report)


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
    """Move the database and its -wal/-shm into a new evidence directory; return it.

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
    for suffix in ("", "-wal", "-shm"):
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

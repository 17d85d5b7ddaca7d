"""Signed commands a technician brings to the gateway: on a laptop, or in a USB bundle.

Central signs a top-up (or a meter exchange, ``meter.replace``) like any other
command; the envelope travels as a file. It reaches the gateway's one command
path, :meth:`gateway.commands.handler.CommandHandler.handle`, which verifies and
applies it exactly once under the same rules as a command from MQTT — so a
sale carried on a stick cannot be credited twice, nor next to its MQTT twin.

Two ways in, both through the running daemon (the single SQLite writer: the
ledger's working copy lives in the daemon, so nothing else may write it):

* ``edgegw topup apply FILE`` (channel ``technician``) checks the file's shape
  and target, drops it into the daemon's *command spool*
  (``<storage directory>/command-spool/``), and waits for the daemon's answer
  (``<name>.result.json``, written after the commit). The daemon takes spooled
  envelopes every second. If the daemon is not running the envelope stays in the
  spool and is applied when it starts; the command says so and exits 3.
* A provisioning bundle may carry envelopes in ``topups/`` and ``commands/``
  (docs/provisioning.md); the daemon applies the ones of the configuration in
  force when it starts (channel ``usb``; an accepted bundle restarts it). Each
  file is taken once (its SHA-256 is remembered), so a restart does not present
  it again; presenting it again would be answered ``duplicate`` anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from firmware_bridge.durable import fsync_dir, write_atomic
from gateway.config import ConfigError, load_config
from gateway.security.envelope import MAX_ENVELOPE_BYTES, CommandResult, Envelope, parse_envelope
from gateway.security.roles import CommandType
from store_forward.schema import Schema, Step

log = logging.getLogger(__name__)

SPOOL_DIR = "command-spool"
ENVELOPE_SUFFIX = ".cmd"
RESULT_SUFFIX = ".result.json"
BUNDLE_DIRS = ("topups", "commands")  # in the configuration's directory (a bundle's release)
MAX_PER_PASS = 32  # spooled envelopes taken per pass (a flood waits, it does not stall the daemon)
RESULT_KEEP_S = 7 * 86_400  # answers nobody picked up are removed after this long

FILE_IMPORT_TABLE = """CREATE TABLE IF NOT EXISTS cmd_file_import (
    digest      TEXT PRIMARY KEY,
    path        TEXT NOT NULL,
    imported_ms INTEGER NOT NULL,
    outcome     TEXT NOT NULL
)"""
# Declared to the gateway database's schema registry (gateway.database).
SCHEMA = Schema("technician", Step(4, "envelope files a bundle carried, taken once", (FILE_IMPORT_TABLE,)))

Handle = Callable[[bytes, str], Awaitable[CommandResult]]


def spool_dir(storage_path: Path) -> Path:
    """The command spool of the gateway whose database is ``storage_path``."""
    return storage_path.parent / SPOOL_DIR


def ensure_spool(spool: Path) -> None:
    """Create the spool directory durably (its name survives a power cut)."""
    if spool.is_dir():
        return
    spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    fsync_dir(spool.parent)


def _read_bounded(path: Path) -> bytes:
    """At most MAX_ENVELOPE_BYTES + 1 bytes of a regular file (a link or a FIFO is refused)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        return f.read(MAX_ENVELOPE_BYTES + 1)


def _write_atomic(path: Path, data: bytes) -> None:
    # The mode of any new file (umask): the daemon and a technician's shell may be
    # different users. A directory that cannot be fsynced does not fail the hand-over.
    write_atomic(path, data, 0o666, chmod=False, sync_dir=False)
    with contextlib.suppress(OSError):
        fsync_dir(path.parent)


def result_json(result: CommandResult, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    out = result.to_reply()
    if result.envelope is not None:
        out["type"] = result.envelope.type.value
    return out | (extra or {})


# ---------------------------------------------------------------------------
# Daemon side


async def drain_spool(
    spool: Path, handle: Handle | None, *, describe: Callable[[CommandResult], Awaitable[dict[str, Any]]] | None = None
) -> int:
    """Apply the envelopes waiting in ``spool`` (oldest first, at most MAX_PER_PASS)
    through ``handle(raw, "technician")`` and leave each answer beside it; returns how
    many were taken. Without a command path (no trust store) each is refused with
    that reason, so the technician is told at once."""
    try:
        names = await asyncio.to_thread(os.listdir, spool)
    except FileNotFoundError:
        return 0
    pending = sorted(n for n in names if n.endswith(ENVELOPE_SUFFIX) and not n.startswith("."))
    n = 0
    for name in pending[:MAX_PER_PASS]:
        path = spool / name
        answer = spool / (name[: -len(ENVELOPE_SUFFIX)] + RESULT_SUFFIX)
        try:
            raw = await asyncio.to_thread(_read_bounded, path)
        except OSError as exc:
            body: dict[str, Any] = {"outcome": "rejected", "reason": "unreadable", "message": str(exc)}
        else:
            if handle is None:
                body = {"outcome": "rejected", "reason": "no_command_path",
                        "message": "this gateway has no trust store configured (security.trust_file): "
                                   "it cannot verify signed commands"}
            else:
                result = await handle(raw, "technician")
                body = result_json(result, await describe(result) if describe is not None else None)
        await asyncio.to_thread(_write_atomic, answer, orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(path.unlink)
        log.info("technician command %s: %s", name, body.get("outcome"))
        n += 1
    return n


async def prune_results(spool: Path, now_s: float | None = None) -> int:
    """Remove answers older than RESULT_KEEP_S (nobody came back for them)."""
    now = time.time() if now_s is None else now_s
    try:
        names = await asyncio.to_thread(os.listdir, spool)
    except FileNotFoundError:
        return 0
    n = 0
    for name in names:
        if name.endswith(RESULT_SUFFIX):
            p = spool / name
            with contextlib.suppress(FileNotFoundError):
                if now - p.stat().st_mtime > RESULT_KEEP_S:
                    p.unlink()
                    n += 1
    return n


async def import_bundle_commands(
    config_dir: Path, handle: Handle, db_transaction: Callable[[], Any], now_ms: int
) -> list[tuple[str, str]]:
    """Apply the envelopes a bundle carried (``topups/``, ``commands/`` beside the
    configuration) that were not taken before; returns (file, outcome) for each taken."""
    files: list[Path] = []
    for d in BUNDLE_DIRS:
        base = config_dir / d
        if base.is_dir():
            files += sorted(p for p in base.rglob("*") if p.is_file() and not p.is_symlink())
    if not files:
        return []
    async with db_transaction() as db:
        done = {str(d) for (d,) in await (await db.execute("SELECT digest FROM cmd_file_import")).fetchall()}
    out: list[tuple[str, str]] = []
    for p in files:
        try:
            raw = await asyncio.to_thread(_read_bounded, p)
        except OSError as exc:
            log.error("bundle command %s: %s", p, exc)
            continue
        digest = hashlib.sha256(raw).hexdigest()
        if digest in done:
            continue
        result = await handle(raw, "usb")
        rel = str(p.relative_to(config_dir))
        async with db_transaction() as db:
            await db.execute(
                "INSERT OR IGNORE INTO cmd_file_import (digest, path, imported_ms, outcome) VALUES (?, ?, ?, ?)",
                (digest, rel, now_ms, result.outcome.value),
            )
        done.add(digest)
        msg = "" if result.ok else f" ({result.reason.value if result.reason else ''}: {result.message})"
        log.info("bundle command %s: %s%s", rel, result.outcome.value, msg)
        out.append((rel, result.outcome.value))
    return out


# ---------------------------------------------------------------------------
# Technician side: edgegw topup apply FILE


def check_envelope(raw: bytes, gateway_id: str, allowed: frozenset[CommandType]) -> Envelope:
    """The checks a technician can get before handing the file over: shape, type, target.
    The signature, counter and expiry are the gateway's to check. Raises ValueError."""
    parsed = parse_envelope(raw)
    if isinstance(parsed, CommandResult):
        raise ValueError(f"not a signed command envelope ({parsed.reason}: {parsed.message})")
    if parsed.type not in allowed:
        raise ValueError(f"this is a {parsed.type.value} command, not a "
                         f"{' or '.join(sorted(t.value for t in allowed))}")
    if parsed.target != gateway_id:
        raise ValueError(f"the command is for gateway {parsed.target!r}; this is gateway {gateway_id!r}")
    return parsed


def _already(ans: dict[str, Any]) -> bool:
    """Applied before: the same command id (``duplicate``), or this very envelope
    (``replay``: the gateway refuses to read it twice, it was accepted the first time)."""
    return ans.get("outcome") == "duplicate" or ans.get("reason") == "replay"


def _describe_answer(ans: dict[str, Any]) -> str:
    outcome = ans.get("outcome")
    cid = ans.get("id", "?")
    if _already(ans):
        return f"{ans.get('type', 'command')} {cid}: already applied before (nothing changed)"
    if outcome == "applied":
        extra = ""
        if "balance" in ans:
            extra = f"; balance of {ans.get('account')} now {ans['balance']}"
        return f"{ans.get('type', 'command')} {cid}: applied{extra}"
    code = ans.get("code") or ans.get("reason") or "rejected"
    return f"{ans.get('type', 'command')} {cid}: refused ({code}): {ans.get('message', '')}"


def cmd_topup_apply(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 2
    src = Path(args.file)
    try:
        raw = _read_bounded(src)
    except OSError as exc:
        print(f"{src}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        env = check_envelope(raw, cfg.gateway.id, frozenset({CommandType.TOPUP}))
    except ValueError as exc:
        print(f"{src}: {exc}", file=sys.stderr)
        return 2
    spool = spool_dir(Path(cfg.storage.path))
    ensure_spool(spool)
    name = hashlib.sha256(raw).hexdigest()[:32]
    answer = spool / (name + RESULT_SUFFIX)
    if not answer.exists():
        _write_atomic(spool / (name + ENVELOPE_SUFFIX), raw)
    body = env.body
    print(f"top-up {env.command_id} for {body.get('account')}: handed to the gateway daemon ({spool})")
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        if answer.exists():
            ans = orjson.loads(answer.read_bytes())
            print(_describe_answer(ans))
            with contextlib.suppress(OSError):
                answer.unlink()
            return 0 if ans.get("outcome") == "applied" or _already(ans) else 1
        time.sleep(0.1)
    print(f"no answer from the gateway daemon within {args.wait:g} s: is edgegw running? The top-up "
          f"waits in {spool} and is applied when the daemon takes it.", file=sys.stderr)
    return 3


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``topup apply`` to the ``edgegw`` command line."""
    t = subparsers.add_parser("topup", help="top-ups a technician brings to the gateway")
    sub = t.add_subparsers(dest="topup_command", required=True)
    a = sub.add_parser(
        "apply",
        help="hand a signed top-up envelope (from central, on a stick or laptop) to the gateway",
        description="The envelope goes to the running daemon's command spool and is applied through the "
                    "same command path as one from central (channel 'technician'): verified, applied once.",
    )
    a.add_argument("file", help="the signed envelope (JSON) as central issued it")
    a.add_argument("--config", required=True, help="the gateway's configuration (for its id and database)")
    a.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for the daemon's answer (default 30)")
    a.set_defaults(func=cmd_topup_apply)

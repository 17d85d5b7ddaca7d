"""``edgegw status``: what a technician is asked first when a family has no power.

Whether the daemon runs (its heartbeat, and systemd where it is the service
manager), the link and since when, the backlog, each prepaid account's balance and
supply state with the reason, held fixed charges, and each meter's health. It opens
the database read-only and never changes anything; without ``--config`` it reads
the provisioned gateway's configuration (:func:`gateway.config.default_config_path`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from gateway import heartbeat, meter_health
from gateway.billing import ledger_store, retention
from gateway.billing.account import AccountError, load_account
from gateway.billing.cutoff import Contact, CutoffState, describe
from gateway.billing.money import yuan_text
from gateway.config import Config, ConfigError, default_config_path, load_config
from gateway.software_status import software_lines, software_status
from gateway.update_transfer import update_spool
from store_forward.integrity import is_hot_journal_refusal
from store_forward.outbox import (
    K_BATCH_EPOCH,
    K_GENERATION,
    K_LINK,
    K_LINK_SINCE,
    K_STORAGE,
    backlog_stats,
    meter_statuses,
    read_kv,
)
from store_forward.storage_policy import APPLIANCE_WRITEBACK_S, page_cache_writeback_s
from store_forward.storage_state import StorageState
from store_forward.storage_state import describe as describe_storage


def _age(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return "never"
    s = max(0, (now_ms - ms) // 1000)
    if s < 120:
        return f"{s}s ago"
    if s < 7200:
        return f"{s // 60}min ago"
    if s < 2 * 86400:
        return f"{s // 3600}h ago"
    return f"{s // 86400}d ago"


def storage_status(db_path: Path, kv: dict[str, Any]) -> dict[str, Any]:
    """The storage state (fault, recovery, evidence), the reserve and the free space."""
    try:
        state = StorageState.from_json(orjson.loads(kv.get(K_STORAGE) or "{}"))
    except (orjson.JSONDecodeError, ValueError, TypeError):
        state = StorageState()
    try:
        st = os.statvfs(db_path.parent)
        free: int | None = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    reserve = db_path.with_name(db_path.name + ".ballast")
    return {
        **state.to_json(),
        "summary": describe_storage(state),
        "generation": kv.get(K_GENERATION, 1),
        "batch_epoch": kv.get(K_BATCH_EPOCH),
        "reserve_in_place": reserve.exists(),
        "free_bytes": free,
        "writeback_s": page_cache_writeback_s(),
    }


def daemon_status(path: Path, now_ms: int) -> dict[str, Any]:
    """Whether the daemon runs, from its heartbeat (and systemd, where it runs)."""
    try:
        hb = heartbeat.read(path)
    except ValueError as exc:
        return {"state": "unknown", "detail": str(exc), "since_ms": None, "heartbeat": None}
    proc = heartbeat.process(hb.pid) if hb is not None else heartbeat.Process(False)
    a = heartbeat.assess(hb, proc, now_ms, heartbeat.boot_id())
    out: dict[str, Any] = {
        "state": a.run.value,
        "detail": a.detail,
        "since_ms": a.since_ms,
        "heartbeat": None if hb is None else hb.to_json(),
        "heartbeat_file": str(path),
    }
    systemd = heartbeat.systemd_state()
    if systemd is not None:
        out["systemd"] = systemd
    return out


@dataclass(frozen=True)
class AccountRow:
    account: str
    balance_micro: int | None  # None: not opened yet (no reading rated)
    state: dict[str, Any] | None
    supply: str  # in words (gateway.billing.cutoff.describe)
    held: list[dict[str, Any]]


async def _has_table(db: aiosqlite.Connection, name: str) -> bool:
    async with db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)) as cur:
        return await cur.fetchone() is not None


async def account_rows(
    db: aiosqlite.Connection, cfg: Config, now_ms: int, contact: Contact
) -> list[AccountRow]:
    if not cfg.accounts or not await _has_table(db, "billing_account"):
        return []
    rows: list[AccountRow] = []
    for a in cfg.accounts:
        async with db.execute(
            "SELECT balance_micro FROM billing_account WHERE account = ?", (a.id,)
        ) as cur:
            found = await cur.fetchone()
        data = await ledger_store.load_cutoff_json(db, a.id)
        state = CutoffState() if data is None else CutoffState.from_json(data)
        held = [
            {"charge_id": h.charge_id, "period_start_ms": h.period_start_ms,
             "amount": yuan_text(h.amount_micro), "cause": h.cause}
            for h in await ledger_store.held_charges(db, a.id)
        ]
        balance = None if found is None else int(found[0])
        if balance is None:
            supply = "no reading rated yet"
        else:
            try:
                settings = load_account(a.settings, cfg.gateway.timezone)
                supply = describe(state, balance, now_ms, contact, settings.cutoff)
            except AccountError as exc:
                supply = f"{state.level.value}{', supply cut' if state.relay_open else ''}"
                supply += f" (account settings unreadable: {exc.problems[0]})"
        rows.append(AccountRow(a.id, balance, None if data is None else state.to_json(), supply, held))
    return rows


async def ledger_retention(db: aiosqlite.Connection, now_ms: int, cfg: Config | None) -> dict[str, Any] | None:
    """The ledger's retention: what was pruned, up to where central acknowledged,
    each account's fold base (None for a database from before retention)."""
    if not await _has_table(db, "billing_retention"):
        return None
    st = await retention.load_state(db)
    return {
        "retention_days": None if cfg is None else cfg.billing.ledger_retention_days,
        "entries_pruned": st.pruned_total,
        "last_pass_ms": st.last_pass_ms,
        "last_pass_pruned": st.last_pass_pruned,
        "acknowledged_rowid": st.acked_rowid,
        "kept_for_good_rowid": st.hold_rowid,
        "marks_pending": st.marks,
        # from the accounts' sequences, less what retention deleted: each append takes
        # the next seq and only retention deletes (counting what it deleted), so this
        # is the row count without reading every row (count(*) reads a whole index:
        # minutes on an SD card for a large area's ledger)
        "entries": await _count(
            db,
            "SELECT coalesce((SELECT sum(last_seq) FROM billing_account), 0)"
            " - coalesce((SELECT sum(pruned) FROM billing_fold_base), 0)",
        ),
        "bases": [
            {
                "account": b.account,
                "base_seq": b.base_seq,
                "pruned": b.pruned,
                "pruned_until_ms": b.pruned_until_ms,
                # how old the newest entry only central keeps is
                "base_age_s": None if b.pruned_until_ms is None else max(0, (now_ms - b.pruned_until_ms) // 1000),
            }
            for b in await retention.bases(db)
        ],
    }


async def _count(db: aiosqlite.Connection, sql: str) -> int:
    async with db.execute(sql) as cur:
        row = await cur.fetchone()
    return 0 if row is None else int(row[0])


async def gather_status(db_path: Path, now_ms: int, cfg: Config | None = None,
                        daemon: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read-only view of a running (or stopped) gateway's database."""
    uri = f"file:{db_path}?mode=ro"
    hb = (daemon or {}).get("heartbeat") or {}
    contact = Contact(hb.get("last_contact_ms"), hb.get("started_ms"))
    async with aiosqlite.connect(uri, uri=True) as db:
        stats = await backlog_stats(db)
        kv = await read_kv(db)
        meters = await meter_statuses(db)
        health = await meter_health.read(db)
        accounts = [] if cfg is None else await account_rows(db, cfg, now_ms, contact)
        ledger = await ledger_retention(db, now_ms, cfg)
    return {
        "storage": storage_status(db_path, kv),
        "link": {"state": kv.get(K_LINK, "unknown"), "since_ms": kv.get(K_LINK_SINCE)},
        "backlog": {
            "records": stats.records,
            "readings": stats.readings,
            "batches_pending": stats.batches_pending,
            "bytes": stats.bytes,
            "oldest_created_ms": stats.oldest_created_ms,
            "oldest_age_s": None
            if stats.oldest_created_ms is None
            else max(0, (now_ms - stats.oldest_created_ms) // 1000),
        },
        "totals": {
            "readings_committed": stats.readings_committed,
            "readings_acked": stats.readings_acked,
        },
        "ledger": ledger,
        "accounts": [
            {
                "account": r.account,
                "balance": None if r.balance_micro is None else yuan_text(r.balance_micro),
                "balance_micro": r.balance_micro,
                "cutoff": r.state,
                "supply": r.supply,
                "held_charges": r.held,
            }
            for r in accounts
        ],
        "meters": [
            {
                "meter": m.meter_id,
                "online": m.online,
                # online / offline / quarantined, as central was told (meter.* events)
                "state": health[m.meter_id][0] if m.meter_id in health else ("online" if m.online else "offline"),
                "state_since_ms": health[m.meter_id][1] if m.meter_id in health else None,
                "last_good_ms": m.last_good_ms,
                "consecutive_failures": m.consecutive_failures,
                "total_failures": m.total_failures,
                "last_error": m.last_error,
            }
            for m in meters
        ],
    }


RUNNING = ("running", "starting", "stopping", "not responding")


def link_view(link: dict[str, Any], daemon: dict[str, Any]) -> dict[str, Any]:
    """The link as it is: what the daemon recorded while it runs; down while it does
    not (since it stopped, or since the link went down before that)."""
    if daemon["state"] in RUNNING or daemon["state"] == "unknown":
        return {**link, "recorded_state": link["state"]}
    since = link["since_ms"]
    if link["state"] == "up":
        since = daemon.get("since_ms")  # the last heartbeat: when the daemon stopped
    return {"state": "down", "since_ms": since, "recorded_state": link["state"],
            "detail": "the daemon is not running"}


def _print_daemon(d: dict[str, Any], now: int) -> None:
    since = "" if d.get("since_ms") is None else f" since {_age(d['since_ms'], now)}"
    state = d["state"] if d["state"] == "running" else d["state"].upper()
    if d["state"] == "not running" and d.get("since_ms") is not None:
        since = f" (last heartbeat {_age(d['since_ms'], now)})"
    print(f"daemon:  {state}{since}: {d['detail']}")
    sd = d.get("systemd")
    if sd:
        print(f"         systemd: {sd.get('ActiveState', '?')} ({sd.get('SubState', '?')})")


def _print(cfg: Config, st: dict[str, Any], daemon: dict[str, Any], now: int) -> None:
    print(f"gateway {cfg.gateway.id} ({cfg.gateway.site})")
    _print_daemon(daemon, now)
    sto = st["storage"]
    print(f"storage: {sto['summary']}")
    if sto["mode"] != "normal":
        print(f"         since {_age(sto['since_ms'], now)}: {sto['reason']}")
        if sto["fence_ms"]:
            print(f"         commands issued before {sto['fence_ms']} are refused unless already known")
    free = "unknown" if sto["free_bytes"] is None else f"{sto['free_bytes'] // 1024} KiB free"
    reserve = "in place" if sto["reserve_in_place"] else "RELEASED (the disk was full)"
    print(
        f"disk:    {free}, reserve {reserve}; database generation {sto['generation']},"
        f" batch epoch {sto['batch_epoch'] or '-'}"
    )
    writeback = sto.get("writeback_s")
    if writeback is not None and writeback < APPLIANCE_WRITEBACK_S:
        print(
            f"         the page cache is written back after {writeback:g} s (the appliance's setting is"
            f" {APPLIANCE_WRITEBACK_S} s, systemd/60-edgegw-writeback.conf): more writes to the SD card"
        )
    link = st["link"]
    running = daemon["state"] in RUNNING
    why = f" ({link['detail']})" if link.get("detail") else ""
    print(f"link:    {link['state']} since {_age(link['since_ms'], now)}{why}")
    b = st["backlog"]
    oldest = "-" if b["oldest_age_s"] is None else f"{b['oldest_age_s']}s"
    print(
        f"backlog: {b['records']} records ({b['readings']} readings), {b['bytes']} bytes,"
        f" oldest {oldest}, {b['batches_pending']} batch(es) awaiting ack"
    )
    print(
        f"totals:  {st['totals']['readings_committed']} readings stored,"
        f" {st['totals']['readings_acked']} acknowledged by the headend"
    )
    if st["accounts"]:
        note = "" if running else " (as the daemon left them)"
        print(f"accounts{note}:")
        for a in st["accounts"]:
            bal = "-" if a["balance"] is None else a["balance"]
            print(f"  {a['account']:<16} balance {bal:>10}  {a['supply']}")
            for h in a["held_charges"]:
                print(f"  {'':<16} held charge {h['amount']} ({h['cause']}), period from"
                      f" {_age(h['period_start_ms'], now)}: waits for central")
    for line in software_lines(st["software"]):
        print(line)
    print("meters:")
    known = {m["meter"]: m for m in st["meters"]}
    for m in cfg.meters:
        row = known.get(m.id)
        if row is None:
            print(f"  {m.id:<16} not polled yet")
            continue
        state = row["state"] if row["state"] == "online" else row["state"].upper()
        since = f" since {_age(row['state_since_ms'], now)}," if row["state_since_ms"] is not None else ""
        err = f"  last error: {row['last_error']}" if row["last_error"] and row["state"] != "online" else ""
        print(
            f"  {m.id:<16} {state:<11}{since} last good read {_age(row['last_good_ms'], now)},"
            f" {row['consecutive_failures']} consecutive / {row['total_failures']} total failures{err}"
        )


def cmd_status(args: argparse.Namespace) -> int:
    path = Path(args.config) if args.config else default_config_path()
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        if not args.config and not path.exists():
            print(f"{path}: no configuration (not provisioned yet?); give --config FILE", file=sys.stderr)
        else:
            print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        return 2
    now = time.time_ns() // 1_000_000
    daemon = daemon_status(heartbeat.path_to_read(cfg.gateway.heartbeat_file, cfg.storage.path), now)
    db_path = cfg.storage.path
    if not db_path.exists():
        print(f"{db_path}: no database yet (has the gateway run?); daemon: {daemon['state']}:"
              f" {daemon['detail']}", file=sys.stderr)
        return 1
    try:
        st = asyncio.run(gather_status(db_path, now, cfg, daemon))
        st["link"] = link_view(st["link"], daemon)
    except Exception as exc:  # a damaged database: say so, do not crash
        print(f"gateway {cfg.gateway.id} ({cfg.gateway.site})")
        _print_daemon(daemon, now)
        if is_hot_journal_refusal(exc):  # status never writes, so it cannot roll it back
            print(f"storage: {db_path} cannot be read: a transaction that did not complete"
                  f" ({db_path.name}-journal) waits to be rolled back; the daemon does that at its next start")
            return 1
        print(f"storage: {db_path} cannot be read ({exc}); the daemon keeps it as evidence at its next start")
        return 1
    hb = daemon.get("heartbeat") or {}
    running = hb.get("version") if daemon["state"] in RUNNING else None
    st["software"] = software_status(Path(args.releases_root), update_spool(db_path), running)
    if args.json:
        out = {"gateway": cfg.gateway.id, "site": cfg.gateway.site, "now_ms": now, "daemon": daemon, **st}
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    _print(cfg, st, daemon, now)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser(
        "status",
        help="daemon, link, backlog, balances and supply, meter health of a gateway",
        description="Read-only. Without --config: $EDGEGW_CONFIG, else the provisioned"
        " configuration (/var/lib/edgegw/provisioning/current/files/gateway.toml).",
    )
    s.add_argument("--config", help="TOML configuration (default: the provisioned gateway's)")
    s.add_argument("--json", action="store_true", help="one JSON document, for tools")
    s.add_argument(
        "--releases-root", default="/opt/edgegw", help="where install.sh put the releases (default: %(default)s)"
    )
    s.set_defaults(func=cmd_status)

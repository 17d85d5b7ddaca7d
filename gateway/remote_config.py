"""Configuration changes from central: ``config.patch`` and ``meter.roster``.

A signed command (operations role, verified by :mod:`gateway.commands.handler`)
changes the gateway's TOML configuration file. The change is checked the way
a technician's file is: the candidate is written beside the configuration (so
relative paths resolve alike) and loaded with :func:`gateway.config.load_config`;
any problem refuses the command with the loader's messages, and nothing
changes. Then, in steps that survive a power cut at any point:

1. **stage** (inside the command's transaction): the candidate file is
   written and fsynced, and a ``cmd_config_stage`` row records it;
2. **apply** (after the commit): the current file is kept as
   ``<file>.previous`` and the candidate renamed over it (atomic), the row
   marked applied and a confirmation put in ``cmd_config_confirm``; a crash
   between commit and rename is finished at the next start;
3. **restart**: the daemon stops cleanly and exits with
   :data:`RESTART_EXIT_CODE`; systemd (``Restart=always``) starts it again on
   the new configuration;
4. **confirm or roll back**: the restarted daemon must reach central —
   authenticated contact, as :meth:`gateway.daemon.Daemon.contact` reports it —
   within the change's confirmation window (``confirm_within_s`` in the
   command body, default :data:`DEFAULT_CONFIRM_MS`), counted in running time
   on the new file, so a power cut does not eat it. Otherwise, or if the
   daemon is started :data:`MAX_UNCONFIRMED_STARTS` times on the new file
   without reaching central, ``<file>.previous`` is put back in force, the
   rollback audited and reported, and the daemon restarts on it. The state
   lives in the database, so it survives restarts. A file that someone else
   replaced meanwhile (a technician, a provisioning bundle) is never rolled
   back: the confirmation is marked ``superseded``.

While a change waits for its confirmation, ``<file>.previous`` keeps the last
file that was not an unconfirmed remote change, so a second change sent before
the first was confirmed rolls back to the configuration that worked.

**What the operations role may change.** Operations keys keep the gateway on
the air; they must not change what is billed, nor who the gateway trusts or
talks to securely. A patch may set only :data:`gateway.commands.bodies.PATCHABLE`. A roster replaces
the ``[[meter]]`` list, but a meter that bills to an account stays, with its
account and everything that says which meter and which energy is billed; only
its relay settings (:data:`ROSTER_OPERATIONAL_KEYS`) may change, and no meter
can be given an account. After loading, :func:`protected_view` of the
candidate must equal that of the file in force, whatever the command said:
accounts, tariffs (their files and the time zone that places their periods),
billed meters, buses and register profiles, storage, security, broker
credentials and TLS, and the uplink's sealing key
(``uplink.headend_public_key``) change only through signed provisioning
bundles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiosqlite
import tomli_w

from firmware_bridge.durable import fsync_dir, write_atomic
from firmware_bridge.events import event
from gateway.billing.cutoff import Contact
from gateway.commands.bodies import (
    CommandRefused,
    ConfigChange,
    ConfigPatch,
    MeterRoster,
    parse_config_change,
)
from gateway.commands.handler import audit_and_report
from gateway.config import Config, ConfigError, check_config, load_config
from store_forward.schema import Schema, Step

log = logging.getLogger(__name__)

RESTART_EXIT_CODE = 75  # EX_TEMPFAIL: "run me again"; systemd restarts the unit

# What a roster may change on a meter that bills to an account.
ROSTER_OPERATIONAL_KEYS = frozenset({"relay", "password", "operator"})

DEFAULT_CONFIRM_MS = 15 * 60_000
MAX_UNCONFIRMED_STARTS = 5

STAGE_TABLE = """
CREATE TABLE IF NOT EXISTS cmd_config_stage (
    command_id  TEXT PRIMARY KEY,
    change      TEXT NOT NULL,
    staged_path TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('staged', 'applied', 'abandoned')),
    accepted_ms INTEGER NOT NULL,
    applied_ms  INTEGER
)
"""
# One row per remote change: its confirmation window, then whether the gateway
# reached central on it (confirmed) or it was rolled back.
CONFIRM_TABLE = """
CREATE TABLE IF NOT EXISTS cmd_config_confirm (
    command_id    TEXT PRIMARY KEY,
    window_ms     INTEGER NOT NULL CHECK (window_ms > 0),
    state         TEXT NOT NULL CHECK (state IN ('staged', 'pending', 'confirmed',
                      'rolling_back', 'rolled_back', 'superseded', 'failed')),
    applied_sha   BLOB,
    previous_sha  BLOB,
    applied_ms    INTEGER,
    waited_ms     INTEGER NOT NULL DEFAULT 0,
    starts        INTEGER NOT NULL DEFAULT 0,
    done_ms       INTEGER,
    note          TEXT
) STRICT
"""
# Declared to the gateway database's schema registry (gateway.database).
SCHEMA = Schema(
    "remote_config",
    Step(4, "staged configuration changes and their confirmation", (STAGE_TABLE, CONFIRM_TABLE)),
)

def _mono_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def _sha(path: Path) -> bytes | None:
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except FileNotFoundError:
        return None


def _billed_meters(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    meters = doc.get("meter", [])
    return {
        str(m.get("id")): m
        for m in (meters if isinstance(meters, list) else [])
        if isinstance(m, dict) and m.get("account") is not None
    }


def _check_roster(doc: Mapping[str, Any], meters: list[dict[str, Any]]) -> None:
    """A roster keeps every billed meter as it bills and gives no meter an account."""
    ids = [str(m.get("id")) for m in meters]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise CommandRefused("duplicate_meter", f"meter.roster names {dup} more than once")
    billed = _billed_meters(doc)
    new = {str(m.get("id")): m for m in meters}
    for mid, old in sorted(billed.items()):
        if mid not in new:
            raise CommandRefused(
                "billing_change",
                f"meter {mid} bills to account {old['account']!r}: a roster cannot drop it "
                "(billing changes come in a signed provisioning bundle)",
            )
        m = new[mid]
        keys = (set(old) | set(m)) - ROSTER_OPERATIONAL_KEYS
        changed = sorted(k for k in keys if old.get(k) != m.get(k))
        if changed:
            raise CommandRefused(
                "billing_change",
                f"meter {mid} bills to account {old['account']!r}: {', '.join(changed)} "
                f"cannot change remotely (only {', '.join(sorted(ROSTER_OPERATIONAL_KEYS))})",
            )
    for mid, m in sorted(new.items()):
        if mid not in billed and m.get("account") is not None:
            raise CommandRefused(
                "billing_change",
                f"meter {mid}: a roster cannot make a meter bill to an account "
                "(billing changes come in a signed provisioning bundle)",
            )


def apply_change(doc: Mapping[str, Any], change: ConfigChange, body: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration document after ``change`` (pure); raises :class:`CommandRefused`."""
    return apply_parsed(doc, parse_config_change(change, body))


def apply_parsed(doc: Mapping[str, Any], change: ConfigPatch | MeterRoster) -> dict[str, Any]:
    """The configuration document after a parsed change (pure); raises :class:`CommandRefused`."""
    new: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in doc.items()}
    if isinstance(change, ConfigPatch):
        for table, key, value in change.values:
            section = new.setdefault(table, {})
            if not isinstance(section, dict):
                raise CommandRefused("malformed", f"{table}: is not a table in the configuration")
            section[key] = value
        return new
    meters = [dict(m) for m in change.meters]
    _check_roster(doc, meters)
    new["meter"] = meters
    return new


def protected_view(cfg: Config) -> dict[str, Any]:
    """Everything in a loaded configuration that the operations role must not change."""
    billed = sorted(
        (
            dataclasses.replace(m, relay=None, password=None, operator=None)
            for m in cfg.meters
            if m.account is not None
        ),
        key=lambda m: m.id,
    )
    br = cfg.broker
    return {
        "gateway.id": cfg.gateway.id,
        "gateway.timezone": cfg.gateway.timezone,
        "accounts and their tariffs": cfg.accounts,
        "billed meters": tuple(billed),
        "buses": cfg.buses,
        "profiles": cfg.profiles,
        "storage": cfg.storage,
        "security": cfg.security,
        "broker TLS and credentials": (
            br.tls, br.ca_file, br.cert_file, br.key_file, br.username, br.password
        ),
        "uplink.headend_public_key": cfg.uplink.headend_public_key,
    }


def protected_changes(old: Config, new: Config) -> list[str]:
    a, b = protected_view(old), protected_view(new)
    return [k for k in a if a[k] != b[k]]


class RemoteConfig:
    """The daemon's :class:`gateway.commands.handler.ConfigPort`: validate, stage, apply,
    restart, then confirm the change by contact with central or roll it back.

    ``contact`` is the daemon's view of authenticated contact with central
    (:meth:`gateway.daemon.Daemon.contact`): a change is confirmed by contact
    at or after ``Contact.started_ms`` of a run that loaded it. ``mono_ms`` is
    the monotonic clock the confirmation window is counted on.
    """

    def __init__(
        self,
        config_file: Path,
        outbox: Any,
        clock_ms: Callable[[], int],
        request_restart: Callable[[str], None],
        *,
        contact: Callable[[], Contact] | None = None,
        confirm_window_ms: int = DEFAULT_CONFIRM_MS,
        mono_ms: Callable[[], int] = _mono_ms,
        max_unconfirmed_starts: int = MAX_UNCONFIRMED_STARTS,
    ) -> None:
        self.file = config_file
        self.previous = config_file.with_name(config_file.name + ".previous")
        self.outbox = outbox
        self.clock_ms = clock_ms
        self.request_restart = request_restart
        self.contact = contact
        self.confirm_window_ms = confirm_window_ms
        self.mono_ms = mono_ms
        self.max_unconfirmed_starts = max_unconfirmed_starts
        # The file this run of the daemon loaded (read when the daemon starts).
        self.loaded_sha = _sha(config_file)
        self._last_mono = mono_ms()

    def _staged_path(self, command_id: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in command_id)[:80]
        return self.file.with_name(f".{self.file.name}.{safe}.staged")

    # -- the command ---------------------------------------------------------

    async def stage_in(
        self,
        db: aiosqlite.Connection,
        change: ConfigChange,
        body: Mapping[str, Any],
        *,
        command_id: str,
        now_ms: int,
    ) -> dict[str, Any]:
        async with db.execute("SELECT command_id FROM cmd_config_stage WHERE state = 'staged'") as cur:
            if await cur.fetchone() is not None:
                # apply() runs right after each commit, so this is a crash not yet recovered
                raise CommandRefused("busy", "another configuration change is waiting to be applied")
        parsed = parse_config_change(change, body)
        window_ms = self.confirm_window_ms if parsed.confirm_ms is None else parsed.confirm_ms
        report = check_config(self.file)
        if report.config is None:
            raise CommandRefused(
                "config_unreadable",
                f"{self.file}: current configuration unreadable: {'; '.join(report.problems)}",
            )
        doc, current = report.where.raw, report.config
        new = apply_parsed(doc, parsed)
        try:
            text = tomli_w.dumps(new)
        except (TypeError, ValueError) as exc:  # e.g. a null, which TOML cannot hold
            raise CommandRefused("malformed", f"{change}: not expressible in TOML: {exc}") from exc
        staged = self._staged_path(command_id)
        try:
            write_atomic(staged, text.encode(), mode=0o640)
        except OSError as exc:  # e.g. a read-only configuration directory
            raise CommandRefused(
                "config_unwritable", f"{self.file.parent}: cannot stage a new configuration: {exc}"
            ) from exc
        try:
            cfg = load_config(staged)
        except ConfigError as exc:
            staged.unlink(missing_ok=True)
            problems = [p.replace(str(staged), self.file.name) for p in exc.problems]
            raise CommandRefused("invalid_config", "; ".join(problems)) from exc
        changed = protected_changes(current, cfg)
        if changed:  # the rules above should have refused it already; this is the invariant
            staged.unlink(missing_ok=True)
            raise CommandRefused(
                "billing_change" if "billed meters" in changed else "not_patchable",
                f"{', '.join(changed)} cannot change by an operations command",
            )
        await db.execute(
            "INSERT INTO cmd_config_stage (command_id, change, staged_path, state, accepted_ms)"
            " VALUES (?, ?, ?, 'staged', ?)",
            (command_id, change.value, str(staged), now_ms),
        )
        await db.execute(
            "INSERT INTO cmd_config_confirm (command_id, window_ms, state) VALUES (?, ?, 'staged')"
            " ON CONFLICT (command_id) DO UPDATE SET window_ms = excluded.window_ms, state = 'staged'",
            (command_id, window_ms),
        )
        effect: dict[str, Any] = {
            "change": change.value,
            "applies": "after a restart of the gateway",
            "confirm_within_s": window_ms // 1000,
        }
        if change is ConfigChange.CONFIG_PATCH:
            effect["set"] = sorted(body["set"])
        else:
            effect["meters"] = [str(m.get("id")) for m in body["meters"]]
        return effect

    async def after_commit(self) -> str | None:
        """Put a committed staged change in force and ask for a restart (idempotent;
        also run at start, to finish what a crash interrupted).

        Returns the command id applied, or None. Staged files of rolled-back
        commands (no row) are removed.
        """
        outbox = self.outbox
        async with outbox.transaction() as db:
            async with db.execute(
                "SELECT command_id, staged_path FROM cmd_config_stage WHERE state = 'staged'"
                " ORDER BY accepted_ms"
            ) as cur:
                rows = [(str(r[0]), Path(r[1])) for r in await cur.fetchall()]
        known = {p for _, p in rows}
        for orphan in self.file.parent.glob(f".{self.file.name}.*.staged"):
            if orphan not in known:
                orphan.unlink(missing_ok=True)
        renamed = None
        for command_id, staged in rows:
            if staged.exists():
                current = self.file.read_bytes()
                if not await self._unconfirmed(hashlib.sha256(current).digest()):
                    write_atomic(self.previous, current, mode=0o640)
                # else: the file in force is itself waiting for confirmation; .previous
                # keeps the configuration before it, the one to go back to
                os.replace(staged, self.file)
                fsync_dir(self.file.parent)
                renamed = command_id
                log.warning("configuration change %s is in force in %s", command_id, self.file)
            # else: renamed before a crash, so this start already loaded it
            now = self.clock_ms()
            async with outbox.transaction() as db:
                await db.execute(
                    "UPDATE cmd_config_stage SET state = 'applied', applied_ms = ? WHERE command_id = ?",
                    (now, command_id),
                )
                await db.execute(
                    "UPDATE cmd_config_confirm SET state = 'superseded', done_ms = ?,"
                    " note = ? WHERE state = 'pending' AND command_id != ?",
                    (now, f"replaced by configuration change {command_id}", command_id),
                )
                await db.execute(
                    "INSERT INTO cmd_config_confirm (command_id, window_ms, state, applied_sha,"
                    " previous_sha, applied_ms) VALUES (?, ?, 'pending', ?, ?, ?)"
                    " ON CONFLICT (command_id) DO UPDATE SET state = 'pending',"
                    " applied_sha = excluded.applied_sha, previous_sha = excluded.previous_sha,"
                    " applied_ms = excluded.applied_ms, waited_ms = 0, starts = 0",
                    (command_id, self.confirm_window_ms, _sha(self.file), _sha(self.previous), now),
                )
        if renamed is not None:
            self.request_restart(f"configuration change {renamed}")
        return renamed

    async def _unconfirmed(self, sha: bytes) -> bool:
        """Is the file with digest ``sha`` a remote change still waiting for confirmation?"""
        async with self.outbox.transaction() as db, db.execute(
            "SELECT 1 FROM cmd_config_confirm WHERE state = 'pending' AND applied_sha = ?", (sha,)
        ) as cur:
            return await cur.fetchone() is not None

    # -- confirmation and rollback --------------------------------------------

    async def _pending(self) -> dict[str, Any] | None:
        async with self.outbox.transaction() as db:
            async with db.execute(
                "SELECT command_id, window_ms, state, applied_sha, previous_sha, waited_ms, starts"
                " FROM cmd_config_confirm WHERE state IN ('pending', 'rolling_back')"
                " ORDER BY applied_ms DESC LIMIT 1"
            ) as cur:
                r = await cur.fetchone()
        if r is None:
            return None
        keys = ("command_id", "window_ms", "state", "applied_sha", "previous_sha", "waited_ms", "starts")
        return dict(zip(keys, r, strict=True))

    async def start(self) -> None:
        """At daemon start, before anything that could fail on a bad configuration:
        finish a rollback a crash interrupted, and roll back a change the daemon
        keeps restarting on without reaching central."""
        row = await self._pending()
        if row is None:
            return
        if row["state"] == "rolling_back":
            await self._finish_rollback(row)
            return
        if row["applied_sha"] != self.loaded_sha:
            return  # this run did not load the change (it is the run that applied it)
        starts = int(row["starts"]) + 1
        async with self.outbox.transaction() as db:
            await db.execute(
                "UPDATE cmd_config_confirm SET starts = ? WHERE command_id = ?",
                (starts, row["command_id"]),
            )
        if starts > self.max_unconfirmed_starts:
            await self._roll_back(
                row, f"started {starts} times on it without reaching central"
            )

    async def check(self) -> str | None:
        """Confirm the change in force once central was reached on it; roll it back
        when its window ran out without. Run by the daemon's maintenance timer.

        Returns the new state of the change looked at (``confirmed``,
        ``rolled_back``, ``superseded``, ``failed``), or None when nothing changed.
        """
        now_mono = self.mono_ms()
        elapsed, self._last_mono = max(0, now_mono - self._last_mono), now_mono
        row = await self._pending()
        if row is None:
            return None
        if row["state"] == "rolling_back":
            return await self._finish_rollback(row)
        in_force = _sha(self.file)
        if in_force != row["applied_sha"]:
            await self._close(
                row,
                "superseded",
                "config.superseded",
                "the configuration file was replaced by other means (technician or bundle); "
                "it is not rolled back",
            )
            return "superseded"
        if self.loaded_sha != row["applied_sha"]:
            return None  # in force on disk, not yet loaded: the restart is under way
        if self._reached_central():
            await self._close(row, "confirmed", "config.confirmed", "central reached on it")
            return "confirmed"
        waited = int(row["waited_ms"]) + elapsed
        async with self.outbox.transaction() as db:
            await db.execute(
                "UPDATE cmd_config_confirm SET waited_ms = ? WHERE command_id = ?",
                (waited, row["command_id"]),
            )
        if waited >= int(row["window_ms"]):
            return await self._roll_back(
                {**row, "waited_ms": waited},
                f"central not reached within {int(row['window_ms']) // 1000} s of running on it",
            )
        return None

    def _reached_central(self) -> bool:
        if self.contact is None:
            return False
        c = self.contact()
        return (
            c.last_contact_ms is not None
            and c.started_ms is not None
            and c.last_contact_ms >= c.started_ms
        )

    async def _close(self, row: Mapping[str, Any], state: str, action: str, note: str) -> None:
        now = self.clock_ms()
        details = {"id": row["command_id"], "state": state, "note": note}
        async with self.outbox.transaction() as db:
            await db.execute(
                "UPDATE cmd_config_confirm SET state = ?, done_ms = ?, note = ? WHERE command_id = ?",
                (state, now, note, row["command_id"]),
            )
            await audit_and_report(
                db,
                self.outbox,
                actor="gateway",
                action=action,
                details=details,
                event=event(action.replace(".", "_"), details),
                time_ms=now,
            )
        log.warning("configuration change %s: %s (%s)", row["command_id"], state, note)

    async def _roll_back(self, row: Mapping[str, Any], why: str) -> str:
        """Put ``<file>.previous`` back in force and restart (two steps: the decision
        is committed first, so a crash in between is finished at the next start)."""
        if not self._previous_intact(row):
            await self._close(
                row,
                "failed",
                "config.rollback_failed",
                f"{why}; but {self.previous.name} is missing or not the file before the "
                "change, so nothing was rolled back",
            )
            return "failed"
        now = self.clock_ms()
        details = {
            "id": row["command_id"],
            "reason": why,
            "waited_ms": int(row["waited_ms"]),
            "window_ms": int(row["window_ms"]),
            "starts": int(row["starts"]),
        }
        async with self.outbox.transaction() as db:
            await db.execute(
                "UPDATE cmd_config_confirm SET state = 'rolling_back', done_ms = ?, note = ?"
                " WHERE command_id = ?",
                (now, why, row["command_id"]),
            )
            await audit_and_report(
                db,
                self.outbox,
                actor="gateway",
                action="config.rolled_back",
                details=details,
                event=event("config_rolled_back", details),
                time_ms=now,
            )
        log.error("configuration change %s rolled back: %s", row["command_id"], why)
        return await self._finish_rollback(row)

    def _previous_intact(self, row: Mapping[str, Any]) -> bool:
        return row["previous_sha"] is not None and _sha(self.previous) == row["previous_sha"]

    async def _finish_rollback(self, row: Mapping[str, Any]) -> str:
        if _sha(self.file) == row["applied_sha"]:
            if not self._previous_intact(row):
                await self._close(
                    row,
                    "failed",
                    "config.rollback_failed",
                    f"{self.previous.name} changed or vanished during the rollback; "
                    "the change stays in force",
                )
                return "failed"
            write_atomic(self.file, self.previous.read_bytes(), mode=0o640)
        async with self.outbox.transaction() as db:
            await db.execute(
                "UPDATE cmd_config_confirm SET state = 'rolled_back' WHERE command_id = ?",
                (row["command_id"],),
            )
        if _sha(self.file) != self.loaded_sha:
            self.request_restart(f"configuration change {row['command_id']} rolled back")
        return "rolled_back"

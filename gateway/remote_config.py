"""Configuration changes from central: ``config.patch`` and ``meter.roster``.

A signed command (operations role, verified by :mod:`gateway.commands`)
changes the gateway's TOML configuration file. The change is checked the way
a technician's file is: the candidate is written beside the configuration (so
relative paths resolve alike) and loaded with :func:`gateway.config.load_config`;
any problem refuses the command with the loader's messages, and nothing
changes. Then, in three steps that survive a power cut at any point:

1. **stage** (inside the command's transaction): the candidate file is
   written and fsynced, and a ``cmd_config_stage`` row records it;
2. **apply** (after the commit): the current file is kept as
   ``<file>.previous`` and the candidate renamed over it (atomic), the row
   marked applied; a crash between commit and rename is finished at the next
   start;
3. **restart**: the daemon stops cleanly and exits with
   :data:`RESTART_EXIT_CODE`; systemd (``Restart=always``) starts it again on
   the new configuration.

What a patch may touch is limited (:data:`PATCHABLE`): the gateway's
identity, its storage and its security settings never change remotely — a
stolen operations key must not be able to re-point the trust file or the
database. A roster replaces the ``[[meter]]`` list as a whole.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiosqlite
import tomli_w

from gateway.commands import CommandRefused, ConfigChange
from gateway.config import ConfigError, load_config
from provisioning.keys import fsync_dir, write_atomic

log = logging.getLogger(__name__)

RESTART_EXIT_CODE = 75  # EX_TEMPFAIL: "run me again"; systemd restarts the unit

# table -> keys a config.patch may set (None: any key of the table)
PATCHABLE: Mapping[str, frozenset[str] | None] = {
    "gateway": frozenset({"site", "timezone", "poll_interval_s"}),
    "uplink": None,
    "broker": frozenset({"host", "port", "keepalive_s", "topic_prefix"}),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS cmd_config_stage (
    command_id  TEXT PRIMARY KEY,
    change      TEXT NOT NULL,
    staged_path TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('staged', 'applied', 'abandoned')),
    accepted_ms INTEGER NOT NULL,
    applied_ms  INTEGER
)
"""

_SCALARS = (str, int, float, bool)


def apply_change(doc: Mapping[str, Any], change: ConfigChange, body: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration document after ``change`` (pure); raises :class:`CommandRefused`."""
    new: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in doc.items()}
    if change is ConfigChange.CONFIG_PATCH:
        values = body.get("set")
        if not isinstance(values, dict) or not values:
            raise CommandRefused("malformed", 'config.patch needs "set": {"table.key": value, ...}')
        for path, value in values.items():
            table, dot, key = str(path).partition(".")
            if not dot or not key or "." in key:
                raise CommandRefused("malformed", f"{path!r}: expected TABLE.KEY")
            allowed = PATCHABLE.get(table, frozenset())
            if table not in PATCHABLE or (allowed is not None and key not in allowed):
                raise CommandRefused("not_patchable", f"{path}: not changeable remotely")
            if not isinstance(value, _SCALARS):
                raise CommandRefused("malformed", f"{path}: value must be a string, number or boolean")
            section = new.setdefault(table, {})
            if not isinstance(section, dict):
                raise CommandRefused("malformed", f"{table}: is not a table in the configuration")
            section[key] = value
        return new
    if change is ConfigChange.METER_ROSTER:
        meters = body.get("meters")
        if not isinstance(meters, list) or not all(isinstance(m, dict) for m in meters):
            raise CommandRefused("malformed", 'meter.roster needs "meters": [ {meter table}, ... ]')
        new["meter"] = [dict(m) for m in meters]
        return new
    raise CommandRefused("not_accepted", f"{change} is not a configuration change")


class RemoteConfig:
    """The daemon's :class:`gateway.commands.ConfigPort`: validate, stage, apply, restart."""

    def __init__(
        self,
        config_file: Path,
        outbox: Any,
        clock_ms: Callable[[], int],
        request_restart: Callable[[str], None],
    ) -> None:
        self.file = config_file
        self.outbox = outbox
        self.clock_ms = clock_ms
        self.request_restart = request_restart

    def _staged_path(self, command_id: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in command_id)[:80]
        return self.file.with_name(f".{self.file.name}.{safe}.staged")

    async def stage_in(
        self,
        db: aiosqlite.Connection,
        change: ConfigChange,
        body: Mapping[str, Any],
        *,
        command_id: str,
        now_ms: int,
    ) -> dict[str, Any]:
        await db.execute(SCHEMA)
        async with db.execute("SELECT command_id FROM cmd_config_stage WHERE state = 'staged'") as cur:
            if await cur.fetchone() is not None:
                # apply() runs right after each commit, so this is a crash not yet recovered
                raise CommandRefused("busy", "another configuration change is waiting to be applied")
        try:
            doc = tomllib.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise CommandRefused("config_unreadable", f"{self.file}: current configuration unreadable: {exc}") from exc
        new = apply_change(doc, change, body)
        staged = self._staged_path(command_id)
        try:
            write_atomic(staged, tomli_w.dumps(new).encode(), mode=0o640)
        except OSError as exc:  # e.g. a read-only configuration directory
            raise CommandRefused("config_unwritable", f"{self.file.parent}: cannot stage a new configuration: {exc}") from exc
        try:
            cfg = load_config(staged)
        except ConfigError as exc:
            staged.unlink(missing_ok=True)
            problems = [p.replace(str(staged), self.file.name) for p in exc.problems]
            raise CommandRefused("invalid_config", "; ".join(problems)) from exc
        if cfg.gateway.id != doc.get("gateway", {}).get("id"):  # PATCHABLE keeps it; belt and braces
            staged.unlink(missing_ok=True)
            raise CommandRefused("not_patchable", "gateway.id cannot change")
        await db.execute(
            "INSERT INTO cmd_config_stage (command_id, change, staged_path, state, accepted_ms)"
            " VALUES (?, ?, ?, 'staged', ?)",
            (command_id, change.value, str(staged), now_ms),
        )
        effect: dict[str, Any] = {"change": change.value, "applies": "after a restart of the gateway"}
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
            await db.execute(SCHEMA)
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
                previous = self.file.with_name(self.file.name + ".previous")
                write_atomic(previous, self.file.read_bytes(), mode=0o640)
                os.replace(staged, self.file)
                fsync_dir(self.file.parent)
                renamed = command_id
                log.warning("configuration change %s is in force in %s", command_id, self.file)
            # else: renamed before a crash, so this start already loaded it
            async with outbox.transaction() as db:
                await db.execute(
                    "UPDATE cmd_config_stage SET state = 'applied', applied_ms = ? WHERE command_id = ?",
                    (self.clock_ms(), command_id),
                )
        if renamed is not None:
            self.request_restart(f"configuration change {renamed}")
        return renamed

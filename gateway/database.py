"""The gateway's database: every table in it, in one schema history.

One SQLite file holds the outbox and the state of every component of the
gateway (:mod:`store_forward.database` owns it). Each module declares its own
tables as numbered steps (:class:`store_forward.schema.Schema`); :data:`SCHEMA`
puts them together, and opening the database with it (:func:`open_database`)
brings any database to the newest version, in one transaction, or refuses one
written by a newer release.

The history (``PRAGMA user_version``):

====  ======================================================================
   2  the sealed outbox: settings and counters, nonce epochs, records,
      batches, damaged records, meter status (version 1, the outbox before
      records were sealed, cannot be migrated)
   3  batches numbered in epochs (``batches.epoch`` where a database from
      before batch epochs lacks it)
   4  the tables every other module used to create for itself when it first
      needed them: ledger, security, audit, trusted time, commands, remote
      configuration, technician imports, meter health, revenue protection
      (a database written before the registry holds those that were used;
      the rest are created)
   5  ledger retention: the fold base per account, the acknowledgement marks
      and watermarks, an index of snapshot entries (an older database
      migrates with no fold base: its ledgers fold from zero, as before)
   6  the last trusted time used in the time floor's row
      (``sec_time_floor.seen_ms``: one page written per save instead of two;
      ``sec_time_seen`` keeps its last value and is no longer written)
   7  the damaged billing records ledger retention has accounted for
      (``billing_damaged_seen``: each kept the entries of its moment for
      good and no longer holds up pruning)
====  ======================================================================

A change to a table is a new step, with the next version, in the module that
owns the table; a released step is never edited.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway import meter_health, remote_config, risk_monitor, technician
from gateway.billing import ledger_store
from gateway.commands import handler as commands
from gateway.security import audit, envelope, trusted_time
from store_forward import database, outbox
from store_forward.outbox import Outbox
from store_forward.schema import SchemaRegistry

SCHEMA = SchemaRegistry(
    [
        database.SCHEMA,
        outbox.SCHEMA,
        ledger_store.SCHEMA,
        envelope.SCHEMA,
        audit.SCHEMA,
        trusted_time.SCHEMA,
        commands.SCHEMA,
        remote_config.SCHEMA,
        technician.SCHEMA,
        meter_health.SCHEMA,
        risk_monitor.SCHEMA,
    ],
    oldest=2,
    marker="outbox",
)


async def open_database(path: str | Path, **kwargs: Any) -> Outbox:
    """The gateway's database at ``path``, migrated to :data:`SCHEMA` (the keyword
    arguments are :meth:`store_forward.outbox.Outbox.open`'s)."""
    return await Outbox.open(path, schema=SCHEMA, **kwargs)

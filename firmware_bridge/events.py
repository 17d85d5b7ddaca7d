"""The event catalogue: every event a gateway sends central, its fields and its severity.

An event is an outbox record of kind ``event`` (record class 0, sent before
billing data and telemetry; docs/protocol.md, "Events") whose body is a JSON
object with ``type`` naming it. Every part of the product that reports
something to central builds the body with :func:`event`, which knows only the
names in :data:`CATALOGUE` and refuses a body whose fields are not the ones
listed (a programming error, found by the tests that run the emitter).

Each entry says:

* ``fields`` — always in the body; ``optional`` — there when they apply;
* ``severity`` — ``info`` (a normal change), ``warning`` (something an
  operator should look at) or ``critical`` (money, supply or stored data at
  risk: look now). The storage events carry it in their body too
  (``severity``), as central has always received them.

Names are stable (central keys on them). Older names are written with ``_``
(``command_result``, ``storage_fault``); new names take the dotted
``area.what`` form (``meter.offline``, ``relay.refused``).

docs/protocol.md lists the catalogue as a table; tests/test_events.py checks
that the table and this module agree and that no product module writes an
event body of its own. The module imports nothing of the project, so every
layer reports through it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from firmware_bridge.errors import EdgeGwError, ErrorKind


class Severity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class EventError(EdgeGwError, ValueError):
    """An event name the catalogue does not know, or fields it does not list."""

    kind = ErrorKind.INVALID


@dataclass(frozen=True)
class EventSpec:
    name: str
    severity: Severity
    fields: tuple[str, ...]
    optional: tuple[str, ...] = ()
    summary: str = ""
    severity_in_body: bool = False  # the body carries ``severity`` (the storage events)

    def body(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """``{"type": name, **fields}``, checked against the entry."""
        given = set(fields)
        if self.severity_in_body and "severity" not in given:
            fields = {"severity": self.severity.value, **fields}
            given.add("severity")
        required = set(self.fields)
        allowed = required | set(self.optional)
        if not required <= given or not given <= allowed:
            raise EventError(
                f"event {self.name}: missing {sorted(required - given)}, unknown {sorted(given - allowed)}"
            )
        return {"type": self.name, **fields}


def _specs(
    names: Iterable[str], severity: Severity, fields: tuple[str, ...], optional: tuple[str, ...] = (), summary: str = ""
) -> list[EventSpec]:
    return [EventSpec(n, severity, fields, optional, summary) for n in names]


_I, _W, _C = Severity.INFO, Severity.WARNING, Severity.CRITICAL
_CUTOFF = ("account", "time_ms", "from", "to", "state", "balance_micro", "balance", "reason")
_CUTOFF_ACTION = ("account", "meter", "time_ms", "reason")
_RATING = ("account", "meter", "from_reading", "to_reading", "detail")
_RISK = ("meter", "time_ms", "evidence")
_CLOCK = ("delta_ms", "detail", "at_ms")
_METER_STATE = ("meter", "bus", "from", "time_ms", "last_good_ms")
_CONFIG_CLOSED = ("id", "state", "note")

_ALL: list[EventSpec] = [
    # the gateway
    EventSpec("gateway_started", _I, ("gateway",), summary="the daemon started (once per run)"),
    EventSpec("gateway.health", _I,
              ("time_ms", "version", "boot_id", "uptime_s", "board_uptime_s", "load", "temperature_c", "disk",
               "meters"),
              ("outbox", "time", "link"),
              "the periodic health record: software, uptime, disk, load, temperature, outbox, time, link, meters"),
    # meters
    EventSpec("meter.online", _I, _METER_STATE, ("account", "away_ms"),
              "a meter answers (again: `away_ms` since it went offline)"),
    EventSpec("meter.offline", _W, (*_METER_STATE, "last_error", "consecutive_failures"), ("account",),
              "a meter stopped answering"),
    EventSpec("meter.quarantined", _W, (*_METER_STATE, "last_error", "consecutive_failures"), ("account",),
              "a meter failed so often that it is only re-probed"),
    EventSpec("meter.clock_fault", _W, ("meter", "time_ms", "cause", "detail", "raw"),
              summary="a meter's clock reads wrong (once per change of cause; the raw bytes as evidence)"),
    EventSpec("meter.register_reset", _W,
              ("account", "meter", "last_good", "first_after", "confirmed_by", "billing"),
              summary="a register went back without a declared exchange; the energy between is held"),
    EventSpec("meter.signal", _I, ("account", "meter", "signal", "reason", "ok", "detail"),
              summary="a meter alarm or power-protect command, acknowledged or not"),
    # relays
    EventSpec("relay.operation", _I, ("account", "meter", "action", "want_open", "reason", "ok", "detail"),
              ("final_open", "drives", "pending_customer"), "a relay was operated (or could not be)"),
    EventSpec("relay.alarm", _C,
              ("account", "meter", "action", "want_open", "reason", "ok", "detail", "final_open", "drives",
               "pending_customer"),
              summary="a relay is not verified in the wanted state after every re-drive"),
    EventSpec("relay.refused", _W, ("account", "meter", "action", "reason"),
              summary="a relay operation not carried out: the storage state does not permit it"),
    EventSpec("relay_intent_expired", _W, ("id", "meter", "op", "expires_ms"),
              summary="a commanded relay operation expired before it could be handed to its bus"),
    # prepaid billing and the cutoff policy
    *_specs(("cutoff.state_change", "cutoff.trip_pending", "cutoff.restore_pending"), _I, _CUTOFF,
            summary="the account's cutoff level changed, or a trip or restore waits (`state` says why)"),
    *_specs(("cutoff.action.trip", "cutoff.action.close", "cutoff.action.close_allowed",
             "cutoff.action.alarm_on", "cutoff.action.alarm_off"), _I, _CUTOFF_ACTION,
            summary="the cutoff policy decided a relay operation or a meter alarm"),
    EventSpec("billing.fixed_held", _W,
              ("account", "cause", "from_ms", "to_ms", "count", "amount_micro", "amount", "charges", "truncated"),
              summary="fixed charges held, not debited: their period started in time the gateway did not see"),
    *_specs(("rating.register_backwards", "rating.time_not_increasing", "rating.meter_mismatch",
             "rating.no_tariff"), _W, _RATING, summary="a reading pair could not be rated"),
    *_specs(("rating.gap", "rating.rate_registers_inconsistent"), _I, _RATING,
            summary="rated, but worth knowing (readings far apart; rate registers do not add up)"),
    *_specs(("risk.register_backwards", "risk.sudden_drop", "risk.zero_consumption",
             "risk.consumption_while_open", "risk.clock_drift", "risk.relay_mismatch"), _W, _RISK,
            summary="a revenue-protection check found something (with its evidence)"),
    # time
    EventSpec("time.central_time_sync", _I, _CLOCK, summary="central set the time"),
    *_specs(("time.clock_jump_backward", "time.clock_jump_forward", "time.clock_step_followed",
             "time.time_gap_at_start", "time.clock_behind_floor", "time.central_time_behind_floor",
             "time.time_floor_reset", "time.time_sources_disagree", "time.clock_events_suppressed"),
            _W, _CLOCK, summary="trusted time saw the clock jump, fall behind its floor, or its sources disagree"),
    # commands
    EventSpec("command_result", _I, ("outcome", "channel", "at_ms"),
              ("id", "reason", "code", "message", "command_type", "issuer", "effect", "error"),
              "a signed command applied, a duplicate, rejected (with reason and code) or failed"),
    EventSpec("command_rejections", _W, ("reason", "hour_ms", "count", "first_ms", "last_ms", "channels"),
              summary="how many commands of one reason an hour refused beyond the detailed ones"),
    EventSpec("config_confirmed", _I, _CONFIG_CLOSED,
              summary="a configuration change from central is confirmed by contact on it"),
    EventSpec("config_superseded", _I, _CONFIG_CLOSED,
              summary="a configuration change waiting for confirmation was replaced by other means"),
    EventSpec("config_rollback_failed", _C, _CONFIG_CLOSED,
              summary="a configuration change should be rolled back but the previous file is not intact"),
    EventSpec("config_rolled_back", _W, ("id", "reason", "waited_ms", "window_ms", "starts"),
              summary="a configuration change was rolled back: central not reached on it"),
    EventSpec("provisioning.audit", _I, ("action", "detail"),
              summary="the USB provisioning unit's audit record of a bundle attempt"),
    EventSpec("software.download_started", _I, ("version", "sha256", "chunks"),
              summary="an offered software bundle is being fetched (chunks still missing)"),
    EventSpec("software.downloaded", _I, ("version", "sha256", "size", "chunks", "chunks_fetched"),
              summary="an offered software bundle is complete and handed to the updater"),
    EventSpec("software.download_failed", _W, ("version", "sha256", "reason"),
              summary="a fetched software bundle does not hash to the offer's digest; it is fetched again"),
    EventSpec("audit_checkpoint", _I, ("gateway", "seq", "hash", "time_ms", "public_key", "signature"),
              summary="the audit log's head, signed by the gateway identity key"),
    # storage
    EventSpec("storage_fault", _C, ("severity", "kind", "reason", "evidence", "generation", "salvaged", "detail"),
              summary="the database is damaged: kept as evidence, a new one took over", severity_in_body=True),
    EventSpec("storage_recovered", _C,
              ("severity", "evidence", "mode", "held_accounts", "accounts", "replay_fence_ms", "imported",
               "tables_damaged", "audit"),
              summary="the money state recovered from the evidence (`severity` critical while accounts are held,"
              " else warning)", severity_in_body=True),
    EventSpec("storage_full", _C, ("severity", "error", "at_ms"),
              summary="the disk is full: a transaction rolled back", severity_in_body=True),
    EventSpec("storage_full_readings_dropped", _C, ("severity", "readings", "detail"),
              summary="intermediate register readings given up while the disk was full", severity_in_body=True),
    EventSpec("storage_hard_floor", _C,
              ("severity", "billing_records_evicted", "telemetry_records_evicted", "telemetry_bytes_freed"),
              summary="below the storage hard floor: unsent billing records evicted", severity_in_body=True),
    EventSpec("records_damaged", _C, ("severity", "ids"),
              summary="stored records that no longer open (their ids)", severity_in_body=True),
]

CATALOGUE: Mapping[str, EventSpec] = MappingProxyType({s.name: s for s in _ALL})


def event(name: str, fields: Mapping[str, Any] | None = None, /, **more: Any) -> dict[str, Any]:
    """The body of event ``name`` with ``fields`` and ``more`` (keys as in the
    catalogue; ``fields`` for keys that are not Python names, such as ``from``)."""
    spec = CATALOGUE.get(name)
    if spec is None:
        raise EventError(f"event {name!r} is not in the catalogue (firmware_bridge/events.py)")
    return spec.body({**(fields or {}), **more})

"""The gateway's metrics, as a file for node_exporter's textfile collector.

The daemon listens on no socket (``SocketBindDeny=any`` in its unit): it
writes its metrics in the Prometheus text exposition format (version 0.0.4)
to a file, ``[metrics] textfile`` in the configuration, every
``[metrics] interval_s``, and node_exporter's textfile collector serves them
with the machine's own metrics. The file is replaced atomically (a temporary
file in the same directory, then ``rename``), so a scrape never sees half a
file; it is not fsynced (a power cut costs at most the last write, and
the next one follows within the interval; the SD card is spared). At a clean
stop a last file says ``edgegw_up 0``; after a crash the file's age
(node_exporter's ``node_textfile_mtime_seconds``) tells.

The format is written here (:func:`render`, pure) rather than by
prometheus-client: the gateway needs no registry, no HTTP server and no
further dependency for a few dozen lines of text, and the tests parse the
output with prometheus-client's own parser.

Three parts:

* :class:`GatewayMetrics` counts what happens, fed by the daemon's hooks:
  each committed poll cycle slice (reads per meter, relay states), relay
  operations asked for (cutoffs and restores the policy decided), command
  results;
* :func:`collect` samples the daemon's state (uplink, outbox, meter health,
  storage, trusted time) and returns every metric family;
* :class:`TextfileExporter` writes the file on a timer and once at stop.

The metric names and their meaning are listed in docs/operations.md,
"Metrics".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import platform
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from firmware_bridge.cause_log import CauseLog
from firmware_bridge.reading import Quantity
from gateway import __version__
from gateway.meter_health import State
from gateway.security.trusted_time import TimeQuality
from gateway.software_status import releases_root_of, software_status
from gateway.update_transfer import update_spool
from store_forward.storage_state import StorageMode
from store_forward.uplink import LinkState

if TYPE_CHECKING:
    from firmware_bridge.relay_ops import RelayIntent
    from gateway.daemon import Cycle, Daemon
    from gateway.security.envelope import CommandResult

log = logging.getLogger(__name__)

PREFIX = "edgegw_"
DEFAULT_INTERVAL_S = 30.0
# The part of a sample that waits on the database (outbox depth) is given up after
# this long: a busy writer must not hold the metrics back.
DB_TIMEOUT_S = 5.0

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
KINDS = ("counter", "gauge", "untyped")

# -- the text format (pure) -----------------------------------------------------


@dataclass(frozen=True)
class Family:
    """One metric: name (counters end in ``_total``), kind, help text, samples."""

    name: str
    kind: str
    help: str
    samples: Sequence[tuple[Mapping[str, str], float]] = ()


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers without a decimal point, ``+Inf``/``-Inf``/``NaN``."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**63:
        return str(int(value))
    return repr(float(value))


def render(families: Iterable[Family]) -> str:
    """The Prometheus text exposition format (0.0.4) of ``families``.

    Raises ValueError for a metric or label name the format does not allow, a
    kind other than counter/gauge/untyped, or a family given twice."""
    out: list[str] = []
    seen: set[str] = set()
    for f in families:
        if not _NAME.match(f.name):
            raise ValueError(f"invalid metric name {f.name!r}")
        if f.kind not in KINDS:
            raise ValueError(f"{f.name}: invalid kind {f.kind!r}")
        if f.name in seen:
            raise ValueError(f"metric {f.name} given twice")
        seen.add(f.name)
        out.append(f"# HELP {f.name} {_escape_help(f.help)}")
        out.append(f"# TYPE {f.name} {f.kind}")
        for labels, value in f.samples:
            for k in labels:
                if not _LABEL.match(k) or k.startswith("__"):
                    raise ValueError(f"{f.name}: invalid label name {k!r}")
            if labels:
                inner = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
                out.append(f"{f.name}{{{inner}}} {format_value(value)}")
            else:
                out.append(f"{f.name} {format_value(value)}")
    return "\n".join(out) + "\n"


def write_textfile(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (a temporary file beside it, then
    rename), readable by other users (node_exporter runs as its own user; the
    service's umask is 0077). Not fsynced: see the module's docstring."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- what the daemon counts -------------------------------------------------------


@dataclass
class GatewayMetrics:
    """Counters fed by the daemon as things happen (see the module docstring)."""

    cycles: Counter[str] = field(default_factory=Counter)  # bus
    reads: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # bus, meter, ok|failed
    relay_open: dict[str, bool] = field(default_factory=dict)  # meter -> last known
    relay_operations: Counter[tuple[str, str]] = field(default_factory=Counter)  # action, result
    cutoffs: int = 0  # trips the cutoff policy decided
    restores: int = 0  # closes (and close permissions) the cutoff policy decided
    commands: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # type, outcome, reason
    _failures_seen: dict[str, int] = field(default_factory=dict)  # the scheduler's total per meter

    def cycle_committed(self, cycle: Cycle) -> None:
        """A slice of a poll cycle, a cycle's end or relay events: just committed."""
        bus = cycle.bus
        if cycle.final and (cycle.statuses or not cycle.events):
            self.cycles[bus] += 1
        for r in cycle.readings:
            self.reads[(bus, r.meter_id, "ok")] += 1
            relay = r.get(Quantity.RELAY_OPEN)
            if relay is not None:
                self.relay_open[r.meter_id] = relay != 0
        for s in cycle.statuses:
            # The scheduler's running total restarts with the bus: a smaller value is new.
            before = self._failures_seen.get(s.meter_id, 0)
            new = s.total_failures - before if s.total_failures >= before else s.total_failures
            self._failures_seen[s.meter_id] = s.total_failures
            if new:
                self.reads[(bus, s.meter_id, "failed")] += new
        for meter, is_open in cycle.relay_states:
            self.relay_open[meter] = is_open
        for e in cycle.events:
            kind = e.get("type")
            if kind not in ("relay.operation", "relay.alarm"):
                continue
            result = "alarm" if kind == "relay.alarm" else "ok" if e.get("ok") else "failed"
            self.relay_operations[(str(e.get("action")), result)] += 1
            final = e.get("final_open")
            if isinstance(final, bool) and e.get("meter"):
                self.relay_open[str(e["meter"])] = final

    def relay_requested(self, intent: RelayIntent, *, refused: bool = False) -> None:
        """A relay operation was asked for (after its decision was committed)."""
        if refused:
            self.relay_operations[(intent.op.value, "refused")] += 1
        if intent.op.is_signal or intent.commanded:
            return
        if intent.open:
            self.cutoffs += 1
        else:
            self.restores += 1

    def command_result(self, result: CommandResult) -> None:
        env = result.envelope
        kind = env.type.value if env is not None else "unknown"
        reason = result.code or (result.reason.value if result.reason is not None else "")
        self.commands[(kind, result.outcome.value, reason)] += 1


# -- sampling the daemon ----------------------------------------------------------


def _counter(name: str, help: str, samples: Iterable[tuple[Mapping[str, str], float]]) -> Family:
    return Family(PREFIX + name, "counter", help, list(samples))


def _gauge(name: str, help: str, samples: Iterable[tuple[Mapping[str, str], float]]) -> Family:
    return Family(PREFIX + name, "gauge", help, list(samples))


def _one(value: float) -> list[tuple[Mapping[str, str], float]]:
    return [({}, value)]


async def collect(daemon: Daemon, m: GatewayMetrics, *, up: bool = True) -> list[Family]:
    """Every metric family of the gateway, now (``up``: False for the last file
    written at a clean stop)."""
    cfg = daemon.config
    now_ms = daemon.time_ms()
    fams: list[Family] = [
        _gauge("up", "1 while the daemon runs; 0 in the file written at a clean stop", _one(1 if up else 0)),
        _gauge(
            "start_time_seconds",
            "when the daemon started (Unix time, trusted clock)",
            _one(daemon.started_ms / 1000 if daemon.started_ms else time.time()),
        ),
        _gauge(
            "build_info",
            "the gateway's software version (value 1)",
            [({"gateway": cfg.gateway.id, "version": __version__, "python": platform.python_version()}, 1)],
        ),
        _counter(
            "poll_cycles_total",
            "poll cycles committed, per bus",
            [({"bus": b.name}, m.cycles[b.name]) for b in cfg.buses],
        ),
        _counter(
            "bus_failures_total",
            "times a bus failed and was opened again",
            [({"bus": b.name}, daemon.stats.bus_failures.get(b.name, 0)) for b in cfg.buses],
        ),
        _counter("readings_total", "meter readings committed", _one(daemon.stats.readings)),
        _counter(
            "meter_reads_total",
            "meter reads per meter: result ok (a reading committed) or failed (an attempt that failed)",
            [
                ({"bus": mt.bus, "meter": mt.id, "result": res}, m.reads[(mt.bus, mt.id, res)])
                for mt in cfg.meters
                for res in ("ok", "failed")
            ],
        ),
    ]
    states: Counter[str] = Counter()
    online = []
    for mt in cfg.meters:
        known = daemon.meter_states.get(mt.id)
        states[known.state.value if known is not None else "unknown"] += 1
        if known is not None:
            online.append(({"bus": mt.bus, "meter": mt.id}, 1 if known.state is State.ONLINE else 0))
    fams += [
        _gauge(
            "meters",
            "meters by health state: online, offline, quarantined (only re-probed), unknown (not yet read)",
            [({"state": s}, states[s]) for s in (*(x.value for x in State), "unknown")],
        ),
        _gauge("meter_online", "1 if the meter answers, 0 if offline or quarantined", online),
    ]
    fams += _uplink_families(daemon, now_ms)
    fams += await _outbox_families(daemon, now_ms)
    fams += [
        _counter(
            "commands_total",
            "signed commands handled, by type, outcome (applied, duplicate, rejected) and reason",
            [
                ({"type": t, "outcome": o, "reason": r}, n)
                for (t, o, r), n in sorted(m.commands.items())
            ],
        ),
        _counter(
            "commands_not_taken_total",
            "commands not taken while the storage was faulted (central sends them again)",
            _one(daemon.stats.commands_dropped),
        ),
        _counter("cutoffs_total", "supply cutoffs (relay trips) the cutoff policy decided", _one(m.cutoffs)),
        _counter(
            "restores_total",
            "supply restores (relay closes or close permissions) the cutoff policy decided",
            _one(m.restores),
        ),
        _counter(
            "relay_operations_total",
            "relay operations by action and result (ok, failed, alarm, refused by the storage state)",
            [({"action": a, "result": r}, n) for (a, r), n in sorted(m.relay_operations.items())],
        ),
        _gauge(
            "relay_open",
            "1 if the meter's supply relay is open (supply cut), 0 if closed; last known state",
            [({"meter": k}, 1 if v else 0) for k, v in sorted(m.relay_open.items())],
        ),
    ]
    fams += _time_families(daemon, now_ms)
    fams += software_families(
        await asyncio.to_thread(
            software_status,
            releases_root_of(Path(sys.prefix)) or NO_ROOT,
            update_spool(cfg.storage.path),
            __version__,
        )
    )
    return fams


NO_ROOT = Path("/nonexistent/edgegw-releases")  # a development install: no releases root
UPDATE_PHASES = ("idle", "switching", "trial", "committing", "rolling-back")


def software_families(sw: Mapping[str, Any]) -> list[Family]:
    """Updates and software downloads (:func:`gateway.software_status.software_status`):
    the update phase (under a releases root only), the last update's outcome, bundles
    that failed their trial, downloads in progress, bundles ready and held."""
    fams: list[Family] = []
    rel = sw["releases"]
    if rel["present"]:
        phase = str(rel.get("phase", "unknown"))
        phases = UPDATE_PHASES if phase in UPDATE_PHASES else (*UPDATE_PHASES, phase)
        fams.append(_gauge(
            "update_phase",
            "1 for the updater's phase now (idle; switching, trial, committing, rolling-back while an update runs)",
            [({"phase": ph}, 1 if ph == phase else 0) for ph in phases],
        ))  # fmt: skip
        last = rel.get("last")
        if last:
            labels = {"outcome": str(last.get("outcome")), "from": str(last.get("from")), "to": str(last.get("to"))}
            fams.append(_gauge("update_last", "the last update's outcome and versions (value 1)", [(labels, 1)]))
        fams.append(_gauge(
            "update_failed_bundles", "bundles that failed their trial (not tried again)", _one(rel.get("failed", 0))
        ))  # fmt: skip
    sp = sw["spool"]
    downloads = [d for d in sp["downloads"] if "problem" not in d]
    fams += [
        _gauge("software_downloads", "software bundles offered and being downloaded", _one(len(downloads))),
        _gauge(
            "software_download_bytes",
            "how far each download's part file reaches, against the bundle's size (the size label)",
            [({"version": d["version"], "size": str(d["size"])}, d["bytes_on_disk"]) for d in downloads],
        ),
        _gauge("software_bundles_ready", "downloaded bundles waiting for the updater", _one(sp["ready"])),
        _gauge("software_bundles_held", "bundles held below the version floor", _one(sp["held"])),
    ]
    return fams


def _uplink_families(daemon: Daemon, now_ms: int) -> list[Family]:
    up = daemon.uplink
    if up is None:
        return []
    s = up.stats
    fams = [
        _gauge("uplink_up", "1 while connected to the broker", _one(1 if s.state is LinkState.UP else 0)),
        _counter("uplink_connects_total", "connections to the broker made", _one(s.connects)),
        _counter(
            "uplink_connect_failures_total",
            "connection attempts that failed and connections lost",
            _one(s.connect_failures),
        ),
        _counter("uplink_batches_published_total", "batches published (QoS 1)", _one(s.published)),
        _counter(
            "uplink_batches_retransmitted_total",
            "batches published again (no ack in time, or after a reconnect)",
            _one(s.retransmits),
        ),
        _counter("uplink_batches_acked_total", "batches the headend acknowledged as stored", _one(s.acked)),
        _counter(
            "uplink_batches_rejected_total",
            "batches the headend answered rejected or conflict (kept, retried slowly)",
            _one(s.rejected),
        ),
        _counter("uplink_bytes_sent_total", "batch payload bytes published", _one(s.bytes_sent)),
        _counter(
            "uplink_acks_refused_total",
            "acks refused (not authenticated, malformed): nothing deleted",
            [({"cause": c}, n) for c, n in sorted(s.acks_refused.items())],
        ),
    ]
    if s.last_contact_ms is not None:
        fams.append(
            _gauge(
                "uplink_last_contact_timestamp_seconds",
                "last authenticated contact with central (a verified ack or signed command)",
                _one(s.last_contact_ms / 1000),
            )
        )
    return fams


async def _outbox_families(daemon: Daemon, now_ms: int) -> list[Family]:
    outbox = daemon.outbox
    if outbox is None:
        return []
    fams: list[Family] = []
    try:
        async with asyncio.timeout(DB_TIMEOUT_S):
            records, oldest_ms, batches = await outbox.depth()
    except Exception as exc:  # a timeout, a busy or faulted database: left out this time
        log.debug("metrics: outbox depth not read: %s", exc)
    else:
        fams += [
            _gauge("outbox_records", "records waiting in the outbox for central's ack", _one(records)),
            _gauge(
                "outbox_oldest_record_age_seconds",
                "age of the oldest record not yet acknowledged (0 when the outbox is empty)",
                _one(max(0.0, (now_ms - oldest_ms) / 1000) if oldest_ms is not None else 0),
            ),
            _gauge("outbox_batches_pending", "batches numbered and not yet acknowledged", _one(batches)),
        ]
    try:
        free = await outbox.free_bytes()
    except OSError as exc:
        log.debug("metrics: free space not read: %s", exc)
    else:
        fams.append(_gauge("storage_free_bytes", "free bytes on the database's filesystem", _one(free)))
    mode = outbox.storage.mode
    fams += [
        _gauge(
            "storage_state",
            "1 for the storage state in force: normal, fault (billing and relays stopped), recovering",
            [({"state": s.value}, 1 if s is mode else 0) for s in StorageMode],
        ),
        _gauge(
            "storage_waiting_for_space",
            "1 while the disk is full and work waits in memory",
            _one(1 if daemon.waiting_for_space else 0),
        ),
    ]
    return fams


def _time_families(daemon: Daemon, now_ms: int) -> list[Family]:
    clock = daemon.clock
    if clock is None:
        return []
    st = clock.state
    return [
        _gauge(
            "trusted_time_quality",
            "1 for the trusted clock's current source: central, system_synced, meter_majority,"
            " system_unsynced, floor",
            [({"quality": q.value}, 1 if q is st.quality else 0) for q in TimeQuality],
        ),
        _gauge(
            "trusted_time_offset_seconds",
            "trusted time minus the system clock",
            _one((now_ms - daemon.clock_ms()) / 1000),
        ),
        _gauge(
            "trusted_time_behind_floor",
            "1 while the system clock is behind the trusted floor",
            _one(1 if st.behind_floor else 0),
        ),
    ]


# -- the textfile ------------------------------------------------------------------


class TextfileExporter:
    """Writes the daemon's metrics to ``path`` every ``interval_s`` and at stop."""

    def __init__(
        self,
        daemon: Daemon,
        metrics: GatewayMetrics,
        path: Path,
        interval_s: float = DEFAULT_INTERVAL_S,
        *,
        writer: Callable[[Path, str], Any] = write_textfile,
    ) -> None:
        self.daemon = daemon
        self.metrics = metrics
        self.path = path
        self.interval_s = interval_s
        self.writer = writer
        self.writes = 0
        self._log = CauseLog(log, f"metrics file {path}", fields={"file": str(path)})

    async def write(self, *, up: bool = True) -> bool:
        """Write the file once; a failure is logged once per cause. True if written."""
        try:
            text = render(await collect(self.daemon, self.metrics, up=up))
            await asyncio.to_thread(self.writer, self.path, text)
        except (OSError, ValueError) as exc:
            self._log.failed(str(exc))
            return False
        self._log.ok("written again")
        self.writes += 1
        return True

    async def run(self) -> None:
        try:
            while True:
                await self.write()
                await asyncio.sleep(self.interval_s)
        finally:
            self._log.stopped()

"""The headend's ``/metrics``: the fleet as Prometheus sees it (prometheus-client).

``edgegw headend run --metrics HOST:PORT`` serves ``http://HOST:PORT/metrics``
from its own registry (no global state): what this headend process did since
it started (batches by outcome, batches refused by reason, records stored,
the broker connection), each gateway's presence as the broker holds it (the
retained ``{prefix}/{gw}/state`` messages, read by every headend, so every
headend knows every gateway), and the fleet view from the database
(:mod:`headend.fleet`: per gateway its last batch, how far behind central's
data is, its meters by state, cutoffs, restores and command results). The
database part is read every ``refresh_s`` in the headend's event loop, so a
scrape never waits on the database and never adds to its load.

With several headends on one database the fleet part is the same on each
(aggregate it with ``max``), the per-process part adds up (``sum``).

Metric names: docs/operations.md, "Metrics".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from firmware_bridge.cause_log import CauseLog
from headend.fleet import (
    COMMAND_OUTCOMES,
    COMMAND_PREFIX,
    CUTOFFS,
    METER_STATES,
    RELAY_ALARMS,
    RESTORES,
    FleetSnapshot,
)
from headend.store import HeadendStore
from store_forward.presence import Presence as StoredPresence

log = logging.getLogger(__name__)

REFRESH_S = 15.0
P = "edgegw_headend_"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("edge-gateway")
    except Exception:
        return "unknown"


@dataclass(frozen=True)
class Presence:
    online: bool
    since_ms: int


class HeadendMetrics:
    """The headend's metrics; also the ingest's observer (:class:`headend.ingest.Headend`)."""

    def __init__(self, *, clock_ms: Any = None) -> None:
        disable_created_metrics()  # no *_created series: counters read the same as the gateway's
        self.clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        r = self.registry
        Gauge(P + "build_info", "the headend's software version (value 1)", ["version"], registry=r).labels(
            _version()
        ).set(1)
        Gauge(P + "start_time_seconds", "when this headend process started (Unix time)", registry=r).set(
            time.time()
        )
        self.batches = Counter(
            P + "batches",
            "batches this process handled, by status: stored, duplicate, conflict, rejected",
            ["status"],
            registry=r,
        )
        self.refused = Counter(
            P + "batches_refused",
            "batches refused before storing (not acked; the gateway keeps them), by reason",
            ["reason"],
            registry=r,
        )
        self.records = Counter(P + "records_stored", "new records this process stored", registry=r)
        self.connected = Gauge(P + "broker_connected", "1 while subscribed at the broker", registry=r)
        self.connects = Counter(P + "broker_connects", "connections to the broker made", registry=r)
        self.connect_failures = Counter(
            P + "broker_connect_failures", "connection attempts that failed and connections lost", registry=r
        )
        self.fleet_refresh_failures = Counter(
            P + "fleet_refresh_failures", "reads of the fleet tables that failed", registry=r
        )
        for status in ("stored", "duplicate", "conflict", "rejected"):
            self.batches.labels(status)
        self.presence: dict[str, Presence] = {}
        self.versions: dict[str, str] = {}  # software version each gateway's presence names
        self.snapshot: FleetSnapshot | None = None
        self.snapshot_ms: int | None = None
        self._lock = threading.Lock()  # the scrape runs in the HTTP server's thread
        self.registry.register(_FleetCollector(self))
        self._refresh_log = CauseLog(log, "metrics: fleet tables")

    # -- the ingest's observer ----------------------------------------------------

    def on_connected(self, up: bool) -> None:
        self.connected.set(1 if up else 0)
        if up:
            self.connects.inc()

    def on_connect_failed(self) -> None:
        self.connect_failures.inc()

    def on_batch(self, status: str, records_new: int) -> None:
        self.batches.labels(status).inc()
        if records_new:
            self.records.inc(records_new)

    def on_refused(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def on_presence(self, gateway: str, p: StoredPresence) -> None:
        now = self.clock_ms()
        with self._lock:
            before = self.presence.get(gateway)
            if before is None or before.online != p.online:
                self.presence[gateway] = Presence(p.online, now)
            if p.version is not None:
                self.versions[gateway] = p.version

    # -- the fleet tables ---------------------------------------------------------

    async def refresh(self, store: HeadendStore) -> bool:
        try:
            snap = await store.fleet()
        except Exception as exc:
            self.fleet_refresh_failures.inc()
            self._refresh_log.failed(f"cannot read: {exc}")
            return False
        self._refresh_log.ok("read again")
        with self._lock:
            self.snapshot, self.snapshot_ms = snap, self.clock_ms()
        return True

    async def refresh_loop(self, store: HeadendStore, interval_s: float = REFRESH_S) -> None:
        while True:
            await self.refresh(store)
            await asyncio.sleep(interval_s)

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve ``/metrics`` on ``host:port`` (a thread); stop it with ``close()``."""
        server, thread = start_http_server(port, host, registry=self.registry)
        return MetricsServer(server, thread)

    def fleet_families(self) -> Iterator[Metric]:
        with self._lock:
            snap, snap_ms, presence = self.snapshot, self.snapshot_ms, dict(self.presence)
        now_s = self.clock_ms() / 1000
        gws = GaugeMetricFamily(
            P + "gateways", "gateways by presence: online, offline (retained state messages)", labels=["state"]
        )
        n_online = sum(p.online for p in presence.values())
        gws.add_metric(["online"], n_online)
        gws.add_metric(["offline"], len(presence) - n_online)
        yield gws
        up = GaugeMetricFamily(P + "gateway_online", "1 if the gateway's presence is online", labels=["gateway"])
        since = GaugeMetricFamily(
            P + "gateway_presence_since_timestamp_seconds",
            "when this headend saw the gateway's presence change (or first saw it)",
            labels=["gateway"],
        )
        info = GaugeMetricFamily(
            P + "gateway_info",
            "the software version the gateway's presence names (value 1)",
            labels=["gateway", "version"],
        )
        with self._lock:
            versions = dict(self.versions)
        for gw, p in sorted(presence.items()):
            up.add_metric([gw], 1 if p.online else 0)
            since.add_metric([gw], p.since_ms / 1000)
        for gw, v in sorted(versions.items()):
            info.add_metric([gw, v], 1)
        yield up
        yield since
        yield info
        if snap is None or snap_ms is None:
            return
        yield GaugeMetricFamily(
            P + "fleet_refresh_timestamp_seconds", "when the fleet tables were last read", value=snap_ms / 1000
        )
        last = GaugeMetricFamily(
            P + "gateway_last_batch_timestamp_seconds", "when the gateway's last new batch was stored", labels=["gateway"]
        )
        newest = GaugeMetricFamily(
            P + "gateway_newest_record_timestamp_seconds",
            "time of the newest record central holds from the gateway",
            labels=["gateway"],
        )
        lag = GaugeMetricFamily(
            P + "gateway_last_batch_lag_seconds",
            "how old the oldest record of the gateway's last batch was when it arrived",
            labels=["gateway"],
        )
        backlog = GaugeMetricFamily(
            P + "gateway_backlog_age_seconds",
            "central's estimate of the age of the gateway's backlog: the larger of the last batch's"
            " lag and the time since the newest record central holds",
            labels=["gateway"],
        )
        batches = CounterMetricFamily(P + "gateway_batches", "new batches stored per gateway", labels=["gateway"])
        records = CounterMetricFamily(P + "gateway_records", "new records stored per gateway", labels=["gateway"])
        for g in snap.gateways:
            last.add_metric([g.gateway], g.last_batch_ms / 1000)
            age = 0.0
            if g.newest_record_ms is not None:
                newest.add_metric([g.gateway], g.newest_record_ms / 1000)
                age = max(age, now_s - g.newest_record_ms / 1000)
            if g.last_batch_lag_ms is not None:
                lag.add_metric([g.gateway], g.last_batch_lag_ms / 1000)
                age = max(age, g.last_batch_lag_ms / 1000)
            backlog.add_metric([g.gateway], age)
            batches.add_metric([g.gateway], g.batches)
            records.add_metric([g.gateway], g.records)
        yield from (last, newest, lag, backlog, batches, records)
        meters = GaugeMetricFamily(
            P + "meters",
            "meters per gateway by the state the gateway last reported: online, offline, quarantined",
            labels=["gateway", "state"],
        )
        counts: dict[tuple[str, str], int] = {(g, s): n for g, s, n in snap.meters}
        for gw in sorted({g for g, _ in counts} | {g.gateway for g in snap.gateways}):
            for state in METER_STATES:
                meters.add_metric([gw, state], counts.get((gw, state), 0))
        yield meters
        cutoffs = CounterMetricFamily(
            P + "cutoffs", "supply cutoffs the gateway's cutoff policy decided (as reported)", labels=["gateway"]
        )
        restores = CounterMetricFamily(
            P + "restores", "supply restores the gateway's cutoff policy decided (as reported)", labels=["gateway"]
        )
        alarms = CounterMetricFamily(P + "relay_alarms", "relay alarms reported", labels=["gateway"])
        commands = CounterMetricFamily(
            P + "command_results",
            "command results the gateways reported, by outcome: applied, duplicate, rejected",
            labels=["gateway", "outcome"],
        )
        # Every known gateway has every counter, from 0: increase() then counts the first one.
        got = {(gw, name): value for gw, name, value in snap.counters}
        for gw in sorted({g.gateway for g in snap.gateways} | {g for g, _ in got}):
            cutoffs.add_metric([gw], got.get((gw, CUTOFFS), 0))
            restores.add_metric([gw], got.get((gw, RESTORES), 0))
            alarms.add_metric([gw], got.get((gw, RELAY_ALARMS), 0))
            for outcome in COMMAND_OUTCOMES:
                commands.add_metric([gw, outcome], got.get((gw, COMMAND_PREFIX + outcome), 0))
        yield from (cutoffs, restores, alarms, commands)


class _FleetCollector(Collector):
    def __init__(self, metrics: HeadendMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self.metrics.fleet_families()


@dataclass
class MetricsServer:
    server: Any
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.server.shutdown()
            self.server.server_close()
        self.thread.join(timeout=5)

"""Metrics the ecosystem reads, from real processes.

A real ``edgegw run`` polls a Modbus TCP simulator (a prepaid meter with a
coil relay on a heavy load, which runs out of credit and is cut, and a dead
meter) and delivers through a real mosquitto to a real ``edgegw headend run
--metrics``. The gateway's textfile and the headend's ``/metrics`` (over
HTTP) are parsed with prometheus-client's own parser, and must say what
happened: polls, reads ok and failed per meter, the meter offline, the
cutoff, the relay open, batches acked, the link up; at the headend the
gateway online, its cutoff, its meter offline, its batches. Every metric name
the fleet's Grafana dashboard queries must be among them. A clean stop makes
the textfile say ``edgegw_up 0`` and the headend see the gateway offline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import until
from tests.gateway.test_prepaid_daemon import config as prepaid_config
from tests.harness.mosquitto import Mosquitto, free_port

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "examples" / "grafana" / "edgegw-fleet.json"
GW = "gw-prepaid"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[set[str], Samples]:
    """(every family and sample name, {(sample name, labels): value}) via prometheus-client."""
    names: set[str] = set()
    samples: Samples = {}
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        if fam.type == "counter":  # declared, even before its first sample: NAME_total
            names.add(fam.name + "_total")
        for s in fam.samples:
            names.add(s.name)
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return names, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", *args],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
        )  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise
    return int(proc.returncode)


def site(tmp: Path, modbus_port: int, broker_port: int, textfile: Path) -> Path:
    path = prepaid_config(tmp, modbus_port)
    text = re.sub(r"\[broker\]\nport = \d+[^\n]*", f"[broker]\nport = {broker_port}", path.read_text())
    text = text.replace(
        "[uplink]\n", "[uplink]\nallow_unauthenticated_acks = true\nack_timeout_s = 2.0\n"
    ).replace(
        "[[account]]",
        '[[meter]]\nid = "m002"\nbus = "lan"\nprotocol = "modbus"\nunit_id = 2\nprofile = "sdm120"\n\n[[account]]',
    )
    text += f'\n[metrics]\ntextfile = "{textfile}"\ninterval_s = 1\n'
    path.write_text(text)
    return path


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body: bytes = resp.read()
        assert resp.headers.get_content_type() == "text/plain"
    return body.decode()


def dashboard_metric_names() -> set[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("expr", "query", "definition") and isinstance(v, str):
                    exprs.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    assert exprs, "the dashboard has no queries"
    return {n for e in exprs for n in re.findall(r"\bedgegw_[a-zA-Z0-9_]+", e)}


async def test_gateway_textfile_and_headend_metrics_tell_what_happened(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    textfile = tmp_path / "textfile" / "edgegw.prom"
    textfile.parent.mkdir()
    metrics_port = free_port()
    hlog, glog = tmp_path / "headend.log", tmp_path / "gateway.log"
    headend = start(
        ["headend", "run", "--broker", f"127.0.0.1:{mosquitto.port}", "--db", str(tmp_path / "central.db"),
         "--metrics", f"127.0.0.1:{metrics_port}", "--metrics-refresh-s", "0.5"],
        hlog,
    )  # fmt: skip
    gateway: subprocess.Popen[bytes] | None = None
    try:
        async with ModbusSimulator(units=[1, 2], load_kw="150") as sim:
            sim.meter(2).dead = True
            gateway = start(["run", "--config", str(site(tmp_path, sim.port, mosquitto.port, textfile))], glog)

            def gw() -> tuple[set[str], Samples]:
                return parse(textfile.read_text()) if textfile.exists() else (set(), {})

            def gateway_says(pred: Callable[[Samples], bool]) -> Callable[[], bool]:
                def check() -> bool:
                    assert gateway is not None and gateway.poll() is None, glog.read_text()[-3000:]
                    return pred(gw()[1])

                return check

            def cut(s: Samples) -> bool:
                return (value(s, "edgegw_cutoffs_total") or 0) >= 1 and value(s, "edgegw_relay_open", meter="m001") == 1

            await until(gateway_says(cut), 60, "the cutoff in the gateway's textfile")
            await until(lambda: sim.meter(1).relay_open, 10, "the relay open at the meter")
            await until(
                gateway_says(lambda s: (value(s, "edgegw_uplink_batches_acked_total") or 0) >= 2),
                30, "batches acked",
            )  # fmt: skip

            def hd() -> tuple[set[str], Samples]:
                assert headend.poll() is None, hlog.read_text()[-3000:]
                return parse(scrape(metrics_port))

            def central_saw(s: Samples) -> bool:
                return (
                    value(s, "edgegw_headend_gateway_online", gateway=GW) == 1
                    and (value(s, "edgegw_headend_cutoffs_total", gateway=GW) or 0) >= 1
                    and value(s, "edgegw_headend_meters", gateway=GW, state="offline") == 1
                )

            await until(lambda: central_saw(hd()[1]), 30, "the cutoff and the offline meter at the headend")
            gw_names, g = gw()
            hd_names, h = hd()

            # The gateway's view.
            assert value(g, "edgegw_up") == 1
            assert value(g, "edgegw_build_info", gateway=GW, version="0.1.0", python=sys.version.split()[0]) == 1
            assert (value(g, "edgegw_poll_cycles_total", bus="lan") or 0) >= 3
            assert (value(g, "edgegw_meter_reads_total", bus="lan", meter="m001", result="ok") or 0) >= 3
            assert value(g, "edgegw_meter_reads_total", bus="lan", meter="m001", result="failed") == 0
            assert (value(g, "edgegw_meter_reads_total", bus="lan", meter="m002", result="failed") or 0) >= 1
            assert value(g, "edgegw_meter_reads_total", bus="lan", meter="m002", result="ok") == 0
            assert value(g, "edgegw_meter_online", bus="lan", meter="m001") == 1
            assert value(g, "edgegw_meter_online", bus="lan", meter="m002") == 0
            assert value(g, "edgegw_meters", state="online") == 1
            assert (value(g, "edgegw_meters", state="offline") or 0) + (value(g, "edgegw_meters", state="quarantined") or 0) == 1
            assert value(g, "edgegw_restores_total") == 0
            assert value(g, "edgegw_software_downloads") == 0  # a development install: no update metrics
            assert value(g, "edgegw_update_phase", phase="idle") is None
            assert (value(g, "edgegw_relay_operations_total", action="trip", result="ok") or 0) >= 1
            assert value(g, "edgegw_uplink_up") == 1 and value(g, "edgegw_uplink_connects_total") == 1
            assert value(g, "edgegw_storage_state", state="normal") == 1
            assert (value(g, "edgegw_storage_free_bytes") or 0) > 0
            assert (value(g, "edgegw_outbox_records") or 0) >= 0
            assert (value(g, "edgegw_outbox_oldest_record_age_seconds") or 0) < 60
            assert sum(value(g, "edgegw_trusted_time_quality", quality=q) or 0 for q in
                       ("central", "system_synced", "meter_majority", "system_unsynced", "floor")) == 1  # fmt: skip

            # Central's view.
            assert (value(h, "edgegw_headend_gateways", state="online") or 0) == 1
            assert (value(h, "edgegw_headend_batches_total", status="stored") or 0) >= 2
            assert (value(h, "edgegw_headend_records_stored_total") or 0) >= 3
            assert value(h, "edgegw_headend_broker_connected") == 1
            assert (value(h, "edgegw_headend_gateway_batches_total", gateway=GW) or 0) >= 2
            assert value(h, "edgegw_headend_meters", gateway=GW, state="online") == 1
            age = value(h, "edgegw_headend_gateway_backlog_age_seconds", gateway=GW)
            assert age is not None and 0 <= age < 60
            assert value(h, "edgegw_headend_restores_total", gateway=GW) == 0  # from 0, for increase()
            assert value(h, "edgegw_headend_command_results_total", gateway=GW, outcome="applied") == 0
            assert "process_cpu_seconds_total" in hd_names

            # The dashboard queries only what exists.
            wanted = dashboard_metric_names()
            missing = wanted - gw_names - hd_names
            assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"

            # A clean stop: the last file says so, and central sees the gateway go.
            assert stop(gateway) == 0, glog.read_text()[-3000:]
            assert value(gw()[1], "edgegw_up") == 0
            await until(
                lambda: value(hd()[1], "edgegw_headend_gateway_online", gateway=GW) == 0, 10, "gateway offline at central"
            )
            assert not list(textfile.parent.glob(".*.tmp")), "a temporary file was left behind"
            assert (textfile.stat().st_mode & 0o777) == 0o644
    finally:
        if gateway is not None:
            stop(gateway)
        assert stop(headend) == 0, hlog.read_text()[-3000:]

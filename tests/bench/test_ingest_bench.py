"""Smoke test of bench/ingest.py: a tiny drain on both stores completes, the
baseline tree it ran is the one it names, and the JSON has every field.

The benchmark itself checks that central holds every reading exactly once
after each drain (it exits non-zero otherwise); the timings are not checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

RUN_KEYS = {
    "readings",
    "telemetry_records",
    "drain_s",
    "readings_per_s",
    "headend_cpu_s",
    "headend_cpu_share_of_core",
    "headend_cpu_s_by_thread",
    "headend_cpu_s_user_system",
    "readings_per_headend_cpu_s",
    "gateway_cpu_s",
    "gateway_cpu_share_of_core",
    "broker_cpu_s",
    "batches",
    "retransmits",
}


def test_tiny_drain_reports_both_stores_against_the_baseline() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ingest.py"), "--readings", "2000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["backlog"]["readings"] == 2000
    assert out["baseline_commit"] and out["current_commit"]
    for store in ("sqlite", "postgres"):
        res = out[store]
        for variant in ("baseline", "current"):
            run = res[variant]
            assert RUN_KEYS <= set(run), (store, variant, run)
            assert run["readings"] == run["telemetry_records"] == 2000
            assert run["headend_cpu_s"] >= 0 and run["batches"] >= 1
        assert ("postgres_backend_cpu_s" in res["current"]) == (store == "postgres")
        assert res["ratio_readings_per_s"] is not None and res["ratio_readings_per_s"] > 0

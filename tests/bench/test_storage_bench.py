"""Smoke test of bench/storage.py: a tiny run of the real daemon (5 meters, 5 s)
completes, every reading it committed reaches central, and the JSON carries the
daemon's writes and CPU and the bare loop's CPU. The figures are not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_reports_writes_and_cpu_of_the_daemon_process() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "storage.py"), "--quick", "--windows", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    [run] = doc["scenarios"].values()
    assert run["meters"] == 5 and run["readings"] > 0
    assert run["readings_acked"] > 0
    daemon = run["daemon"]
    assert daemon["write_bytes"] > 0 and daemon["write_bytes_per_reading"] > 0
    assert daemon["cpu_s"] >= 0 and 0 <= daemon["cpu_fraction_of_core"] < 2
    assert run["bare_loop"]["polls"] > 0
    assert set(run["daemon_minus_bare"]) == {"cpu_s_per_1000_readings", "cpu_fraction_of_core"}
    # the measured time in two windows: their readings add up, the ledger only grows
    first, second = run["windows"]
    assert first["readings"] + second["readings"] == run["readings"]
    assert first["to_s"] <= second["from_s"] + 0.1
    assert 0 < first["ledger_entries_at_end"] <= second["ledger_entries_at_end"]

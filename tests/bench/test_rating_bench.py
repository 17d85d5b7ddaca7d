"""Smoke test of bench/rating.py: a tiny run completes and reports every field.

Checks the shape and the bookkeeping of the JSON (every tripping account was
tripped and restored on the wire, latencies are ordered and non-negative),
never the timings themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SUMMARY_KEYS = {"n", "p50", "p99", "max", "mean"}
CONTEXT_KEYS = {
    "window_s",
    "setup_s",
    "stop_s",
    "stopped_cleanly",
    "readings_committed_in_window",
    "readings_polled_in_window",
    "polls_per_s",
    "writer_queue_depth",
    "cycle_s_all_buses",
    "cycle_s_p50_by_bus",
    "commit_s_per_batch",
    "work_items_per_transaction",
    "commit_ms_per_reading",
    "billing_tick_commit_s",
    "cpu_s",
    "cpu_fraction_of_one_core",
    "cpu_ms_per_reading",
}


def check_summary(s: dict[str, object], n: int) -> None:
    assert set(s) == SUMMARY_KEYS, s
    assert s["n"] == n, s
    p50, p99, mx = float(s["p50"]), float(s["p99"]), float(s["max"])  # type: ignore[arg-type]
    assert 0 <= p50 <= p99 <= mx, s


def test_quick_run_reports_every_field() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "rating.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)

    assert out["benchmark"] == "rating"
    assert {"python", "cpu", "cpus", "sqlite"} <= set(out["machine"])
    setup = out["setup"]
    assert setup["meters"] == sum(setup["meters_per_bus"])
    tripping = setup["tripping_accounts"]
    assert tripping > 0 and out["accounts_tripping"] == tripping

    # every account that ran out was cut off and, after its top-up, restored
    assert out["missing_trips"] == [] and out["missing_restores"] == []
    assert out["trips_measured"] == out["restores_measured"] == tripping
    check_summary(out["cutoff_latency_s"], tripping)
    check_summary(out["restore_latency_s"], tripping)
    check_summary(out["topup_transaction_s"], tripping)
    for part in ("until_handed_to_writer", "queue_and_commit", "handover_to_wire"):
        assert set(out["cutoff_parts_s"][part]) == SUMMARY_KEYS
    assert isinstance(out["cutoff_p99_under_target"], bool)
    ops = out["relay_operations"]
    assert ops["ok"] >= 2 * tripping  # a trip and a restore each, verified by read-back

    for phase in ("prepaid", "baseline_no_prepaid"):
        ctx = out[phase]
        extra = {"billing_tick_ms_per_account_p50"} if phase == "prepaid" else set()
        assert set(ctx) == CONTEXT_KEYS | extra, (phase, set(ctx) ^ (CONTEXT_KEYS | extra))
        assert ctx["readings_committed_in_window"] > 0 and ctx["polls_per_s"] > 0
        assert ctx["cpu_s"] >= 0 and ctx["stopped_cleanly"] is True
        assert set(ctx["cycle_s_p50_by_bus"]) == {f"lan{b}" for b in range(setup["buses"])}
    assert out["prepaid"]["billing_tick_commit_s"]["n"] > 0
    assert out["baseline_no_prepaid"]["billing_tick_commit_s"] == {"n": 0}
    assert set(out["ratios_prepaid_over_baseline"]) == {
        "cycle_s_p50",
        "commit_s_per_batch_p50",
        "cpu_ms_per_reading",
        "polls_per_s",
    }

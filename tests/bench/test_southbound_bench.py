"""Smoke test of bench/southbound.py at tiny scale: it runs and reports every field.

Not a timing test: the numbers depend on the machine. Only their shape and the
facts that do not depend on speed (frame counts, byte counts, readings) are checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_reports_every_part() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "southbound.py"), "--quick", "--bauds", "9600,19200"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)

    assert out["benchmark"] == "southbound"
    assert len(out["machine"]["loadavg_start"]) == 3 and len(out["machine"]["loadavg_end"]) == 3

    # (a) CPU per poll, gateway vs bare, both protocols
    for name, requests in (("modbus_tcp", 2), ("dlt645_tcp", 9)):
        part = out["cpu_per_poll"][name]
        assert part["requests_per_poll"] == requests
        for side in ("bare", "gateway"):
            assert part[side]["cpu_us_per_poll_median"] > 0
            assert part[side]["best_round"]["polls"] == part["polls_per_round"]
        assert part["cpu_ratio_gateway_to_bare"] > 0
    assert out["cpu_per_poll"]["dlt645_tcp"]["data_ids"][0] == "0001FF00"
    tcp = out["cpu_per_poll"]["modbus_tcp"]
    assert tcp["floor_cpu_us_per_poll_median"] > 0 and tcp["lean"]["cpu_us_per_poll_median"] > 0
    assert tcp["cpu_ratio_lean_to_floor"] > 0 and tcp["cpu_ratio_lean_to_bare"] > 0

    # (b) fraction of the wire limit at each baud, both protocols
    wire = out["wire_limit"]
    assert [r["baud"] for r in wire["modbus_rtu"]] == [9600, 19200]
    assert [r["baud"] for r in wire["dlt645"]] == [9600, 19200]
    for r in wire["modbus_rtu"]:
        # SDM120: two requests per meter (8 bytes each), replies 5 + 2N bytes
        assert r["transactions_per_cycle"] == 2 * r["meters"]
        assert r["request_bytes_per_cycle"] == 16 * r["meters"]
    for r in wire["dlt645"]:
        assert r["transactions_per_cycle"] == 9 * r["meters"]
        assert r["request_bytes_per_cycle"] == 20 * r["transactions_per_cycle"]  # FE x4 + 12 + DI
    for r in wire["modbus_rtu"] + wire["dlt645"]:
        assert r["limit_cycle_s"] > 0 and r["cycle_s_median"] > 0
        assert 0 < r["fraction_of_limit"] <= 1.05  # a simulated bus cannot beat its wire

    # (c) dead meter: healthy meters read every cycle, ratios before/after back-off
    dead = out["dead_meter"]["modbus_rtu"]
    cycles = dead["cycles_after_death"]
    assert cycles[0]["dead_meter_asked"] and cycles[0]["dead_meter_state"] == "failing"
    assert all(c["readings"] == dead["meters"] - 1 for c in cycles)
    assert dead["ratio_before_backoff"] > 1  # the dead meter's timeouts cost bus time
    assert dead["ratio_after_backoff_mean"] > 0

    # outage: silent bus, then every meter read again in the first cycle
    outage = out["outage"]
    assert all(c["bus_silent"] for c in outage["cycles_during_outage"])
    back = outage["first_cycle_after_supply_returns"]
    assert back["readings"] == outage["meters"] and not back["bus_silent"]

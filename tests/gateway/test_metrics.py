"""gateway.metrics: the text format read back by prometheus-client's parser, the
atomic textfile, and what the daemon's hooks count."""

from __future__ import annotations

import math
import os
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from firmware_bridge.reading import Measurement, Quantity, Reading, TimeSource
from firmware_bridge.relay_ops import RelayIntent, RelayOp
from gateway.daemon import Cycle
from gateway.metrics import Family, GatewayMetrics, format_value, render, write_textfile
from gateway.security.envelope import CommandResult, Outcome, RejectReason
from store_forward.outbox import MeterStatus

names = st.from_regex(r"[a-z_][a-z0-9_]{0,20}", fullmatch=True)
label_names = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
values = st.one_of(
    st.integers(-(2**53), 2**53).map(float),
    st.floats(allow_nan=False, allow_infinity=True, width=64),
)


@st.composite
def families(draw: st.DrawFn) -> list[Family]:
    out = []
    for name in draw(st.lists(names, unique=True, max_size=5)):
        kind = draw(st.sampled_from(["gauge", "counter", "untyped"]))
        full = f"edgegw_{name}_total" if kind == "counter" else f"edgegw_{name}"
        keys = draw(st.lists(label_names, unique=True, max_size=3))
        samples = draw(
            st.lists(
                st.tuples(st.fixed_dictionaries({k: st.text(max_size=12) for k in keys}), values),
                max_size=4,
                unique_by=lambda s: tuple(sorted(s[0].items())),
            )
        )
        if kind == "counter":
            samples = [(labels, abs(v)) for labels, v in samples]
        out.append(Family(full, kind, draw(st.text(max_size=30)), samples))
    return out


@given(families())
def test_what_is_rendered_parses_back_the_same(fams: list[Family]) -> None:
    parsed = {}
    for fam in text_string_to_metric_families(render(fams)):
        for s in fam.samples:
            parsed[(s.name, tuple(sorted(s.labels.items())))] = s.value
    expected = {(f.name, tuple(sorted(labels.items()))): v for f in fams for labels, v in f.samples}
    assert parsed.keys() == expected.keys()
    for k, v in expected.items():
        assert parsed[k] == v or (math.isnan(v) and math.isnan(parsed[k]))


def test_the_format_refuses_what_prometheus_would() -> None:
    with pytest.raises(ValueError, match="invalid metric name"):
        render([Family("edgegw-up", "gauge", "")])
    with pytest.raises(ValueError, match="invalid label name"):
        render([Family("edgegw_up", "gauge", "", [({"bad-label": "x"}, 1)])])
    with pytest.raises(ValueError, match="given twice"):
        render([Family("edgegw_up", "gauge", ""), Family("edgegw_up", "gauge", "")])
    with pytest.raises(ValueError, match="invalid kind"):
        render([Family("edgegw_up", "histogram", "")])
    assert [format_value(v) for v in (1.0, 0.5, math.inf, -math.inf, 1e300)] == ["1", "0.5", "+Inf", "-Inf", "1e+300"]


def test_the_textfile_is_replaced_whole_and_readable_by_node_exporter(tmp_path: Path) -> None:
    path = tmp_path / "edgegw.prom"
    old = os.umask(0o077)  # as under the service's UMask=0077
    try:
        write_textfile(path, "edgegw_up 1\n")
        first = path.stat().st_ino
        write_textfile(path, "edgegw_up 0\n")
    finally:
        os.umask(old)
    assert path.read_text() == "edgegw_up 0\n"
    assert path.stat().st_ino != first  # a new file renamed over the old one, never rewritten in place
    assert (path.stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edgegw.prom"]
    with pytest.raises(FileNotFoundError):
        write_textfile(tmp_path / "missing" / "edgegw.prom", "x\n")


def reading(meter: str, relay_open: int | None = None) -> Reading:
    values = {Quantity.ENERGY_IMPORT: Measurement(Decimal("1.5"))}
    if relay_open is not None:
        values[Quantity.RELAY_OPEN] = Measurement(Decimal(relay_open))
    return Reading(meter, 1_000, values, TimeSource.SYSTEM)


def status(meter: str, total_failures: int) -> MeterStatus:
    return MeterStatus(meter, total_failures == 0, 1, None, 0, total_failures, None)


def test_hooks_count_reads_relays_cutoffs_and_commands() -> None:
    m = GatewayMetrics()
    m.cycle_committed(Cycle("b", 1, [reading("m1", relay_open=0)], [], final=False))  # a slice
    m.cycle_committed(Cycle("b", 2, [reading("m1")], [status("m1", 0), status("m2", 3)]))
    m.cycle_committed(Cycle("b", 3, [], [status("m1", 0), status("m2", 5)]))
    m.cycle_committed(Cycle("b", 4, [], [status("m1", 0), status("m2", 1)]))  # the bus was reopened
    trip = RelayIntent("m1", RelayOp.TRIP, "balance", "a1")
    m.cycle_committed(
        Cycle("b", 5, [], [], [{"type": "relay.operation", "meter": "m1", "action": "trip", "ok": True, "final_open": True}])
    )
    assert m.cycles["b"] == 3 and m.reads[("b", "m1", "ok")] == 2
    assert m.reads[("b", "m2", "failed")] == 3 + 2 + 1
    assert m.relay_open == {"m1": True} and m.relay_operations[("trip", "ok")] == 1
    m.relay_requested(trip)
    m.relay_requested(RelayIntent("m1", RelayOp.CLOSE, "top-up", "a1"))
    m.relay_requested(RelayIntent("m1", RelayOp.TRIP, "remote", "a1", command_id="r-1"))  # not the policy's
    m.relay_requested(RelayIntent("m1", RelayOp.ALARM_ON, "low", "a1"))
    m.relay_requested(trip, refused=True)
    assert (m.cutoffs, m.restores) == (2, 1) and m.relay_operations[("trip", "refused")] == 1
    m.command_result(CommandResult(Outcome.REJECTED, None, RejectReason.BAD_SIGNATURE, "no"))
    m.command_result(CommandResult(Outcome.REJECTED, None, RejectReason.BAD_BODY, "gap", code="counter_gap"))
    assert m.commands == {("unknown", "rejected", "bad_signature"): 1, ("unknown", "rejected", "counter_gap"): 1}


def test_the_metrics_table_of_the_configuration(tmp_path: Path) -> None:
    from gateway.config import check_config, load_config
    from tests.gateway.e2e import site_config

    path = site_config(tmp_path / "site.toml", gateway_id="gw", db=tmp_path / "gw.db", broker_port=1, modbus_port=2, units=[1])
    base = path.read_text()
    assert load_config(path).metrics.textfile is None  # no file unless asked for
    path.write_text(base + '\n[metrics]\ntextfile = "prom/edgegw.prom"\ninterval_s = 15\n')
    cfg = load_config(path)
    assert cfg.metrics.textfile == tmp_path / "prom" / "edgegw.prom" and cfg.metrics.interval_s == 15.0
    path.write_text(base + '\n[metrics]\ntextfile = "edgegw.txt"\ninterval_s = 0\n')
    problems = "\n".join(check_config(path).problems)
    assert "metrics.textfile: must end in .prom" in problems and "metrics.interval_s: must be 1..3600 s" in problems


def test_config_check_looks_at_the_textfile_directory(tmp_path: Path) -> None:
    from gateway.config import check_config
    from gateway.preflight import account_for, preflight
    from tests.gateway.e2e import site_config

    path = site_config(tmp_path / "site.toml", gateway_id="gw", db=tmp_path / "gw.db", broker_port=1, modbus_port=2, units=[1])
    base = path.read_text()
    path.write_text(base + '\n[metrics]\ntextfile = "missing/edgegw.prom"\n')
    found = preflight(check_config(path), account_for(None))
    assert [p for p in found.problems if "metrics.textfile" in p] == [
        f"{path}:{len(base.splitlines()) + 3}: metrics.textfile: {tmp_path}/missing: no such directory"
        " (node_exporter's textfile directory)"
    ]
    (tmp_path / "missing").mkdir()
    assert not [p for p in preflight(check_config(path), account_for(None)).problems if "metrics" in p]

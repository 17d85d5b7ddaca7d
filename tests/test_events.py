"""The event catalogue: docs/protocol.md lists it, and every emitter builds its events with it."""

from __future__ import annotations

import ast
import re

import pytest

from firmware_bridge.events import CATALOGUE, EventError, Severity, event
from firmware_bridge.relay_ops import RelayOp
from gateway.billing.rating import AnomalyKind
from gateway.billing.risk import RiskKind
from gateway.meter_health import State
from gateway.security.trusted_time import ClockEventKind
from tests.harness.product import REPO, product_sources

# Product modules whose dicts have a "type" key that is no event: register
# types of a Modbus map, the configuration schema, a command's type (the
# signed envelope's payload, central's view of a queued command), the cutoff
# transitions `edgegw tariff simulate --json` prints, metric labels.
NOT_EVENTS = {
    "firmware_bridge/modbus/profiles.py",
    "gateway/config.py",
    "store_forward/command_envelope.py",
    "headend/central.py",
    "gateway/billing/cli.py",
    "gateway/metrics.py",
    "headend/read_api.py",  # its answers name an event's type; it writes no event
}
# Modules that read events by name (the headend's fleet view and caring reminders, the gateway's metrics).
READERS = ("headend/fleet.py", "gateway/metrics.py", "headend/notices.py")
EVENT_LIKE = re.compile(r"[a-z]+(\.[a-z_]+)+|[a-z]+_[a-z_]+")


def docs_table() -> dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str]]:
    text = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    section = text.split("\n## Events\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str]] = {}
    for line in section.splitlines():
        m = re.fullmatch(r"\| `([^`]+)` \| (\w+) \| (.*) \| (.*) \|", line)
        if m is None:
            continue
        fields = [f.strip() for f in m.group(3).split(",")]
        required = tuple(f.strip("`") for f in fields if not f.endswith("?"))
        optional = tuple(f.rstrip("?").strip("`") for f in fields if f.endswith("?"))
        assert m.group(1) not in rows, f"{m.group(1)} listed twice"
        rows[m.group(1)] = (m.group(2), required, optional, m.group(4))
    return rows


def test_the_docs_table_and_the_catalogue_agree() -> None:
    table = docs_table()
    assert len(table) == len(CATALOGUE) > 40
    for name, spec in CATALOGUE.items():
        assert table.get(name) == (spec.severity.value, spec.fields, spec.optional, spec.summary), name


def _event_calls(tree: ast.AST) -> list[ast.Call]:
    return [
        n for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "event"
    ]


def test_no_product_module_writes_an_event_body_of_its_own() -> None:
    found = []
    for path in product_sources():
        rel = path.relative_to(REPO).as_posix()
        if rel in NOT_EVENTS or rel == "firmware_bridge/events.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Dict) and any(
                isinstance(k, ast.Constant) and k.value == "type" for k in node.keys
            ):
                found.append(f"{rel}:{node.lineno}")
    assert not found, f"event bodies written outside the catalogue: {found}"


def test_every_name_an_emitter_uses_is_in_the_catalogue() -> None:
    """Literal names must be entries; a name built at run time (``f"risk.{kind}"``)
    must start like one, and its enumerations are checked below."""
    prefixes = {n.rsplit(".", 1)[0] + "." for n in CATALOGUE if "." in n} | {"meter.", "config_"}
    calls = 0
    for path in product_sources():
        for call in _event_calls(ast.parse(path.read_text(encoding="utf-8"))):
            calls += 1
            name = call.args[0]
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            if isinstance(name, ast.Constant):
                assert name.value in CATALOGUE, where
            elif isinstance(name, ast.JoinedStr):
                head = name.values[0]
                assert isinstance(head, ast.Constant) and head.value in prefixes, where
            else:  # relay.alarm/operation; config_*; a software transfer's report (below)
                assert isinstance(name, ast.IfExp | ast.Call | ast.Name), where
    assert calls > 25


def test_every_software_transfer_report_is_in_the_catalogue() -> None:
    """The downloader reports through a callback whose names become events."""
    tree = ast.parse((REPO / "gateway" / "update_transfer.py").read_text(encoding="utf-8"))
    names = {
        n.args[0].value
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "report"
        and n.args and isinstance(n.args[0], ast.Constant)
    }
    assert names and names <= set(CATALOGUE), sorted(names - set(CATALOGUE))


def test_every_value_of_an_event_family_has_its_entry() -> None:
    families = {
        "risk": [k.value for k in RiskKind],
        "rating": [k.value for k in AnomalyKind],
        "time": [k.value for k in ClockEventKind],
        "meter": [s.value for s in State],
        "cutoff.action": [op.value for op in (RelayOp.TRIP, RelayOp.CLOSE, RelayOp.CLOSE_ALLOWED,
                                              RelayOp.ALARM_ON, RelayOp.ALARM_OFF)],
    }
    for family, values in families.items():
        for v in values:
            assert f"{family}.{v}" in CATALOGUE, f"{family}.{v}"
    # cutoff transitions and meter faults are strings in their modules
    cutoff = (REPO / "gateway" / "billing" / "cutoff.py").read_text(encoding="utf-8")
    for t in set(re.findall(r'CutoffEvent\("(\w+)"', cutoff)):
        assert f"cutoff.{t}" in CATALOGUE, t
    clock = (REPO / "firmware_bridge" / "dlt645" / "clock.py").read_text(encoding="utf-8")
    for kind in set(re.findall(r'MeterFault\("(\w+)"', clock)):
        assert f"meter.{kind}_fault" in CATALOGUE, kind
    remote = (REPO / "gateway" / "remote_config.py").read_text(encoding="utf-8")
    for action in set(re.findall(r'"(config\.\w+)"', remote)):
        assert action.replace(".", "_") in CATALOGUE, action


def test_a_body_is_checked_against_its_entry() -> None:
    assert event("gateway_started", gateway="gw-1") == {"type": "gateway_started", "gateway": "gw-1"}
    assert event("records_damaged", ids=[3]) == {"type": "records_damaged", "severity": "critical", "ids": [3]}
    assert CATALOGUE["records_damaged"].severity is Severity.CRITICAL
    with pytest.raises(EventError, match="missing"):
        event("gateway_started")
    with pytest.raises(EventError, match="unknown"):
        event("gateway_started", gateway="gw-1", colour="red")
    with pytest.raises(EventError, match="not in the catalogue"):
        event("gateway_exploded", gateway="gw-1")


def test_the_names_readers_look_for_are_in_the_catalogue() -> None:
    """A reader comparing an event's type with a name the catalogue lacks would never match."""
    looked_for: set[str] = set()
    for rel in READERS:
        tree = ast.parse((REPO / rel).read_text(encoding="utf-8"))
        tuples = {  # names bound to a tuple of names or to one name
            t.id: n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Tuple | ast.Constant)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            for side in (node.left, *node.comparators):
                if isinstance(side, ast.Name) and side.id in tuples:
                    side = tuples[side.id]
                for c in ast.walk(side):
                    if isinstance(c, ast.Constant) and isinstance(c.value, str) and EVENT_LIKE.fullmatch(c.value):
                        looked_for.add(c.value)
    assert {"relay.alarm", "cutoff.action.trip", "command_result", "gateway.health"} <= looked_for
    assert looked_for <= set(CATALOGUE), sorted(looked_for - set(CATALOGUE))

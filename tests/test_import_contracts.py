"""The import contracts in pyproject.toml stay complete as modules are added.

lint-imports (run by ./dev test) checks the contracts; this checks the one
contract written as a list: every store_forward module is either one of the
protocol and encoding modules the headend may use, or forbidden to it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# What the headend shares with the gateway: the protocol and its encodings.
PROTOCOL = {
    "acks",
    "backlog_format",
    "batch_epoch",
    "codec",
    "command_envelope",
    "command_roles",
    "presence",
    "records",
    "sealing",
    "tls",
    "topics",
    "uplink_keys",
    "wire",
    "wire_json",
}


def contract(contract_id: str) -> dict[str, Any]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (found,) = [c for c in config["contracts"] if c.get("id") == contract_id]
    return dict(found)


def test_every_store_forward_module_is_classified_for_the_headend() -> None:
    package = REPO / "store_forward"
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    modules |= {p.parent.name for p in package.glob("*/__init__.py")}
    forbidden = {
        m.removeprefix("store_forward.")
        for m in contract("headend")["forbidden_modules"]
        if m.startswith("store_forward.")
    }
    assert PROTOCOL <= modules, f"protocol modules missing: {sorted(PROTOCOL - modules)}"
    assert not PROTOCOL & forbidden
    unclassified = modules - PROTOCOL - forbidden
    assert not unclassified, (
        f"store_forward modules neither protocol nor forbidden to the headend: {sorted(unclassified)}"
    )
    assert not forbidden - modules, f"no such store_forward modules: {sorted(forbidden - modules)}"
    assert {"gateway", "provisioning"} <= set(contract("headend")["forbidden_modules"])


def test_no_product_package_may_import_the_test_bench() -> None:
    c = contract("no-testbed")
    assert c["forbidden_modules"] == ["testbed"]
    product = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()} - {"tests", "testbed"}
    assert product <= set(c["source_modules"]), "a product package the contract does not cover"

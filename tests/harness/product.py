"""The product's packages and modules, for tests that check the whole product."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
# The packages the wheel ships (the test bench, testbed/, is not one of them).
PACKAGES = ("firmware_bridge", "store_forward", "provisioning", "gateway", "headend")


def product_modules(packages: tuple[str, ...] = PACKAGES) -> Iterator[ModuleType]:
    """Every module of the product packages (or of ``packages``), imported."""
    for name in packages:
        package = importlib.import_module(name)
        yield package
        for info in pkgutil.walk_packages(package.__path__, f"{name}."):
            yield importlib.import_module(info.name)


def product_sources() -> Iterator[Path]:
    """Every Python source file of the product packages."""
    for name in PACKAGES:
        yield from sorted((REPO / name).rglob("*.py"))

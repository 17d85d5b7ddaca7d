"""The wheel ships the product and nothing of the test bench.

The wheel is built (no build isolation, no index: offline) from a copy of the
source tree that has the test bench in it, so leaving it out is the build
configuration's doing. Unpacked, the wheel is the installed product: its
``edgegw demo`` says how to get the demo instead of failing on an import.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = {"gateway", "firmware_bridge", "store_forward", "provisioning", "headend"}
# Module names of the test bench: demo, meter simulators, link emulator, MQTT broker.
BENCH_MODULE = re.compile(r"(^|/)[^/]*(demo|simulator|linkemu|broker)[^/]*\.py$")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The build writes build/ and *.egg-info next to pyproject.toml: build a copy.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    packages = [p for p in REPO.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"]
    assert "testbed" in {p.name for p in packages}, "the copy must hold the test bench"
    for p in packages:
        shutil.copytree(p, src / p.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "--wheel-dir", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (built,) = out.glob("edge_gateway-*.whl")
    return built


def top_level(names: list[str]) -> set[str]:
    return {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}


def test_wheel_holds_the_product_packages_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    expected = {p for p in PRODUCT if (REPO / p).is_dir()}  # headend: where the tree has it
    assert top_level(names) == expected
    assert "gateway/cli.py" in names and "provisioning/usb.py" in names
    assert not [n for n in names if BENCH_MODULE.search(n)], "test bench modules in the wheel"


def test_installed_demo_says_how_to_get_it(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import sys, gateway.cli\n"
        f"assert gateway.cli.__file__.startswith({str(site)!r}), gateway.cli.__file__\n"
        "sys.exit(gateway.cli.main(['demo']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=site, capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "./dev demo" in lines[0] and "source checkout" in lines[0], r.stderr
    assert r.stdout == ""

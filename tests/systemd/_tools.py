"""Finding host tools for the systemd tests: skip outside CI, fail loudly in CI."""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRED_IN_CI = "CI"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(
            f"{name} is required in CI but was not found on PATH (install the systemd package)"
        )
    pytest.skip(f"{name} not installed (install the systemd package to run this check)")

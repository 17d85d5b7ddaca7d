"""Shared test options.

``--long`` enables the long chaos and fuzz runs (marked ``@pytest.mark.long``);
the default run skips them so that it stays within a few minutes.
"""

from __future__ import annotations

import pytest
from hypothesis import settings

# Property tests check behaviour, not speed: no per-example deadline (a loaded CI
# machine and coverage tracing make single examples slow without anything wrong).
settings.register_profile("edgegw", deadline=None)
settings.load_profile("edgegw")

pytest_plugins = ["tests.harness.fixtures"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="run the long chaos and fuzz runs (minutes to hours)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long run: enable with --long")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def long_run(request: pytest.FixtureRequest) -> bool:
    """True when the long runs were asked for (scale loop counts with it)."""
    return bool(request.config.getoption("--long"))


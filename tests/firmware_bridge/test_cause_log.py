"""CauseLog: one line per change of cause, with the repeat count."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.cause_log import CauseLog

LOG = logging.getLogger("test.cause_log")


def test_logged_once_per_cause_with_the_count_and_once_on_recovery(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    c = CauseLog(LOG, "uplink", clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger=LOG.name):
        assert c.failed("ca.pem: No such file or directory")
        for _ in range(99):
            now[0] += 1
            assert not c.failed("ca.pem: No such file or directory")
        assert c.failed("connection refused")
        assert not c.failed("connection refused")
        now[0] += 20
        assert c.ok("connected")
        assert not c.ok("connected")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "uplink: ca.pem: No such file or directory",
        "uplink: connection refused (the previous cause repeated 100 times: ca.pem: No such file or directory)",
        "uplink: connected after 102 failures in 119 s (last cause, 2 times: connection refused)",
    ]
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING, logging.INFO]


@given(st.lists(st.sampled_from(["a", "b", "c", None]), max_size=60))
def test_lines_equal_changes_of_cause(events: list[str | None]) -> None:
    """Whatever the sequence of failures (a cause) and successes (None): one line
    per change of cause and one per recovery, and the counts add up."""
    seen: list[str] = []

    class Sink(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger("test.cause_log.prop")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    sink = Sink()
    logger.addHandler(sink)
    try:
        c = CauseLog(logger, "x", clock=lambda: 0.0)
        expected, last = 0, None
        for e in events:
            if e is None:
                expected += last is not None
                c.ok()
            else:
                expected += e != last
                c.failed(e)
            last = e
        assert len(seen) == expected
    finally:
        logger.removeHandler(sink)

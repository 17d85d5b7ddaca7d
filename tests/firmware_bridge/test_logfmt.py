"""firmware_bridge.logfmt: priority prefixes, key=value fields, repeated lines folded."""

from __future__ import annotations

import io
import logging
import os
import shlex
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge import logfmt
from firmware_bridge.logfmt import FoldingHandler, JournalFormatter


def test_priorities_are_sd_daemons() -> None:
    assert [logfmt.syslog_priority(lv) for lv in (50, 40, 30, logfmt.NOTICE, 20, 10, 5)] == [2, 3, 4, 5, 6, 7, 7]


def test_the_journal_is_recognised_by_device_and_inode(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.touch()
    b.touch()
    st_a = os.stat(a)
    journal = {"JOURNAL_STREAM": f"{st_a.st_dev}:{st_a.st_ino}"}
    with a.open("w") as fa, b.open("w") as fb:
        assert logfmt.stderr_is_journal(journal, fa)
        assert not logfmt.stderr_is_journal(journal, fb)  # redirected elsewhere: not the journal
        assert not logfmt.stderr_is_journal({}, fa)
        assert not logfmt.stderr_is_journal({"JOURNAL_STREAM": "garbage"}, fa)
        assert logfmt.stderr_is_journal({"EDGEGW_LOG_FORMAT": "journal"}, fb)
        assert not logfmt.stderr_is_journal({**journal, "EDGEGW_LOG_FORMAT": "plain"}, fa)
    assert not logfmt.stderr_is_journal(journal, io.StringIO())  # no file descriptor


def record(msg: str, *args: object, level: int = logging.WARNING, name: str = "gw", **extra: object) -> logging.LogRecord:
    r = logging.LogRecord(name, level, __file__, 10, msg, args, None)
    for k, v in extra.items():
        setattr(r, k, v)
    return r


def test_journal_lines_carry_the_priority_on_every_line_and_fields_at_the_end() -> None:
    f = JournalFormatter(journal=True, fields={"gateway": "gw-1"})
    line = f.format(record("meter %s offline: %s", "m-2", "no reply", meter="m-2", bus="rs485 1"))
    assert line == '<4>gw: meter m-2 offline: no reply gateway=gw-1 meter=m-2 bus="rs485 1"'
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        r = record("failed", level=logging.ERROR)
        r.exc_info = sys.exc_info()
    lines = f.format(r).split("\n")
    assert len(lines) > 2 and all(ln.startswith("<3>") for ln in lines), lines
    assert lines[0] == "<3>gw: failed gateway=gw-1" and lines[-1] == "<3>ValueError: boom"
    plain = JournalFormatter(journal=False).format(record("x", level=logging.INFO))
    assert plain.endswith(" INFO gw: x") and not plain.startswith("<")


@given(st.text(alphabet=st.characters().filter(str.isprintable), max_size=40))
def test_a_field_value_reads_back_with_shell_quoting(value: str) -> None:
    [pair] = shlex.split(logfmt.render_fields({"k": value}))
    assert pair == f"k={value}"


def test_field_values_stay_on_one_line() -> None:
    rendered = logfmt.render_value("a\nb\t\x00\"c\\")
    assert rendered == '"a\\nb\\t\\x00\\"c\\\\"' and "\n" not in rendered


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def handler(window_s: float = 60.0) -> tuple[FoldingHandler, io.StringIO, Clock]:
    out, clock = io.StringIO(), Clock()
    h = FoldingHandler(out, window_s=window_s, clock=clock)
    h.setFormatter(JournalFormatter(journal=True))
    return h, out, clock


def test_a_retry_loop_is_one_line_per_cause_and_its_count() -> None:
    h, out, clock = handler()
    for _ in range(40):
        clock.t += 1
        h.handle(record("bus %s failed: %s", "b1", "port gone", bus="b1"))
    for _ in range(3):
        clock.t += 1
        h.handle(record("bus %s failed: %s", "b1", "permission denied", bus="b1"))
    h.handle(record("bus %s failed: %s", "b2", "port gone", bus="b2"))  # another bus: its own line
    h.close()
    assert out.getvalue().splitlines() == [
        "<4>gw: bus b1 failed: port gone bus=b1",
        "<4>gw: bus b1 failed: port gone (repeated 39 more times in 39 s) bus=b1 repeats=39",
        "<4>gw: bus b1 failed: permission denied bus=b1",
        "<4>gw: bus b2 failed: port gone bus=b2",
        "<4>gw: bus b1 failed: permission denied (repeated 2 more times in 2 s) bus=b1 repeats=2",
    ]


def test_loops_of_two_entities_from_one_call_site_fold_separately() -> None:
    h, out, clock = handler()
    for _ in range(10):
        clock.t += 1
        for bus in ("b1", "b2"):
            h.handle(record("bus failed: %s", "port gone", bus=bus))
    h.close()
    assert out.getvalue().splitlines() == [
        "<4>gw: bus failed: port gone bus=b1",
        "<4>gw: bus failed: port gone bus=b2",
        "<4>gw: bus failed: port gone (repeated 9 more times in 9 s) bus=b1 repeats=9",
        "<4>gw: bus failed: port gone (repeated 9 more times in 9 s) bus=b2 repeats=9",
    ]


def test_a_run_ends_after_a_quiet_window_and_the_next_one_is_written() -> None:
    h, out, clock = handler(window_s=10)
    h.handle(record("link down"))
    clock.t = 5
    h.handle(record("link down"))
    clock.t = 100  # quiet for longer than the window
    h.handle(record("something else", name="other"))  # ends the quiet run, with its count
    h.handle(record("link down"))  # a new run: written
    assert out.getvalue().splitlines() == [
        "<4>gw: link down",
        "<4>gw: link down (repeated 1 more time in 5 s) repeats=1",
        "<4>other: something else",
        "<4>gw: link down",
    ]


def test_volatile_fields_do_not_break_a_run_and_tracebacks_always_print() -> None:
    h, out, _ = handler()
    for i in range(5):
        h.handle(record("command rejected: bad_signature", command=f"c-{i}"))
    try:
        raise OSError("x")
    except OSError:
        import sys

        for _ in range(2):
            r = record("command rejected: bad_signature")
            r.exc_info = sys.exc_info()
            h.handle(r)
    lines = out.getvalue().splitlines()
    assert lines[0] == "<4>gw: command rejected: bad_signature command=c-0"
    assert lines[1] == "<4>gw: command rejected: bad_signature (repeated 4 more times in 0 s) command=c-0 repeats=4"
    assert sum(ln.startswith("<4>OSError: x") for ln in lines) == 2


@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["x", "y"]), st.integers(0, 30)), max_size=60))
def test_every_line_is_written_or_counted(events: list[tuple[str, str, int]]) -> None:
    """Whatever the sequence (call site, text, seconds since the last line): each
    line is written or counted in exactly one summary, once everything is flushed."""
    h, out, clock = handler(window_s=10)
    for site, text, dt in events:
        clock.t += dt
        h.handle(record(f"{site}: %s", text, name=site))
    h.flush_runs()
    written = counted = 0
    for ln in out.getvalue().splitlines():
        if "(repeated " in ln:
            counted += int(ln.split("(repeated ")[1].split(" ")[0])
        else:
            written += 1
    assert written + counted == len(events)


def test_configure_installs_one_handler_and_set_fields_reaches_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = io.StringIO()
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        # pytest's own handlers are on the root logger: left alone unless forced
        assert logfmt.configure(logging.INFO, stream=out) is None
        logfmt.configure(logging.INFO, stream=out, env={"EDGEGW_LOG_FORMAT": "journal"}, force=True)
        h = logfmt.configure(logging.INFO, stream=out, env={"EDGEGW_LOG_FORMAT": "journal"}, force=True)
        assert h is not None
        assert sum(isinstance(x, FoldingHandler) for x in root.handlers) == 1
        logfmt.set_fields(gateway="gw-9")
        logging.getLogger("t").info("hello", extra={"meter": "m-1"})
        logging.getLogger("t").debug("not shown")
        assert out.getvalue() == "<6>t: hello gateway=gw-9 meter=m-1\n"
    finally:
        root.removeHandler(h)
        root.handlers[:] = before[0]
        root.setLevel(before[1])

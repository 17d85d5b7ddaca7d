"""The one problem collector: every file and body reports FILE[:LINE]: PATH: problem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.billing.account import AccountError, load_account
from gateway.billing.tariff import TariffError
from gateway.billing.tariff_file import load_tariff
from gateway.config import ConfigError, load_config
from gateway.problems import Problems, read_toml


def test_lines_name_file_line_and_path() -> None:
    p = Problems("site.toml", line=lambda path: 14 if path == ("meter", 1, "unit_id") else None)
    p.add(("meter", 1, "unit_id"), "must be 1..247")
    p.add(("tou", "workday", 0), "the first period must start at 00:00")
    p.add("tier.thresholds_kwh[1]", "must increase")
    p.add((), "TOML syntax error")
    p.unknown(("limits",), {"alarm1": 1, "bogus": 2}, {"alarm1"})
    assert p.problems == [
        "site.toml:14: meter[1].unit_id: must be 1..247",
        "site.toml: tou.workday[0]: the first period must start at 00:00",
        "site.toml: tier.thresholds_kwh[1]: must increase",
        "site.toml: TOML syntax error",
        "site.toml: limits.bogus: unknown key (allowed: alarm1)",
    ]


def test_a_body_has_no_file_and_a_prefix() -> None:
    p = Problems(prefix=("topup",))
    p.add("amount_micro", "must be an integer >= 1, got '7'")
    p.add((), "must be a JSON object")
    p.unknown("", {"colour": 1}, {"account"})
    assert p.problems == [
        "topup.amount_micro: must be an integer >= 1, got '7'",
        "topup: must be a JSON object",
        "topup.colour: unknown key (allowed: account)",
    ]
    with pytest.raises(ConfigError) as caught:
        p.check(ConfigError)
    assert caught.value.problems == p.problems
    Problems().check(ConfigError)  # nothing to report: no error


def test_every_toml_file_is_read_within_the_same_bounds(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    nested = tmp_path / "nested.toml"
    nested.write_text("x = " + "[" * 20 + "]" * 20 + "\n", encoding="utf-8")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    for path, why in (
        (fifo, "not a regular file"),
        (Path("/dev/zero"), "not a regular file"),
        (nested, "nest deeper than 8 levels"),
        (binary, "not UTF-8 text"),
        (tmp_path / "missing.toml", "cannot read file"),
    ):
        found = Problems(path)
        assert read_toml(path, found) is None
        (line,) = found.problems
        assert line.startswith(f"{path}: ") and why in line, line
        for load, error in ((load_config, ConfigError), (load_tariff, TariffError), (load_account, AccountError)):
            with pytest.raises(error) as caught:
                load(path)
            assert caught.value.problems == [line], load


def test_a_path_written_out_gives_its_key_path_for_the_line() -> None:
    from gateway.problems import key_path

    assert key_path("price") == ("price",)
    assert key_path("tier.thresholds_kwh[1]") == ("tier", "thresholds_kwh", 1)
    assert key_path("no_disconnect[0].start") == ("no_disconnect", 0, "start")
    assert key_path("a[0][2].b") == ("a", 0, 2, "b")
    assert key_path("") == ()
    assert key_path("odd]key") == ()  # not a path it can follow: no line, never a wrong one

"""Hostile values in a configuration: refused with a clear problem, never a crash.

The loader also checks configurations that arrive from central, so a value
that would take the gateway off the air (a wildcard topic, an infinite poll
interval, a keepalive MQTT cannot carry) or crash it (deep nesting, a huge
file, a NUL in a path) must be a reported problem. The fuzz tests feed the
loader arbitrary documents and arbitrary text: nothing may raise, and nothing
may reach the loader's last-resort "internal error" line.
"""

from __future__ import annotations

import datetime as dt
import os
import string
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import (
    ACCOUNT_SCHEMA,
    BROKER_SCHEMA,
    BUS_SCHEMA,
    GATEWAY_SCHEMA,
    METER_SCHEMA,
    RELAY_SCHEMA,
    SECURITY_SCHEMA,
    STORAGE_SCHEMA,
    UPLINK_SCHEMA,
    ConfigError,
    check_config,
    load_config,
)
from gateway.problems import MAX_FILE_BYTES

BASE = """\
[gateway]
id = "gw-1"
site = "test"
poll_interval_s = 60

[storage]
path = "gw.db"

[broker]
keepalive_s = 30
topic_prefix = "edgegw/v1"

[uplink]
ack_timeout_s = 20

[[bus]]
name = "lan"
type = "tcp"
host = "127.0.0.1"
timeout_s = 1.0

[[meter]]
id = "m-1"
bus = "lan"
protocol = "modbus"
unit_id = 1
profile = "sdm120"
"""


def problems_of(tmp_path: Path, text: str) -> list[str]:
    p = tmp_path / "site.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    return info.value.problems


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('topic_prefix = "edgegw/v1"', 'topic_prefix = "#"', "broker.topic_prefix: must not contain MQTT wildcards"),
        ('topic_prefix = "edgegw/v1"', 'topic_prefix = "a/+/b"', "broker.topic_prefix: must not contain MQTT wildcards"),
        ('topic_prefix = "edgegw/v1"', 'topic_prefix = "$SYS/x"', "broker.topic_prefix: must not start with '$'"),
        ('topic_prefix = "edgegw/v1"', 'topic_prefix = "a//b"', "broker.topic_prefix: must not start or end with '/'"),
        ('topic_prefix = "edgegw/v1"', 'topic_prefix = "a\\u0000b"', "broker.topic_prefix: must not contain control characters"),
        ('topic_prefix = "edgegw/v1"', f'topic_prefix = "{"x" * 129}"', "broker.topic_prefix: must be at most 128 bytes"),
        ('topic_prefix = "edgegw/v1"', 'topic_prefix = ""', "broker.topic_prefix: must not be empty"),
        ("poll_interval_s = 60", "poll_interval_s = inf", "gateway.poll_interval_s: must be a finite number, got inf"),
        ("poll_interval_s = 60", "poll_interval_s = nan", "gateway.poll_interval_s: must be a finite number, got nan"),
        ("poll_interval_s = 60", "poll_interval_s = 0", "gateway.poll_interval_s: must be 0.1..86400 s, got 0"),
        ("poll_interval_s = 60", "poll_interval_s = 1e9", "gateway.poll_interval_s: must be 0.1..86400 s"),
        ("keepalive_s = 30", "keepalive_s = 70000", "broker.keepalive_s: must be 5..240 s (MQTT keepalive"),
        ("keepalive_s = 30", "keepalive_s = 0", "broker.keepalive_s: must be 5..240 s"),
        ("keepalive_s = 30", "keepalive_s = 30.5", "broker.keepalive_s: must be an integer, got float 30.5"),
        ("ack_timeout_s = 20", "ack_timeout_s = -inf", "uplink.ack_timeout_s: must be a finite number"),
        ("ack_timeout_s = 20", "ack_timeout_s = 1e308", "uplink.ack_timeout_s: must be 1..600 s"),
        ("ack_timeout_s = 20", "window = 0", "uplink.window: must be 1..64, got 0"),
        ("ack_timeout_s = 20", "batch_max_records = 0", "uplink.batch_max_records: must be 1..100000, got 0"),
        ("ack_timeout_s = 20", "batch_max_bytes = 99999999999", "uplink.batch_max_bytes: must be 1024..983040 bytes"),
        ("ack_timeout_s = 20", "batch_max_bytes = 1048576", "max_packet_size of 1 MiB"),
        ("ack_timeout_s = 20", "reconnect_min_s = 30\nreconnect_max_s = 10", "uplink.reconnect_min_s: must not be larger"),
        ("ack_timeout_s = 20", "headend_public_key = 'AAAA'", "uplink.headend_public_key: an X25519 public key is 32 bytes"),
        ("ack_timeout_s = 20", "max_bytes_per_s = 0", "uplink.max_bytes_per_s: must be 100..1000000000 bytes/s, got 0"),
        ("timeout_s = 1.0", "timeout_s = inf", "bus[lan].timeout_s: must be a finite number, got inf"),
        ("timeout_s = 1.0", "timeout_s = 3600", "bus[lan].timeout_s: must be 0.01..60 s"),
        ("timeout_s = 1.0", "retries = 1000", "bus[lan].retries: must be 0..10, got 1000"),
        ('host = "127.0.0.1"', 'host = "evil host"', "bus[lan].host: must be a host name or address"),
        ('path = "gw.db"', 'path = "gw\\u0000.db"', "storage.path: must not contain control characters"),
        ('path = "gw.db"', 'path = "gw.db"\nmax_bytes = 9223372036854775807', "storage.max_bytes: must be 1048576..1099511627776 bytes"),
        ('site = "test"', 'site = "   "', "gateway.site: must not be empty"),
        ('site = "test"', f'site = "{"s" * 5000}"', "gateway.site: must be at most 4096 characters, got 5000"),
        ("unit_id = 1", "unit_id = 99999999999999999999999", "meter[m-1].unit_id: must be a Modbus unit id 1..247"),
        ('profile = "sdm120"', 'profile = "sdm120"\nquantities = [{a = 1}]', "meter[m-1].quantities: must be an array of quantity names"),
        ('profile = "sdm120"', 'profile = "sdm120"\nrelay = {kind = "coil", min_interval_s = nan}', "meter[m-1].relay.min_interval_s: must be a finite number"),
    ],
)
def test_hostile_value_is_one_clear_problem(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in BASE
    got = problems_of(tmp_path, BASE.replace(old, new, 1))
    assert len(got) == 1 and expected in got[0], got


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a = " + "[" * 100_000 + "]" * 100_000 + "\n", "arrays or inline tables nest deeper than 8 levels"),
        ("a = " + "{b = " * 5_000 + "1" + "}" * 5_000 + "\n", "arrays or inline tables nest deeper than 8 levels"),
        ("[" + ".".join(["a"] * 5_000) + "]\n", "tables or arrays nest deeper than 8 levels"),
        ("a." * 5_000 + "b = 1\n", "tables or arrays nest deeper than 8 levels"),
        ("x = 1\n" * (MAX_FILE_BYTES // 6 + 1), "larger than 4 MiB"),
        ("[gateway\nid = 1\n", "TOML syntax error"),
        ("\xff\xfe", "not UTF-8 text"),
    ],
    ids=["deep-arrays", "deep-inline-tables", "deep-header", "deep-dotted-key", "huge", "syntax", "binary"],
)
def test_deep_huge_or_broken_files_are_refused_not_crashed(tmp_path: Path, text: str, expected: str) -> None:
    p = tmp_path / "site.toml"
    p.write_bytes(text.encode("latin-1") if text == "\xff\xfe" else text.encode())
    report = check_config(p)
    assert report.config is None
    assert len(report.problems) == 1 and expected in report.problems[0], report.problems[0][:300]


def test_devices_and_fifos_are_not_read_as_configuration(tmp_path: Path) -> None:
    """/dev/zero as a configuration or an account file would never end: refused."""
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for path in (Path("/dev/zero"), fifo):
        report = check_config(path)
        assert report.problems == [f"{path}: not a regular file"]
    text = BASE.replace("unit_id = 1", 'unit_id = 1\naccount = "a-1"') + (
        '\n[[account]]\nid = "a-1"\nsettings = "/dev/zero"\ntariffs = ["fifo.toml"]\n'
    )
    got = problems_of(tmp_path, text)
    assert got == [
        f"{tmp_path}/site.toml:32: account[a-1].settings: /dev/zero: not a regular file",
        f"{tmp_path}/site.toml:33: account[a-1].tariffs: {fifo}: not a regular file",
    ]


# -- fuzz ----------------------------------------------------------------------

SCHEMAS: dict[str, Any] = {
    "gateway": GATEWAY_SCHEMA,
    "storage": STORAGE_SCHEMA,
    "broker": BROKER_SCHEMA,
    "uplink": UPLINK_SCHEMA,
    "security": SECURITY_SCHEMA,
}

scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", "#", "+", "$SYS", "a//b", "/dev/null", "../../etc/passwd", "gw\x00x", "sdm120", "modbus",
                     "dlt645", "serial", "tcp", "coil", "register", "lan", "m-1", "000001020304", "UTC",
                     "Asia/Shanghai", "energy_import_kwh"]),
    st.datetimes(timezones=st.none() | st.just(dt.UTC)),
    st.dates(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def table_for(schema: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    known = st.dictionaries(st.sampled_from(sorted(schema)), values, max_size=len(schema))
    extra = st.dictionaries(st.text(string.ascii_lowercase, min_size=1, max_size=6), values, max_size=1)
    return st.builds(lambda a, b: {**b, **a}, known, extra)


meter_tables = st.builds(
    lambda m, relay: {**m, **({"relay": relay} if relay is not None else {})},
    table_for(METER_SCHEMA),
    st.none() | table_for(RELAY_SCHEMA),
)
documents = st.fixed_dictionaries(
    {},
    optional={
        **{name: table_for(schema) for name, schema in SCHEMAS.items()},
        "bus": st.lists(table_for(BUS_SCHEMA), max_size=3),
        "meter": st.lists(meter_tables, max_size=3),
        "account": st.lists(table_for(ACCOUNT_SCHEMA), max_size=2),
        "profiles": st.dictionaries(st.text(max_size=5), values, max_size=2),
        "extra": values,
    },
)


def _check_never_raises(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    report = check_config(path)  # must not raise
    assert all("internal error" not in p for p in report.problems), report.problems
    if report.config is None:
        assert report.problems
    else:
        assert not report.problems


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(documents)
def test_fuzz_documents_give_problems_never_exceptions(tmp_path: Path, doc: dict[str, Any]) -> None:
    _check_never_raises(tmp_path / "fuzz.toml", tomli_w.dumps(doc).encode())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_edited_text_gives_problems_never_exceptions(tmp_path: Path, data: st.DataObject) -> None:
    text = BASE
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 8))
        insert = data.draw(st.text(max_size=6) | st.sampled_from(["[", "]]", "\n[[meter]]\n", '"""', "=", "inf", "\\u0000"]))
        text = text[:at] + insert + text[at + cut :]
    _check_never_raises(tmp_path / "fuzz.toml", text.encode("utf-8", "surrogatepass"))


@pytest.mark.long
@pytest.mark.timeout(4 * 3600)
@settings(max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(documents)
def test_fuzz_documents_long(tmp_path: Path, doc: dict[str, Any]) -> None:
    _check_never_raises(tmp_path / "fuzz.toml", tomli_w.dumps(doc).encode())

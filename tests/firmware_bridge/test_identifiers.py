"""The one identifier rule: names, central's issued ids, purposes, reason codes."""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.identifiers import (
    is_code,
    is_issued_id,
    is_name,
    is_purpose,
    is_release_id,
    is_user_name,
    name_problem,
)

NAME_CHARS = string.ascii_letters + string.digits + "_.-"


def spelled_out(value: str, first: str, rest: str, longest: int) -> bool:
    """The rule written without a regular expression."""
    return 0 < len(value) <= longest and value[0] in first and all(c in rest for c in value[1:])


@given(st.text(alphabet=NAME_CHARS + ":+ \n/é", max_size=70))
def test_names_and_issued_ids_follow_the_written_rule(value: str) -> None:
    alnum = string.ascii_letters + string.digits
    assert is_name(value) == spelled_out(value, alnum, NAME_CHARS, 64)
    assert is_issued_id(value) == spelled_out(value, alnum, NAME_CHARS + ":", 64)
    assert is_release_id(value) == spelled_out(value, alnum, NAME_CHARS + "+", 64)
    lower = string.ascii_lowercase + string.digits
    assert is_user_name(value) == spelled_out(value, lower, lower + "_.-", 64)
    assert not is_name(value) or (is_issued_id(value) and is_release_id(value))  # every name is both


@given(st.text(alphabet=string.ascii_letters + string.digits + "-_.", max_size=50))
def test_purposes_and_codes_follow_the_written_rule(value: str) -> None:
    lower = string.ascii_lowercase
    assert is_purpose(value) == spelled_out(value, lower, lower + string.digits + "-", 32)
    assert is_code(value) == spelled_out(value, lower, lower + string.digits + "_.", 48)


def test_the_whole_value_must_match() -> None:
    assert is_name("m-0001") and is_name("rs485.1") and is_name("A" * 64)
    for bad in ("m-0001\n", "", "-m", ".hidden", "m 1", "A" * 65, "gw:1", None, 7):
        assert not is_name(bad), bad
    assert is_issued_id("cmd:2026:0001") and not is_issued_id(":cmd")
    assert name_problem("m 1") == "'m 1' is not a valid identifier (letters, digits, _ . -; at most 64)"
    assert name_problem("m1") is None

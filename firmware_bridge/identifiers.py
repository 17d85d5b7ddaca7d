"""Identifiers: the one rule for every name and id the product accepts.

=============  ==========================================================  ==========================
rule           what it names                                               characters
=============  ==========================================================  ==========================
name           gateways, sites, meters, buses, accounts, register-map      a letter or digit, then
               profiles, bundles, technicians, files inside a bundle       letters, digits ``_ . -``;
                                                                           at most 64
issued id      what central issues: command ids, the key ids of its        a name, and ``:`` after
               signing keys (a command's ``issuer``)                       the first character
release id     a software bundle (``edgegw-0.2.0+site1``)                  a name, and ``+`` after the
                                                                           first character (a
                                                                           version's local part)
user name      an operator of the headend's console                       a name in lower case
purpose        a keystore purpose (``uplink-seal``)                        a lower-case letter, then
                                                                           lower-case letters, digits
                                                                           and ``-``; at most 32
code           a refusal's reason code (``counter_gap``)                   a lower-case letter, then
                                                                           lower-case letters, digits,
                                                                           ``_ .``; at most 48
=============  ==========================================================  ==========================

Names are safe in file names, MQTT topics, log lines and SQL text without
quoting. The whole value must match (a trailing newline is not part of a
name). Pure; imports nothing of the project, so every layer uses it.
"""

from __future__ import annotations

import re
from typing import TypeGuard

MAX_NAME = 64
NAME_RULE = "letters, digits, _ . -; at most 64"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ISSUED = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_RELEASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
_USER = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_PURPOSE = re.compile(r"[a-z][a-z0-9-]{0,31}")
_CODE = re.compile(r"[a-z][a-z0-9_.]{0,47}")
_PAYMENT_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


def is_name(value: object) -> TypeGuard[str]:
    """A gateway, site, meter, bus, account, profile or bundle name."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def is_issued_id(value: object) -> TypeGuard[str]:
    """A command id or central key id: a name that may also contain ``:``."""
    return isinstance(value, str) and _ISSUED.fullmatch(value) is not None


def is_release_id(value: object) -> TypeGuard[str]:
    """A software bundle id: a name that may also contain ``+``."""
    return isinstance(value, str) and _RELEASE.fullmatch(value) is not None


def is_user_name(value: object) -> TypeGuard[str]:
    """A console user's name: a name in lower case."""
    return isinstance(value, str) and _USER.fullmatch(value) is not None


def is_purpose(value: object) -> TypeGuard[str]:
    """A keystore purpose name."""
    return isinstance(value, str) and _PURPOSE.fullmatch(value) is not None


def is_code(value: object) -> TypeGuard[str]:
    """A short reason code."""
    return isinstance(value, str) and _CODE.fullmatch(value) is not None


def is_payment_key(value: object) -> TypeGuard[str]:
    """A payment channel's idempotency key (its own id of a payment): an issued id of
    up to 128 characters."""
    return isinstance(value, str) and _PAYMENT_KEY.fullmatch(value) is not None


def name_problem(value: object) -> str | None:
    """Why ``value`` is not a name (for a problem line), or None."""
    return None if is_name(value) else f"{value!r} is not a valid identifier ({NAME_RULE})"

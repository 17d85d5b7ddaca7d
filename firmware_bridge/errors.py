"""The root of every exception the product raises, and what kind of failure it is.

Every exception class in the product packages derives from
:class:`EdgeGwError` (tests/test_errors.py imports every module and checks),
so ``except EdgeGwError`` catches anything the product raises on purpose and
nothing it does not. Each class says what kind of failure it stands for
(:class:`ErrorKind`, a class attribute a subclass may narrow); callers that
count or route failures use the kind, not the class name. Classes that were
also a ``ValueError``, ``OSError`` or ``LookupError`` still are, beside the
root, so code catching those keeps working.

:class:`ProblemsError` is the root of the errors that carry a list of
problems, one line each (a configuration, tariff, account or command body
that breaks the rules: all of them are reported together).

This module sits in the bottom layer and imports nothing of the project, so
every layer can use it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class ErrorKind(enum.StrEnum):
    """What went wrong, in words a caller can act on (stable: counted and logged)."""

    ERROR = "error"  # nothing more specific is known
    INVALID = "invalid"  # input that breaks the rules: a file, an argument, a command body
    FRAME = "frame"  # bytes from a peer that do not decode (a frame, a batch, an ack)
    TIMEOUT = "timeout"  # no (complete) answer in time
    ADDRESS = "address"  # an answer from someone else than the one asked
    REFUSED = "refused"  # the other side or a rule said no (a meter's error reply, a veto)
    TRANSPORT = "transport"  # a bus, line or connection that cannot be used
    BUSY = "busy"  # held by another user, or asked again too soon
    AUTH = "auth"  # a signature, MAC, key or permission that does not verify
    STORAGE = "storage"  # stored state that is damaged, full or cannot be written
    UNSUPPORTED = "unsupported"  # a version or feature this side does not have
    NOT_FOUND = "not_found"  # nothing where something was expected
    CONFLICT = "conflict"  # the same identity with different content


class EdgeGwError(Exception):
    """Base class of every exception of the product."""

    kind: ErrorKind = ErrorKind.ERROR


class ProblemsError(EdgeGwError):
    """Input that breaks the rules; ``problems`` holds one line per problem."""

    kind = ErrorKind.INVALID
    separator = "\n"  # between the problems in the message

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__(self.separator.join(self.problems))

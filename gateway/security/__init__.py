"""Security: signed command envelopes, roles, trusted time, tamper-evident audit log.

The pure cores (:func:`authenticate`, :func:`decide`, :func:`observe`,
:func:`verify_entries`) take values and return values; the async helpers run
on the daemon's single writer connection inside the caller's transaction.
See docs/security.md for the threat model.
"""

from gateway.security.audit import AuditEntry, VerifyResult
from gateway.security.envelope import (
    CommandResult,
    Envelope,
    Outcome,
    RejectReason,
    authenticate,
    decide,
    process_command,
    sign_command,
)
from gateway.security.roles import COMMAND_ROLE, CentralKey, CommandType, Role, TrustStore
from gateway.security.trusted_time import TimeQuality, TrustedClock, TrustedTime

__all__ = [
    "COMMAND_ROLE",
    "AuditEntry",
    "CentralKey",
    "CommandResult",
    "CommandType",
    "Envelope",
    "Outcome",
    "RejectReason",
    "Role",
    "TimeQuality",
    "TrustStore",
    "TrustedClock",
    "TrustedTime",
    "VerifyResult",
    "authenticate",
    "decide",
    "process_command",
    "sign_command",
]

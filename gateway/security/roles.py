"""Central signing roles and the trust store (shared with central).

They live in :mod:`store_forward.command_roles`, beside the envelope format
central signs with; this module re-exports them for the gateway.
"""

from store_forward.command_roles import (
    COMMAND_ROLE,
    MAX_VALIDITY_MS,
    CentralKey,
    CommandType,
    Role,
    TrustError,
    TrustStore,
)

__all__ = [
    "COMMAND_ROLE",
    "MAX_VALIDITY_MS",
    "CentralKey",
    "CommandType",
    "Role",
    "TrustError",
    "TrustStore",
]

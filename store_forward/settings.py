"""The settings of the uplink and its broker connection.

These are store_forward's own types: the gateway's configuration file maps its
``[broker]`` and ``[uplink]`` tables onto them (``gateway/config.py`` checks
the values), and tests and tools build them directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["BrokerSettings", "UplinkSettings"]


@dataclass(frozen=True)
class BrokerSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30
    topic_prefix: str = "edgegw/v1"


@dataclass(frozen=True)
class UplinkSettings:
    batch_max_records: int = 5000
    batch_max_bytes: int = 64 * 1024
    ack_timeout_s: float = 20.0
    window: int = 4
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0
    headend_public_key: str | None = None  # base64 X25519: enables sealed encoding 2
    max_bytes_per_s: int | None = None  # ceiling for backlog bytes on the link
    # Unsealed batches (no headend_public_key) get acks nothing can authenticate: they
    # delete batches and count as contact with central only when this is true (development).
    allow_unauthenticated_acks: bool = False

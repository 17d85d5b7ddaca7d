"""The tests' broker: the test bench's one mosquitto starter (:mod:`testbed.broker`).

``Mosquitto(tmp_path)`` is a plain broker (anonymous, plaintext) on a free
loopback port; ``Mosquitto.shipped(dir, tls_files)`` runs the configuration
shipped for deployments (``examples/mosquitto``). Tests may stop, kill and
restart either.
"""

from __future__ import annotations

from testbed.broker import (
    BrokerError,
    Mosquitto,
    TlsFiles,
    free_port,
    mosquitto_binary,
    render_shipped_config,
    wait_port,
)

__all__ = [
    "BrokerError",
    "Mosquitto",
    "TlsFiles",
    "free_port",
    "mosquitto_binary",
    "render_shipped_config",
    "wait_port",
]

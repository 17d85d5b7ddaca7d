"""The headend's TLS to the broker: its own settings, the uplink's policy.

The policy is the gateway's (:func:`store_forward.tls.client_tls_context`):
the broker's certificate verified against ``ca_file`` and its host name,
TLS 1.2 or newer, and the headend's certificate for mutual TLS when
``cert_file`` and ``key_file`` are given.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from store_forward.tls import TLSLabels, client_tls_context

_LABELS = TLSLabels(ca_file="CA file", cert_file="certificate", key_file="key")


@dataclass(frozen=True)
class BrokerTLS:
    ca_file: Path  # the CA that signed the broker's certificate
    cert_file: Path | None = None  # the headend's client certificate (with key_file)
    key_file: Path | None = None

    def context(self) -> ssl.SSLContext:
        """The client context. Raises OSError (:class:`store_forward.tls.TLSFileError`)
        or ssl.SSLError for unreadable or mismatched files."""
        return client_tls_context(self.ca_file, self.cert_file, self.key_file, labels=_LABELS)

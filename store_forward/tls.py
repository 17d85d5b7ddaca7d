"""TLS to the broker: the client side's one policy (the gateway's uplink and the headend).

The broker's certificate is always verified, against the given CA and the
broker's host name; TLS 1.2 or newer; a client certificate (mutual TLS) when
a certificate and its key are given. Nothing falls back to plain MQTT.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from firmware_bridge.errors import EdgeGwError, ErrorKind

__all__ = ["TLSFileError", "TLSLabels", "client_tls_context"]


class TLSFileError(EdgeGwError, OSError):
    """A TLS file cannot be used; the message names the setting, the file and the cause."""

    kind = ErrorKind.INVALID


@dataclass(frozen=True)
class TLSLabels:
    """How error messages name the three files (the caller's setting names)."""

    ca_file: str = "broker.ca_file"
    cert_file: str = "broker.cert_file"
    key_file: str = "broker.key_file"


def _tls_cause(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        text = str(exc.args[1] if len(exc.args) > 1 else exc)
        return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text)
    return exc.strerror or str(exc)


def client_tls_context(
    ca_file: Path | None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    *,
    labels: TLSLabels = TLSLabels(),
) -> ssl.SSLContext:
    """Server verification always on; TLS 1.2 or newer; client certificate if given.
    Raises :class:`TLSFileError` naming the file and the cause."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    except OSError as exc:
        raise TLSFileError(f"{labels.ca_file} {ca_file}: {_tls_cause(exc)}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cert_file and key_file:
        try:
            ctx.load_cert_chain(str(cert_file), str(key_file))
        except OSError as exc:
            raise TLSFileError(
                f"{labels.cert_file} {cert_file} / {labels.key_file} {key_file}: {_tls_cause(exc)}"
            ) from exc
    return ctx

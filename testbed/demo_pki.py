"""A throw-away PKI for the demo: one CA, a broker certificate, one client certificate per party.

``make_demo_pki`` writes, under one directory, PEM files that Python's ``ssl``
(OpenSSL) accepts for TLS 1.2/1.3 with mutual authentication:

* ``ca.pem`` — a self-signed CA (ECDSA P-256, SHA-256), ``pathLen=0``. Its
  private key is never written to disk: once the certificates below are signed
  it is dropped, so nobody can issue more certificates from this directory.
  Run ``make_demo_pki`` again for a new set.
* ``ca.crl`` — the CA's certificate revocation list, empty, signed while the
  key still exists (the shipped broker configuration requires a CRL).
* ``broker.pem`` / ``broker.key`` — server certificate (extended key usage
  serverAuth) whose subject alternative names are the given hosts (IP
  addresses as IP SANs, names as DNS SANs; ``127.0.0.1`` and ``localhost`` by
  default), so clients keep hostname checking on.
* ``client-<id>.pem`` / ``client-<id>.key`` — one client certificate
  (clientAuth) per gateway with CN = gateway id, one for the headend with
  CN = ``headend_id`` and one for central's command sender with CN =
  ``central_id``: the shipped broker names every session by its certificate's
  CN (``use_username_as_clientid``), so two processes cannot share one. A broker that takes the certificate CN as the MQTT
  username (mosquitto's ``use_identity_as_username``, as in the shipped
  ``examples/mosquitto`` configuration) then confines each gateway to its own
  topics by CN.

``DemoPki.broker_files()`` names the files the shipped broker configuration
needs (:class:`testbed.broker.TlsFiles`); ``DemoPki.client_tls_context(identity)``
builds a client's ``ssl`` context (the gateway's own policy,
:func:`store_forward.uplink.tls_context`);
``DemoPki.bundle_files(identity)`` gives a gateway's credentials laid out as a
provisioning bundle carries them (``certs/ca.pem``, ``certs/client.pem``,
``certs/client.key``).

Private keys are PKCS#8 PEM without a passphrase, created with mode 0600 (never
readable by others, not even briefly). Validity is short (2 days by default)
and starts 5 minutes before ``now`` to tolerate small clock differences.

This is a demo and test PKI. A deployment's CA lives offline and issues
certificates with its own tooling (see ``examples/mosquitto/README.md``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.identifiers import is_name
from gateway.config import BrokerSection
from store_forward.uplink import tls_context
from testbed.broker import TlsFiles

__all__ = [
    "BUNDLE_CA",
    "BUNDLE_CERT",
    "BUNDLE_KEY",
    "DEFAULT_VALIDITY",
    "CertPair",
    "DemoPki",
    "DemoPkiError",
    "make_demo_pki",
]

DEFAULT_VALIDITY = dt.timedelta(days=2)
# Where a provisioning bundle puts a gateway's broker credentials (relative to gateway.toml).
BUNDLE_CA = "certs/ca.pem"
BUNDLE_CERT = "certs/client.pem"
BUNDLE_KEY = "certs/client.key"
CLOCK_SKEW = dt.timedelta(minutes=5)
ORGANIZATION = "edge-gateway demo"

# The same identifier rule as the configuration's gateway id: the CN becomes an
# MQTT username and a topic level, so "/", "+", "#" and spaces must never occur.


class DemoPkiError(EdgeGwError, ValueError):
    """The requested PKI cannot be made (bad identity or host name)."""

    kind = ErrorKind.INVALID


@dataclass(frozen=True, slots=True)
class CertPair:
    """A certificate and its private key, both PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class DemoPki:
    """Paths of everything :func:`make_demo_pki` wrote."""

    directory: Path
    ca: Path  # the CA certificate: trust anchor for the broker and every client
    crl: Path  # the CA's (empty) revocation list
    broker: CertPair  # server certificate for ``hosts``
    clients: dict[str, CertPair]  # CN -> client certificate; gateways and the headend
    headend_id: str
    not_valid_after: dt.datetime
    central_id: str = "edgegw-central"  # central's command sender (its own session)

    @property
    def headend(self) -> CertPair:
        return self.clients[self.headend_id]

    def client(self, identity: str) -> CertPair:
        try:
            return self.clients[identity]
        except KeyError:
            raise DemoPkiError(f"no client certificate for {identity!r}") from None

    def client_tls_context(self, identity: str) -> ssl.SSLContext:
        """The context a client with this identity connects with: the gateway's own
        policy (:func:`store_forward.uplink.tls_context`: server verified against
        this CA, hostname checked, TLS >= 1.2) plus this identity's certificate."""
        pair = self.client(identity)
        section = BrokerSection(tls=True, ca_file=self.ca, cert_file=pair.cert, key_file=pair.key)
        return tls_context(section)

    def bundle_files(self, identity: str) -> dict[str, bytes]:
        """The broker credentials of one client as a provisioning bundle carries them
        (docs/provisioning.md): ``certs/ca.pem``, ``certs/client.pem``, ``certs/client.key``.

        The private key travels in the bundle, so the stick is as sensitive as the
        key until the bundle is applied (the release keeps it 0600)."""
        pair = self.client(identity)
        return {
            BUNDLE_CA: self.ca.read_bytes(),
            BUNDLE_CERT: pair.cert.read_bytes(),
            BUNDLE_KEY: pair.key.read_bytes(),
        }

    def broker_files(self) -> TlsFiles:
        """What the shipped broker configuration names: CA, CRL, server certificate and key."""
        return TlsFiles(ca=self.ca, crl=self.crl, cert=self.broker.cert, key=self.broker.key)


def make_demo_pki(
    directory: Path,
    *,
    gateway_ids: Sequence[str],
    headend_id: str = "edgegw-headend",
    central_id: str = "edgegw-central",
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    now: dt.datetime | None = None,
    valid_for: dt.timedelta = DEFAULT_VALIDITY,
) -> DemoPki:
    """Generate a fresh CA and every certificate under ``directory`` (created if missing).

    Existing files of the same names are replaced. ``now`` (timezone-aware;
    default: the current time) and ``valid_for`` set the validity window.
    """
    identities = [*gateway_ids, headend_id, central_id]
    for ident in identities:
        if not is_name(ident):
            raise DemoPkiError(
                f"{ident!r} is not a valid identity (1-64 letters, digits, _ . -, "
                "starting with a letter or digit)"
            )
    if len(set(identities)) != len(identities):
        raise DemoPkiError(f"identities must be distinct (central's too): {identities}")
    if not hosts:
        raise DemoPkiError("the broker certificate needs at least one host")
    sans = [_san(h) for h in hosts]
    if valid_for <= dt.timedelta(0):
        raise DemoPkiError(f"validity must be positive, got {valid_for}")
    if now is None:
        now = dt.datetime.now(dt.UTC)
    elif now.tzinfo is None:
        raise DemoPkiError("now must be timezone-aware")
    start, end = now - CLOCK_SKEW, now + valid_for

    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, start, end)
    ca_path = directory / "ca.pem"
    _write_public(ca_path, ca_cert)
    crl_path = directory / "ca.crl"
    _write_crl(crl_path, ca_key, ca_cert, start, end)

    broker_key = ec.generate_private_key(ec.SECP256R1())
    broker_cert = _leaf(ca_key, ca_cert, broker_key, "edgegw demo broker", start, end, sans=sans)
    broker = _write_pair(directory, "broker", broker_key, broker_cert)

    clients: dict[str, CertPair] = {}
    for ident in identities:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _leaf(ca_key, ca_cert, key, ident, start, end, sans=None)
        clients[ident] = _write_pair(directory, f"client-{ident}", key, cert)
    return DemoPki(directory, ca_path, crl_path, broker, clients, headend_id, end, central_id)


# --------------------------------------------------------------------------- #


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_valid_label(label) for label in labels):
        raise DemoPkiError(f"{host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host.lower())


def _valid_label(label: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label))


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, start: dt.datetime, end: dt.datetime
) -> x509.Certificate:
    name = _name("edgegw demo CA")
    pub = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    cn: str,
    start: dt.datetime,
    end: dt.datetime,
    *,
    sans: list[x509.GeneralName] | None,
) -> x509.Certificate:
    """``sans`` given: a server certificate for those names; None: a client certificate."""
    pub = key.public_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if sans is not None else ExtendedKeyUsageOID.CLIENT_AUTH
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def _write_public(path: Path, cert: x509.Certificate) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)


def _write_crl(
    path: Path,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    start: dt.datetime,
    end: dt.datetime,
) -> None:
    """An empty CRL: nothing is revoked, but a broker that checks revocation can."""
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(start)
        .next_update(end)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(x509.CRLNumber(1), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Mode 0600 from creation on; replaces an older file atomically."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by an interrupted earlier run
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may only remove bits; make the mode exact
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_pair(
    directory: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> CertPair:
    pair = CertPair(directory / f"{stem}.pem", directory / f"{stem}.key")
    _write_private(pair.key, key)
    _write_public(pair.cert, cert)
    return pair

"""Test PKI: a CA, broker certificates, client certificates (CN = gateway id), a rogue CA, a CRL.

Everything is generated fresh with ``cryptography`` (ECDSA P-256, fast) and
written as PEM files. Certificates follow RFC 5280 closely enough for
OpenSSL's strict mode: key identifiers, critical basic constraints and key
usage on the CA, SANs and extended key usage on the leaves.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HEADEND_CN = "edgegw-headend"
# central's command dispatchers: each process its own certificate, as the shipped broker
# names every session by its certificate's CN (examples/mosquitto/edgegw.acl)
CENTRAL_CN = "edgegw-central"
CENTRAL_2_CN = "edgegw-central-2"


@dataclass(frozen=True)
class Authority:
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-gateway test"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def make_ca(name: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(hours=1))
        .not_valid_after(_now() + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(name, key, cert)


def issue(
    ca: Authority,
    cn: str,
    *,
    server: bool,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    valid_days: int = 30,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key()
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(hours=1))
        .not_valid_after(_now() + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, b.sign(ca.key, hashes.SHA256())


def write_pair(
    directory: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> Pair:
    c, k = directory / f"{stem}.pem", directory / f"{stem}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    k.chmod(0o600)
    return Pair(c, k)


def write_crl(path: Path, ca: Authority, revoked: list[x509.Certificate]) -> None:
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(_now() - dt.timedelta(minutes=5))
        .next_update(_now() + dt.timedelta(days=7))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .add_extension(x509.CRLNumber(1), critical=False)
    )
    for cert in revoked:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(_now() - dt.timedelta(minutes=1))
            .build()
        )
    path.write_bytes(b.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


@dataclass
class Pki:
    """All files a transport test needs, under ``directory``."""

    directory: Path
    ca: Path  # the fleet CA (trusted by broker and clients)
    rogue_ca: Path
    crl: Path  # the fleet CA's CRL
    server: Pair  # broker cert for 127.0.0.1 / localhost, fleet CA
    rogue_server: Pair  # same names, rogue CA
    wrong_host_server: Pair  # fleet CA, but for broker.invalid only
    clients: dict[str, Pair] = field(default_factory=dict)  # CN -> pair, fleet CA
    rogue_clients: dict[str, Pair] = field(default_factory=dict)  # CN -> pair, rogue CA


def make_pki(
    directory: Path,
    *,
    clients: tuple[str, ...] = ("gw-a", "gw-b", HEADEND_CN),
    revoked: tuple[str, ...] = ("gw-revoked",),
    rogue_clients: tuple[str, ...] = ("gw-a",),
) -> Pki:
    """Generate the fleet CA, a rogue CA and every certificate; ``revoked`` CNs go in the CRL."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, rogue = make_ca("edgegw test fleet CA"), make_ca("rogue CA")
    ca_path, rogue_path = directory / "ca.pem", directory / "rogue-ca.pem"
    ca_path.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    rogue_path.write_bytes(rogue.cert.public_bytes(serialization.Encoding.PEM))
    dns, ips = ("localhost",), ("127.0.0.1",)
    server = write_pair(directory, "server", *issue(ca, "broker", server=True, dns=dns, ips=ips))
    rogue_server = write_pair(
        directory, "rogue-server", *issue(rogue, "broker", server=True, dns=dns, ips=ips)
    )
    wrong = write_pair(
        directory, "wrong-host-server", *issue(ca, "broker", server=True, dns=("broker.invalid",))
    )
    pki = Pki(directory, ca_path, rogue_path, directory / "ca.crl", server, rogue_server, wrong)
    revoked_certs = []
    for cn in (*clients, *revoked):
        key, cert = issue(ca, cn, server=False)
        pki.clients[cn] = write_pair(directory, f"client-{cn}", key, cert)
        if cn in revoked:
            revoked_certs.append(cert)
    for cn in rogue_clients:
        pki.rogue_clients[cn] = write_pair(
            directory, f"rogue-client-{cn}", *issue(rogue, cn, server=False)
        )
    write_crl(pki.crl, ca, revoked_certs)
    return pki

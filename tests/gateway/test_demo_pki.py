"""The demo PKI: files Python's ssl loads, and real TLS handshakes on 127.0.0.1 that pass or fail."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.config import BrokerSection
from store_forward.uplink import tls_context
from testbed.demo_pki import DemoPki, DemoPkiError, make_demo_pki

GATEWAYS = ("gw-a", "gw-b")
TIMEOUT = 5.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPki:
    return make_demo_pki(tmp_path_factory.mktemp("pki"), gateway_ids=GATEWAYS)


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> DemoPki:
    """A second, unrelated PKI with the same identities and host names."""
    return make_demo_pki(tmp_path_factory.mktemp("other"), gateway_ids=GATEWAYS)


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(ca)
    return ctx


def client_context(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """The gateway's own TLS context, built from a [broker] section."""
    return tls_context(
        BrokerSection(host="127.0.0.1", tls=True, ca_file=ca, cert_file=cert, key_file=key)
    )


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str = "127.0.0.1"
) -> tuple[str | None, str | None, str | None]:
    """One TLS connection over loopback: (server error, client error, client CN seen by server).

    The server sends one byte after a successful handshake and the client waits
    for it, so a client certificate rejected after the client's side of a TLS 1.3
    handshake is finished still shows up as a client error.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    port = listener.getsockname()[1]
    result: dict[str, str | None] = {"server": None, "cn": None}

    def serve() -> None:
        try:
            raw, _ = listener.accept()
        except OSError as exc:
            result["server"] = f"accept: {exc}"
            return
        raw.settimeout(TIMEOUT)
        try:
            with server_ctx.wrap_socket(raw, server_side=True) as tls:
                peer = tls.getpeercert()
                subject = peer.get("subject", ()) if peer else ()
                for rdn in subject:
                    for attr in rdn:
                        if attr[0] == "commonName":
                            result["cn"] = str(attr[1])
                tls.sendall(b"!")
        except (OSError, ssl.SSLError) as exc:
            result["server"] = str(exc)
        finally:
            raw.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_error = None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=hostname) as tls:
                if tls.recv(1) != b"!":
                    client_error = "connection closed after the handshake"
    except (OSError, ssl.SSLError) as exc:
        client_error = str(exc)
    thread.join(TIMEOUT)
    listener.close()
    assert not thread.is_alive()
    return result["server"], client_error, result["cn"]


# --------------------------------------------------------------------------- #
# Files


def test_files_are_pem_that_python_ssl_loads(pki: DemoPki) -> None:
    assert set(pki.clients) == {*GATEWAYS, "edgegw-headend", "edgegw-central"}
    assert pki.headend == pki.clients["edgegw-headend"]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca)
    for pair in (pki.broker, *pki.clients.values()):
        assert pair.cert.parent == pki.directory
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(pair.cert, pair.key)


def test_private_keys_are_0600_and_the_ca_key_is_not_kept(pki: DemoPki) -> None:
    keys = [pki.broker.key, *(p.key for p in pki.clients.values())]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    holding_keys = {p for p in pki.directory.iterdir() if b"PRIVATE KEY" in p.read_bytes()}
    assert holding_keys == set(keys)  # nothing else, in particular no CA key
    assert not list(pki.directory.glob("*.tmp"))


def test_certificate_contents(pki: DemoPki) -> None:
    ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    broker = x509.load_pem_x509_certificate(pki.broker.cert.read_bytes())
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    eku = broker.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for ident, pair in pki.clients.items():
        cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        assert [a.value for a in cns] == [ident]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert dt.timedelta(days=2) <= lifetime <= dt.timedelta(days=2, minutes=10)
        assert cert.not_valid_after_utc == pki.not_valid_after.replace(microsecond=0)
    # the CA's revocation list (the shipped broker configuration requires one): signed
    # by the CA, nothing revoked
    crl = x509.load_pem_x509_crl(pki.crl.read_bytes())
    assert crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key())
    assert len(crl) == 0


def test_a_second_run_replaces_every_file(tmp_path: Path) -> None:
    first = make_demo_pki(tmp_path, gateway_ids=["gw-a"])
    old = first.ca.read_bytes()
    second = make_demo_pki(tmp_path, gateway_ids=["gw-a"])
    assert second.ca.read_bytes() != old
    s, c, _ = handshake(
        server_context(second.broker.cert, second.broker.key, second.ca),
        client_context(second.ca, second.clients["gw-a"].cert, second.clients["gw-a"].key),
    )
    assert (s, c) == (None, None)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"gateway_ids": ["gw/a"]}, "not a valid identity"),
        ({"gateway_ids": ["gw+"]}, "not a valid identity"),
        ({"gateway_ids": ["#"]}, "not a valid identity"),
        ({"gateway_ids": [""]}, "not a valid identity"),
        ({"gateway_ids": ["gw-a", "gw-a"]}, "distinct"),
        ({"gateway_ids": ["edgegw-headend"]}, "distinct"),
        ({"gateway_ids": ["gw-a"], "hosts": ()}, "at least one host"),
        ({"gateway_ids": ["gw-a"], "hosts": ("bad host",)}, "neither an IP"),
        ({"gateway_ids": ["gw-a"], "valid_for": dt.timedelta(0)}, "positive"),
        ({"gateway_ids": ["gw-a"], "now": dt.datetime(2026, 1, 1)}, "timezone-aware"),
    ],
)
def test_bad_requests_are_refused_before_writing(
    tmp_path: Path, kwargs: dict[str, object], fragment: str
) -> None:
    with pytest.raises(DemoPkiError, match=fragment):
        make_demo_pki(tmp_path / "pki", **kwargs)
    assert not (tmp_path / "pki").exists()


def test_client_lookup_names_the_missing_identity(pki: DemoPki) -> None:
    assert pki.client("gw-a") == pki.clients["gw-a"]
    with pytest.raises(DemoPkiError, match="gw-z"):
        pki.client("gw-z")


# --------------------------------------------------------------------------- #
# Handshakes


@pytest.mark.parametrize("ident", [*GATEWAYS, "edgegw-headend"])
@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost"])
def test_mutual_tls_handshake_succeeds(pki: DemoPki, ident: str, hostname: str) -> None:
    pair = pki.client(ident)
    server_err, client_err, cn = handshake(
        server_context(pki.broker.cert, pki.broker.key, pki.ca),
        client_context(pki.ca, pair.cert, pair.key),
        hostname,
    )
    assert (server_err, client_err) == (None, None)
    assert cn == ident


def test_client_certificate_from_an_unrelated_ca_is_refused(pki: DemoPki, other: DemoPki) -> None:
    rogue = other.client("gw-a")
    server_err, client_err, cn = handshake(
        server_context(pki.broker.cert, pki.broker.key, pki.ca),
        client_context(pki.ca, rogue.cert, rogue.key),
    )
    assert server_err is not None and "certificate verify failed" in server_err
    assert client_err is not None
    assert cn is None


def test_client_without_certificate_is_refused(pki: DemoPki) -> None:
    server_err, client_err, _ = handshake(
        server_context(pki.broker.cert, pki.broker.key, pki.ca),
        client_context(pki.ca, None, None),
    )
    assert server_err is not None and "certificate" in server_err
    assert client_err is not None


def test_server_certificate_from_an_unrelated_ca_is_refused(pki: DemoPki, other: DemoPki) -> None:
    pair = pki.client("gw-a")
    _, client_err, _ = handshake(
        server_context(other.broker.cert, other.broker.key, pki.ca),
        client_context(pki.ca, pair.cert, pair.key),
    )
    assert client_err is not None and "CERTIFICATE_VERIFY_FAILED" in client_err


def test_server_certificate_for_another_host_is_refused(pki: DemoPki) -> None:
    pair = pki.client("gw-a")
    _, client_err, _ = handshake(
        server_context(pki.broker.cert, pki.broker.key, pki.ca),
        client_context(pki.ca, pair.cert, pair.key),
        hostname="broker.example.net",
    )
    assert client_err is not None and "mismatch" in client_err


def test_a_client_certificate_cannot_serve_as_the_broker(pki: DemoPki) -> None:
    """Extended key usage: a gateway's certificate does not make it a broker."""
    gw_b, gw_a = pki.client("gw-b"), pki.client("gw-a")
    _, client_err, _ = handshake(
        server_context(gw_b.cert, gw_b.key, pki.ca),
        client_context(pki.ca, gw_a.cert, gw_a.key),
    )
    assert client_err is not None and "CERTIFICATE_VERIFY_FAILED" in client_err


def test_expired_certificates_are_refused(tmp_path: Path) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    old = make_demo_pki(tmp_path, gateway_ids=["gw-a"], now=past)
    assert old.not_valid_after < dt.datetime.now(dt.UTC)
    pair = old.client("gw-a")
    _, client_err, _ = handshake(
        server_context(old.broker.cert, old.broker.key, old.ca),
        client_context(old.ca, pair.cert, pair.key),
    )
    assert client_err is not None and "expired" in client_err


def test_convenience_contexts_complete_a_handshake(pki: DemoPki) -> None:
    files = pki.broker_files()  # what the shipped broker configuration is given
    assert (files.ca, files.crl, files.cert, files.key) == (
        pki.ca,
        pki.crl,
        pki.broker.cert,
        pki.broker.key,
    )
    server_ctx = server_context(files.cert, files.key, files.ca)
    client_ctx = pki.client_tls_context("gw-b")
    assert client_ctx.check_hostname and client_ctx.verify_mode is ssl.CERT_REQUIRED
    assert client_ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert handshake(server_ctx, client_ctx, "localhost") == (None, None, "gw-b")
    with pytest.raises(DemoPkiError, match="gw-z"):
        pki.client_tls_context("gw-z")

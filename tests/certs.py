"""Test certificates made on the fly with ``cryptography`` (no files in git).

Reusable by any TLS test (listeners, broker, MQTT sink)::

    from certs import CertFiles, make_cert_files

    @pytest.fixture(scope="module")
    def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
        return make_cert_files(tmp_path_factory.mktemp("certs"))

    def test_tls(tls_certs):
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(tls_certs.server_cert, tls_certs.server_key)
        client_ctx = tls_certs.client_context()            # trusts the CA, sends the client cert
        client_ctx = tls_certs.client_context(with_cert=False)

(``tests/`` is on pytest's ``pythonpath``; ``tests.certs`` would not work because
gmqtt installs a top-level package named ``tests``.) The session-scoped
fixture ``tls_certs`` below can also be imported directly
(``from certs import tls_certs``), at the price of a ruff F811 per use.

What :func:`make_cert_files` writes (PEM, keys unencrypted, EC P-256 because
it is generated in milliseconds where RSA-2048 takes ~0.1 s each):

- ``ca.pem``/``ca.key``: a CA that signs everything below.
- ``server.pem``/``server.key``: CN ``localhost``, SANs ``localhost``,
  ``127.0.0.1``, ``::1``; extended key usage serverAuth.
- ``client.pem``/``client.key``: CN :data:`CLIENT_CN`, clientAuth.
- ``rogue-client.pem``/``rogue-client.key``: a client certificate with the same
  CN signed by a different CA, which the server must refuse.

``tls_certs`` is session-scoped: generated once per test run.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLIENT_CN = "device-1"
"""Common name of the client certificate."""

Key = ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeway tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _new_key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(cn: str = "edgeway test CA") -> tuple[x509.Certificate, Key]:
    """A self-signed CA certificate and its key."""
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_cert(
    ca: tuple[x509.Certificate, Key],
    cn: str,
    *,
    server: bool = False,
    client: bool = False,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
    days: int = 365,
) -> tuple[x509.Certificate, Key]:
    """A leaf certificate signed by ``ca``."""
    ca_cert, ca_key = ca
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    usages = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def write_key(path: Path, key: Key) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


@dataclass(frozen=True, slots=True)
class CertFiles:
    """Paths of a generated CA, server and client certificates."""

    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_client_cert: Path
    rogue_client_key: Path
    client_cn: str = CLIENT_CN

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        """A plain server context (for tests of clients, e.g. the MQTT sink)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        if require_client_cert:
            ctx.load_verify_locations(self.ca_cert)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self, *, with_cert: bool = True, rogue: bool = False) -> ssl.SSLContext:
        """A client context that trusts the test CA and checks the host name
        (connect to ``127.0.0.1`` or ``localhost``); with the client
        certificate unless ``with_cert=False``; ``rogue=True`` sends the
        certificate signed by the other CA instead."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(self.ca_cert)
        if rogue:
            ctx.load_cert_chain(self.rogue_client_cert, self.rogue_client_key)
        elif with_cert:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


def make_cert_files(directory: Path, client_cn: str = CLIENT_CN) -> CertFiles:
    """Generate a CA, a server and client certificates into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca()
    server = issue_cert(
        ca,
        "localhost",
        server=True,
        dns_names=("localhost",),
        ip_addresses=("127.0.0.1", "::1"),
    )
    client = issue_cert(ca, client_cn, client=True)
    rogue = issue_cert(make_ca("rogue CA"), client_cn, client=True)
    d = directory
    return CertFiles(
        dir=d,
        ca_cert=write_cert(d / "ca.pem", ca[0]),
        ca_key=write_key(d / "ca.key", ca[1]),
        server_cert=write_cert(d / "server.pem", server[0]),
        server_key=write_key(d / "server.key", server[1]),
        client_cert=write_cert(d / "client.pem", client[0]),
        client_key=write_key(d / "client.key", client[1]),
        rogue_client_cert=write_cert(d / "rogue-client.pem", rogue[0]),
        rogue_client_key=write_key(d / "rogue-client.key", rogue[1]),
        client_cn=client_cn,
    )


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    """CA, server and client certificates, generated once per test session."""
    return make_cert_files(tmp_path_factory.mktemp("certs"))


def crl_read(watch: Any, path: Path) -> Callable[[], bool]:
    """For a test's ``wait_until``: whether a listener's ``CrlWatch`` has read
    the CRL now in ``path`` (it looks every ``CRL_POLL``; a fixed sleep of
    about that long fails on a loaded machine). The watch runs on the test's
    own event loop, so once its ``mtime`` is the file's, that CRL is in force."""
    want = path.stat().st_mtime
    return lambda: bool(watch.mtime == want)

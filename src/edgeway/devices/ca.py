"""The gateway's own certificate authority: device certificates and their CRL.

Offline, local, no cloud: ``edgeway ca init`` makes a CA under
``DATA_DIR/ca/`` (an EC P-256 key, mode 0600, a self-signed certificate and
an empty revocation list); ``edgeway ca issue-cert ID`` writes a PEM bundle
for device ``ID`` (its private key, its certificate with CN = ID and the
client-authentication usage, and the CA certificate); ``edgeway ca revoke
ID`` adds the device's certificates to the CRL; ``edgeway ca server-cert
HOST`` makes the MQTT listener's own certificate::

    mqtt:
      listeners:
        - bind: "0.0.0.0:8883"
          tls: {cert: DATA_DIR/ca/server.pem, key: DATA_DIR/ca/server.key,
                ca: DATA_DIR/ca/ca.pem, crl: DATA_DIR/ca/crl.pem,
                require_client_cert: true}

The listener checks the CRL at every handshake (OpenSSL's CRL check of the
leaf certificate) and reads the file again when it changes, so a revoked
certificate cannot start a new connection a second later; the device's
connections that are open are closed by its revocation in the credential
store (:meth:`revoke` disables the device there too). An expired
certificate, or one from another CA, fails the handshake.

See docs/ca.md for the operator's steps.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeway.devices.credentials import check_device_id
from edgeway.storage.sqlite import connect, migrate

__all__ = ["CaError", "GatewayCa"]

CA_DIR = "ca"
CA_DAYS = 3650
"""Ten years: the CA outlives every device certificate it signs."""
CERT_DAYS = 365
"""Device and server certificates: a year, renewed by issuing again."""
CRL_DAYS = 30
"""The CRL's next update: a listener keeps accepting it this long without a
new one. ``edgeway ca revoke`` and ``edgeway ca crl`` (e.g. monthly from
cron) write a fresh one."""

_SCHEMA_V1 = """
CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    not_after REAL NOT NULL,
    revoked REAL
);
CREATE INDEX certificates_device ON certificates(device_id);
"""


class CaError(Exception):
    """The CA is missing, exists already, or an argument is bad."""


@dataclass(slots=True, frozen=True)
class Issued:
    device_id: str
    serial: int
    not_after: dt.datetime
    path: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by the owner only (created 0600, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class GatewayCa:
    """The CA of one data directory (``DATA_DIR/ca``)."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / CA_DIR
        self.key_path = self.dir / "ca.key"
        self.cert_path = self.dir / "ca.pem"
        self.crl_path = self.dir / "crl.pem"

    @property
    def exists(self) -> bool:
        return self.key_path.exists() and self.cert_path.exists()

    def _db(self) -> sqlite3.Connection:
        conn = connect(self.dir / "ca.db")
        migrate(conn, [_SCHEMA_V1], "ca.db")
        return conn

    # ------------------------------------------------------------------ init

    def init(self, name: str = "edgeway gateway CA", *, days: int = CA_DAYS) -> None:
        if self.exists:
            raise CaError(f"{self.dir}: a CA exists already (its key signs every device's cert)")
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        _write_private(self.key_path, _key_pem(key))
        _write_public(self.cert_path, cert.public_bytes(serialization.Encoding.PEM))
        self._db().close()
        self.write_crl()

    def _load(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        if not self.exists:
            raise CaError(f"no CA in {self.dir}: run 'edgeway ca init' first")
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CaError(f"{self.key_path}: not an EC key")
        return key, x509.load_pem_x509_certificate(self.cert_path.read_bytes())

    # ----------------------------------------------------------------- issue

    def issue(
        self,
        device_id: str,
        out: Path,
        *,
        days: int = CERT_DAYS,
        server_names: list[str] | None = None,
        not_before: dt.datetime | None = None,
        key_out: Path | None = None,
    ) -> Issued:
        """Write ``out``: the new key, its certificate (CN = ``device_id``)
        and the CA certificate, PEM, mode 0600 (with ``key_out``: the key
        there, the certificates in ``out``). ``server_names``: a server
        certificate for those DNS names / IP addresses instead."""
        if server_names is None:
            try:
                check_device_id(device_id)
            except Exception as e:
                raise CaError(str(e)) from None
        ca_key, ca_cert = self._load()
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or (_now() - dt.timedelta(minutes=5))
        not_after = start + dt.timedelta(days=days)
        serial = x509.random_serial_number()
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if server_names:
            import ipaddress

            names: list[x509.GeneralName] = []
            for n in server_names:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    names.append(x509.DNSName(n))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        pem = serialization.Encoding.PEM
        chain = cert.public_bytes(pem) + ca_cert.public_bytes(pem)
        if key_out is not None:
            _write_private(key_out, _key_pem(key))
            _write_public(out, chain)
        else:
            _write_private(out, _key_pem(key) + chain)
        conn = self._db()
        try:
            conn.execute(
                "INSERT INTO certificates(serial, device_id, kind, not_after) VALUES (?, ?, ?, ?)",
                (str(serial), device_id, "server" if server_names else "device",
                 not_after.timestamp()),
            )  # fmt: skip
        finally:
            conn.close()
        return Issued(device_id, serial, not_after, out)

    # ---------------------------------------------------------------- revoke

    def revoke(self, device_id: str) -> int:
        """Revoke every unrevoked certificate of ``device_id`` and write a new
        CRL; returns how many. (The caller disables the device in the
        credential store too, which closes its open connections.)"""
        conn = self._db()
        try:
            n = conn.execute(
                "UPDATE certificates SET revoked = ? WHERE device_id = ? AND revoked IS NULL",
                (_now().timestamp(), device_id),
            ).rowcount
        finally:
            conn.close()
        if n:
            self.write_crl()
        return n

    def write_crl(self, *, days: int = CRL_DAYS) -> None:
        """Sign and write ``crl.pem`` listing every revoked, unexpired serial.

        Its ``last_update`` is the current second, never later: a TLS server
        checks with the newest CRL that is already valid, and one dated ahead
        (the way this once made a CRL written within the same second as the
        one before the newest) was passed over for the previous one, which did
        not list the certificate just revoked. A listener puts each new CRL in
        force alone (``CrlWatch``), so one of the same second as the previous
        counts all the same."""
        ca_key, ca_cert = self._load()
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now)
            .next_update(now + dt.timedelta(days=days))
        )
        conn = self._db()
        try:
            rows = conn.execute(
                "SELECT serial, revoked FROM certificates WHERE revoked IS NOT NULL "
                "AND not_after > ?",
                (now.timestamp(),),
            ).fetchall()
        finally:
            conn.close()
        for serial, revoked in rows:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(serial))
                .revocation_date(dt.datetime.fromtimestamp(revoked, dt.UTC))
                .build()
            )
        crl = builder.sign(ca_key, hashes.SHA256())
        _write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))

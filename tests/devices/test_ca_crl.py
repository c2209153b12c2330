"""The CA's CRLs are never dated in the future."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509

from edgeway.devices.ca import GatewayCa


def test_crls_written_within_a_second_are_never_dated_in_the_future(tmp_path: Path) -> None:
    """A TLS server checks with the newest CRL that is already valid: a CRL
    dated a second ahead (the old way to make it newer than one written in
    the same second) was passed over for the previous one, which did not list
    the certificate just revoked (a revoked device could connect for up to a
    second). The listener side is tests/devices/test_gateway_ca.py."""
    ca = GatewayCa(tmp_path / "ca")
    ca.init("test CA")
    ca.issue("dev-1", tmp_path / "dev-1.pem")
    for _ in range(3):
        ca.revoke("dev-1")
        ca.write_crl()
        crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
        assert crl.last_update_utc <= dt.datetime.now(dt.UTC)
    assert len(list(crl)) == 1  # dev-1's certificate

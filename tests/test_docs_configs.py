"""Every configuration example in the docs passes ``edgeway check``.

Each ```` ```yaml ```` block in ``docs/`` and ``README.md`` is a complete
configuration file, checked with the same ``validate()`` as ``edgeway check``
and ``edgeway run``, unless its first line is a comment saying otherwise:
``# fragment: ...`` (a piece of a file, shown alone) or ``# ... not an edgeway
configuration`` (a Prometheus scrape file, say). A page whose examples show
only some sections (``# example:`` blocks of docs/pipeline.md) declares the
sinks they send to in a block that starts ``# sinks for the examples on this
page``; each such example is checked with that block in front.

The certificate and key files an example names (``/etc/edgeway/server.pem``)
are generated into a temporary directory and the example is pointed there, so
"must exist and parse" is checked with real PEM/DER files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certs import CertFiles, make_cert_files
from edgeway.config import ConfigIssue
from edgeway.validate import validate

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```ya?ml\n(.*?)^```", re.S | re.M)
FILE_NAME = re.compile(r"(?<![\w/.-])((?:/[\w.-]+)*/?[\w.-]+\.(?:pem|crt|key|der|creds))\b")


@dataclass(frozen=True, slots=True)
class Example:
    page: Path
    line: int
    """Line of the block's first YAML line in the page."""
    text: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


SINKS_FOR_EXAMPLES = "# sinks for the examples on this page"


def _examples() -> list[Example]:
    pages = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
    out = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        blocks = [(text[: m.start()].count("\n") + 2, m.group(1)) for m in BLOCK.finditer(text)]
        sinks = next((b for _, b in blocks if b.startswith(SINKS_FOR_EXAMPLES)), "")
        for line, block in blocks:
            first = block.split("\n", 1)[0]
            if first.startswith("#") and (
                "fragment" in first or "not an edgeway configuration" in first
            ):
                continue
            if first.startswith("# example:") and sinks:
                # Line numbers stay the block's: the sinks go after its first line.
                block = f"{first}\n{sinks}{block.split(chr(10), 1)[1]}"
                line -= sinks.count("\n")
            out.append(Example(page, line, block))
    return out


EXAMPLES = _examples()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return make_cert_files(tmp_path_factory.mktemp("docs-certs"))


def _stand_in(name: str, certs: CertFiles, into: Path) -> Path:
    """A real file of the kind ``name`` suggests (key, CA, certificate; PEM or DER)."""
    stem = Path(name).name.lower()
    target = into / Path(name).name
    if stem.endswith(".creds"):
        target.write_text("-----BEGIN NATS USER JWT-----\n", encoding="ascii")
        return target
    if "crl" in stem:
        target.write_bytes(_empty_crl(certs))
        return target
    is_key = stem.endswith(".key") or "key" in stem
    is_ca = bool(re.search(r"(^|[-_.])ca([-_.\d]|$)", stem)) or "rootca" in stem
    source = certs.server_key if is_key else certs.ca_cert if is_ca else certs.server_cert
    data = source.read_bytes()
    if stem.endswith(".der"):
        if is_key:
            key = serialization.load_pem_private_key(data, password=None)
            data = key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        else:
            data = x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    target.write_bytes(data)
    return target


def _empty_crl(certs: CertFiles) -> bytes:
    """A revocation list of the test CA, revoking nothing."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes

    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=None)
    now = dt.datetime.now(dt.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return crl.public_bytes(serialization.Encoding.PEM)


def test_the_docs_have_examples() -> None:
    # A change to the block syntax must not make this test check nothing.
    assert len(EXAMPLES) >= 30
    assert any(e.page.name == "security.md" for e in EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)
def test_example_passes_edgeway_check(example: Example, files: CertFiles, tmp_path: Path) -> None:
    text = FILE_NAME.sub(lambda m: str(_stand_in(m.group(1), files, tmp_path)), example.text)
    issues = validate(text, filename=str(example.page.relative_to(ROOT)))
    shifted = [
        ConfigIssue(i.file, None if i.line is None else i.line + example.line - 1, i.key, i.message)
        for i in issues
    ]
    assert not shifted, "\n".join(str(i) for i in shifted)


def test_example_password_hashes_are_of_the_password_the_page_names() -> None:
    # "Runnable" includes logging in: the hashes are of "change-me", as the
    # pages say, so a reader can try a recipe with mosquitto_pub at once.
    import argon2

    hashes = {h for e in EXAMPLES for h in re.findall(r'"(\$argon2id\$[^"]+)"', e.text)}
    assert hashes
    for h in hashes:
        assert argon2.PasswordHasher().verify(h, "change-me")

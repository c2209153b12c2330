"""Ed25519 signatures for what the gateway accepts from afar: model files
(:mod:`edgeway.ml.store`) and fleet configurations (:mod:`edgeway.runtime.fleet`).

A signature always covers a *context* (what kind of thing it is, with its
version) followed by the SHA-256 of the content, so a signature made for one
purpose cannot be replayed for another (a model's signature is not a
configuration's). Keys are named in the configuration (``models.keys``,
``fleet.keys``) as PEM text or the base64 of the 32 raw public-key bytes;
``edgeway models keygen`` / ``edgeway fleet keygen`` make a key pair.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def load_public_key(text: str) -> Any:
    """An Ed25519 public key from PEM text or the base64 of its 32 raw bytes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    text = text.strip()
    if text.startswith("-----BEGIN"):
        key = serialization.load_pem_public_key(text.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return key
    raw = base64.b64decode(text, validate=True)
    return Ed25519PublicKey.from_public_bytes(raw)


def check_public_keys(keys: Mapping[str, str]) -> None:
    """Raise ValueError naming the first key that does not parse (config validation)."""
    for name, text in keys.items():
        try:
            load_public_key(text)
        except Exception as e:
            raise ValueError(f"key {name!r} is not an Ed25519 public key: {e}") from None


def verify(keys: Mapping[str, Any], signature: bytes, message: bytes) -> str | None:
    """The name of the key in ``keys`` (loaded public keys) that signed
    ``message``, or None."""
    from cryptography.exceptions import InvalidSignature

    for name, key in keys.items():
        try:
            key.verify(signature, message)
        except InvalidSignature:
            continue
        return str(name)
    return None


def generate(path: Path) -> str:
    """Write a new private key to ``path`` (PEM, mode 0600, never overwriting)
    and return the public key as base64 (what goes in the configuration)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if path.exists():
        raise FileExistsError(f"{path} exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.touch(mode=0o600)
    path.write_bytes(pem)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def sign(key_path: Path, message: bytes) -> str:
    """The base64 Ed25519 signature of ``message`` with the private key in ``key_path``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{key_path} is not an Ed25519 private key")
    return base64.b64encode(key.sign(message)).decode()

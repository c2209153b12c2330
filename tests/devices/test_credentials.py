"""The credential store: keyed hashes, the key file, passwords, changes seen
across processes (a second store on the same files plays the CLI)."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from edgeway.devices.credentials import (
    DB_NAME,
    KEY_NAME,
    CredentialError,
    CredentialStore,
    Verdict,
    load_key,
)


@pytest.fixture
def store(tmp_path: Path) -> CredentialStore:
    s = CredentialStore.open(tmp_path)
    yield s  # type: ignore[misc]
    s.close()


def test_issued_secret_verifies_and_nothing_in_clear_is_stored(
    store: CredentialStore, tmp_path: Path
) -> None:
    secret = store.issue("boiler-1", "mqtt")
    assert len(secret) >= 32  # 192 bits of URL-safe base64
    assert store.verify("mqtt", "boiler-1", secret.encode()) is Verdict.OK
    assert store.verify("mqtt", "boiler-1", b"x" + secret.encode()) is Verdict.WRONG
    assert store.verify("mqtt", "pump-1", secret.encode()) is Verdict.UNKNOWN
    # The same secret for another protocol or device does not verify: the
    # kind and id are bound into the keyed hash.
    assert store.verify("http", "boiler-1", secret.encode()) is Verdict.UNKNOWN
    raw = (tmp_path / DB_NAME).read_bytes() + (tmp_path / (DB_NAME + "-wal")).read_bytes()
    assert secret.encode() not in raw
    (digest,) = sqlite3.connect(tmp_path / DB_NAME).execute("SELECT digest FROM credentials")
    assert digest[0].startswith("hmac-sha256:")


def test_key_file_is_private_and_refused_when_readable_by_others(tmp_path: Path) -> None:
    key = load_key(tmp_path)
    assert len(key) == 32
    assert os.stat(tmp_path / KEY_NAME).st_mode & 0o777 == 0o600
    assert load_key(tmp_path) == key  # the same key on every start
    os.chmod(tmp_path / KEY_NAME, 0o644)
    with pytest.raises(CredentialError, match="chmod 600"):
        load_key(tmp_path)


def test_another_key_does_not_verify(tmp_path: Path) -> None:
    s = CredentialStore.open(tmp_path)
    secret = s.issue("d1", "http")
    s.close()
    (tmp_path / KEY_NAME).unlink()  # a copied database without its key
    s = CredentialStore.open(tmp_path)
    try:
        assert s.verify("http", "d1", secret.encode()) is Verdict.WRONG
    finally:
        s.close()


def test_person_chosen_password_is_argon2id(store: CredentialStore) -> None:
    store.set_password("panel-1", "correct horse")
    assert store.verify("mqtt", "panel-1", b"correct horse") is Verdict.NEEDS_ARGON2
    assert store.verify_password("mqtt", "panel-1", b"correct horse")
    assert not store.verify_password("mqtt", "panel-1", b"wrong")
    assert store.digest_is_password("mqtt", "panel-1")


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "x\x00", "a\nb", "x" * 129])
def test_device_ids_that_cannot_name_a_device_are_refused(store: CredentialStore, bad: str) -> None:
    with pytest.raises(CredentialError):
        store.issue(bad, "mqtt")


def test_changes_made_by_another_process_are_seen(store: CredentialStore, tmp_path: Path) -> None:
    a = store.issue("d1", "mqtt")
    b = store.issue("d2", "mqtt")
    store.changes()
    cli = CredentialStore.open(tmp_path)
    try:
        cli.set_disabled("d1", True)
        cli.issue("d2", "mqtt")  # replaced: the old secret's holders lose access
        cli.issue("d3", "mqtt")  # new: nobody loses access
        cli.set_groups("d3", ["hall-a"])
    finally:
        cli.close()
    ch = store.changes()
    assert ch.revoked == {"d1", "d2"} and ch.groups_changed
    assert store.verify("mqtt", "d1", a.encode()) is Verdict.DISABLED
    assert store.verify("mqtt", "d2", b.encode()) is Verdict.WRONG
    assert store.groups("d3") == frozenset({"hall-a"})
    assert not store.changes().revoked  # nothing new


def test_verify_is_fast(store: CredentialStore) -> None:
    secrets = {f"dev-{i}": store.issue(f"dev-{i}", "mqtt") for i in range(200)}
    start = time.perf_counter()
    for _ in range(10):
        for device, secret in secrets.items():
            assert store.verify("mqtt", device, secret.encode()) is Verdict.OK
    per_check = (time.perf_counter() - start) / 2000
    assert per_check < 100e-6  # microseconds on the event loop, not argon2's 0.1 s


def test_issue_many_in_one_transaction(store: CredentialStore) -> None:
    issued = store.issue_many([f"d{i}" for i in range(500)], "coap")
    assert len(set(issued.values())) == 500
    assert all(store.verify("coap", d, s.encode()) is Verdict.OK for d, s in issued.items())
    with pytest.raises(CredentialError):
        store.issue_many(["ok", "bad/id"], "coap")
    assert not store.has("coap", "ok")  # nothing of a refused batch is stored


def test_issue_enrolment_is_one_write_kept_in_step_in_memory(
    store: CredentialStore, tmp_path: Path
) -> None:
    store.set_groups("pump-1", ["old"])
    store.changes()
    first = store.issue_enrolment("pump-1", ["mqtt", "http"], ["site-a"])
    assert set(first) == {"mqtt", "http"}
    assert store.verify("mqtt", "pump-1", first["mqtt"].encode()) is Verdict.OK
    assert store.groups("pump-1") == {"old", "site-a"}
    changed = store.changes()
    assert changed.groups_changed and not changed.revoked  # nothing was replaced
    # Enrolling again replaces the secret: the old one is refused and reported revoked.
    again = store.issue_enrolment("pump-1", ["mqtt"], ["site-a"])
    assert store.verify("mqtt", "pump-1", first["mqtt"].encode()) is Verdict.WRONG
    assert store.verify("mqtt", "pump-1", again["mqtt"].encode()) is Verdict.OK
    changed = store.changes()
    assert changed.revoked == {"pump-1"} and not changed.groups_changed
    # What is in memory is what is on disk: another connection reads the same.
    other = CredentialStore.open(tmp_path)
    try:
        assert other.verify("mqtt", "pump-1", again["mqtt"].encode()) is Verdict.OK
        assert other.verify("http", "pump-1", first["http"].encode()) is Verdict.OK
        assert other.groups("pump-1") == {"old", "site-a"}
        assert other.access("pump-1") == store.access("pump-1")
    finally:
        other.close()

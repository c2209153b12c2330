"""DeviceAuthenticator and DeviceAccessControl without sockets: the order of
sources, lockout, disabled devices, revocation hooks."""

from __future__ import annotations

import time
from pathlib import Path

import argon2

from edgeway.config import parse_config
from edgeway.devices.auth import ConnectInfo
from edgeway.devices.credentials import CredentialStore, Verdict
from edgeway.devices.identity import DeviceAccessControl


def info(user: str | None, password: bytes | None, anonymous: bool = False) -> ConnectInfo:
    return ConnectInfo("cid", user, password, "127.0.0.1:1883", "127.0.0.1:5000", anonymous)


def access(tmp_path: Path, users: str = "") -> DeviceAccessControl:
    text = f'gateway: {{data_dir: "{tmp_path}"}}\nmqtt:\n  acl: [{{topic: "#"}}]\n' + users
    return DeviceAccessControl(parse_config(text), tmp_path)


async def test_store_then_config_users_and_groups(tmp_path: Path) -> None:
    h = argon2.PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("pw")
    a = access(tmp_path, f'  users: [{{username: panel, password_hash: "{h}"}}]\n')
    try:
        secret = a.store.issue("dev-1", "mqtt")
        a.store.set_groups("dev-1", ["hall-a"])
        d = await a.authenticator.authenticate(info("dev-1", secret.encode()))
        assert d.allowed and d.principal is not None
        assert d.principal.groups == frozenset({"hall-a"}) and d.principal.method == "token"
        d = await a.authenticator.authenticate(info("panel", b"pw"))  # mqtt.users still work
        assert d.allowed and d.principal is not None and d.principal.username == "panel"
        a.store.set_disabled("panel", True)  # disabled applies to every source
        assert not (await a.authenticator.authenticate(info("panel", b"pw"))).allowed
    finally:
        a.close()


async def test_unknown_name_without_config_users_is_refused_without_argon2(
    tmp_path: Path,
) -> None:
    a = access(tmp_path)
    try:
        start = time.perf_counter()
        for i in range(20):
            d = await a.authenticator.authenticate(info(f"nobody-{i}", b"x"))
            assert d.reason_code == 0x86
        assert (time.perf_counter() - start) / 20 < 0.01  # argon2 costs ~0.1 s each
        # On an anonymous listener an unknown name is still anonymous (as before).
        d = await a.authenticator.authenticate(info("whoever", b"x", anonymous=True))
        assert d.allowed and d.principal is not None and d.principal.anonymous
    finally:
        a.close()


async def test_wrong_secrets_lock_the_device_out(tmp_path: Path) -> None:
    a = access(tmp_path)
    try:
        secret = a.store.issue("dev-1", "mqtt")
        for _ in range(5):
            assert (await a.authenticator.authenticate(info("dev-1", b"guess"))).reason_code == 0x86
        d = await a.authenticator.authenticate(info("dev-1", secret.encode()))
        assert d.reason_code == 0x8A  # locked, even with the right secret
    finally:
        a.close()


async def test_revoke_device_calls_hooks_and_refuses_tokens(tmp_path: Path) -> None:
    a = access(tmp_path)
    try:
        token = a.store.issue("dev-1", "http")
        assert a.check_token("http", "dev-1", token) is Verdict.OK
        seen: list[str] = []
        a.on_revoked.append(seen.append)
        a.revoke_device("dev-1")
        assert seen == ["dev-1"] and a.revocations == 1
        assert a.check_token("http", "dev-1", token) is Verdict.DISABLED
        # Stored: a new process (a restart) refuses it too.
        other = CredentialStore.open(tmp_path)
        try:
            assert other.is_disabled("dev-1")
        finally:
            other.close()
    finally:
        a.close()

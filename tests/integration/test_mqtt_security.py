"""Authentication, ACL and TLS of ``edgeway run``, with real clients.

The gateway runs from a config file whose users have argon2 hashes made here
with argon2-cffi (cheap parameters: the test is about the protocol, not the
hash cost); TLS certificates come from ``tests/certs.py``.
"""

from __future__ import annotations

import ssl
import subprocess
import time
from collections.abc import Iterator

import argon2
import pytest
from edgeway_process import GatewayLauncher, GatewayProcess
from mqtt_peers import (
    TIMEOUT,
    PahoPeer,
    TlsFiles,
    mosquitto_args,
    raw_connack,
    raw_connect_packet,
    unique,
)

from certs import CertFiles, tls_certs  # noqa: F401  (tls_certs is a fixture)

VERSIONS = [pytest.param(4, id="v311"), pytest.param(5, id="v5")]

PASSWORDS = {
    "alice": "alice-secret",
    "bob": "bob-secret",
    # One user per refused-login test, so that the lockout after repeated
    # failures (ConfigAuthenticator) never changes another test's answer.
    "mallory5": "right-5",
    "mallory4": "right-4",
    "mallorycli": "right-cli",
}

# bob may watch every device; every user may publish only under its own name
# and its own client id, and read only its own inbox. Non-empty ACL: default deny.
ACL = """
  acl:
    - {username: bob, topic: "devices/#", access: subscribe}
    - {username: bob, topic: "alerts/#", access: subscribe}
    - {username: "*", topic: "devices/{username}/#", access: publish}
    - {username: "*", topic: "alerts/{client_id}", access: publish}
    - {username: "*", topic: "inbox/{username}/#", access: subscribe}
"""


def _users_yaml() -> str:
    hasher = argon2.PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    lines = ["  users:"]
    for name, password in PASSWORDS.items():
        lines.append(f'    - {{username: {name}, password_hash: "{hasher.hash(password)}"}}')
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def auth_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = (
        "mqtt:\n"
        "  listeners:\n"
        '    - {bind: "127.0.0.1:{port}", allow_anonymous: false}\n' + _users_yaml() + ACL
    )
    launcher = GatewayLauncher(tmp_path_factory)
    try:
        yield launcher.start(config)
    finally:
        launcher.stop_all()


def login(gw: GatewayProcess, peers: list[PahoPeer], user: str, **kwargs: object) -> PahoPeer:
    peer = PahoPeer(gw.host, gw.port, username=user, password=PASSWORDS[user], **kwargs)  # type: ignore[arg-type]
    peers.append(peer)
    rc, _ = peer.connect()
    assert rc == 0, f"{user}: CONNACK {rc:#x}"
    return peer


# ---------------------------------------------------------------------------
# authentication


@pytest.mark.parametrize("version", VERSIONS)
def test_right_password_is_accepted(
    auth_gateway: GatewayProcess, peers: list[PahoPeer], version: int
) -> None:
    login(auth_gateway, peers, "alice", version=version)


def test_bad_password_v5_connack_0x86(auth_gateway: GatewayProcess, peers: list[PahoPeer]) -> None:
    peer = PahoPeer(
        auth_gateway.host, auth_gateway.port, version=5, username="mallory5", password="wrong"
    )
    peers.append(peer)
    rc, session_present = peer.connect()
    assert rc == 0x86  # bad user name or password
    assert not session_present
    assert peer.wait_disconnected(), "connection left open after a refused CONNECT"


def test_bad_password_v311_return_code_4(auth_gateway: GatewayProcess) -> None:
    gw = auth_gateway
    connack, sock = raw_connack(
        gw.host, gw.port, raw_connect_packet(unique("raw"), username="mallory4", password="wrong")
    )
    with sock:
        assert connack == b"\x20\x02\x00\x04"  # 3.1.1: bad user name or password
        assert sock.recv(1) == b"", "connection left open after a refused CONNECT"


def test_unknown_user_is_refused_like_a_bad_password(auth_gateway: GatewayProcess) -> None:
    gw = auth_gateway
    packet = raw_connect_packet(unique("raw"), username=unique("nobody"), password="x")
    connack, sock = raw_connack(gw.host, gw.port, packet)
    with sock:
        assert connack == b"\x20\x02\x00\x04"


@pytest.mark.parametrize("version", VERSIONS)
def test_anonymous_refused_when_listener_requires_credentials(
    auth_gateway: GatewayProcess, peers: list[PahoPeer], version: int
) -> None:
    if version == 4:
        connack, sock = raw_connack(
            auth_gateway.host, auth_gateway.port, raw_connect_packet(unique("anon"))
        )
        with sock:
            assert connack == b"\x20\x02\x00\x05"  # 3.1.1: not authorised
        return
    peer = PahoPeer(auth_gateway.host, auth_gateway.port, version=5)
    peers.append(peer)
    assert peer.connect()[0] == 0x87  # not authorised


def test_mosquitto_pub_bad_password_fails(auth_gateway: GatewayProcess) -> None:
    gw = auth_gateway
    args = ["mosquitto_pub", *mosquitto_args(gw.host, gw.port, 4), "-t", "devices/x/telemetry"]
    args += ["-m", "{}", "-u", "mallorycli", "-P", "wrong"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode != 0
    assert "bad user name or password" in done.stderr.lower()
    args[-1] = PASSWORDS["mallorycli"]
    args[args.index("devices/x/telemetry")] = "devices/mallorycli/telemetry"
    ok = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT)
    assert ok.returncode == 0, ok.stderr


# ---------------------------------------------------------------------------
# ACL


@pytest.mark.parametrize("version", VERSIONS)
def test_subscribe_denied_gets_failure_code(
    auth_gateway: GatewayProcess, peers: list[PahoPeer], version: int
) -> None:
    alice = login(auth_gateway, peers, "alice", version=version)
    denied = 0x87 if version == 5 else 0x80
    assert alice.subscribe("devices/#", 1) == [denied]
    assert alice.subscribe("inbox/alice/#", 1) == [1]
    assert alice.subscribe("inbox/bob/#", 1) == [denied]  # {username} is alice's own


@pytest.mark.parametrize("version", VERSIONS)
def test_publish_denied_is_not_delivered(
    auth_gateway: GatewayProcess, peers: list[PahoPeer], version: int
) -> None:
    gw = auth_gateway
    bob = login(gw, peers, "bob", version=version)
    # Telemetry topics only: the gateway publishes each connecting client's
    # twin delta under devices/<client id>/twin/, which devices/# also gets.
    assert bob.subscribe("devices/+/telemetry", 1) == [1]
    alice = login(gw, peers, "alice", version=version)

    denied_rc = alice.publish("devices/bob/telemetry", b'{"spoofed": 1}', qos=1)
    alice.publish("devices/bob/telemetry", b'{"spoofed": 0}', qos=0)
    allowed_rc = alice.publish("devices/alice/telemetry", b'{"temp": 21.5}', qos=1)
    if version == 5:
        assert denied_rc == 0x87  # not authorised
    assert allowed_rc == 0
    # Publishes from one client arrive in order: the first thing bob sees must
    # be the allowed one, so the denied ones were dropped.
    msg = bob.get()
    assert (msg.topic, msg.payload) == ("devices/alice/telemetry", b'{"temp": 21.5}')
    assert bob.messages.empty()


def test_client_id_placeholder(auth_gateway: GatewayProcess, peers: list[PahoPeer]) -> None:
    gw = auth_gateway
    bob = login(gw, peers, "bob", version=5)
    bob.subscribe("alerts/#", 1)
    alice_id = unique("alice-dev")
    alice = login(gw, peers, "alice", version=5, client_id=alice_id)
    assert alice.publish(f"alerts/{unique('someone-else')}", b"no", qos=1) == 0x87
    assert alice.publish(f"alerts/{alice_id}", b"yes", qos=1) == 0
    msg = bob.get()
    assert (msg.topic, msg.payload) == (f"alerts/{alice_id}", b"yes")


# ---------------------------------------------------------------------------
# TLS with client certificates


@pytest.fixture(scope="module")
def tls_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    tls_certs: CertFiles,  # noqa: F811
) -> Iterator[GatewayProcess]:
    config = f"""
        mqtt:
          listeners:
            - bind: "127.0.0.1:{{port}}"
              allow_anonymous: false
              tls:
                cert: {tls_certs.server_cert}
                key: {tls_certs.server_key}
                ca: {tls_certs.ca_cert}
                require_client_cert: true
    """
    launcher = GatewayLauncher(tmp_path_factory)
    try:
        yield launcher.start(config)
    finally:
        launcher.stop_all()


def _tls(certs: CertFiles, *, with_cert: bool = True, rogue: bool = False) -> TlsFiles:
    if rogue:
        return TlsFiles(
            str(certs.ca_cert), str(certs.rogue_client_cert), str(certs.rogue_client_key)
        )
    if with_cert:
        return TlsFiles(str(certs.ca_cert), str(certs.client_cert), str(certs.client_key))
    return TlsFiles(str(certs.ca_cert))


@pytest.mark.parametrize("version", VERSIONS)
def test_tls_client_certificate_round_trip(
    tls_gateway: GatewayProcess,
    tls_certs: CertFiles,  # noqa: F811
    peers: list[PahoPeer],
    version: int,
) -> None:
    gw = tls_gateway
    topic = unique("tls")
    sub = PahoPeer(gw.host, gw.port, version=version, tls=_tls(tls_certs))
    pub = PahoPeer(gw.host, gw.port, version=version, tls=_tls(tls_certs))
    peers += [sub, pub]
    assert sub.connect()[0] == 0
    assert sub.subscribe(topic, 1) == [1]
    assert pub.connect()[0] == 0
    assert pub.publish(topic, b"over-tls", qos=1) == 0
    assert sub.get().payload == b"over-tls"


@pytest.mark.parametrize("rogue", [False, True], ids=["no-client-cert", "cert-from-other-ca"])
def test_tls_without_valid_client_certificate_is_refused(
    tls_gateway: GatewayProcess,
    tls_certs: CertFiles,  # noqa: F811
    peers: list[PahoPeer],
    rogue: bool,
) -> None:
    gw = tls_gateway
    peer = PahoPeer(gw.host, gw.port, version=5, tls=_tls(tls_certs, with_cert=False, rogue=rogue))
    peers.append(peer)
    # The handshake fails (TLS 1.2) or the server closes right after it (TLS
    # 1.3 checks the client certificate after the client's Finished); either
    # way no CONNACK.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        peer.connect()


def test_tls_plain_tcp_client_gets_no_connack(tls_gateway: GatewayProcess) -> None:
    connack, sock = raw_connack(tls_gateway.host, tls_gateway.port, raw_connect_packet("plain"))
    with sock:
        assert not connack.startswith(b"\x20")


def test_tls_mosquitto_pub_with_client_certificate(
    tls_gateway: GatewayProcess,
    tls_certs: CertFiles,  # noqa: F811
    peers: list[PahoPeer],
) -> None:
    gw = tls_gateway
    topic = unique("tls/cli")
    sub = PahoPeer(gw.host, gw.port, version=5, tls=_tls(tls_certs))
    peers.append(sub)
    assert sub.connect()[0] == 0
    sub.subscribe(topic, 1)
    args = ["mosquitto_pub", *mosquitto_args(gw.host, gw.port, 5), "-t", topic, "-m", "cli-tls"]
    args += ["-q", "1", "--cafile", str(tls_certs.ca_cert)]
    args += ["--cert", str(tls_certs.client_cert), "--key", str(tls_certs.client_key)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert sub.get().payload == b"cli-tls"


# ---------------------------------------------------------------------------
# sessions belong to an identity; log lines cannot be forged


def test_another_user_cannot_take_a_persistent_session(
    auth_gateway: GatewayProcess, peers: list[PahoPeer]
) -> None:
    gw = auth_gateway
    shared = unique("shared-id")
    alice = login(gw, peers, "alice", version=5, client_id=shared, clean=False, session_expiry=300)
    assert alice.subscribe("inbox/alice/#", 1) == [1]
    alice.disconnect()
    # bob claims alice's client id: refused (paho v5), and over 3.1.1 (return code 2).
    thief = PahoPeer(
        gw.host, gw.port, version=5, client_id=shared, clean=False, session_expiry=300,
        username="bob", password=PASSWORDS["bob"],
    )  # fmt: skip
    peers.append(thief)
    assert thief.connect() == (0x85, False)  # client identifier not valid
    connack, sock = raw_connack(
        gw.host, gw.port,
        raw_connect_packet(shared, username="bob", password=PASSWORDS["bob"], clean=False),
    )  # fmt: skip
    with sock:
        assert connack == b"\x20\x02\x00\x02"  # identifier rejected
    owner = PahoPeer(
        gw.host, gw.port, version=5, client_id=shared, clean=False, session_expiry=300,
        username="alice", password=PASSWORDS["alice"],
    )  # fmt: skip
    peers.append(owner)
    assert owner.connect() == (0, True)  # her session is still there


def test_a_client_id_with_a_newline_cannot_forge_a_log_line(auth_gateway: GatewayProcess) -> None:
    gw = auth_gateway
    marker = unique("forged")
    forged = f"dev\n2026-12-06T20:00:00.000Z info    edgeway.gateway: {marker}"
    connack, sock = raw_connack(
        gw.host, gw.port, raw_connect_packet(forged, username="mallorycli", password="wrong")
    )
    with sock:
        assert connack == b"\x20\x02\x00\x04"
    deadline = time.monotonic() + TIMEOUT
    while marker not in gw.output() and time.monotonic() < deadline:
        time.sleep(0.05)  # the log line has no event to wait on; bounded poll
    lines = [line for line in gw.output().splitlines() if marker in line]
    assert len(lines) == 1, lines
    assert "edgeway.south.mqtt.broker: MQTT client dev\\n2026-12-06T20:00:00.000Z" in lines[0]

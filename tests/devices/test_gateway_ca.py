"""The gateway's CA on the MQTT TLS listener, with aiomqtt clients over TLS:
a certificate issued by ``edgeway ca`` logs in as its CN; an expired one and
one from another CA fail the handshake; ``edgeway ca revoke`` closes the
open connection within a second and refuses the next handshake (CRL)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from certs import crl_read
from edgeway.config import parse_config
from edgeway.devices.ca import GatewayCa
from edgeway.devices.ca_cli import ca_main
from edgeway.gateway import Gateway
from sim_gateway import wait_until

pytestmark = pytest.mark.asyncio

CONFIG = """
gateway: {{id: gw-ca, data_dir: "{data}"}}
mqtt:
  listeners:
    - bind: "127.0.0.1:0"
      tls: {{cert: "{ca}/server.pem", key: "{ca}/server.key", ca: "{ca}/ca.pem",
             crl: "{ca}/crl.pem", require_client_cert: true}}{listener}
  acl:
    - {{device: "*", topic: "devices/{{device_id}}/#"}}
"""


@contextlib.asynccontextmanager
async def tls_gateway(
    tmp_path: Path, listener: str = ""
) -> AsyncIterator[tuple[Gateway, GatewayCa, int]]:
    data = tmp_path / "data"
    assert ca_main(["init"], data) == 0
    ca = GatewayCa(data)
    assert ca_main(["server-cert", "127.0.0.1"], data) == 0
    gw = Gateway(parse_config(CONFIG.format(data=data, ca=ca.dir, listener=listener)))
    task = asyncio.create_task(gw.run())
    try:
        await asyncio.wait_for(gw.ready.wait(), 15)
        yield gw, ca, gw.listeners[0].bound[1]
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 15)


def client_tls(bundle: Path, ca: GatewayCa) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca.cert_path)
    ctx.load_cert_chain(bundle)
    return ctx


def refused_at_handshake(port: int, tls: ssl.SSLContext) -> str:
    """Connect, send a CONNECT, and return how the server refused (the TLS
    alert, or "closed"); fails if it answers with a CONNACK."""
    import socket

    connect = bytes.fromhex("101000044d5154540402003c0004") + b"dev1"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with tls.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(connect)
                data = s.recv(4)
        except (ssl.SSLError, ConnectionResetError) as e:
            return str(e)
    assert data == b"", f"answered {data!r}: not refused"
    return "closed"


def client(port: int, tls: ssl.SSLContext, name: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1", port, identifier=name, tls_context=tls,
        protocol=aiomqtt.ProtocolVersion.V5, timeout=5,
    )  # fmt: skip


async def test_issued_certificate_is_the_identity(tmp_path: Path) -> None:
    async with tls_gateway(tmp_path) as (gw, ca, port):
        bundle = tmp_path / "dev-1.pem"
        assert ca_main(["issue-cert", "dev-1", "--out", str(bundle)], ca.dir.parent) == 0
        assert bundle.stat().st_mode & 0o777 == 0o600
        async with client(port, client_tls(bundle, ca), "c1") as c:
            await c.subscribe("devices/dev-1/#", qos=1)
            await c.publish("devices/dev-1/state", b"mine", qos=1)
            await c.publish("devices/dev-2/state", b"not mine", qos=1)  # ACL: {device_id}
            async with asyncio.timeout(5):
                msg = await anext(aiter(c.messages))
            assert str(msg.topic) == "devices/dev-1/state"
        assert gw.broker is not None
        assert gw.broker.dropped.get("not_authorised", 0) >= 1


async def test_expired_certificate_and_another_ca_fail_the_handshake(tmp_path: Path) -> None:
    async with tls_gateway(tmp_path) as (gw, ca, port):
        old = tmp_path / "old.pem"
        ca.issue("dev-old", old, days=1, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
        other = GatewayCa(tmp_path / "other")
        other.init("someone else's CA")
        foreign = tmp_path / "foreign.pem"
        other.issue("dev-1", foreign)  # the right name, the wrong issuer
        # asyncio closes a failed handshake without flushing the alert, so
        # the client sees the connection closed (or the alert when it came).
        for bundle in (old, foreign):
            why = await asyncio.to_thread(refused_at_handshake, port, client_tls(bundle, ca))
            assert why == "closed" or "alert" in why, why
        assert gw.broker is not None
        # The same client set-up with a valid certificate gets its CONNACK.
        good = tmp_path / "good.pem"
        ca.issue("dev-good", good)
        with pytest.raises(AssertionError, match="not refused"):
            await asyncio.to_thread(refused_at_handshake, port, client_tls(good, ca))


async def test_revoked_certificate_is_disconnected_and_refused(tmp_path: Path) -> None:
    async with tls_gateway(tmp_path) as (gw, ca, port):
        bundle = tmp_path / "dev-1.pem"
        keep = tmp_path / "dev-2.pem"
        ca.issue("dev-1", bundle)
        ca.issue("dev-2", keep)
        async with client(port, client_tls(keep, ca), "c2") as other:
            async with client(port, client_tls(bundle, ca), "c1") as c:
                await c.subscribe("devices/dev-1/#", qos=1)
                start = time.monotonic()
                assert await asyncio.to_thread(ca_main, ["revoke", "dev-1"], ca.dir.parent) == 0
                with pytest.raises(aiomqtt.MqttError):
                    async with asyncio.timeout(5):
                        async for _ in c.messages:
                            pass
                assert time.monotonic() - start < 1.0
            # The other device's connection stays.
            await other.publish("devices/dev-2/state", b"still here", qos=1)
        await wait_until(crl_read(gw.listeners[0]._crl, ca.crl_path), 5)
        why = await asyncio.to_thread(refused_at_handshake, port, client_tls(bundle, ca))
        assert why == "closed" or "revoked" in why, why
        # The other device still gets in: the CRL revokes one certificate.
        async with client(port, client_tls(keep, ca), "c2-again"):
            pass


async def test_a_crl_of_the_same_second_as_the_one_before_is_in_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two CRLs with the same last update (revocations within one second):
    the listener checks with the one written last. Added to the running TLS
    context, OpenSSL kept checking with the first (the newest by last update
    wins, and neither is newer), which did not revoke the certificate."""
    from edgeway.devices import ca as ca_mod

    async with tls_gateway(tmp_path) as (gw, ca, port):
        bundle = tmp_path / "dev-1.pem"
        ca.issue("dev-1", bundle)
        second = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(seconds=5)
        monkeypatch.setattr(ca_mod, "_now", lambda: second)
        ca.write_crl()  # nothing revoked yet
        await wait_until(crl_read(gw.listeners[0]._crl, ca.crl_path), 5)
        with pytest.raises(AssertionError, match="not refused"):
            await asyncio.to_thread(refused_at_handshake, port, client_tls(bundle, ca))
        assert ca.revoke("dev-1") == 1  # a CRL of the same second
        await wait_until(crl_read(gw.listeners[0]._crl, ca.crl_path), 5)
        why = await asyncio.to_thread(refused_at_handshake, port, client_tls(bundle, ca))
        assert why == "closed" or "revoked" in why, why


async def test_devices_issue_cert_disabled_unknown_and_disabled_mid_connection(
    tmp_path: Path,
) -> None:
    from edgeway.cli import main
    from edgeway.devices.credentials_cli import credentials_main

    async with tls_gateway(tmp_path) as (gw, ca, port):
        data = ca.dir.parent
        bundle = tmp_path / "dev-7.pem"
        # `edgeway devices issue-cert` is `edgeway ca issue-cert`: same bundle, audited the same.
        argv = ["devices", "issue-cert", "dev-7", "--out", str(bundle), "--data-dir", str(data)]
        assert await asyncio.to_thread(main, argv) == 0
        assert bundle.stat().st_mode & 0o777 == 0o600
        from edgeway.audit import read_offline

        assert [e.target for e in read_offline(data) if e.action == "ca issue-cert"] == ["dev-7"]
        tls = client_tls(bundle, ca)
        # Valid, and unknown to the registry and the credential store: a
        # certificate of this CA is an identity (the listener allows unregistered).
        async with client(port, tls, "c7") as c:
            await c.publish("devices/dev-7/state", b"hello", qos=1)
            # Disabled mid-connection (the CLI, another process's way): closed within 1 s.
            start = time.monotonic()
            assert await asyncio.to_thread(credentials_main, ["disable", "dev-7"], data) == 0
            with pytest.raises(aiomqtt.MqttError):
                async with asyncio.timeout(5):
                    async for _ in c.messages:
                        pass
            assert time.monotonic() - start < 1.5
        # Disabled: a valid certificate does not get in any more (CONNACK refused).
        with pytest.raises(aiomqtt.MqttCodeError):
            async with client(port, tls, "c7-again"):
                pass
        assert await asyncio.to_thread(credentials_main, ["enable", "dev-7"], data) == 0
        deadline = time.monotonic() + 2.0  # the gateway looks at the store every 0.25 s
        while True:
            try:
                async with client(port, tls, "c7-back"):
                    break
            except aiomqtt.MqttCodeError:
                assert time.monotonic() < deadline, "enabled device still refused"
                await asyncio.sleep(0.1)
        assert gw.broker is not None


async def test_unknown_device_certificate_on_a_listener_refusing_unregistered(
    tmp_path: Path,
) -> None:
    async with tls_gateway(tmp_path, "\n      unregistered: refuse") as (gw, ca, port):
        bundle = tmp_path / "dev-9.pem"
        ca.issue("dev-9", bundle)
        tls = client_tls(bundle, ca)
        # A valid certificate of this CA for a device the registry does not know: 0x87.
        with pytest.raises(aiomqtt.MqttCodeError) as refused:
            async with client(port, tls, "c9"):
                pass
        assert "135" in str(refused.value) or "authori" in str(refused.value).lower()
        assert gw.devices is not None
        await gw.devices.registry.add({"id": "dev-9"})
        async with client(port, tls, "c9-registered"):
            pass

"""OPC-UA adapter against an asyncua server started in the test, with
Basic256Sha256 and certificates generated here."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

pytest.importorskip("asyncua")

from asyncua import Server, ua
from asyncua.crypto.permission_rules import SimpleRoleRuleset
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from ingest_doubles import RecordingIngest, wait_until

from edgeway.config import OpcUaServerConfig, parse_config
from edgeway.south.opcua import OpcUaAdapter, is_node_id, to_metric

pytestmark = pytest.mark.asyncio(loop_scope="module")

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocols" / "opcua.md"
CLIENT_URI = "urn:edgeway:test:client"
SERVER_URI = "urn:edgeway:test:server"


def make_cert(directory: Path, name: str, uri: str, server: bool) -> tuple[Path, Path]:
    """A self-signed RSA-2048 certificate as OPC-UA wants it: the application
    URI in subjectAltName, key usages for signing and encryption. (RSA, not
    EC: Basic256Sha256 is an RSA policy.)"""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(uri),
                    x509.DNSName("localhost"),
                    x509.DNSName(socket.gethostname()),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{name}-cert.der"
    key_path = directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Plant:
    """The test server and what the tests touch on it."""

    server: Server
    endpoint: str
    idx: int
    temperature: Any
    level: Any
    setpoint: Any
    blob: Any
    certs: dict[str, Path]


async def start_server(port: int, certs: dict[str, Path]) -> Plant:
    server = Server()
    await server.init()
    endpoint = f"opc.tcp://127.0.0.1:{port}/edgeway-test/"
    server.set_endpoint(endpoint)
    await server.set_application_uri(SERVER_URI)
    # Only encrypted or signed channels: a client without security is refused.
    server.set_security_policy(
        [
            ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
            ua.SecurityPolicyType.Basic256Sha256_Sign,
        ],
        permission_ruleset=SimpleRoleRuleset(),
    )
    await server.load_certificate(str(certs["server_cert"]))
    await server.load_private_key(str(certs["server_key"]))
    idx = await server.register_namespace("urn:edgeway:test")
    line = await server.nodes.objects.add_object(idx, "Line3")
    temperature = await line.add_variable(ua.NodeId("Oven.Temperature", idx), "Temperature", 20.0)
    level = await line.add_variable(idx, "Level", 100.0)
    setpoint = await line.add_variable(
        ua.NodeId(2001, idx), "Setpoint", ua.Variant(10, ua.VariantType.Int32)
    )
    await setpoint.set_writable()
    blob = await line.add_variable(idx, "Blob", ua.Variant(b"\x00\x01", ua.VariantType.ByteString))

    async def add(parent: Any, a: Any, b: Any) -> list[ua.Variant]:
        return [ua.Variant(a.Value + b.Value, ua.VariantType.Int64)]

    await line.add_method(
        idx, "Add", add, [ua.VariantType.Int64, ua.VariantType.Int64], [ua.VariantType.Int64]
    )
    await server.start()
    return Plant(server, endpoint, idx, temperature, level, setpoint, blob, certs)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plant(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Plant]:
    d = tmp_path_factory.mktemp("opcua")
    sc, sk = make_cert(d, "server", SERVER_URI, server=True)
    cc, ck = make_cert(d, "client", CLIENT_URI, server=False)
    certs = {"server_cert": sc, "server_key": sk, "client_cert": cc, "client_key": ck}
    p = await start_server(free_port(), certs)
    try:
        yield p
    finally:
        await p.server.stop()


def config(plant: Plant, **kw: Any) -> OpcUaServerConfig:
    data: dict[str, Any] = {
        "name": "line3",
        "device_id": "line-3",
        "endpoint": plant.endpoint,
        "publishing_interval": 0.05,
        "timeout": 3,
        "security": {
            "policy": "Basic256Sha256",
            "mode": "SignAndEncrypt",
            "certificate": str(plant.certs["client_cert"]),
            "private_key": str(plant.certs["client_key"]),
        },
        "nodes": [
            {
                "metric": "temperature",
                "node_id": f"ns={plant.idx};s=Oven.Temperature",
                "sampling_interval": 0.05,
            },
            {
                "metric": "level",
                "browse_path": f"{plant.idx}:Line3/{plant.idx}:Level",
                "sampling_interval": 0.05,
                "deadband": 5.0,
            },
            {"metric": "setpoint", "node_id": f"ns={plant.idx};i=2001", "writable": True},
        ],
        "methods": [{"name": "add", "object": f"{plant.idx}:Line3", "method": f"{plant.idx}:Add"}],
    }
    data.update(kw)
    return OpcUaServerConfig.model_validate(data)


@contextlib.asynccontextmanager
async def running(
    adapter: OpcUaAdapter, wait_ready: bool = True
) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(adapter.run())
    try:
        if wait_ready:
            async with asyncio.timeout(20):
                await adapter.ready.wait()
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def values_of(ingest: RecordingIngest, metric: str) -> list[Any]:
    return [r.metrics[metric] for r in ingest.readings if metric in r.metrics]


async def test_subscription_with_basic256sha256(plant: Plant) -> None:
    ingest = RecordingIngest()
    adapter = OpcUaAdapter(config(plant), ingest=ingest)
    await plant.temperature.write_value(20.0)
    await plant.level.write_value(100.0)
    async with running(adapter):
        assert adapter.subscribed == 3
        # initial values of all three items
        await wait_until(
            lambda: (
                {"temperature", "level", "setpoint"}
                <= {m for r in ingest.readings for m in r.metrics}
            )
        )
        assert values_of(ingest, "temperature")[0] == 20.0
        assert values_of(ingest, "level")[0] == 100.0
        first = ingest.readings[0]
        assert first.device_id == "line-3" and first.origin.adapter == "opcua"
        assert abs(first.ts - dt.datetime.now(dt.UTC).timestamp()) < 60

        await plant.temperature.write_value(21.5)
        await wait_until(lambda: 21.5 in values_of(ingest, "temperature"))

        # deadband 5: a change of 1 is not reported, a change of 10 is
        await plant.level.write_value(101.0)
        await plant.temperature.write_value(22.5)  # a marker that the server has moved on
        await wait_until(lambda: 22.5 in values_of(ingest, "temperature"))
        await plant.level.write_value(111.0)
        await wait_until(lambda: 111.0 in values_of(ingest, "level"))
        assert values_of(ingest, "level") == [100.0, 111.0]
    assert adapter.state.errors == 0


async def test_write_and_method_call(plant: Plant) -> None:
    ingest = RecordingIngest()
    adapter = OpcUaAdapter(config(plant), ingest=ingest)
    async with running(adapter):
        await adapter.write("setpoint", 42)
        assert await plant.setpoint.read_value() == 42
        await wait_until(lambda: 42 in values_of(ingest, "setpoint"))
        assert await adapter.call("add", 2, 3) == 5
        with pytest.raises(PermissionError):
            await adapter.write("temperature", 1.0)
        with pytest.raises(KeyError):
            await adapter.write("nope", 1)
        with pytest.raises(ValueError):
            await adapter.write("setpoint", 1.5)
        with pytest.raises(KeyError):
            await adapter.call("nope")


async def test_commands_write_and_call(plant: Plant, tmp_path: Path) -> None:
    """Commands through the queue: `write` changes the node on the asyncua
    server, a method name calls it and returns its output."""
    from edgeway.commands.model import CommandState
    from edgeway.commands.service import CommandService
    from edgeway.config import CommandsSection

    ingest = RecordingIngest()
    adapter = OpcUaAdapter(config(plant), ingest=ingest)
    svc = CommandService(tmp_path, CommandsSection())
    await svc.open()
    dl = adapter.downlink(svc)
    assert dl is not None
    svc.add_downlink(dl)
    try:
        async with running(adapter):
            w, _ = await svc.submit("line-3", "write", {"setpoint": 77})
            assert (await svc.wait(w.id, 10)).state is CommandState.SUCCEEDED
            assert await plant.setpoint.read_value() == 77
            c, _ = await svc.submit("line-3", "add", {"args": [20, 22]})
            done = await svc.wait(c.id, 10)
            assert done.state is CommandState.SUCCEEDED and done.result == {"output": 42}
            c2, _ = await svc.submit("line-3", "call", {"method": "add", "args": [1, 2]})
            assert (await svc.wait(c2.id, 10)).result == {"output": 3}
            bad, _ = await svc.submit("line-3", "write", {"setpoint": 1.5})
            assert (await svc.wait(bad.id, 10)).state is CommandState.FAILED
            assert await plant.setpoint.read_value() == 77
            nope, _ = await svc.submit("line-3", "call", {"method": "nope"})
            assert (await svc.wait(nope.id, 10)).state is CommandState.FAILED
    finally:
        await svc.close()


async def test_unresolvable_node_and_bad_values_are_counted(plant: Plant) -> None:
    ingest = RecordingIngest()
    cfg = config(
        plant,
        nodes=[
            {"metric": "temperature", "node_id": f"ns={plant.idx};s=Oven.Temperature"},
            {"metric": "ghost", "browse_path": f"{plant.idx}:Line3/{plant.idx}:Ghost"},
            {"metric": "blob", "browse_path": f"{plant.idx}:Line3/{plant.idx}:Blob"},
        ],
    )
    adapter = OpcUaAdapter(cfg, ingest=ingest)
    async with running(adapter):
        await wait_until(lambda: bool(values_of(ingest, "temperature")))
        await wait_until(lambda: adapter.decode_errors.counts[("line-3", "bad_value")] >= 1)
        assert adapter.subscribed == 2
        assert adapter.state.connected
    assert not values_of(ingest, "blob")
    assert not values_of(ingest, "ghost")


async def test_no_security_against_a_secure_only_server_fails_and_keeps_trying(
    plant: Plant,
) -> None:
    adapter = OpcUaAdapter(config(plant, security={"policy": "None"}), ingest=RecordingIngest())
    async with running(adapter, wait_ready=False) as task:
        await wait_until(lambda: adapter.state.errors >= 1, within=20)
        assert not adapter.state.connected and not task.done()


async def test_helpers() -> None:
    assert is_node_id("ns=2;i=5") and is_node_id("i=85") and not is_node_id("2:Line3/2:Level")
    assert to_metric(dt.datetime(2020, 1, 1, tzinfo=dt.UTC), "t") == 1577836800.0
    assert to_metric(3, "x") == 3


async def test_docs_example_parses() -> None:
    block = DOCS.read_text().split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = parse_config(block, str(DOCS))
    assert cfg.opcua and cfg.opcua[0].security.policy == "Basic256Sha256"


async def test_reconnects_when_the_server_restarts(plant: Plant) -> None:
    # Runs last in the module: it stops and restarts the shared server.
    ingest = RecordingIngest()
    adapter = OpcUaAdapter(
        config(plant, nodes=[config(plant).nodes[0].model_dump()]), ingest=ingest
    )
    async with running(adapter) as task:
        await wait_until(lambda: bool(ingest.readings))
        await plant.server.stop()
        await wait_until(lambda: not adapter.state.connected, within=20)
        n = len(ingest.readings)
        await plant.server.start()
        await wait_until(lambda: adapter.state.connected and len(ingest.readings) > n, within=30)
        await plant.temperature.write_value(33.0)
        await wait_until(lambda: 33.0 in values_of(ingest, "temperature"))
        assert not task.done()

"""The broker's log lines: connect, disconnect with its reason, refused login,
denied publish and subscribe (rate-limited), never forgeable by a client."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from mqtt_harness import RawClient, running_broker, wait_until

from edgeway.config import AclRule, MqttEventLog, MqttSection
from edgeway.devices.auth import AuthDecision, ConnectInfo, Principal
from edgeway.devices.config_auth import ConfigAuthoriser
from edgeway.logs import TextFormatter
from edgeway.south.mqtt.packets import ConnAck, Disconnect, Will


class NamedUsers:
    """Accepts any user name except "intruder"; the name is the identity."""

    async def authenticate(self, info: ConnectInfo) -> AuthDecision:
        if info.username == "intruder":
            return AuthDecision(False, None, 0x86, "bad user name or password")
        return AuthDecision(True, Principal(info.client_id, info.username, info.username is None))


ACL = ConfigAuthoriser(
    [
        AclRule(topic="open/#"),
        AclRule(username="*", topic="own/{username}/#"),
    ]
)


@pytest.fixture
def broker_log() -> Iterator[io.StringIO]:
    """What the broker writes, formatted as ``edgeway run`` formats it."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("edgeway.south.mqtt")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


async def test_connect_disconnect_refusal_and_denials_are_logged(
    tmp_path: Path, broker_log: io.StringIO
) -> None:
    async with running_broker(tmp_path, authenticator=NamedUsers(), authoriser=ACL) as rb:
        c, _ = await RawClient.connect(
            rb.port, "dev-1", username="alice", level=4, will=Will("own/bob/will", b"x")
        )
        assert (await c.subscribe("own/bob/#", qos=1)).reason_codes == [0x80]
        await c.publish("own/bob/x", b"1", qos=1)
        c.abort()  # the will is sent, but alice may not publish to own/bob
        await wait_until(lambda: "dev-1 disconnected" in broker_log.getvalue())
        v5, _ = await RawClient.connect(rb.port, "dev-2", username="carol")
        v5.send_raw(b"\x32\x0c\x00\x06open/a\x00\x00\x00x")  # packet id 0: protocol error
        got = await v5.closed()
        assert [type(p) for p in got] == [Disconnect]
        bad, ack = await RawClient.connect(rb.port, "dev-3", username="intruder", expect_ok=False)
        assert ack.reason_code == 0x86
        await bad.closed()
        await wait_until(lambda: "dev-2" in broker_log.getvalue() and not rb.broker.connections)
    text = broker_log.getvalue()
    lines = text.splitlines()

    def line(part: str) -> str:
        found = [x for x in lines if part in x]
        assert found, f"no line with {part!r} in:\n{text}"
        return found[0]

    assert line("dev-1 connected").split()[1] == "info"
    assert "as alice: MQTT 3.1.1, clean session" in line("dev-1 connected")
    assert line("may not subscribe to own/bob/#").split()[1] == "warning"
    assert line("may not publish to own/bob/x").split()[1] == "warning"
    gone = line("dev-1 disconnected")
    assert "without DISCONNECT" in gone or "connection lost" in gone
    assert line("may not publish its will to own/bob/will").split()[1] == "warning"
    assert line("dev-2 disconnected").split()[1] == "warning"
    assert "protocol error 0x82: PUBLISH packet id 0" in line("dev-2 disconnected")
    refused = line("dev-3")
    assert refused.split()[1] == "warning"
    assert "user intruder) refused: bad user name or password (CONNACK 0x86)" in refused


async def test_event_lines_are_rate_limited_per_kind(
    tmp_path: Path, broker_log: io.StringIO
) -> None:
    cfg = MqttSection(event_log=MqttEventLog(lines_per_second=0.001, burst=2))
    async with running_broker(tmp_path, config=cfg) as rb:
        clients = [(await RawClient.connect(rb.port, f"c{i}"))[0] for i in range(5)]
        for c in clients:
            await c.disconnect()
        await wait_until(lambda: not rb.broker.connections)
        text = broker_log.getvalue()
        assert text.count(" connected (") == 2
        assert text.count(" disconnected (") == 2
        assert rb.broker.stats().log_lines_suppressed == 6


async def test_forged_client_id_cannot_make_a_second_line(
    tmp_path: Path, broker_log: io.StringIO
) -> None:
    forged = "dev\n2026-12-06T20:00:00.000Z info    edgeway.gateway: configuration reloaded"
    async with running_broker(tmp_path, authenticator=NamedUsers()) as rb:
        bad, ack = await RawClient.connect(rb.port, forged, username="intruder", expect_ok=False)
        assert isinstance(ack, ConnAck) and ack.reason_code == 0x86
        await bad.closed()
        ok, _ = await RawClient.connect(rb.port, forged, username="x\r\nfake")
        await ok.disconnect()
        await wait_until(lambda: not rb.broker.connections)
    lines = broker_log.getvalue().splitlines()
    assert len(lines) >= 3
    assert not [x for x in lines if "edgeway.gateway" in x.split()[2]]
    assert all(x.split()[2].startswith("edgeway.south.mqtt") for x in lines)
    assert any("dev\\n2026-12-06T20:00:00.000Z" in x for x in lines)

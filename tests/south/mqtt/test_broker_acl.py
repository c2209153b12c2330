"""The broker under a configured ACL: delivery-time filtering, ACL changes and
revocation taking effect at once, and bypass attempts.

Peers: aiomqtt (a real third-party client) for the headline case, the raw
client of ``mqtt_harness`` where a test must send exact packets (aliases,
wills, shared subscriptions) or see exact reason codes.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from mqtt_harness import RawClient, running_broker, wait_until

from edgeway.config import MqttSection
from edgeway.devices.config_auth import ConfigAuthoriser
from edgeway.ingest import MemoryIngest
from edgeway.south.mqtt.connection import MqttConnection
from edgeway.south.mqtt.packets import Disconnect, Properties, Publish, Will

pytestmark = pytest.mark.asyncio

SECRET_DENIED = [
    {"topic": "secret/#", "access": "subscribe", "allow": False},
    {"topic": "#"},
]


def _acl(rules: list[dict[str, Any]]) -> ConfigAuthoriser:
    return ConfigAuthoriser(MqttSection.model_validate({"acl": rules}))


async def test_hash_subscriber_gets_everything_except_the_denied_topics(tmp_path: Path) -> None:
    async with running_broker(tmp_path, authoriser=_acl(SECRET_DENIED)) as rb:
        async with aiomqtt.Client("127.0.0.1", rb.port, identifier="watcher") as watcher:
            await watcher.subscribe("#", qos=1)  # granted despite the deny rule
            async with aiomqtt.Client("127.0.0.1", rb.port, identifier="pub") as pub:
                for topic in ("a/b", "secret/x", "c", "secret", "secret/y/z", "d/secret"):
                    await pub.publish(topic, topic.encode(), qos=1)
            got: list[str] = []
            async with asyncio.timeout(5):
                async for msg in watcher.messages:
                    got.append(str(msg.topic))
                    if msg.topic.value == "d/secret":
                        break
        assert got == ["a/b", "c", "d/secret"]
        assert rb.broker.dropped.get("read_not_authorised") == 3


async def test_filter_wholly_inside_a_deny_rule_is_refused(tmp_path: Path) -> None:
    async with running_broker(tmp_path, authoriser=_acl(SECRET_DENIED)) as rb:
        c, _ = await RawClient.connect(rb.port, "c1")
        ack = await c.subscribe("secret/#", "secret/+/x", "$share/g/secret/#", "other/#", qos=1)
        assert ack.reason_codes == [0x87, 0x87, 0x87, 1]
        await c.close()


async def test_shared_retained_and_will_are_filtered_at_delivery(tmp_path: Path) -> None:
    async with running_broker(tmp_path, authoriser=_acl(SECRET_DENIED)) as rb:
        pub, _ = await RawClient.connect(rb.port, "pub")
        await pub.publish("secret/r", b"retained secret", qos=1, retain=True)
        await pub.publish("open/r", b"retained open", qos=1, retain=True)
        shared, _ = await RawClient.connect(rb.port, "shared")
        assert (await shared.subscribe("$share/g/#", qos=1)).reason_codes == [1]
        plain, _ = await RawClient.connect(rb.port, "plain")
        assert (await plain.subscribe("#", qos=1)).reason_codes == [1]
        assert (await plain.receive_publish()).topic == "open/r"  # not secret/r
        # A will to a denied topic reaches nobody who may not read it.
        doomed, _ = await RawClient.connect(
            rb.port, "doomed", will=Will("secret/will", b"w", 1, False, Properties())
        )
        doomed.abort()
        await pub.publish("open/after", b"x", qos=1)
        assert (await plain.receive_publish()).topic == "open/after"
        assert (await shared.receive_publish()).topic == "open/after"
        await plain.nothing()
        await shared.nothing()
        for c in (pub, shared, plain):
            await c.close()


async def _telemetry_run(tmp_path: Path, fast: bool) -> tuple[list[Any], int]:
    """Publish telemetry, change the ACL so that topic is denied, publish
    again in the same connection: only the first readings may be ingested.
    Also returns how many telemetry PUBLISHes took the packet path."""
    ingest = MemoryIngest()
    MqttConnection.fast_telemetry = fast
    slow_calls: list[str] = []
    orig = MqttConnection._on_publish

    def spy(self: MqttConnection, p: Publish) -> None:
        slow_calls.append(p.topic)
        orig(self, p)

    MqttConnection._on_publish = spy  # type: ignore[method-assign]
    try:
        async with running_broker(tmp_path, ingest=ingest, authoriser=_acl([{"topic": "#"}])) as rb:
            c, _ = await RawClient.connect(rb.port, "d1", level=4)
            for i in range(3):  # the second and third take the fast path when on
                await c.publish("devices/d1/telemetry", b'{"v": %d}' % i, qos=1)
            rb.broker.authoriser = _acl([{"topic": "devices/d1/other"}])
            rb.broker.acl_changed()
            c.send(Publish("devices/d1/telemetry", b'{"v": 99}', 1, False, False, 9))
            await c.publish("devices/d1/other", b"{}", qos=1)  # in order after it
            await c.close()
    finally:
        MqttConnection.fast_telemetry = True
        MqttConnection._on_publish = orig  # type: ignore[method-assign]
    telemetry = sum(1 for t in slow_calls if t == "devices/d1/telemetry")
    return [r.metrics["v"] for r in ingest.readings], telemetry


async def test_acl_change_reaches_the_telemetry_fast_path(tmp_path: Path) -> None:
    slow, slow_path = await _telemetry_run(tmp_path / "slow", fast=False)
    fast, fast_path = await _telemetry_run(tmp_path / "fast", fast=True)
    assert slow == fast == [0, 1, 2]
    assert slow_path == 4
    # The fast path took publishes 1 and 2, and gave the topic back to the
    # packet path (which refused it) once the ACL changed.
    assert fast_path == 2


async def test_acl_change_disconnects_a_subscriber_now_refused(tmp_path: Path) -> None:
    async with running_broker(tmp_path, authoriser=_acl([{"topic": "#"}])) as rb:
        c, _ = await RawClient.connect(rb.port, "watcher")
        await c.subscribe("plant/#", qos=1)
        keeps, _ = await RawClient.connect(rb.port, "keeps")
        await keeps.subscribe("other/#", qos=1)
        rb.broker.authoriser = _acl([{"topic": "other/#"}])
        start = time.monotonic()
        assert rb.broker.acl_changed() == 1
        got = await c.closed()
        assert time.monotonic() - start < 1.0
        assert [p.reason_code for p in got if isinstance(p, Disconnect)] == [0x87]
        pub, _ = await RawClient.connect(rb.port, "pub")
        await pub.publish("other/x", b"1", qos=1)
        assert (await keeps.receive_publish()).topic == "other/x"
        for x in (keeps, pub):
            await x.close()


async def test_revoked_identity_is_disconnected_within_a_second_without_its_will(
    tmp_path: Path,
) -> None:
    from edgeway.devices.auth import AuthDecision, ConnectInfo, Principal

    class NameIsUser:
        async def authenticate(self, info: ConnectInfo) -> AuthDecision:
            return AuthDecision(True, Principal(info.client_id, info.username))

    async with running_broker(
        tmp_path, authenticator=NameIsUser(), authoriser=_acl([{"topic": "#"}])
    ) as rb:
        watcher, _ = await RawClient.connect(rb.port, "w", username="watcher")
        await watcher.subscribe("#", qos=1)
        victim, _ = await RawClient.connect(
            rb.port,
            "v",
            username="dev-7",
            will=Will("status/dev-7", b"gone", 1, False, Properties()),
        )
        other, _ = await RawClient.connect(rb.port, "o", username="dev-8")
        start = time.monotonic()
        assert rb.broker.revoke("dev-7") == 1
        got = await victim.closed()
        assert time.monotonic() - start < 1.0
        assert [p.reason_code for p in got if isinstance(p, Disconnect)] == [0x98]
        await other.publish("status/dev-8", b"here", qos=1)
        assert (await watcher.receive_publish()).topic == "status/dev-8"  # no will first
        await wait_until(lambda: rb.broker.counters.get("clients_revoked") == 1)
        for c in (watcher, other):
            await c.close()


async def test_topic_alias_cannot_reach_a_denied_topic(tmp_path: Path) -> None:
    rules = [{"topic": "secret/#", "access": "publish", "allow": False}, {"topic": "#"}]
    async with running_broker(tmp_path, authoriser=_acl(rules)) as rb:
        watcher, _ = await RawClient.connect(rb.port, "w")
        await watcher.subscribe("#", qos=1)
        c, _ = await RawClient.connect(rb.port, "c")
        ack = await c.publish("secret/x", b"1", qos=1, properties=Properties(topic_alias=1))
        assert ack.reason_code == 0x87
        # The alias, if it was recorded at all, still names the denied topic.
        ack = await c.publish("", b"2", qos=1, properties=Properties(topic_alias=1))
        assert ack.reason_code == 0x87
        await c.publish("open/x", b"3", qos=1)
        assert (await watcher.receive_publish()).payload == b"3"
        for x in (watcher, c):
            await x.close()


# ---------------------------------------------------------------------------
# per-address limits


class _RefuseAllBut:
    """Accepts only user ``ok``; everyone else is a bad user name or password."""

    async def authenticate(self, info: Any) -> Any:
        from edgeway.devices.auth import AuthDecision, Principal

        if info.username == "ok":
            return AuthDecision(True, Principal(info.client_id, "ok"))
        return AuthDecision(False, None, 0x86, "bad user name or password")


async def test_an_address_spraying_user_names_is_locked_out(tmp_path: Path) -> None:
    config = MqttSection.model_validate({"limits": {"max_failed_logins_per_address": 5}})
    async with running_broker(tmp_path, config=config, authenticator=_RefuseAllBut()) as rb:
        # One device retrying one wrong name does not lock the address.
        for _ in range(8):
            c, ack = await RawClient.connect(rb.port, "", username="same", expect_ok=False)
            assert ack.reason_code == 0x86
            await c.close()
        c, _ = await RawClient.connect(rb.port, "", username="ok")
        await c.close()
        # Five distinct names: locked, even for a good login, without asking
        # the authenticator.
        for i in range(4):
            c, ack = await RawClient.connect(rb.port, "", username=f"u{i}", expect_ok=False)
            assert ack.reason_code == 0x86
            await c.close()
        c, ack = await RawClient.connect(rb.port, "", username="ok", expect_ok=False)
        assert ack.reason_code == 0x8A
        await c.close()
        assert rb.broker.counters["address_locked_out"] == 1


async def test_connections_per_address_are_limited(tmp_path: Path) -> None:
    config = MqttSection.model_validate({"limits": {"max_connections_per_address": 3}})
    async with running_broker(tmp_path, config=config) as rb:
        held = [await asyncio.open_connection("127.0.0.1", rb.port) for _ in range(3)]
        await wait_until(lambda: len(rb.broker.connections) == 3)
        r, w = await asyncio.open_connection("127.0.0.1", rb.port)
        assert await asyncio.wait_for(r.read(), 5) == b""  # closed at accept
        w.close()
        assert rb.broker.dropped["max_connections_per_address"] == 1
        # One closes: a new one is let in and can CONNECT.
        held[0][1].close()
        await wait_until(lambda: len(rb.broker.connections) == 2)
        c, _ = await RawClient.connect(rb.port, "fourth")
        await c.close()
        for _, writer in held[1:]:
            writer.close()


@pytest.mark.parametrize("client_id", ["+", "#", "a/b", "dev/#"])
async def test_client_ids_with_wildcards_or_levels_gain_nothing(
    tmp_path: Path, client_id: str
) -> None:
    rules = [{"topic": "devices/{client_id}/#"}]
    async with running_broker(tmp_path, authoriser=_acl(rules)) as rb:
        c, _ = await RawClient.connect(rb.port, client_id)
        for topic in (
            "devices/other/t",
            f"devices/{client_id.replace('#', 'x')}/t",
            "devices/a/b/t",
        ):
            ack = await c.publish(topic.replace("+", "x"), b"1", qos=1)
            assert ack.reason_code == 0x87, topic
        ack = await c.subscribe("devices/#", f"devices/{client_id.replace('#', 'x')}/#", qos=1)
        assert ack.reason_codes == [0x87, 0x87]
        await c.close()

"""A session belongs to the identity that created it, and what it delivers is
checked against the read ACL of that identity when it is delivered."""

from __future__ import annotations

from pathlib import Path

import pytest
from mqtt_harness import RawClient, running_broker

from edgeway.config import AclRule
from edgeway.devices.auth import AuthDecision, ConnectInfo, Principal
from edgeway.devices.config_auth import ConfigAuthoriser
from edgeway.south.mqtt.packets import Disconnect, Properties


class NamedUsers:
    """Accepts every user name as verified (the test is about ownership)."""

    async def authenticate(self, info: ConnectInfo) -> AuthDecision:
        return AuthDecision(True, Principal(info.client_id, info.username, info.username is None))


PERSIST = Properties(session_expiry_interval=300)


@pytest.mark.parametrize("level", [4, 5])
async def test_another_identity_cannot_resume_or_end_a_session(tmp_path: Path, level: int) -> None:
    props = PERSIST if level == 5 else None
    refused = 0x85 if level == 5 else 2  # client identifier not valid / identifier rejected
    async with running_broker(tmp_path, authenticator=NamedUsers()) as rb:
        alice, _ = await RawClient.connect(
            rb.port, "dev-a", level=level, clean=False, username="alice", properties=props
        )
        await alice.subscribe("inbox/#", qos=1)
        await alice.disconnect()
        pub, _ = await RawClient.connect(rb.port, "pub", level=level)
        await pub.publish("inbox/alice", b"for alice", qos=1)
        # Mallory, a different user, claims alice's client id: resume, then clean start.
        for clean in (False, True):
            m, ack = await RawClient.connect(
                rb.port, "dev-a", level=level, clean=clean, username="mallory",
                properties=props, expect_ok=False,
            )  # fmt: skip
            assert (ack.reason_code, ack.session_present) == (refused, False)
            assert await m.closed() == []
        anon, ack = await RawClient.connect(
            rb.port, "dev-a", level=level, clean=False, properties=props, expect_ok=False
        )
        assert ack.reason_code == refused
        await anon.closed()
        # Alice still has her session, her queued message and her subscription.
        alice, ack = await RawClient.connect(
            rb.port, "dev-a", level=level, clean=False, username="alice", properties=props
        )
        assert ack.session_present
        assert (await alice.receive_publish()).payload == b"for alice"
        # While alice is online, mallory can neither take over nor kick her.
        m, ack = await RawClient.connect(
            rb.port, "dev-a", level=level, username="mallory", expect_ok=False
        )
        assert ack.reason_code == refused
        await pub.publish("inbox/x", b"still alice's", qos=1)
        assert (await alice.receive_publish()).payload == b"still alice's"
        assert rb.broker.stats().events["client_id_in_use"] == 4


async def test_the_owner_survives_a_restart(tmp_path: Path) -> None:
    async with running_broker(tmp_path, authenticator=NamedUsers()) as rb:
        a, _ = await RawClient.connect(
            rb.port, "dev-a", clean=False, username="alice", properties=PERSIST
        )
        await a.subscribe("inbox/#", qos=1)
        await a.disconnect()
    async with running_broker(tmp_path, authenticator=NamedUsers()) as rb:
        m, ack = await RawClient.connect(
            rb.port, "dev-a", clean=False, username="mallory", properties=PERSIST,
            expect_ok=False,
        )  # fmt: skip
        assert ack.reason_code == 0x85
        await m.closed()
        a, ack = await RawClient.connect(
            rb.port, "dev-a", clean=False, username="alice", properties=PERSIST
        )
        assert ack.session_present


async def test_same_identity_still_takes_over(tmp_path: Path) -> None:
    async with running_broker(tmp_path, authenticator=NamedUsers()) as rb:
        old, _ = await RawClient.connect(rb.port, "dev-a", username="alice")
        new, _ = await RawClient.connect(rb.port, "dev-a", username="alice")
        got = await old.closed()
        assert [(type(p), p.reason_code) for p in got] == [(Disconnect, 0x8E)]  # type: ignore[attr-defined]
        await new.disconnect()


async def test_read_acl_is_checked_at_delivery(tmp_path: Path) -> None:
    """A persistent session subscribed to plant/# under an open ACL; the
    gateway restarts with plant/secret/# denied. Its queued message on a now
    secret topic and new ones there are not delivered; the rest are."""
    async with running_broker(tmp_path, authenticator=NamedUsers()) as rb:
        a, _ = await RawClient.connect(
            rb.port, "dev-a", clean=False, username="alice", properties=PERSIST
        )
        await a.subscribe("plant/#", qos=1)
        await a.disconnect()
        pub, _ = await RawClient.connect(rb.port, "pub", username="ops")
        await pub.publish("plant/secret/recipe", b"queued secret", qos=1)
        await pub.publish("plant/line1", b"queued ok", qos=1)
        await pub.disconnect()
    strict = ConfigAuthoriser(
        [AclRule(topic="plant/secret/#", allow=False, access="subscribe"), AclRule(topic="plant/#")]
    )
    async with running_broker(tmp_path, authenticator=NamedUsers(), authoriser=strict) as rb:
        a, ack = await RawClient.connect(
            rb.port, "dev-a", clean=False, username="alice", properties=PERSIST
        )
        assert ack.session_present
        assert (await a.receive_publish()).payload == b"queued ok"
        pub, _ = await RawClient.connect(rb.port, "pub", username="ops")
        await pub.publish("plant/secret/recipe", b"live secret", qos=1)
        await pub.publish("plant/line2", b"live ok", qos=1)
        assert (await a.receive_publish()).payload == b"live ok"
        await a.nothing(0.2)
        assert rb.broker.stats().dropped_by_reason["read_not_authorised"] == 2

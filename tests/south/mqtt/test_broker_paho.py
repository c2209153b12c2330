"""The broker with real third-party clients in-process: paho-mqtt 2.x (3.1.1 and 5) and aiomqtt."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest
from mqtt_harness import running_broker
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

WAIT = 5.0


class PahoClient:
    """A paho client running its network loop in its own thread."""

    def __init__(self, port: int, client_id: str, protocol: int, clean: bool = True) -> None:
        self.protocol = protocol
        kwargs: dict[str, Any] = {}
        if protocol != paho.MQTTv5:
            kwargs["clean_session"] = clean
        self.c = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            **kwargs,
        )
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.connack: tuple[Any, Any] | None = None
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_connect = self._on_connect
        self.port = port
        self.clean = clean
        self.stopped = False

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connack = (flags, rc)
        self.connected.set()

    def start(self, will: tuple[str, bytes, int] | None = None, expiry: int | None = None) -> None:
        if will is not None:
            self.c.will_set(will[0], will[1], will[2])
        kwargs: dict[str, Any] = {}
        if self.protocol == paho.MQTTv5:
            kwargs["clean_start"] = self.clean
            if expiry is not None:
                p = PahoProperties(PacketTypes.CONNECT)
                p.SessionExpiryInterval = expiry
                kwargs["properties"] = p
        self.c.connect("127.0.0.1", self.port, keepalive=30, **kwargs)
        self.c.loop_start()

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.c.disconnect()
            self.c.loop_stop()


async def stop_all(clients: list[PahoClient]) -> None:
    """Stop paho clients while the broker still runs (else paho waits to reconnect)."""
    for c in clients:
        await asyncio.to_thread(c.stop)


async def wait_event(ev: threading.Event) -> None:
    assert await asyncio.to_thread(ev.wait, WAIT)


async def next_message(c: PahoClient) -> paho.MQTTMessage:
    return await asyncio.to_thread(c.messages.get, True, WAIT)


async def subscribed(c: PahoClient, topic: str, qos: int) -> None:
    done = threading.Event()
    c.c.on_subscribe = lambda *a: done.set()
    c.c.subscribe(topic, qos)
    await wait_event(done)


@pytest.fixture
def clients() -> Iterator[list[PahoClient]]:
    made: list[PahoClient] = []
    yield made
    for c in made:
        c.stop()


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5])
async def test_paho_qos_round_trips_and_retained(
    tmp_path: Path, protocol: int, clients: list[PahoClient]
) -> None:
    async with running_broker(tmp_path) as rb:
        sub = PahoClient(rb.port, "sub", protocol)
        pub = PahoClient(rb.port, "pub", protocol)
        clients += [sub, pub]
        sub.start()
        pub.start()
        await wait_event(sub.connected)
        await wait_event(pub.connected)
        await subscribed(sub, "t/#", 2)
        for qos in (0, 1, 2):
            info = pub.c.publish(f"t/{qos}", b"q%d" % qos, qos=qos)
            await asyncio.to_thread(info.wait_for_publish, WAIT)
            m = await next_message(sub)
            assert (m.topic, m.payload, m.qos) == (f"t/{qos}", b"q%d" % qos, qos)
        info = pub.c.publish("t/ret", b"kept", qos=1, retain=True)
        await asyncio.to_thread(info.wait_for_publish, WAIT)
        await next_message(sub)
        late = PahoClient(rb.port, "late", protocol)
        clients.append(late)
        late.start()
        await wait_event(late.connected)
        await subscribed(late, "t/ret", 1)
        m = await next_message(late)
        assert (m.payload, m.retain) == (b"kept", True)
        await stop_all(clients)


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5])
async def test_paho_will_and_persistent_session(
    tmp_path: Path, protocol: int, clients: list[PahoClient]
) -> None:
    async with running_broker(tmp_path) as rb:
        watcher = PahoClient(rb.port, "watch", protocol)
        clients.append(watcher)
        watcher.start()
        await wait_event(watcher.connected)
        await subscribed(watcher, "will/#", 1)
        dying = PahoClient(rb.port, "dying", protocol)
        dying.start(will=("will/dying", b"bye", 1))
        await wait_event(dying.connected)
        # Abrupt: close the socket under paho without DISCONNECT.
        dying.c.loop_stop()
        sock = dying.c.socket()
        assert sock is not None
        sock.close()
        m = await next_message(watcher)
        assert (m.topic, m.payload) == ("will/dying", b"bye")

        sub = PahoClient(rb.port, "psub", protocol, clean=False)
        sub.start(expiry=600)
        await wait_event(sub.connected)
        await subscribed(sub, "jobs/#", 1)
        await asyncio.to_thread(sub.stop)
        pub = PahoClient(rb.port, "ppub", protocol)
        clients.append(pub)
        pub.start()
        await wait_event(pub.connected)
        for i in range(3):
            info = pub.c.publish(f"jobs/{i}", b"%d" % i, qos=1)
            await asyncio.to_thread(info.wait_for_publish, WAIT)
        sub2 = PahoClient(rb.port, "psub", protocol, clean=False)
        clients.append(sub2)
        sub2.start(expiry=600)
        await wait_event(sub2.connected)
        assert sub2.connack is not None and sub2.connack[0].session_present
        got = sorted([(await next_message(sub2)).payload for _ in range(3)])
        assert got == [b"0", b"1", b"2"]
        await stop_all(clients)


async def test_aiomqtt_v5_request_response(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        async with (
            aiomqtt.Client(
                "127.0.0.1", rb.port, identifier="responder", protocol=aiomqtt.ProtocolVersion.V5
            ) as responder,
            aiomqtt.Client(
                "127.0.0.1", rb.port, identifier="requester", protocol=aiomqtt.ProtocolVersion.V5
            ) as requester,
        ):
            await responder.subscribe("svc/req", qos=1)
            await requester.subscribe("svc/resp/requester", qos=1)
            props = PahoProperties(PacketTypes.PUBLISH)
            props.ResponseTopic = "svc/resp/requester"
            props.CorrelationData = b"c-1"
            await requester.publish("svc/req", b"ping", qos=1, properties=props)
            async with asyncio.timeout(WAIT):
                async for msg in responder.messages:
                    assert msg.properties is not None
                    rp = PahoProperties(PacketTypes.PUBLISH)
                    rp.CorrelationData = msg.properties.CorrelationData
                    await responder.publish(
                        msg.properties.ResponseTopic, b"pong", qos=1, properties=rp
                    )
                    break
                async for msg in requester.messages:
                    assert msg.payload == b"pong"
                    assert msg.properties is not None
                    assert msg.properties.CorrelationData == b"c-1"
                    break

"""Helpers for tests of simulated devices against a real in-process gateway
(tests/sim): a gateway config with receipts on and the bundled cloud
receiver as its sink, a context that runs a gateway, polling waits."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeway.config import (
    Config,
    GatewaySection,
    ListenerConfig,
    MqttSection,
    ReceiptsSection,
    SinkConfig,
)
from edgeway.gateway import Gateway
from edgeway.sim.cloud import CloudReceiver


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until(predicate: Callable[[], bool], limit: float = 20.0) -> None:
    """Poll a condition that has no event of its own (counters of other parts); bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def gateway_config(
    data_dir: Path, cloud: CloudReceiver, mqtt_port: int = 0, **extra: Any
) -> Config:
    """An anonymous MQTT listener, receipts on, the cloud receiver as the sink."""
    return Config(
        gateway=GatewaySection(id="gw-sim", data_dir=data_dir),
        mqtt=MqttSection(
            listeners=[ListenerConfig(bind=f"127.0.0.1:{mqtt_port}", allow_anonymous=True)]
        ),
        sinks=[SinkConfig(name="cloud", url=cloud.url)],
        receipts=ReceiptsSection(enabled=True),
        **extra,
    )


@contextlib.asynccontextmanager
async def running(gw: Gateway) -> AsyncIterator[Gateway]:
    """Run ``gw`` until the block ends (ready when the block starts)."""
    task = asyncio.create_task(gw.run())
    try:
        await asyncio.wait_for(gw.ready.wait(), 15)
        yield gw
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 15)


@contextlib.asynccontextmanager
async def cloud_receiver(tmp_path: Path) -> AsyncIterator[CloudReceiver]:
    """The bundled cloud receiver on a free port, storing to tmp_path/cloud.jsonl."""
    c = CloudReceiver(store_path=tmp_path / "cloud.jsonl")
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


def records(cloud: CloudReceiver) -> list[dict[str, Any]]:
    """What the cloud stored (its JSON lines file)."""
    assert cloud.store_path is not None
    if not cloud.store_path.exists():
        return []
    return [orjson.loads(line) for line in cloud.store_path.read_bytes().splitlines()]


def devices_seen(cloud: CloudReceiver) -> set[str]:
    """Device ids the cloud has records of."""
    return {r["device_id"] for r in records(cloud)}


def mqtt_requests(
    port: int, answers_on: str, requests: Sequence[tuple[str, bytes]], client_id: str = "operator"
) -> list[bytes]:
    """With paho (MQTT 5, blocking: run it in a thread), subscribe to
    ``answers_on``, then publish each (topic, payload) at QoS 1 and wait for
    one answer after each; the answers."""
    answers: list[bytes] = []
    got = threading.Semaphore(0)
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)

    def on_message(c: Any, u: Any, msg: Any) -> None:
        answers.append(msg.payload)
        got.release()

    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.subscribe(answers_on, qos=1)
        assert subscribed.wait(5), "no SUBACK"
        for topic, payload in requests:
            client.publish(topic, payload, qos=1).wait_for_publish(5)
            assert got.acquire(timeout=10), f"no answer on {answers_on}"
    finally:
        client.disconnect()
        client.loop_stop()
    return answers
